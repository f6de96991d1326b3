"""Box coding: ``encode_boxes`` and ``decode_boxes`` against torchvision's ``BoxCoder``.

Sizes from an 800x1333 image with FPN (padded 832x1344, levels of stride 4..64, 3 anchors per
position: 268,569 anchors per image), two images: the RPN decodes every anchor's deltas and
encodes a target for every anchor (weights 1); the box head decodes 1000 proposals x 91 classes
(weights 10, 10, 5, 5) and encodes 512 sampled proposals per image.
"""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import BoxCoder

from ... import ops
from ..harness import Case
from ..inputs import IMAGE_SCALE, random_boxes

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
ANCHORS_PER_IMAGE = 3 * sum((832 // s) * (1344 // s) for s in (4, 8, 16, 32, 64))  # 268,569
IMAGES = 2
CLASSES = 91  # COCO with background, torchvision's box predictor
# Per size set: decode (stage, boxes, classes per box, weights), encode (stage, boxes, weights).
_DECODE = {
    "tiny": [("rpn", 100, 1, RPN_WEIGHTS), ("box_head", 20, 3, HEAD_WEIGHTS)],
    "quick": [("rpn", IMAGES * ANCHORS_PER_IMAGE, 1, RPN_WEIGHTS)],
    "full": [("rpn", IMAGES * ANCHORS_PER_IMAGE, 1, RPN_WEIGHTS), ("box_head", IMAGES * 1000, CLASSES, HEAD_WEIGHTS)],
}
_ENCODE = {
    "tiny": [("rpn", 100, RPN_WEIGHTS)],
    "quick": [("rpn", IMAGES * ANCHORS_PER_IMAGE, RPN_WEIGHTS)],
    "full": [("rpn", IMAGES * ANCHORS_PER_IMAGE, RPN_WEIGHTS), ("box_head", IMAGES * 512, HEAD_WEIGHTS)],
}


def _check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


def _decode_case(stage, n, classes, weights, dtype, device) -> Case:
    def inputs():
        generator = torch.Generator().manual_seed(n)
        deltas = torch.randn(n, 4 * classes, generator=generator) * 0.5
        return deltas.to(device, dtype), random_boxes(n, scale=IMAGE_SCALE, generator=generator).to(device, dtype)

    return Case(
        op="decode_boxes",
        size=f"{stage} {n}x{classes}",
        dtype=dtype,
        device=device,
        inputs=inputs,
        ours=lambda deltas, boxes: ops.decode_boxes(deltas, boxes, weights),
        torchvision=lambda deltas, boxes: BoxCoder(weights).decode_single(deltas, boxes),
        min_bytes=n * (4 + 8 * classes) * dtype.itemsize,  # boxes and deltas read, boxes written
        check=_check,
    )


def _encode_case(stage, n, weights, dtype, device) -> Case:
    def inputs():
        generator = torch.Generator().manual_seed(n)
        gt = random_boxes(n, scale=IMAGE_SCALE, generator=generator).to(device, dtype)
        return gt, random_boxes(n, scale=IMAGE_SCALE, generator=generator).to(device, dtype)

    return Case(
        op="encode_boxes",
        size=f"{stage} {n}",
        dtype=dtype,
        device=device,
        inputs=inputs,
        ours=lambda gt, proposals: ops.encode_boxes(gt, proposals, weights),
        torchvision=lambda gt, proposals: BoxCoder(weights).encode_single(gt, proposals),
        min_bytes=n * 12 * dtype.itemsize,  # two box sets read, the targets written
        check=_check,
    )


def cases(device: torch.device, sizes: str) -> list[Case]:
    dtype = torch.float32
    return [_decode_case(stage, n, k, w, dtype, device) for stage, n, k, w in _DECODE[sizes]] + [
        _encode_case(stage, n, w, dtype, device) for stage, n, w in _ENCODE[sizes]
    ]
