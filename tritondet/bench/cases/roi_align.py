"""RoIAlign family: ``roi_align`` and ``MultiScaleRoIAlign``, forward and forward+backward.

The FPN levels of one 800x1333 image (padded to 800x1344): P2 200x336 (stride 4), P3 100x168,
P4 50x84, P5 25x42, 256 channels, two images (a training batch); 512 and 2048 RoIs (the box
head's sampled proposals in training, and more) pooled to 7x7 with sampling ratio 2, as
torchvision's Faster R-CNN does. ``roi_align`` runs on P2, the largest map; ``MultiScaleRoIAlign``
over all four levels. fp32 and bf16, NCHW and channels_last. ``MultiScaleRoIAlign``'s forward also
runs at inference's 2000 RoIs (the 1000 proposals kept per image at test time), fp32 NCHW.

torchvision has no bf16 kernel: for bf16 its side converts the features to fp32 and the result
back, which is what a user of torchvision has to do.
"""

from __future__ import annotations

import functools

import torch
import torchvision
from torchvision.ops.poolers import LevelMapper

from ... import ops
from ..harness import Case
from ..inputs import proposal_like_boxes

OUTPUT_SIZE = 7
SAMPLING_RATIO = 2  # torchvision's Faster R-CNN box head pooler
LEVELS = ("p2", "p3", "p4", "p5")
NCHW, NHWC = torch.contiguous_format, torch.channels_last
# sizes -> (image height, width (padded), channels, images)
_SHAPES = {"tiny": (64, 96, 8, 2), "quick": (800, 1344, 256, 2), "full": (800, 1344, 256, 2)}
_EVERY = [
    (count, dtype, layout)
    for count in (512, 2048)
    for dtype in (torch.float32, torch.bfloat16)
    for layout in (NCHW, NHWC)
]
# (op, backward) -> [(RoIs, dtype, layout)] per size set; the CPU runs a subset (torchvision takes
# about a second per forward call at 512 RoIs there).
_CASES = {
    "tiny": {key: [(12, torch.float32, NCHW), (12, torch.bfloat16, NHWC)] for key in ("roi", "multi")},
    "quick": {"roi": [(512, torch.float32, NCHW)], "multi": [(512, torch.float32, NCHW)]},
    "full": {"roi": _EVERY, "multi": _EVERY},
}
# The detector's inference: 1000 proposals per image pooled from all levels, forward only
# (torchvision takes about a second per call on the CPU).
_INFERENCE = {"tiny": [], "quick": [(2000, torch.float32, NCHW)], "full": [(2000, torch.float32, NCHW)]}
_CPU_FULL = {
    ("roi", False): [(512, torch.float32, NCHW), (512, torch.float32, NHWC), (512, torch.bfloat16, NCHW)],
    ("roi", True): [(512, torch.float32, NCHW), (512, torch.float32, NHWC)],
    ("multi", False): [(512, torch.float32, NCHW)],
    ("multi", True): [(512, torch.float32, NCHW)],
}


def _layout_name(layout: torch.memory_format) -> str:
    return "NHWC" if layout == torch.channels_last else "NCHW"


def _rois(count: int, images: int, height: int, width: int, generator) -> list[torch.Tensor]:
    """Per image, ``count // images`` proposal-like boxes (16 to ~400 px) inside the image."""
    return [
        proposal_like_boxes(count // images, height=height, width=width, generator=generator) for _ in range(images)
    ]


def _touched_pixels(boxes: torch.Tensor, scale: float, height: int, width: int) -> int:
    """Pixels of a ``height x width`` map under at least one box (with its bilinear neighbours)."""
    if boxes.numel() == 0:
        return 0
    scaled = boxes * scale
    ys, xs = torch.arange(height), torch.arange(width)
    rows = (ys >= scaled[:, 1:2].floor() - 1) & (ys <= scaled[:, 3:4].ceil() + 1)  # [K, H]
    cols = (xs >= scaled[:, 0:1].floor() - 1) & (xs <= scaled[:, 2:3].ceil() + 1)  # [K, W]
    return int(((rows.T.float() @ cols.float()) > 0).sum())


def _level_shapes(height: int, width: int) -> list[tuple[int, int, float]]:
    return [(height // 2**k, width // 2**k, 1.0 / 2**k) for k in range(2, 6)]


def _min_bytes(count, sizes, dtype, multi_level: bool, backward: bool) -> int:
    height, width, channels, images = _SHAPES[sizes]
    boxes = _rois(count, images, height, width, torch.Generator().manual_seed(count))
    levels = _level_shapes(height, width) if multi_level else _level_shapes(height, width)[:1]
    assigned = LevelMapper(2, 5)(boxes) if multi_level else None
    touched, maps = 0, 0
    start = 0
    for image_boxes in boxes:
        for i, (h, w, scale) in enumerate(levels):
            mine = image_boxes if assigned is None else image_boxes[assigned[start : start + len(image_boxes)] == i]
            touched += _touched_pixels(mine, scale, h, w)
            maps += h * w
        start += len(image_boxes)
    output = count * channels * OUTPUT_SIZE * OUTPUT_SIZE * dtype.itemsize
    forward = touched * channels * dtype.itemsize + count * 5 * 4 + output
    # Backward reads the output gradient and writes the whole input gradient (zeros included).
    return forward + (output + maps * channels * dtype.itemsize if backward else 0)


def _features(sizes, dtype, layout, device, multi_level: bool, backward: bool):
    height, width, channels, images = _SHAPES[sizes]
    generator = torch.Generator().manual_seed(1)
    levels = _level_shapes(height, width) if multi_level else _level_shapes(height, width)[:1]
    maps = {}
    for name, (h, w, _) in zip(LEVELS, levels, strict=False):
        x = torch.randn(images, channels, h, w, generator=generator).to(device, dtype)
        maps[name] = x.contiguous(memory_format=layout).requires_grad_(backward)
    return maps


def _roi_align_case(count, sizes, dtype, layout, device, backward: bool) -> Case:
    height, width, channels, images = _SHAPES[sizes]

    def inputs():
        x = _features(sizes, dtype, layout, device, False, backward)["p2"]
        boxes = _rois(count, images, height, width, torch.Generator().manual_seed(count))
        rois = torchvision.ops._utils.convert_boxes_to_roi_format(boxes).to(device)
        grad = torch.randn(count, channels, OUTPUT_SIZE, OUTPUT_SIZE).to(device, dtype) if backward else None
        return x, rois, grad

    def run(roi_align, x, rois, grad):
        kwargs = dict(spatial_scale=0.25, sampling_ratio=SAMPLING_RATIO, aligned=False)
        out = roi_align(x, rois, OUTPUT_SIZE, **kwargs)
        if grad is None:
            return out
        out.backward(grad)
        return x.grad

    def theirs(x, rois, grad):
        if dtype != torch.bfloat16:
            return run(torchvision.ops.roi_align, x, rois, grad)
        out = run(lambda x, *a, **k: torchvision.ops.roi_align(x.float(), *a, **k).to(dtype), x, rois, grad)
        return out

    return Case(
        op="roi_align_fwd_bwd" if backward else "roi_align",
        size=f"{count}/{_layout_name(layout)}",
        dtype=dtype,
        device=device,
        inputs=inputs,
        ours=functools.partial(run, ops.roi_align),
        torchvision=theirs,
        min_bytes=_min_bytes(count, sizes, dtype, False, backward),
        check=functools.partial(_check, dtype),
    )


def _multiscale_case(count, sizes, dtype, layout, device, backward: bool) -> Case:
    height, width, channels, images = _SHAPES[sizes]
    image_shapes = [(height, width)] * images
    ours_pooler = ops.MultiScaleRoIAlign(list(LEVELS), OUTPUT_SIZE, SAMPLING_RATIO)
    their_pooler = torchvision.ops.MultiScaleRoIAlign(list(LEVELS), OUTPUT_SIZE, SAMPLING_RATIO)

    def inputs():
        maps = _features(sizes, dtype, layout, device, True, backward)
        boxes = [b.to(device) for b in _rois(count, images, height, width, torch.Generator().manual_seed(count))]
        grad = torch.randn(count, channels, OUTPUT_SIZE, OUTPUT_SIZE).to(device, dtype) if backward else None
        return maps, boxes, grad

    def run(pooler, maps, boxes, grad):
        out = pooler(maps, boxes, image_shapes)
        if grad is None:
            return out
        out.backward(grad)
        return torch.cat([x.grad.flatten() for x in maps.values()])

    def theirs(maps, boxes, grad):
        if dtype != torch.bfloat16:
            return run(their_pooler, maps, boxes, grad)
        as_fp32 = lambda maps, boxes, shapes: their_pooler({k: v.float() for k, v in maps.items()}, boxes, shapes)
        return run(lambda *a: as_fp32(*a).to(dtype), maps, boxes, grad)

    return Case(
        op="MultiScaleRoIAlign_fwd_bwd" if backward else "MultiScaleRoIAlign",
        size=f"{count}/{_layout_name(layout)}",
        dtype=dtype,
        device=device,
        inputs=inputs,
        ours=functools.partial(run, ours_pooler),
        torchvision=theirs,
        min_bytes=_min_bytes(count, sizes, dtype, True, backward),
        check=functools.partial(_check, dtype),
    )


def _check(dtype, ours, theirs) -> None:
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


def cases(device: torch.device, sizes: str) -> list[Case]:
    result = []
    for kind, make in (("roi", _roi_align_case), ("multi", _multiscale_case)):
        for backward in (False, True):
            chosen = _CPU_FULL[kind, backward] if device.type == "cpu" and sizes == "full" else _CASES[sizes][kind]
            if kind == "multi" and not backward:
                chosen = chosen + _INFERENCE[sizes]
            result += [make(count, sizes, dtype, layout, device, backward) for count, dtype, layout in chosen]
    return result
