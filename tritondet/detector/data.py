"""Detection data: the built-in synthetic shapes set, COCO and Pascal VOC datasets, the paper's
preprocessing, and the data loader.

Shape shorthand: N objects in an image, K object classes (labels 1..K, 0 is the background),
H x W image height and width, B images in a batch.

One sample is ``(image, target)``:

- ``image``: ``Tensor[3, H, W]`` float32 in [0, 1], RGB, *not* normalized. Mean/std normalization
  belongs to the model (as in torchvision's ``GeneralizedRCNNTransform``), with torchvision's
  ImageNet statistics ``IMAGENET_MEAN = (0.485, 0.456, 0.406)``, ``IMAGENET_STD = (0.229, 0.224, 0.225)``,
  so that torchvision's pretrained backbones and detector weights apply unchanged.
- ``target``: a dict with
  ``boxes`` ``Tensor[N, 4]`` float32, (x1, y1, x2, y2) in pixels of ``image``;
  ``labels`` ``Tensor[N]`` int64 in 1..K;
  ``image_id`` ``int`` (the id in the dataset's ``coco`` ground truth, for evaluation);
  ``orig_size`` ``Tensor[2]`` int64, (H, W) of the image file, before any resizing, so that predictions
  can be mapped back with :func:`resize_boxes` for evaluation;
  VOC samples also carry ``difficult`` ``Tensor[N]`` bool.

Both datasets expose ``categories`` (class names indexed by label, ``categories[0] == "__background__"``),
``label_to_category_id`` (label -> category id of ``coco``) and ``coco``, a ``pycocotools.coco.COCO``
ground truth holding exactly the images and annotations the dataset serves (bad annotations skipped),
which :func:`tritondet.detector.evaluate.evaluate_coco` takes.

The synthetic set (:func:`ensure_synthetic_dataset`) is generated once, deterministically from a seed,
into a cache folder in COCO format; it needs no download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ..ops._checks import check_choice

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "CocoDetection",
    "DetectionTransform",
    "SyntheticConfig",
    "SyntheticPaths",
    "VOCDetection",
    "collate_detection",
    "default_cache_dir",
    "ensure_synthetic_dataset",
    "generate_synthetic_split",
    "make_data_loader",
    "resize_boxes",
    "resize_image_and_boxes",
]

# torchvision's ImageNet statistics (``GeneralizedRCNNTransform``'s defaults); the model normalizes with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

BAD_DATA_CHOICES = ("skip", "raise")
_MAX_REPORTED_PROBLEMS = 20  # lines in a bad-data warning or error; the rest are counted


# ---------------------------------------------------------------------------------------------------------------------
# Bad-data reporting
# ---------------------------------------------------------------------------------------------------------------------


def _report_problems(problems: list[str], on_bad: str, what: str) -> None:
    """Warn about (``on_bad="skip"``) or raise ``ValueError`` for (``"raise"``) the problems found."""
    if not problems:
        return
    shown = problems[:_MAX_REPORTED_PROBLEMS]
    more = len(problems) - len(shown)
    text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
    if on_bad == "raise":
        raise ValueError(f"bad data in {what} ({len(problems)} problems):\n  {text}")
    warnings.warn(f"skipping bad data in {what} ({len(problems)} problems):\n  {text}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    """One image and its annotations, as the dataset serves them (boxes in the file's pixels)."""

    path: Path
    image_id: int
    boxes: np.ndarray  # [N, 4] float32 xyxy
    labels: np.ndarray  # [N] int64 in 1..K
    difficult: np.ndarray | None = None  # [N] bool (VOC only)


class _DetectionDataset(Dataset):
    """Shared ``__getitem__``: decode the image, build the target, apply ``transforms``."""

    categories: list[str]
    label_to_category_id: dict[int, int]
    coco: COCO

    def __init__(self, transforms: Callable | None) -> None:
        self.transforms = transforms
        self._samples: list[_Sample] = []

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def num_classes(self) -> int:
        """K + 1: the object classes and the background (the detector's ``num_classes``)."""
        return len(self.categories)

    @property
    def image_ids(self) -> list[int]:
        return [sample.image_id for sample in self._samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        sample = self._samples[index]
        try:
            with Image.open(sample.path) as file:
                pixels = np.array(file.convert("RGB"))
        except OSError as error:
            raise ValueError(f"cannot read image {sample.path} (image id {sample.image_id}): {error}") from error
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        height, width = image.shape[-2:]
        boxes = torch.from_numpy(sample.boxes).reshape(-1, 4).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(sample.labels).clone(),
            "image_id": sample.image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if sample.difficult is not None:
            target["difficult"] = torch.from_numpy(sample.difficult).clone()
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class CocoDetection(_DetectionDataset):
    """A COCO-format detection dataset: an image folder and an instances JSON, read with pycocotools.

    Args:
        image_dir: folder the images' ``file_name`` entries are relative to.
        annotation_file: the COCO instances JSON.
        transforms: ``(image, target) -> (image, target)``, e.g. :class:`DetectionTransform`.
        on_bad: what to do with bad data (a missing image file, an annotation with non-positive
            width or height, a box outside its image, an unknown category or image id):
            ``"skip"`` warns and leaves out the bad annotation (the image, for a missing file),
            ``"raise"`` raises ``ValueError``. Every problem names the file and annotation id.
        remove_images_without_annotations: leave out images with no (non-crowd) annotation.

    Labels are the categories in increasing id order, mapped to 1..K. Crowd annotations
    (``iscrowd=1``) are not training targets but stay in ``coco`` for evaluation, where COCOeval
    ignores detections matched to them.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Callable | None = None,
        on_bad: str = "skip",
        remove_images_without_annotations: bool = False,
    ) -> None:
        super().__init__(transforms)
        check_choice("on_bad", on_bad, BAD_DATA_CHOICES)
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(self.annotation_file))
        category_ids = sorted(coco.cats)
        self.categories = ["__background__"] + [coco.cats[c]["name"] for c in category_ids]
        self.label_to_category_id = {label: c for label, c in enumerate(category_ids, start=1)}
        category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}

        problems: list[str] = []
        where = str(self.annotation_file)
        kept_images = []
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            path = self.image_dir / info["file_name"]
            if not path.is_file():
                problems.append(f"{where}: image id {image_id}: image file {path} is missing")
                continue
            kept_images.append(info)
        known_images = {info["id"]: info for info in kept_images}

        kept_annotations = []
        for ann in coco.dataset.get("annotations", []):
            problem = self._annotation_problem(ann, coco, category_id_to_label)
            if problem is not None:
                image = coco.imgs.get(ann.get("image_id"), {}).get("file_name", "?")
                problems.append(f"{where}: annotation id {ann.get('id')} (image {image}): {problem}")
            elif ann["image_id"] in known_images:
                # COCOeval reads "iscrowd" and "area", which hand-made files may leave out.
                _, _, w, h = (float(v) for v in ann["bbox"])
                kept_annotations.append({"iscrowd": 0, "area": w * h, **ann})
        _report_problems(problems, on_bad, where)

        per_image: dict[int, list[dict]] = {image_id: [] for image_id in known_images}
        for ann in kept_annotations:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(ann)
        if remove_images_without_annotations:
            kept_images = [info for info in kept_images if per_image[info["id"]]]
            kept_ids = {info["id"] for info in kept_images}
            kept_annotations = [ann for ann in kept_annotations if ann["image_id"] in kept_ids]

        for info in kept_images:
            anns = per_image[info["id"]]
            xywh = np.array([ann["bbox"] for ann in anns], dtype=np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            labels = np.array([category_id_to_label[ann["category_id"]] for ann in anns], dtype=np.int64)
            self._samples.append(_Sample(self.image_dir / info["file_name"], info["id"], boxes, labels))
        self.coco = _make_coco(
            {
                **coco.dataset,
                "images": kept_images,
                "annotations": kept_annotations,
                "categories": list(coco.cats.values()),
            }
        )

    @staticmethod
    def _annotation_problem(ann: dict, coco: COCO, category_id_to_label: dict[int, int]) -> str | None:
        if ann.get("image_id") not in coco.imgs:
            return f"unknown image id {ann.get('image_id')}"
        if ann.get("category_id") not in category_id_to_label:
            return f"unknown category id {ann.get('category_id')}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return f"bbox must be [x, y, width, height], got {bbox!r}"
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            return f"bbox must hold numbers, got {bbox!r}"
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            return f"bbox has non-finite values {bbox}"
        if w <= 0 or h <= 0:
            return f"non-positive width or height in bbox {bbox}"
        info = coco.imgs[ann["image_id"]]
        if (
            "width" in info
            and "height" in info
            and (x >= info["width"] or y >= info["height"] or x + w <= 0 or y + h <= 0)
        ):
            return f"bbox {bbox} lies outside its {info['width']}x{info['height']} image"
        return None


class VOCDetection(_DetectionDataset):
    """A Pascal VOC detection dataset in the VOC 2007 layout.

    ``root`` holds ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<split>.txt``
    (e.g. ``VOCdevkit/VOC2007``). VOC boxes are 1-based inclusive pixel indices; they become
    continuous coordinates ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2's convention).

    Args:
        root: the VOC year folder.
        split: a file name in ``ImageSets/Main`` without ``.txt`` (``train``, ``val``, ``trainval``, ``test``).
        transforms: ``(image, target) -> (image, target)``.
        classes: the class names, labels 1..K in this order (default: the 20 VOC classes).
        keep_difficult: keep ``difficult`` objects in the training targets (flagged in
            ``target["difficult"]``); they are always in ``coco``, as crowd regions, so that
            COCOeval ignores them as the VOC benchmark does.
        on_bad: ``"skip"`` or ``"raise"`` for a missing or malformed annotation file, a missing image
            file, an unknown class name, or a box with non-positive width or height; problems name the XML file and object index.

    Image ids are the 1-based positions in the split file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "trainval",
        transforms: Callable | None = None,
        classes: Sequence[str] = VOC_CLASSES,
        keep_difficult: bool = True,
        on_bad: str = "skip",
    ) -> None:
        super().__init__(transforms)
        check_choice("on_bad", on_bad, BAD_DATA_CHOICES)
        self.root = Path(root)
        self.split = split
        self.categories = ["__background__", *classes]
        self.label_to_category_id = {label: label for label in range(1, len(self.categories))}
        label_of = {name: label for label, name in enumerate(self.categories) if label > 0}
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise ValueError(f"VOC split file {split_file} does not exist")
        names = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]

        problems: list[str] = []
        images, annotations = [], []
        for image_id, name in enumerate(names, start=1):
            xml_path = self.root / "Annotations" / f"{name}.xml"
            if not xml_path.is_file():
                problems.append(f"{xml_path}: annotation file is missing")
                continue
            try:
                tree = ET.parse(xml_path).getroot()
            except ET.ParseError as error:
                problems.append(f"{xml_path}: malformed XML ({error})")
                continue
            file_name = tree.findtext("filename") or f"{name}.jpg"
            image_path = self.root / "JPEGImages" / file_name
            if not image_path.is_file():
                problems.append(f"{xml_path}: image file {image_path} is missing")
                continue
            width, height = int(float(tree.findtext("size/width") or 0)), int(float(tree.findtext("size/height") or 0))
            if width <= 0 or height <= 0:
                with Image.open(image_path) as header:
                    width, height = header.size
            boxes, labels, difficult = [], [], []
            for index, obj in enumerate(tree.iter("object")):
                class_name = (obj.findtext("name") or "").strip()
                try:
                    x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    problems.append(f"{xml_path}: object {index} ({class_name}): missing or malformed bndbox")
                    continue
                if class_name not in label_of:
                    problems.append(f"{xml_path}: object {index}: unknown class name {class_name!r}")
                elif x2 - x1 + 1 <= 0 or y2 - y1 + 1 <= 0:
                    problems.append(
                        f"{xml_path}: object {index} ({class_name}): non-positive width or height in box {[x1, y1, x2, y2]}"
                    )
                else:
                    boxes.append([x1 - 1, y1 - 1, x2, y2])
                    labels.append(label_of[class_name])
                    difficult.append(obj.findtext("difficult", "0").strip() == "1")
            boxes_np = np.array(boxes, dtype=np.float32).reshape(-1, 4)
            labels_np, difficult_np = np.array(labels, dtype=np.int64), np.array(difficult, dtype=bool)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for box, label, hard in zip(boxes_np.tolist(), labels_np.tolist(), difficult_np.tolist(), strict=True):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": int(hard),
                    }
                )
            if not keep_difficult:
                boxes_np, labels_np, difficult_np = (
                    boxes_np[~difficult_np],
                    labels_np[~difficult_np],
                    difficult_np[~difficult_np],
                )
            self._samples.append(_Sample(image_path, image_id, boxes_np, labels_np, difficult_np))
        _report_problems(problems, on_bad, str(split_file))
        categories = [{"id": label, "name": name} for label, name in enumerate(self.categories) if label > 0]
        self.coco = _make_coco({"images": images, "annotations": annotations, "categories": categories})


def _make_coco(dataset: dict) -> COCO:
    """A ``pycocotools.coco.COCO`` over an in-memory dataset dict."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing (the paper's: shorter side 600, longer side at most 1000, horizontal flip in training)
# ---------------------------------------------------------------------------------------------------------------------


def resize_boxes(boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> torch.Tensor:
    """Scale ``boxes`` ``Tensor[N, 4]`` (xyxy) from an image of ``from_size`` (H, W) to one of ``to_size`` (H, W).

    Maps detections on a resized image back to the original image (``to_size = target["orig_size"]``)
    for evaluation.
    """
    scale_h = float(to_size[0]) / float(from_size[0])
    scale_w = float(to_size[1]) / float(from_size[1])
    scale = torch.tensor([scale_w, scale_h, scale_w, scale_h], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def resize_image_and_boxes(
    image: torch.Tensor, boxes: torch.Tensor | None, min_size: int, max_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize ``image`` ``Tensor[3, H, W]`` so its shorter side is ``min_size`` unless that makes the longer
    side exceed ``max_size``, in which case the longer side is ``max_size`` (Fast/Faster R-CNN's rule).

    Bilinear, ``align_corners=False``, no antialiasing, as torchvision's ``GeneralizedRCNNTransform``;
    output sides are rounded to the nearest pixel (torchvision floors), so the shorter side is exactly
    ``min_size``. ``boxes`` ``Tensor[N, 4]`` are scaled by the per-axis size ratios.
    """
    height, width = image.shape[-2:]
    scale = min(min_size / min(height, width), max_size / max(height, width))
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_height, new_width) != (height, width):
        image = F.interpolate(image[None], size=(new_height, new_width), mode="bilinear", align_corners=False)[0]
        if boxes is not None:
            boxes = resize_boxes(boxes, (height, width), (new_height, new_width))
    return image, boxes


@dataclass
class DetectionTransform:
    """The paper's preprocessing for one ``(image, target)`` sample.

    Resizes so that the shorter side is ``min_size`` and the longer at most ``max_size`` (boxes scaled),
    then, when ``train``, flips horizontally with probability ``flip_prob``. Normalization (mean/std)
    is not done here: the model does it (see the module docstring).

    The flip draws from ``generator`` when given, else from torch's global generator: in
    :func:`make_data_loader`'s worker processes that one is seeded from the loader's ``seed``; with
    ``num_workers=0`` it is the main process's (seed it with ``torch.manual_seed`` for a reproducible run).
    """

    min_size: int = 600  # the paper's shorter side (Fast R-CNN, Faster R-CNN Section 3.3)
    max_size: int = 1000  # the paper's cap on the longer side
    train: bool = False  # flip only in training
    flip_prob: float = 0.5  # the paper flips half of the training images
    generator: torch.Generator | None = None

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        target = dict(target)
        image, boxes = resize_image_and_boxes(image, target.get("boxes"), self.min_size, self.max_size)
        if boxes is not None:
            target["boxes"] = boxes
        if self.train and torch.rand((), generator=self.generator).item() < self.flip_prob:
            image = image.flip(-1)
            boxes = target.get("boxes")
            if boxes is not None:
                width = image.shape[-1]
                target["boxes"] = torch.stack(
                    [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
                )
        return image, target


# ---------------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------------


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target)] * B`` -> ``(images, targets)``: two lists of length B; images keep their own sizes."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of ``(images, targets)`` lists (:func:`collate_detection`), reproducible from ``seed``.

    With ``distributed`` (an initialized ``torch.distributed`` process group), a ``DistributedSampler``
    gives each rank its share; call ``loader.sampler.set_epoch(epoch)`` every epoch so the shuffle
    changes. Note that it pads the last round with repeated images so every rank gets the same count:
    deduplicate by ``image_id`` when gathering evaluation results. Otherwise a seeded ``RandomSampler``
    (``shuffle``) or a ``SequentialSampler``. The loader's generator, seeded with ``seed``, also
    seeds each worker process's torch generator (and so :class:`DetectionTransform`'s flips); with
    ``num_workers=0`` the transforms draw from the main process's generator instead.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be non-negative, got {num_workers}")
    generator = torch.Generator().manual_seed(seed)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        drop_last=drop_last,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic shapes data set
# ---------------------------------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "star", "ellipse", "rectangle")
# Bump when the drawing recipe changes: the cache folder name includes it, so old caches are not reused.
SYNTHETIC_VERSION = 1


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic data set's recipe. Every field goes into the cache folder's name (a hash).

    Objects (``SYNTHETIC_CLASSES``): circles and squares (aspect 1), stars (aspect 0.8-1.25),
    triangles (0.5-2, pointing up/down/left/right), ellipses and rectangles (tall or wide, aspect
    ratios 1.6-3.5 and 1.8-4 either way) -- so all three anchor ratios (1:2, 1:1, 2:1) have objects.
    Later objects may hide up to ``max_occlusion`` of earlier ones; boxes and areas are those of the
    visible pixels (COCO's convention). Backgrounds are textured (smooth colour noise, stripes, checks,
    gradients) with clutter (lines, crosses, scribbles, arcs) that belongs to no class.
    """

    seed: int = 0
    num_train: int = 2000  # sized for a ~15-minute CPU run (~1 min to generate on 2 cores); not yet tuned by training
    num_val: int = 200
    image_size: int = 256  # shorter side in pixels; small for CPU training
    max_aspect: float = 4 / 3  # the longer side is uniform in [image_size, image_size * max_aspect]
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.1  # sqrt(object box area) / shorter image side
    max_scale: float = 0.5
    max_occlusion: float = 0.5  # the largest fraction of an object's pixels later objects may cover
    max_distractors: int = 6  # clutter items per image, uniform in [0, max_distractors]

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError(f"num_train and num_val must be non-negative, got {self.num_train}, {self.num_val}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be at least 1, got {self.max_aspect}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 0.9:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 0.9, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.max_occlusion < 1:
            raise ValueError(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")

    def stamp(self) -> dict:
        return {"version": SYNTHETIC_VERSION, **dataclasses.asdict(self)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.stamp(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`ensure_synthetic_dataset` put the data set; pass a pair to :class:`CocoDetection`."""

    root: Path
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path
    config: SyntheticConfig = field(default_factory=SyntheticConfig)


def default_cache_dir() -> Path:
    """``$TRITONDET_CACHE/data`` if set, else ``~/.cache/tritondet/data``."""
    base = os.environ.get("TRITONDET_CACHE")
    return Path(base) / "data" if base else Path.home() / ".cache" / "tritondet" / "data"


def _paths(folder: Path, config: SyntheticConfig) -> SyntheticPaths:
    return SyntheticPaths(
        root=folder,
        train_images=folder / "train",
        train_annotations=folder / "annotations" / "instances_train.json",
        val_images=folder / "val",
        val_annotations=folder / "annotations" / "instances_val.json",
        config=config,
    )


def ensure_synthetic_dataset(
    root: str | os.PathLike | None = None,
    config: SyntheticConfig | None = None,
    workers: int | None = None,
    **overrides,
) -> SyntheticPaths:
    """Generate the synthetic data set under ``root`` unless it is already there; return its paths.

    ``overrides`` replace fields of ``config`` (default :class:`SyntheticConfig`), e.g.
    ``ensure_synthetic_dataset(root, seed=0, num_train=500, num_val=100)``. The data set lives in
    ``root/synthetic-v<version>-<hash of the recipe>``, so a changed recipe or version regenerates
    into a new folder. Generation writes to a temporary folder renamed into place at the end: an
    interrupted run leaves no half data set, and processes racing (e.g. ranks of one job) are safe.
    ``workers`` processes draw the images (default: the CPU count, at most 8); the bytes do not
    depend on it.
    """
    config = dataclasses.replace(config or SyntheticConfig(), **overrides)
    root = Path(root) if root is not None else default_cache_dir()
    folder = root / f"synthetic-v{SYNTHETIC_VERSION}-{config.digest()}"
    stamp_file = folder / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == config.stamp():
        return _paths(folder, config)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    paths = _paths(staging, config)
    paths.train_annotations.parent.mkdir(parents=True)
    generate_synthetic_split(config, "train", paths.train_images, paths.train_annotations, workers)
    generate_synthetic_split(config, "val", paths.val_images, paths.val_annotations, workers)
    (staging / "stamp.json").write_text(json.dumps(config.stamp(), sort_keys=True, indent=1) + "\n")
    if folder.exists() and not stamp_file.is_file():
        shutil.rmtree(folder)  # a folder without a stamp is not ours to keep (e.g. copied by hand, incomplete)
    try:
        staging.rename(folder)
    except OSError:
        if not stamp_file.is_file():  # not another process finishing first: a real error
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return _paths(folder, config)


_SPLIT_CODES = {"train": 0, "val": 1}  # part of every image's seed, so the splits never share an image
# PNG compression level 1: 3x faster to write than the default 6 for files ~35% larger (~45 KB at 256 px).
_PNG_COMPRESS_LEVEL = 1
# Below this many images a process pool costs more than it saves.
_MIN_IMAGES_PER_POOL = 64


def generate_synthetic_split(
    config: SyntheticConfig, split: str, image_dir: Path, annotation_file: Path, workers: int | None = None
) -> None:
    """Draw the ``split`` ("train" or "val") images into ``image_dir`` as PNGs and write the COCO JSON.

    Image i is drawn from ``numpy.random.default_rng([seed, split code, i])`` alone, so images are
    independent of each other, of the split sizes and of the number of ``workers`` processes.
    """
    check_choice("split", split, _SPLIT_CODES)
    count = config.num_train if split == "train" else config.num_val
    image_dir.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    draw = functools.partial(_write_synthetic_image, config, _SPLIT_CODES[split], image_dir)
    if workers > 1 and count >= _MIN_IMAGES_PER_POOL:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            drawn = pool.map(draw, range(count), chunksize=16)
    else:
        drawn = [draw(index) for index in range(count)]
    images, annotations = [], []
    for image, objects in drawn:
        images.append(image)
        for ann in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], **ann})
    coco = {
        "info": {"description": "tritondet synthetic shapes", "split": split, **config.stamp()},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SYNTHETIC_CLASSES)
        ],
    }
    annotation_file.write_text(json.dumps(coco, separators=(",", ":")))


def _write_synthetic_image(config: SyntheticConfig, split_code: int, image_dir: Path, index: int):
    """Draw and save image ``index``; return its COCO image record and annotations (without ids)."""
    pixels, objects = _draw_image(np.random.default_rng([config.seed, split_code, index]), config)
    file_name = f"{index:06d}.png"
    Image.fromarray(pixels).save(image_dir / file_name, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    height, width = pixels.shape[:2]
    image = {"id": index + 1, "file_name": file_name, "width": width, "height": height}
    annotations = []
    for category, visible in objects:
        rows, cols = np.nonzero(visible.any(axis=1))[0], np.nonzero(visible.any(axis=0))[0]
        x1, y1, x2, y2 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        rle = coco_mask.encode(np.asfortranarray(visible.astype(np.uint8)))
        annotations.append(
            {
                "category_id": category + 1,
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "area": float(visible.sum()),
                "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            }
        )
    return image, annotations


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _object_aspect(rng: np.random.Generator, name: str) -> float:
    """Width / height of an object's box."""
    tall_or_wide = 1.0 if rng.random() < 0.5 else -1.0
    if name == "ellipse":
        return _log_uniform(rng, 1.6, 3.5) ** tall_or_wide  # clearly not a circle
    if name == "rectangle":
        return _log_uniform(rng, 1.8, 4.0) ** tall_or_wide  # clearly not a square
    if name == "triangle":
        return _log_uniform(rng, 0.5, 2.0)
    if name == "star":
        return _log_uniform(rng, 0.8, 1.25)
    return 1.0


def _shape_mask(rng: np.random.Generator, name: str, box: tuple[float, float, float, float], size: tuple[int, int]):
    """Boolean ``[H, W]`` mask of shape ``name`` filling ``box`` (x1, y1, x2, y2)."""
    height, width = size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1, x2, y2 = box
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if name in ("circle", "ellipse"):
        draw.ellipse(box, fill=255)
    elif name in ("square", "rectangle"):
        draw.rectangle(box, fill=255)
    elif name == "triangle":
        apex = [(cx, y1), (x2, y2), (x1, y2)]  # pointing up; then one of four orientations
        direction = int(rng.integers(4))
        if direction == 1:
            apex = [(cx, y2), (x1, y1), (x2, y1)]
        elif direction == 2:
            apex = [(x1, cy), (x2, y1), (x2, y2)]
        elif direction == 3:
            apex = [(x2, cy), (x1, y1), (x1, y2)]
        draw.polygon(apex, fill=255)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)  # inner/outer radius: a clear five-pointed star
        turn = rng.uniform(0, 2 * math.pi)
        angles = turn + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        draw.polygon(
            list(zip(cx + hw * radii * np.cos(angles), cy + hh * radii * np.sin(angles), strict=True)), fill=255
        )
    return np.asarray(canvas) > 127


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int, channels: int) -> np.ndarray:
    """``[H, W, channels]`` smooth noise in [0, 1]: a ``cells``-wide random grid upsampled bilinearly."""
    height, width = size
    grid = rng.uniform(0, 255, size=(cells, cells, channels)).astype(np.uint8)
    layers = [
        np.asarray(Image.fromarray(grid[..., c]).resize((width, height), Image.BILINEAR)) for c in range(channels)
    ]
    return np.stack(layers, axis=-1).astype(np.float32) / 255.0


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, 3]`` float32 textured background."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    color_a, color_b = _random_color(rng), _random_color(rng)
    kind = int(rng.integers(4))
    if kind == 0:  # smooth colour noise
        return _smooth_noise(rng, size, int(rng.integers(3, 10)), 3)
    if kind == 1:  # stripes at a random angle
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        mix = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    elif kind == 2:  # checks
        cell = int(rng.integers(8, 40))
        mix = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:  # linear gradient
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        mix = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    # Low-contrast textures keep objects the most salient things in the image.
    color_b = color_a + rng.uniform(0.2, 0.5) * (color_b - color_a)
    image = color_a + mix[..., None] * (color_b - color_a)
    return 0.8 * image + 0.2 * _smooth_noise(rng, size, int(rng.integers(3, 10)), 3)


def _draw_distractors(rng: np.random.Generator, canvas: Image.Image, count: int, short: int) -> None:
    """Clutter of no class: lines, crosses, scribbles and arcs."""
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for _ in range(count):
        color = tuple(int(v) for v in rng.integers(0, 256, size=3))
        line_width = int(rng.integers(1, 4))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        extent = float(rng.uniform(0.05, 0.3)) * short
        kind = int(rng.integers(4))
        if kind == 0:  # a line
            angle = rng.uniform(0, 2 * math.pi)
            draw.line(
                [(x, y), (x + extent * math.cos(angle), y + extent * math.sin(angle))], fill=color, width=line_width
            )
        elif kind == 1:  # a cross
            half = extent / 4
            draw.line([(x - half, y), (x + half, y)], fill=color, width=line_width)
            draw.line([(x, y - half), (x, y + half)], fill=color, width=line_width)
        elif kind == 2:  # a scribble: a short random walk
            steps = rng.normal(0, extent / 4, size=(int(rng.integers(3, 8)), 2)).cumsum(axis=0) + np.array([x, y])
            draw.line([tuple(p) for p in steps.tolist()], fill=color, width=line_width)
        else:  # an open arc
            start = float(rng.uniform(0, 360))
            draw.arc(
                [x, y, x + extent, y + extent], start, start + float(rng.uniform(60, 200)), fill=color, width=line_width
            )


def _draw_image(rng: np.random.Generator, config: SyntheticConfig) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One synthetic image ``uint8 [H, W, 3]`` and its objects as (class index, visible mask ``bool [H, W]``)."""
    short = config.image_size
    long = int(rng.integers(short, int(short * config.max_aspect) + 1))
    height, width = (short, long) if rng.random() < 0.5 else (long, short)
    background = _background(rng, (height, width))
    canvas = Image.fromarray((background.clip(0, 1) * 255).astype(np.uint8))
    _draw_distractors(rng, canvas, int(rng.integers(0, config.max_distractors + 1)), short)
    image = np.asarray(canvas).astype(np.float32) / 255.0

    owner = np.full((height, width), -1, dtype=np.int32)  # which object each pixel shows (-1: background)
    full_areas: list[int] = []
    classes: list[int] = []
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(wanted * 10):  # placement attempts; a crowded image may end up with fewer objects
        if len(classes) == wanted:
            break
        category = int(rng.integers(len(SYNTHETIC_CLASSES)))
        name = SYNTHETIC_CLASSES[category]
        scale = _log_uniform(rng, config.min_scale, config.max_scale) * short
        aspect = _object_aspect(rng, name)
        box_w, box_h = min(scale * math.sqrt(aspect), width - 2), min(scale / math.sqrt(aspect), height - 2)
        x1, y1 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
        mask = _shape_mask(rng, name, (x1, y1, x1 + box_w, y1 + box_h), (height, width))
        area = int(mask.sum())
        if area < 16:
            continue
        if classes:
            covered = np.bincount(owner[mask] + 1, minlength=len(classes) + 1)[1:]
            remaining = np.bincount(owner.ravel() + 1, minlength=len(classes) + 1)[1:] - covered
            if np.any(remaining < (1 - config.max_occlusion) * np.asarray(full_areas)):
                continue
        under = image[mask].mean(axis=0)
        for _ in range(10):  # a fill colour that stands out from what it covers
            color = _random_color(rng)
            if np.linalg.norm(color - under) > 0.45:
                break
        shading = _smooth_noise(rng, (height, width), 4, 1)[mask]  # mild texture on the object
        image[mask] = color * (0.85 + 0.3 * shading)
        owner[mask] = len(classes)
        full_areas.append(area)
        classes.append(category)
    pixels = (image.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    return pixels, [(category, owner == i) for i, category in enumerate(classes)]
