"""The data side of the paper's preprocessing - the horizontal flip in training - and box rescaling
between image sizes.

Shape shorthand: N boxes, H x W image height and width.

Images are resized once, by the model (:func:`~tritondet.detector.faster_rcnn.build_transform`:
torchvision's ``GeneralizedRCNNTransform``, shorter side ``min_size``, longer at most ``max_size``),
as torchvision's detectors do: the same code path for training, evaluation and inference on raw
images, and targets resized with their image there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def resize_boxes(boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> torch.Tensor:
    """Scale ``boxes`` ``Tensor[N, 4]`` (xyxy) from an image of ``from_size`` (H, W) to one of ``to_size`` (H, W).

    Maps detections on a resized image back to the original image (``to_size = target["orig_size"]``)
    for evaluation.
    """
    scale_h = float(to_size[0]) / float(from_size[0])
    scale_w = float(to_size[1]) / float(from_size[1])
    scale = torch.tensor([scale_w, scale_h, scale_w, scale_h], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


@dataclass
class DetectionTransform:
    """The paper's data augmentation for one ``(image, target)`` sample: when ``train``, a horizontal
    flip with probability ``flip_prob`` (boxes and masks flipped with the image). Resizing and normalization
    are the model's (see the module docstring).

    The flip draws from ``generator`` when given, else from torch's global generator: in
    :func:`~.loader.make_data_loader`'s worker processes that one is seeded from the loader's ``seed``;
    with ``num_workers=0`` it is the main process's (seed it with ``torch.manual_seed`` for a reproducible run).
    """

    train: bool = False  # flip only in training
    flip_prob: float = 0.5  # the paper flips half of the training images
    generator: torch.Generator | None = None

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        target = dict(target)
        if self.train and torch.rand((), generator=self.generator).item() < self.flip_prob:
            image = image.flip(-1)
            boxes = target.get("boxes")
            if boxes is not None:
                width = image.shape[-1]
                target["boxes"] = torch.stack(
                    [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
                )
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target
