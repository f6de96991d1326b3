"""roi_align, MultiScaleRoIAlign: ours against torchvision in the same run.

Sizes the detector uses: 512 and 2048 RoIs x 256 channels x 7x7 over the FPN levels of an
800x1333 image (strides 4..32). On a machine without a GPU the default backend is the CPU
reference, which must not be slower than torchvision's CPU kernel; the Triton interpreter is far
too slow to benchmark, so CPU runs keep to 512 RoIs and fp32.

    pytest benchmarks/bench_roi_align.py --benchmark-only -n 0
"""

from collections import OrderedDict

import pytest
import torch
import torchvision

from tritondet import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMAGE = (800, 1333)
STRIDES = (4, 8, 16, 32)
CHANNELS = 256


def proposals(k: int, generator) -> torch.Tensor:
    """``[k, 4]`` boxes in the image, sides from 8 to ~300 pixels."""
    corner = torch.rand(k, 2, generator=generator) * torch.tensor(IMAGE[::-1], dtype=torch.float32)
    extent = torch.rand(k, 2, generator=generator) * 300 + 8
    return torch.cat([corner, corner + extent], 1).to(DEVICE)


def feature_maps(dtype, channels_last, generator):
    maps = OrderedDict()
    for i, stride in enumerate(STRIDES):
        x = torch.randn(1, CHANNELS, -(-IMAGE[0] // stride), -(-IMAGE[1] // stride), generator=generator)
        x = x.to(DEVICE, dtype)
        maps[str(i)] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return maps


CASES = [
    (k, dtype, layout)
    for k in ((512, 2048) if DEVICE.type == "cuda" else (512,))
    for dtype in ((torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,))
    for layout in ("nchw", "channels_last")
]


@pytest.mark.parametrize("provider", ["tritondet", "torchvision"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("k,dtype,layout", CASES)
def test_roi_align(benchmark, provider, mode, k, dtype, layout):
    if provider == "torchvision" and dtype == torch.bfloat16:
        pytest.skip("torchvision has no bf16 roi_align")
    generator = torch.Generator().manual_seed(0)
    x = feature_maps(dtype, layout == "channels_last", generator)["0"]
    rois = torch.cat([torch.zeros(k, 1, device=DEVICE), proposals(k, generator)], 1)
    fn = ops.roi_align if provider == "tritondet" else torchvision.ops.roi_align
    leaf = x.requires_grad_(mode != "forward")

    def run():
        out = fn(leaf, rois, 7, 0.25, 2)
        if mode != "forward":
            out.sum().backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        kernel="roi_align", provider=provider, mode=mode, size=k, bytes=k * CHANNELS * 49 * x.element_size()
    )
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["tritondet", "torchvision"])
def test_multiscale_roi_align(benchmark, provider):
    generator = torch.Generator().manual_seed(1)
    maps = feature_maps(torch.float32, False, generator)
    boxes = [proposals(512, generator)]
    module = (ops if provider == "tritondet" else torchvision.ops).MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)

    def run():
        module(maps, boxes, [IMAGE])
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(kernel="multiscale_roi_align", provider=provider, mode="forward", size=512)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
