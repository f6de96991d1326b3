"""RoIPool against torchvision (values, argmax, gradients) on both backends."""

import pytest
import torch
import torchvision

from tests.kernels.test_roi_align import features, make_rois
from tests.tolerances import FLOAT_DTYPES, assert_close
from tritondet import ops


@pytest.mark.parametrize("output_size", [1, 7, (7, 5)])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_matches_torchvision_values_argmax_and_gradient(backend, device, output_size, spatial_scale):
    generator = torch.Generator().manual_seed(int(spatial_scale * 10))
    x = features(3, 2, 13, 17, generator).to(device)
    rois = make_rois(6, 3, 13, 17, spatial_scale, generator).to(device)
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    out, argmax = torch.ops.tritondet.roi_pool(x, rois, spatial_scale, *size)
    expected, expected_argmax = torch.ops.torchvision.roi_pool(x, rois, spatial_scale, *size)
    assert torch.equal(out, expected) and torch.equal(argmax, expected_argmax)
    grad = torch.randn(out.shape, generator=generator).to(device)
    grads = []
    for fn in (ops.roi_pool, torchvision.ops.roi_pool):
        leaf = x.clone().requires_grad_()
        fn(leaf, rois, output_size, spatial_scale).backward(grad)
        grads.append(leaf.grad)
    assert_close(grads[0], grads[1], torch.float32)


def test_ties_take_the_first_maximum_and_empty_bins_are_zero(backend, device):
    x = torch.ones(1, 1, 4, 4, device=device)
    rois = torch.tensor([[0, 0, 0, 3, 3], [0, 5, 5, 9, 9]], dtype=torch.float32, device=device)
    out, argmax = torch.ops.tritondet.roi_pool(x, rois, 1.0, 2, 2)
    assert argmax[0].flatten().tolist() == [0, 2, 8, 10]
    assert out[1].abs().sum() == 0 and (argmax[1] == -1).all()


def test_nan_and_infinite_inputs_follow_torchvision(backend, device):
    x = torch.tensor([[1.0, float("nan")], [float("-inf"), -2.0]]).repeat(2, 2).reshape(1, 1, 4, 4).to(device)
    x[0, 0, 2:, 2:] = float("nan")
    rois = torch.tensor([[0, 0, 0, 3, 3], [0, 2, 2, 3, 3], [0, 1, 1, 2, 2]], dtype=torch.float32, device=device)
    out, argmax = torch.ops.tritondet.roi_pool(x, rois, 1.0, 2, 2)
    expected, expected_argmax = torch.ops.torchvision.roi_pool(x, rois, 1.0, 2, 2)
    assert torch.equal(argmax, expected_argmax)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_dtypes_and_layouts(backend, device, dtype, layout):
    generator = torch.Generator().manual_seed(3)
    x = features(2, 4, 13, 17, generator).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, ::2]
    rois = make_rois(5, 2, 13, 17, 1.0, generator).to(device)
    ours = ops.roi_pool(x, rois, (3, 2))
    expected = torchvision.ops.roi_pool(x.double().contiguous(), rois.double(), (3, 2)).to(dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, expected)  # a maximum is exact in every dtype


def test_gradcheck_and_opcheck(backend, device):
    generator = torch.Generator().manual_seed(5)
    x = features(2, 1, 6, 7, generator, torch.float64).to(device).requires_grad_()
    rois = make_rois(2, 2, 6, 7, 1.0, generator).double().to(device)
    assert torch.autograd.gradcheck(lambda t: ops.roi_pool(t, rois, (3, 2)), (x,), fast_mode=True)
    torch.library.opcheck(torch.ops.tritondet.roi_pool.default, (x.float(), rois.float(), 1.0, 2, 2))


def test_deterministic_backward(backend, device):
    generator = torch.Generator().manual_seed(7)
    x = features(1, 2, 13, 17, generator).to(device)
    rois = make_rois(8, 1, 13, 17, 1.0, generator).to(device)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            leaf = x.clone().requires_grad_()
            ops.roi_pool(leaf, rois, 3).sum().backward()
            grads.append(leaf.grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


def test_module_repr_and_compile(backend, device):
    assert repr(ops.RoIPool((7, 5), 0.25)) == repr(torchvision.ops.RoIPool((7, 5), 0.25))
    generator = torch.Generator().manual_seed(9)
    x = features(2, 2, 13, 17, generator).to(device)
    rois = make_rois(3, 2, 13, 17, 1.0, generator).to(device)
    module = ops.RoIPool(3, 1.0)
    compiled = torch.compile(lambda a, b: module(a, b).sum(), fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, rois), module(x, rois).sum(), torch.float32)


# ----------------------------------------------------------------------------------------------
# Position-sensitive RoIPool
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", [1, (3, 2)])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_ps_roi_pool_matches_torchvision(backend, device, output_size, spatial_scale):
    generator = torch.Generator().manual_seed(int(spatial_scale * 10) + 1)
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = features(3, 2 * size[0] * size[1], 13, 17, generator, torch.float64).to(device)
    rois = make_rois(6, 3, 13, 17, spatial_scale, generator).double().to(device)
    grad = torch.randn(rois.shape[0], 2, *size, generator=generator, dtype=torch.float64).to(device)
    results = []
    for fn in (ops.ps_roi_pool, torchvision.ops.ps_roi_pool):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, rois, output_size, spatial_scale)
        out.backward(grad)
        results.append((out, leaf.grad))
    assert_close(results[0][0], results[1][0], torch.float64)
    assert_close(results[0][1], results[1][1], torch.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ps_roi_pool_dtypes_layouts_opcheck(backend, device, dtype):
    generator = torch.Generator().manual_seed(11)
    x = features(2, 8, 13, 17, generator).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    rois = make_rois(4, 2, 13, 17, 1.0, generator).to(device)
    ours = ops.ps_roi_pool(x, rois, 2)
    theirs = torchvision.ops.ps_roi_pool(x.double().contiguous(), rois.double(), 2)
    assert ours.dtype == dtype
    assert_close(ours.double(), theirs.to(dtype).double(), dtype)
    if dtype == torch.float32:
        torch.library.opcheck(torch.ops.tritondet.ps_roi_pool.default, (x.requires_grad_(), rois, 1.0, 2, 2))
        assert repr(ops.PSRoIPool(2, 0.5)) == repr(torchvision.ops.PSRoIPool(2, 0.5))
