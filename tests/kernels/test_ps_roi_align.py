"""Position-sensitive RoIAlign against torchvision on both backends."""

import pytest
import torch
import torchvision

from tests.kernels.test_roi_align import features, make_rois
from tests.tolerances import ATOMIC_NONDET_TOL, FLOAT_DTYPES, assert_close
from tritondet import ops


def nonempty_rois(k, images, height, width, scale, generator):
    """Without the zero-size and inverted RoIs: torchvision divides 0 by 0 there (NaN)."""
    rois = make_rois(k, images, height, width, scale, generator)
    keep = ((rois[:, 3] - rois[:, 1]) * scale > 0.5) & ((rois[:, 4] - rois[:, 2]) * scale > 0.5)
    return rois[keep]


@pytest.mark.parametrize("output_size", [1, (3, 2)])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_matches_torchvision_forward_and_backward(backend, device, output_size, sampling_ratio):
    generator = torch.Generator().manual_seed(sampling_ratio + 3)
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = features(2, 2 * size[0] * size[1], 13, 17, generator, torch.float64).to(device)
    rois = nonempty_rois(5, 2, 13, 17, 0.5, generator).double().to(device)
    results = []
    grad = torch.randn(rois.shape[0], 2, *size, generator=generator, dtype=torch.float64).to(device)
    for fn in (ops.ps_roi_align, torchvision.ops.ps_roi_align):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, rois, output_size, 0.5, sampling_ratio)
        out.backward(grad)
        results.append((out, leaf.grad))
    assert_close(results[0][0], results[1][0], torch.float64)
    assert_close(results[0][1], results[1][1], torch.float64)
    torch.use_deterministic_algorithms(True)
    try:
        leaf = x.clone().requires_grad_()
        ops.ps_roi_align(leaf, rois, output_size, 0.5, sampling_ratio).backward(grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_close(leaf.grad, results[1][1], torch.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_channels_last_and_empty_bins(backend, device, dtype):
    generator = torch.Generator().manual_seed(5)
    x = features(2, 8, 13, 17, generator).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    rois = make_rois(4, 2, 13, 17, 1.0, generator).to(device)
    ours = ops.ps_roi_align(x, rois, 2, 1.0, 2)
    theirs = torchvision.ops.ps_roi_align(x.double().contiguous(), rois.double(), 2, 1.0, 2)
    assert ours.dtype == dtype and ours.shape == (rois.shape[0], 2, 2, 2)
    assert_close(ours.double(), theirs.to(dtype).double(), dtype)
    empty = torch.tensor([[0.0, 3, 3, 3, 3]], device=device)
    assert not ops.ps_roi_align(x, empty, 2, 1.0, -1).any()  # torchvision: NaN (0 / 0)


def test_gradcheck_opcheck_and_repr(backend, device):
    generator = torch.Generator().manual_seed(7)
    x = features(2, 4, 5, 6, generator, torch.float64).to(device).requires_grad_()
    rois = nonempty_rois(2, 2, 5, 6, 1.0, generator).double().to(device)
    # Atomic backward: see ATOMIC_NONDET_TOL.
    assert torch.autograd.gradcheck(
        lambda t: ops.ps_roi_align(t, rois, 2, 1.0, 2), (x,), fast_mode=True, nondet_tol=ATOMIC_NONDET_TOL
    )
    torch.library.opcheck(torch.ops.tritondet.ps_roi_align.default, (x.float(), rois.float(), 1.0, 2, 2, -1))
    assert repr(ops.PSRoIAlign(2, 0.5, 2)) == repr(torchvision.ops.PSRoIAlign(2, 0.5, 2))
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.ps_roi_align(x[:, :3], rois, 2)
