"""Anchors: ``AnchorGenerator`` against torchvision's, for a batch of 800x1333 images with FPN.

Padded 832x1344, levels of stride 4..64, sizes 32..512, ratios 0.5/1/2: 268,569 anchors per image;
B = 2 and 8 (torchvision repeats the anchors per image, ours returns one tensor for all).
"""

from __future__ import annotations

import torch
from torchvision.models.detection import anchor_utils
from torchvision.models.detection.image_list import ImageList

from ... import ops
from ..harness import Case

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = (4, 8, 16, 32, 64)
_SIZES = {"tiny": [((64, 128), 2)], "quick": [((832, 1344), 2)], "full": [((832, 1344), 2), ((832, 1344), 8)]}


def _check(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for mine, their in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, their)


def _case(padded: tuple[int, int], images: int, device: torch.device) -> Case:
    ours_generator = ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    their_generator = anchor_utils.AnchorGenerator(FPN_SIZES, FPN_RATIOS)

    def inputs():
        batch = ImageList(torch.zeros(images, 3, *padded, device=device), [padded] * images)
        features = [torch.zeros(images, 1, padded[0] // s, padded[1] // s, device=device) for s in STRIDES]
        return batch, features

    anchors = 3 * sum((padded[0] // s) * (padded[1] // s) for s in STRIDES)
    return Case(
        op="AnchorGenerator",
        size=f"B={images} {padded[0]}x{padded[1]}",
        dtype=torch.float32,
        device=device,
        inputs=inputs,
        ours=ours_generator,
        torchvision=their_generator,
        min_bytes=anchors * 16,  # the anchors written once (ours shares them between the images)
        check=_check,
    )


def cases(device: torch.device, sizes: str) -> list[Case]:
    return [_case(padded, images, device) for padded, images in _SIZES[sizes]]
