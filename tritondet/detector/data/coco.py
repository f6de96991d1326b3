"""COCO-format detection datasets, and what every dataset here shares: one sample's decoding and target,
bad-data reporting, and the in-memory ``pycocotools`` ground truth evaluation takes.

Shape shorthand: N objects in an image, K object classes (labels 1..K, 0 is the background),
H x W image height and width.

One sample is ``(image, target)``:

- ``image``: ``Tensor[3, H, W]`` float32 in [0, 1], RGB, at the file's size, *not* normalized: resizing
  and mean/std normalization belong to the model (torchvision's ``GeneralizedRCNNTransform``, with
  ``TransformConfig``'s sizes and ImageNet statistics), so that torchvision's pretrained backbones and
  detector weights apply unchanged and images are resized once.
- ``target``: a dict with
  ``boxes`` ``Tensor[N, 4]`` float32, (x1, y1, x2, y2) in pixels of ``image``;
  ``labels`` ``Tensor[N]`` int64 in 1..K;
  ``image_id`` ``int`` (the id in the dataset's ``coco`` ground truth, for evaluation);
  ``orig_size`` ``Tensor[2]`` int64, (H, W) of the image file, so that predictions on an image a
  transform resized can be mapped back with :func:`~.transforms.resize_boxes` for evaluation;
  VOC samples also carry ``difficult`` ``Tensor[N]`` bool; COCO samples read with ``masks=True``
  carry ``masks`` ``Tensor[N, H, W]`` uint8 (1 inside the instance: its polygons or RLE decoded by
  ``pycocotools`` at the image's size).

Every dataset exposes ``categories`` (class names indexed by label, ``categories[0] == "__background__"``),
``label_to_category_id`` (label -> category id of ``coco``) and ``coco``, a ``pycocotools.coco.COCO``
ground truth holding exactly the images and annotations the dataset serves (bad annotations skipped),
which :func:`tritondet.detector.evaluate.evaluate_coco` takes.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from ...ops._checks import check_choice

BAD_DATA_CHOICES = ("skip", "raise")
_MAX_REPORTED_PROBLEMS = 20  # lines in a bad-data warning or error; the rest are counted


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP or GIF) as ``Tensor[3, H, W]`` float32 RGB in [0, 1]; ``RuntimeError``
    when the file is missing or not an image of those formats."""
    pixels = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    return pixels.float().div_(255.0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad-data reporting
# ---------------------------------------------------------------------------------------------------------------------


def report_problems(problems: list[str], on_bad: str, what: str) -> None:
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
class Sample:
    """One image and its annotations, as the dataset serves them (boxes in the file's pixels)."""

    path: Path
    image_id: int
    boxes: np.ndarray  # [N, 4] float32 xyxy
    labels: np.ndarray  # [N] int64 in 1..K
    difficult: np.ndarray | None = None  # [N] bool (VOC only)
    segmentations: list | None = None  # N COCO segmentations (polygons or RLE), when masks are read


class DetectionDataset(Dataset):
    """Shared ``__getitem__``: decode the image, build the target, apply ``transforms``."""

    categories: list[str]
    label_to_category_id: dict[int, int]
    coco: COCO

    def __init__(self, transforms: Callable | None) -> None:
        self.transforms = transforms
        self._samples: list[Sample] = []

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
            image = read_image(sample.path)
        except RuntimeError as error:
            raise ValueError(f"cannot read image {sample.path} (image id {sample.image_id}): {error}") from error
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
        if sample.segmentations is not None:
            target["masks"] = segmentation_masks(sample.segmentations, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class CocoDetection(DetectionDataset):
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
        masks: also serve ``target["masks"]`` (instance segmentation); annotations without a
            ``segmentation`` are then bad data.

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
        masks: bool = False,
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
        if masks:  # a mask target needs a segmentation (polygons or RLE)
            for ann in kept_annotations:
                if not ann.get("segmentation"):
                    image = coco.imgs[ann["image_id"]].get("file_name", "?")
                    problems.append(f"{where}: annotation id {ann.get('id')} (image {image}): no segmentation")
            kept_annotations = [ann for ann in kept_annotations if ann.get("segmentation")]
        report_problems(problems, on_bad, where)

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
            segmentations = [ann["segmentation"] for ann in anns] if masks else None
            sample = Sample(self.image_dir / info["file_name"], info["id"], boxes, labels, segmentations=segmentations)
            self._samples.append(sample)
        self.coco = make_coco(
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


def segmentation_masks(segmentations: list, height: int, width: int) -> torch.Tensor:
    """COCO segmentations (polygon lists, uncompressed or compressed RLE) -> ``Tensor[N, H, W]`` uint8,
    decoded by ``pycocotools`` as ``COCO.annToMask`` does, at the image's size."""
    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):  # polygons: one RLE per part, merged
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        masks[i] = coco_mask.decode(rle)
    return torch.from_numpy(masks)


def make_coco(dataset: dict) -> COCO:
    """A ``pycocotools.coco.COCO`` over an in-memory dataset dict."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
