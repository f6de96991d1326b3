"""IoU family: ``box_iou`` and ``generalized_box_iou`` at the sizes a detector uses.

2000 x 100 and 12000 x 100: pre-NMS proposals (test / train) against up to 100 ground-truth boxes
(the proposal matcher); 250000 x 20: every anchor of an 800x1333 FPN image (~242k) against 20
ground-truth boxes (the anchor matcher). The CPU runs the first two and 100000 x 20.
"""

from __future__ import annotations

import torch
import torchvision

from ... import ops
from ..harness import Case
from ..inputs import IMAGE_SCALE, random_boxes

_SIZES = {
    "tiny": {"cpu": [(37, 11)], "cuda": [(37, 11)]},
    "quick": {"cpu": [(2000, 100)], "cuda": [(2000, 100), (250000, 20)]},
    "full": {
        "cpu": [(2000, 100), (12000, 100), (100000, 20)],
        "cuda": [(2000, 100), (12000, 100), (250000, 20)],
    },
}


def _check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # fp16 boxes: torchvision computes corner extents in fp16, we in fp32 (see kernels/box_iou.py).
    tolerance = 1e-5 if theirs.dtype != torch.float16 else 2e-2
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=tolerance, rtol=tolerance, equal_nan=True)


def _boxes(n: int, m: int, dtype: torch.dtype, device: torch.device):
    def inputs():
        generator = torch.Generator().manual_seed(n + m)
        boxes1 = random_boxes(n, scale=IMAGE_SCALE, generator=generator)
        boxes2 = random_boxes(m, scale=IMAGE_SCALE, generator=generator)
        return boxes1.to(device, dtype), boxes2.to(device, dtype)

    return inputs


def cases(device: torch.device, sizes: str) -> list[Case]:
    dtypes = [torch.float32, torch.float16] if device.type == "cuda" else [torch.float32]
    return [
        Case(
            op=name,
            size=f"{n}x{m}",
            dtype=dtype,
            device=device,
            inputs=_boxes(n, m, dtype, device),
            ours=getattr(ops, name),
            torchvision=getattr(torchvision.ops, name),
            # Read both box sets once, write the fp32 [N, M] matrix once.
            min_bytes=(n + m) * 4 * dtype.itemsize + n * m * 4,
            check=_check,
        )
        for n, m in _SIZES[sizes][device.type]
        for dtype in dtypes
        for name in ("box_iou", "generalized_box_iou")
    ]
