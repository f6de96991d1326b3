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
import json
import math
import os
import re
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
from .errors import InputError

BAD_DATA_CHOICES = ("skip", "raise")
_MAX_REPORTED_PROBLEMS = 20  # problems in a bad-data warning or error; the rest are counted
# torchvision's decoders prefix their reason with the C++ function, file and line.
_DECODER_LOCATION = re.compile(r"^.*\.cpp:\d+, ")


def read_image(path: str | os.PathLike, image_id: int | None = None) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP or GIF) as ``Tensor[3, H, W]`` float32 RGB in [0, 1].

    Raises :class:`~.errors.InputError` naming the file (and ``image_id``, when given) when it is missing,
    empty, truncated or not an image of those formats."""
    return _read_pixels(path, image_id).float().div_(255.0)


def _read_pixels(path: str | os.PathLike, image_id: int | None) -> torch.Tensor:
    """:func:`read_image`'s decoded ``Tensor[3, H, W]`` uint8, before the conversion to [0, 1]."""
    path = Path(path)
    try:
        if not path.is_file():
            raise RuntimeError("it is a directory" if path.is_dir() else "no such file")
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        which = "" if image_id is None else f" (image id {image_id})"
        reason = _DECODER_LOCATION.sub("", str(error).strip())
        raise InputError(f"cannot read image {path}{which}: {reason}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Bad-data reporting
# ---------------------------------------------------------------------------------------------------------------------


def report_problems(problems: list[str], on_bad: str, what: str) -> None:
    """Warn about (``on_bad="skip"``) or raise :class:`~.errors.InputError` for (``"raise"``) the problems
    found; the error is one line, the warning one line per problem."""
    if not problems:
        return
    shown = problems[:_MAX_REPORTED_PROBLEMS]
    more = len(problems) - len(shown)
    if on_bad == "raise":
        text = "; ".join(shown) + (f"; ... and {more} more" if more else "")
        raise InputError(f"bad data in {what} ({len(problems)} problems): {text}")
    text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
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
    """Shared ``__getitem__``: decode the image, build the target, apply ``transforms``.

    An image file that cannot be decoded (truncated, corrupt) raises :class:`~.errors.InputError` with
    ``on_bad="raise"``; with ``"skip"`` it is reported in a warning (once per file) and the sample is
    ``None``, which :func:`~.loader.collate_detection` leaves out of its batch.

    ``image_cache_bytes``: decoded images (uint8, ``3 * H * W`` bytes each) are kept in memory, first
    come first kept, until they fill this many bytes; later reads of a kept image skip the file and the
    decoder and serve the same sample. Each ``DataLoader`` worker process fills its own cache."""

    categories: list[str]
    label_to_category_id: dict[int, int]
    coco: COCO

    def __init__(self, transforms: Callable | None, on_bad: str, image_cache_bytes: int = 0) -> None:
        check_choice("on_bad", on_bad, BAD_DATA_CHOICES)
        if image_cache_bytes < 0:
            raise ValueError(f"image_cache_bytes must be non-negative, got {image_cache_bytes}")
        self.transforms = transforms
        self.on_bad = on_bad
        self.image_cache_bytes = image_cache_bytes
        self._samples: list[Sample] = []
        self._unreadable: set[Path] = set()  # images already reported
        self._decoded: dict[int, torch.Tensor] = {}  # sample index -> Tensor[3, H, W] uint8
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def num_classes(self) -> int:
        """K + 1: the object classes and the background (the detector's ``num_classes``)."""
        return len(self.categories)

    @property
    def image_ids(self) -> list[int]:
        return [sample.image_id for sample in self._samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict] | None:
        sample = self._samples[index]
        try:
            image = self._pixels(index, sample).float().div_(255.0)  # read_image's conversion
        except InputError as error:
            if self.on_bad == "raise":
                raise
            if sample.path not in self._unreadable:
                self._unreadable.add(sample.path)
                warnings.warn(f"skipping an unreadable image: {error}", stacklevel=2)
            return None
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

    def _pixels(self, index: int, sample: Sample) -> torch.Tensor:
        """Sample ``index``'s image as ``Tensor[3, H, W]`` uint8: from the cache, or decoded (and kept if it fits)."""
        pixels = self._decoded.get(index)
        if pixels is None:
            pixels = _read_pixels(sample.path, sample.image_id)
            if self._decoded_bytes + pixels.numel() <= self.image_cache_bytes:
                self._decoded[index] = pixels
                self._decoded_bytes += pixels.numel()
        return pixels


class CocoDetection(DetectionDataset):
    """A COCO-format detection dataset: an image folder and an instances JSON, read with pycocotools.

    Args:
        image_dir: folder the images' ``file_name`` entries are relative to.
        annotation_file: the COCO instances JSON.
        transforms: ``(image, target) -> (image, target)``, e.g. :class:`DetectionTransform`.
        on_bad: what to do with bad data (a missing image file, an annotation with non-positive
            width or height, a box outside its image, an unknown category or image id):
            ``"skip"`` warns and leaves out the bad annotation (the image, for a missing file),
            ``"raise"`` raises :class:`~.errors.InputError` (a ``ValueError``). Every problem names the file
            and annotation id. Unreadable images are handled as :class:`DetectionDataset` says.
        remove_images_without_annotations: leave out images with no usable annotation, as torchvision's
            detection references do for training: none that is not crowd, or only boxes at most one
            pixel wide or tall (evaluation keeps every image).
        masks: also serve ``target["masks"]`` (instance segmentation); annotations without a
            ``segmentation`` are then bad data.
        image_cache_bytes: keep decoded images in memory up to this many bytes (see :class:`DetectionDataset`).

    Raises :class:`~.errors.InputError` naming ``annotation_file`` when it cannot be read, is not valid JSON
    (with the line and column), is not a COCO instances file (a missing key, a category without id or name,
    no categories), or when no usable image is left.

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
        image_cache_bytes: int = 0,
    ) -> None:
        super().__init__(transforms, on_bad, image_cache_bytes)
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise InputError(f"{self.image_dir}: no such image folder (for {self.annotation_file})")
        problems: list[str] = []
        coco = make_coco(_read_coco_json(self.annotation_file, problems))
        category_ids = sorted(coco.cats)
        self.categories = ["__background__"] + [coco.cats[c]["name"] for c in category_ids]
        self.label_to_category_id = {label: c for label, c in enumerate(category_ids, start=1)}
        category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}

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
            kept_images = [info for info in kept_images if _has_usable_box(per_image[info["id"]])]
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
        if not self._samples:
            usable = "image file found in " + str(self.image_dir)
            if remove_images_without_annotations and known_images:
                usable = "image with a usable annotation (not crowd, a box over 1 pixel wide and tall)"
            raise InputError(
                f"{where}: no {usable} among its {len(coco.dataset['images'])} valid image entries and "
                f"{len(coco.dataset['annotations'])} annotations"
            )
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


def _has_usable_box(annotations: list[dict]) -> bool:
    """Whether an image's (non-crowd) annotations hold a box over one pixel wide and tall (torchvision's
    references leave the others out of training)."""
    return any(float(ann["bbox"][2]) > 1 and float(ann["bbox"][3]) > 1 for ann in annotations)


def _read_coco_json(path: Path, problems: list[str]) -> dict:
    """A COCO instances file's dict, its malformed image and annotation entries left out and described in
    ``problems``; :class:`~.errors.InputError` naming ``path`` when the file as a whole is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read it: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from error
    try:
        dataset = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(dataset, dict):
        raise InputError(f"{path}: not a COCO instances file (a JSON {type(dataset).__name__}, not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key, []), list):
            raise InputError(f"{path}: '{key}' must be a list, got {type(dataset[key]).__name__}")
    if "images" not in dataset:
        raise InputError(f"{path}: not a COCO instances file (no 'images' key)")
    categories = dataset.get("categories", [])
    if not categories:
        raise InputError(f"{path}: no categories: a COCO instances file lists its classes in 'categories'")
    for index, category in enumerate(categories):
        for key in ("id", "name"):
            if not isinstance(category, dict) or not isinstance(category.get(key), (int, str)):
                raise InputError(f"{path}: categories[{index}] has no valid '{key}'")

    def entries(key: str, required: dict[str, tuple[type, ...]]) -> list[dict]:
        kept = []
        for index, entry in enumerate(dataset.get(key, [])):
            missing = [
                k for k, types in required.items() if not isinstance(entry, dict) or not isinstance(entry.get(k), types)
            ]
            if missing:
                problems.append(f"{path}: {key}[{index}]: no valid {', '.join(repr(k) for k in missing)}")
            else:
                kept.append(entry)
        return kept

    images = []
    identifier = (int, str)
    for info in entries("images", {"id": identifier, "file_name": (str,)}):
        size = [info[k] for k in ("width", "height") if k in info]
        if all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in size):
            images.append(info)
        else:
            problems.append(f"{path}: image id {info['id']}: width and height must be positive numbers, got {size}")
    annotations = entries("annotations", {"id": identifier, "image_id": identifier, "category_id": identifier})
    return {**dataset, "images": images, "annotations": annotations}


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
