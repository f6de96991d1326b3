"""Anchors against torchvision's AnchorGenerator (exact values and order), on both backends."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from tritondet import ops
from tritondet.kernels.anchors import grid_anchors_cpu, grid_anchors_reference

FPN = (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
PAPER = (((128, 256, 512),), ((0.5, 1.0, 2.0),))
# Odd sizes and ratios whose half extents land exactly on .5 (round half to even decides).
ODD = (((16, 45), (33,)), ((0.25, 1.0, 3.0), (1.0, 0.7)))


def _batch(height, width, grid_sizes, batch=2, dtype=torch.float32, device="cpu"):
    images = ImageList(torch.zeros(batch, 3, height, width, device=device), [(height - 3, width - 5)] * batch)
    features = [torch.zeros(batch, 8, h, w, dtype=dtype, device=device) for h, w in grid_sizes]
    return images, features


@pytest.mark.parametrize(
    "config,image,grid_sizes",
    [
        (FPN, (800, 1216), [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]),
        (FPN, (64, 96), [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]),
        (PAPER, (608, 800), [(38, 50)]),
        (PAPER, (333, 517), [(21, 33)]),
        (ODD, (97, 131), [(13, 7), (3, 5)]),
        (PAPER, (16, 16), [(1, 1)]),
    ],
)
def test_matches_torchvision_exactly(backend, device, config, image, grid_sizes):
    if backend == "triton" and device.type == "cpu" and image[0] * image[1] > 200_000:
        pytest.skip("large grids are slow in the interpreter; see the slow test")
    images, features = _batch(*image, grid_sizes, device=device)
    ours = ops.AnchorGenerator(*config)(images, features)
    theirs = TorchvisionAnchorGenerator(*config)(images, features)
    assert len(ours) == len(theirs) == 2
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.dtype == expected.dtype and mine.device == expected.device
        torch.testing.assert_close(mine, expected, atol=0, rtol=0)


@pytest.mark.slow
def test_fpn_at_detector_size_in_the_interpreter(monkeypatch, device):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    grid_sizes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    images, features = _batch(800, 1216, grid_sizes, device=device)
    ours = ops.AnchorGenerator(*FPN)(images, features)[0]
    torch.testing.assert_close(ours, TorchvisionAnchorGenerator(*FPN)(images, features)[0], atol=0, rtol=0)


def test_paper_configuration_has_nine_anchors_per_position(backend, device):
    generator = ops.AnchorGenerator(*PAPER)
    assert generator.num_anchors_per_location() == [9]
    images, features = _batch(600, 800, [(38, 50)], batch=1, device=device)
    anchors = generator(images, features)[0]
    assert anchors.shape == (38 * 50 * 9, 4)
    # The anchor at (y, x) = (0, 0): ratio 0.5 (h / w), size 128 -> w = 181.02, h = 90.51.
    torch.testing.assert_close(anchors[0], torch.tensor([-91.0, -45.0, 91.0, 45.0], device=device))
    areas = (anchors[:9, 2] - anchors[:9, 0]) * (anchors[:9, 3] - anchors[:9, 1])
    torch.testing.assert_close(areas.sqrt(), torch.tensor([128.0, 256, 512] * 3, device=device), rtol=0.01, atol=0)


def test_cell_anchors_and_flat_configs_follow_torchvision():
    ours = ops.AnchorGenerator((32, 64, 128), (0.5, 1.0, 2.0))
    theirs = TorchvisionAnchorGenerator((32, 64, 128), (0.5, 1.0, 2.0))
    assert ours.sizes == theirs.sizes and ours.aspect_ratios == theirs.aspect_ratios
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location() == [3, 3, 3]
    for mine, expected in zip(ours.cell_anchors, theirs.cell_anchors, strict=True):
        torch.testing.assert_close(mine, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_feature_dtype(backend, device, dtype):
    images, features = _batch(64, 96, [(16, 24), (8, 12)], dtype=dtype, device=device)
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    ours = ops.AnchorGenerator(*config)(images, features)[0]
    theirs = TorchvisionAnchorGenerator(*config)(images, features)[0]
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_kernel_equals_reference_bit_for_bit(monkeypatch, device):
    args = ([7, 11, 3, 5], [16, 16, 32, 32], [10.0, 23.0, 77.0, 31.0, 64.0], [0.3, 1.7, 2.0, 1.0, 0.5], [3, 2], device)
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    ours = torch.ops.tritondet.grid_anchors(*args)
    torch.testing.assert_close(ours, grid_anchors_reference(*args), atol=0, rtol=0)


@pytest.mark.parametrize(
    "grid_sizes,strides",
    [([7, 11, 3, 5], [16, 16, 32, 32]), ([0, 4, 3, 5], [8, 8, 13, 14]), ([2, 0, 1, 1], [5, 3, 7, 9])],
)
def test_cpu_path_equals_reference_bit_for_bit(grid_sizes, strides):
    """Empty levels included, and sizes whose base anchors round to -0.0 (0.5: half extents of
    +-0.25), which the shifts' +0.0 turns into +0.0 in both."""
    args = (grid_sizes, strides, [10.0, 23.0, 0.5, 31.0, 64.0], [0.3, 1.7, 1.0, 1.0, 0.5], [3, 2], torch.device("cpu"))
    ours, expected = grid_anchors_cpu(*args), grid_anchors_reference(*args)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))  # the sign of zero too


def test_grid_anchors_function_and_compile(backend, device):
    grid_sizes, strides = [(5, 7), (3, 4)], [(8, 8), (13, 14)]
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    anchors = ops.grid_anchors(grid_sizes, strides, *config, device=device)
    assert anchors.shape == ((35 + 12) * 3, 4)
    images, features = _batch(40, 56, grid_sizes, device=device)
    torch.testing.assert_close(anchors, TorchvisionAnchorGenerator(*config)(images, features)[0], atol=0, rtol=0)
    generator = ops.AnchorGenerator(*config)
    compiled = torch.compile(generator, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images, features)[0], anchors, atol=0, rtol=0)
    torch.library.opcheck(torch.ops.tritondet.grid_anchors, ([5, 7], [8, 8], [32.0, 32.0], [0.5, 2.0], [2], device))


def test_bad_input(device):
    with pytest.raises(ValueError, match="sizes and aspect_ratios"):
        ops.AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,), (1.0,)))
    with pytest.raises(ValueError, match="sizes"):
        ops.AnchorGenerator(((32, -1),), ((1.0,),))
    with pytest.raises(ValueError, match="aspect_ratios"):
        ops.AnchorGenerator(((32,),), ((0.0,),))
    images, features = _batch(64, 64, [(8, 8), (4, 4)], device=device)
    with pytest.raises(ValueError, match="feature_maps"):
        ops.AnchorGenerator(((32,),), ((1.0,),))(images, features)
    with pytest.raises(ValueError, match="strides"):
        ops.grid_anchors([(4, 4)], [(0, 8)], ((32,),), ((1.0,),))


def test_empty_level(backend, device):
    config = (((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    anchors = ops.grid_anchors([(0, 3), (2, 2)], [(8, 8), (16, 16)], *config, device=device)
    expected = ops.grid_anchors([(2, 2)], [(16, 16)], ((64,),), ((0.5, 1.0, 2.0),), device=device)
    torch.testing.assert_close(anchors, expected, atol=0, rtol=0)


def test_device_tables_are_cached_by_content():
    """Level tables depend on shapes only: a repeated call reuses the device copy (no copy, no
    ATen op, and CUDA-graph capture after a warm-up call)."""
    from tritondet.kernels._launch import device_table

    rows = [[3, 5, 8, 8], [2, 3, 16, 16]]
    table = device_table(rows, torch.int64, torch.device("cpu"))
    torch.testing.assert_close(table, torch.tensor(rows))
    assert device_table([list(r) for r in rows], torch.int64, torch.device("cpu")) is table
    assert device_table(rows, torch.float64, torch.device("cpu")) is not table
    assert device_table([[3, 5, 8, 8], [2, 3, 16, 15]], torch.int64, torch.device("cpu")) is not table
