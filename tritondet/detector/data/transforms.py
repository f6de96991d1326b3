"""The paper's preprocessing of one ``(image, target)`` sample, and box rescaling between image sizes.

Shape shorthand: N boxes, H x W image height and width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
