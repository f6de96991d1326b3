"""Bounded work on hostile RoIs, for every pooling family on the Triton kernels: a RoI of 10^12
pixels, NaN and infinite corners finish quickly with saturating float-to-int casts (as a GPU
converts: the ``math`` GPU mode, whose fast division these ops' exact arithmetic does not yet
match, so results are compared in the interpreter's exact arithmetic) and equal torchvision
wherever torchvision's result is defined (a finite RoI it computes in bounded time)."""

from collections import OrderedDict

import pytest
import torch
import torchvision

from tests.gpu_modes import gpu_mode
from tests.tolerances import assert_close
from tritondet import ops
from tritondet.kernels import crop_pool as crop_pool_family

# Features [1, 8, 9, 10]: 8 channels, so position-sensitive 2x2 pooling has 2 output channels.
HEIGHT, WIDTH = 9, 10
# RoIs (batch, x1, y1, x2, y2): an ordinary one, 10^12 pixels around the map, the same far off the
# map, then NaN and infinite corners (these pool zeros).
FINITE_ROIS = [
    [0.0, 1.5, 2.0, 7.0, 8.5],
    [0.0, -5e5, -5e5, 5e5, 5e5],
    [0.0, -1e6 + 3, -1e6 + 4, 5.0, 6.0],
]
NON_FINITE_ROIS = [
    [0.0, float("nan"), 1.0, 4.0, 4.0],
    [0.0, 1.0, 1.0, float("inf"), 4.0],
    [0.0, -float("inf"), -float("inf"), float("inf"), float("inf")],
]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")


def inputs(device):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, HEIGHT, WIDTH, generator=generator).to(device)
    rois = torch.tensor(FINITE_ROIS + NON_FINITE_ROIS, device=device)
    return x, rois


def check_pooled(pool, expected):
    """``pool()`` finishes with saturating casts, finite, zero for the non-finite RoIs; in exact
    arithmetic it equals ``expected`` on the finite RoIs."""
    finite = len(FINITE_ROIS)
    with gpu_mode("math"):
        saturated = pool().cpu()
    assert torch.isfinite(saturated).all()
    assert torch.equal(saturated[finite:], torch.zeros_like(saturated[finite:]))
    ours = pool().cpu()
    assert_close(ours[:finite], expected, torch.float32)
    assert torch.equal(ours[finite:], torch.zeros_like(ours[finite:]))


# torchvision's ops with a fixed sampling grid (its adaptive grid would loop ~10^10 times per bin).
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda x, r: ops.roi_align(x, r, 3, 0.5, 2), lambda x, r: torchvision.ops.roi_align(x, r, 3, 0.5, 2)),
        (
            lambda x, r: ops.roi_align(x, r, 2, 1.0, 3, True),
            lambda x, r: torchvision.ops.roi_align(x, r, 2, 1.0, 3, True),
        ),
        (lambda x, r: ops.roi_pool(x, r, 3, 0.5), lambda x, r: torchvision.ops.roi_pool(x, r, 3, 0.5)),
        (lambda x, r: ops.ps_roi_align(x, r, 2, 1.0, 2), lambda x, r: torchvision.ops.ps_roi_align(x, r, 2, 1.0, 2)),
        (lambda x, r: ops.ps_roi_pool(x, r, 2, 1.0), lambda x, r: torchvision.ops.ps_roi_pool(x, r, 2, 1.0)),
    ],
    ids=["roi_align", "roi_align_aligned", "roi_pool", "ps_roi_align", "ps_roi_pool"],
)
def test_triton_hostile_rois_match_torchvision(triton_backend, device, ours, theirs):
    x, rois = inputs(device)
    check_pooled(lambda: ours(x, rois), theirs(x.cpu(), rois[: len(FINITE_ROIS)].cpu()))


def test_triton_hostile_rois_crop_pool(triton_backend, device):
    x, rois = inputs(device)
    expected, _ = crop_pool_family.crop_pool_reference(x.cpu(), rois[: len(FINITE_ROIS)].cpu(), 0.5, (3, 3), 2)
    check_pooled(lambda: ops.crop_pool(x, rois, 3, 0.5, 2), expected)


@pytest.mark.parametrize("aligned", [False, True])
def test_triton_adaptive_roi_align_visits_only_samples_near_the_map(triton_backend, device, aligned):
    """An adaptive grid of 10^5 x 10^5 samples per bin finishes; a 2000 x 1500 pixel RoI (2000 x
    1500 samples for a 1x1 output) equals torchvision, whose loop visits every sample."""
    x, rois = inputs(device)
    large = torch.tensor([[0.0, -1000.0, -700.0, 1000.0, 800.0]], device=device)
    with gpu_mode("math"):
        hostile = ops.roi_align(x, rois, 7, 1.0, -1, aligned).cpu()
    assert torch.isfinite(hostile).all()
    assert torch.equal(hostile[len(FINITE_ROIS) :], torch.zeros_like(hostile[len(FINITE_ROIS) :]))
    expected = torchvision.ops.roi_align(x.cpu(), rois[:1].cpu(), 7, 1.0, -1, aligned)
    assert_close(ops.roi_align(x, rois[:1], 7, 1.0, -1, aligned).cpu(), expected, torch.float32)
    expected = torchvision.ops.roi_align(x.cpu(), large.cpu(), 1, 1.0, -1, aligned)
    assert_close(ops.roi_align(x, large, 1, 1.0, -1, aligned).cpu(), expected, torch.float32)


@pytest.mark.parametrize("aligned", [False, True])
def test_reference_adaptive_roi_align_takes_the_kernels_rule(monkeypatch, device, aligned):
    """The RoIAlign reference (the CPU path and the test oracle) clamps adaptive sampling grids to
    the kernels' MAX_GRID and visits only the samples near the map, as the kernels: RoIs of 10^12
    pixels equal the Triton kernels, and 1e30 corners (grids of 1e29 samples, an OverflowError
    from torch.arange before) finish with zeros."""
    x, rois = inputs(device)
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    expected = ops.roi_align(x, rois, 7, 1.0, -1, aligned).cpu()
    far = torch.tensor([[0.0, 0.0, 2.0, 1e30, 5.0], [0.0, 1e30, 1e30, 1e30, 1e30], [0.0, -1e30, -1e30, 1e30, 1e30]])
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("TRITONDET_BACKEND", backend)
        assert_close(ops.roi_align(x.cpu(), rois.cpu(), 7, 1.0, -1, aligned), expected, torch.float32)
        pooled = ops.roi_align(x.cpu(), far, 7, 1.0, -1, aligned)
        assert_close(pooled, torch.zeros_like(pooled), torch.float32)


def test_triton_hostile_rois_multiscale_roi_align(triton_backend, device):
    generator = torch.Generator().manual_seed(7)
    names = ["p2", "p3"]
    features = OrderedDict(
        (name, torch.randn(1, 2, 16 // 2**i, 20 // 2**i, generator=generator).to(device))
        for i, name in enumerate(names)
    )
    boxes = torch.tensor([row[1:] for row in FINITE_ROIS + NON_FINITE_ROIS], device=device)
    image_shapes = [(64, 80)]
    with gpu_mode("math"):
        adaptive = ops.MultiScaleRoIAlign(names, 3, -1)(features, [boxes], image_shapes).cpu()
    assert torch.isfinite(adaptive).all()
    expected = torchvision.ops.MultiScaleRoIAlign(names, 3, 2)(
        OrderedDict((k, v.cpu()) for k, v in features.items()), [boxes[: len(FINITE_ROIS)].cpu()], image_shapes
    )
    check_pooled(lambda: ops.MultiScaleRoIAlign(names, 3, 2)(features, [boxes], image_shapes), expected)
