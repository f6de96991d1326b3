"""Pascal VOC detection datasets (the VOC 2007 layout), served with a COCO ground truth for evaluation.

Samples and targets as in :mod:`.coco`; the annotation files are read with ``xml.etree``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .coco import DetectionDataset, Sample, make_coco, report_problems
from .errors import InputError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class VOCDetection(DetectionDataset):
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
        on_bad: ``"skip"`` or ``"raise"`` for a missing or malformed annotation file, a missing or unreadable
            image file, an unknown class name, or a box with non-positive width or height; problems name the XML file and object index.

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
        super().__init__(transforms, on_bad)
        self.root = Path(root)
        self.split = split
        self.categories = ["__background__", *classes]
        self.label_to_category_id = {label: label for label in range(1, len(self.categories))}
        label_of = {name: label for label, name in enumerate(self.categories) if label > 0}
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise InputError(f"VOC split file {split_file} does not exist")
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
            self._samples.append(Sample(image_path, image_id, boxes_np, labels_np, difficult_np))
        report_problems(problems, on_bad, str(split_file))
        categories = [{"id": label, "name": name} for label, name in enumerate(self.categories) if label > 0]
        self.coco = make_coco({"images": images, "annotations": annotations, "categories": categories})
