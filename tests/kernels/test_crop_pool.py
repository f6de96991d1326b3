"""crop_pool against an affine_grid + grid_sample + max_pool2d composition, on both backends."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.test_roi_align import features, make_rois
from tests.tolerances import FLOAT_DTYPES, assert_close
from tritondet import ops


def composition(x, rois, output_size, spatial_scale, sampling_ratio):
    """The "Spatial Transformer" crop pooling of the PyTorch Faster R-CNN ports, RoI by RoI."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    _, c, h, w = x.shape
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale).unbind(1)
    zero = torch.zeros_like(x1)
    theta = torch.stack(
        [
            torch.stack([(x2 - x1) / (w - 1), zero, (x1 + x2 - w + 1) / (w - 1)], 1),
            torch.stack([zero, (y2 - y1) / (h - 1), (y1 + y2 - h + 1) / (h - 1)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [rois.shape[0], c, ph * sampling_ratio, pw * sampling_ratio], align_corners=True)
    crops = F.grid_sample(x[rois[:, 0].long()], grid, "bilinear", "zeros", align_corners=True)
    return F.max_pool2d(crops, sampling_ratio, sampling_ratio)


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), (1, 1), ((7, 5), 2), ((3, 2), 3)])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_matches_affine_grid_composition(backend, device, output_size, sampling_ratio, spatial_scale):
    generator = torch.Generator().manual_seed(sampling_ratio)
    x = features(3, 2, 13, 17, generator, torch.float64).to(device)
    rois = make_rois(6, 3, 13, 17, spatial_scale, generator).double().to(device)
    grad = None
    results = []
    for fn in (ops.crop_pool, composition):
        leaf, boxes = x.clone().requires_grad_(), rois.clone().requires_grad_()
        out = fn(leaf, boxes, output_size, spatial_scale, sampling_ratio)
        grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(device) if grad is None else grad
        out.backward(grad)
        results.append((out, leaf.grad, boxes.grad))
    for ours, theirs in zip(results[0], results[1], strict=True):
        assert_close(ours, theirs, torch.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_and_channels_last(backend, device, dtype):
    generator = torch.Generator().manual_seed(3)
    x = features(2, 3, 13, 17, generator).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    rois = make_rois(5, 2, 13, 17, 1.0, generator).to(device)
    ours = ops.crop_pool(x, rois, (3, 2))
    assert ours.dtype == dtype and ours.is_contiguous()
    assert_close(ours.double(), composition(x.double(), rois.double(), (3, 2), 1.0, 2).to(dtype).double(), dtype)


def test_gradcheck_with_respect_to_boxes_and_input(backend, device):
    generator = torch.Generator().manual_seed(5)
    x = features(2, 1, 6, 7, generator, torch.float64).to(device).requires_grad_()
    rois = make_rois(2, 2, 6, 7, 1.0, generator)[:2].double().to(device)
    batch, boxes = rois[:, :1], rois[:, 1:].clone().requires_grad_()  # the batch column is not perturbed

    def pool(t, b):
        return ops.crop_pool(t, torch.cat([batch, b], 1), (2, 3), 1.0, 2)

    assert torch.autograd.gradcheck(pool, (x, boxes), fast_mode=True)
    assert torch.autograd.gradcheck(pool, (x.detach(), boxes))  # every box coordinate


def test_opcheck_bad_rois_and_arguments(backend, device):
    generator = torch.Generator().manual_seed(7)
    x = features(2, 2, 6, 7, generator).to(device).requires_grad_()
    rois = make_rois(2, 2, 6, 7, 1.0, generator).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.tritondet.crop_pool.default, (x, rois, 1.0, 2, 2, 2))
    bad = torch.tensor([[2.0, 0, 0, 3, 3], [0.5, 0, 0, 3, 3]], device=device)
    out, argmax = torch.ops.tritondet.crop_pool(x.detach(), bad, 1.0, 2, 2, 2)
    assert not out.any() and (argmax == -1).all()
    with pytest.raises(ValueError, match="sampling_ratio"):
        ops.crop_pool(x, rois, 2, 1.0, 0)
