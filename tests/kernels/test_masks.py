"""Mask R-CNN's mask ops against torchvision's roi_heads functions, on both backends.

``paste_masks_in_image`` and ``mask_targets`` against torchvision's ``paste_masks_in_image`` and
``project_masks_on_boxes`` (per image), ``paste_masks_padded`` against per-image pasting then
``> threshold``, ``mask_loss`` against ``F.binary_cross_entropy_with_logits`` of the labelled
channel (``maskrcnn_loss``'s value). Tiny sizes: the Triton interpreter is slow.
"""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image as torchvision_paste
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from tests.tolerances import FLOAT_DTYPES, assert_close
from tritondet import errors, ops
from tritondet.kernels import _cpu
from tritondet.kernels import masks as masks_kernels

IMAGE = (23, 31)


@pytest.fixture(autouse=True)
def windowed_paste_at_test_sizes(monkeypatch):
    """The CPU backend pastes mask by mask over each box's window from WINDOWED_PASTE_PIXELS on;
    at 0 every test size takes that path (the reference and Triton paths never read it)."""
    monkeypatch.setattr(masks_kernels, "WINDOWED_PASTE_PIXELS", 0)


def _boxes_in_and_around(count: int, height: int, width: int, generator) -> torch.Tensor:
    """Boxes of 0.2 to ~25 pixels with corners up to 3 pixels outside the image, none entirely
    outside it (torchvision's slicing fails or wraps around for those)."""
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width + 2.0, height + 2.0]) - 3
    size = 0.2 + torch.rand(count, 2, generator=generator) ** 2 * 25
    return torch.cat([corner, (corner + size).clamp(min=0.5)], 1)


# Degenerate and odd boxes: sub-pixel, zero and negative extent, partly outside every side,
# covering the image and more.
ODD_BOXES = torch.tensor(
    [
        [5.0, 5.0, 5.2, 5.1],
        [7.0, 3.0, 7.0, 3.0],
        [9.0, 9.0, 8.0, 8.5],
        [-4.0, -2.5, 8.0, 30.0],
        [20.0, 10.0, 40.0, 22.9],
        [-10.0, -10.0, 60.0, 50.0],
        [0.0, 0.0, 0.9, 0.9],
    ]
)


def _paste_per_image(masks, boxes, num_valid, image_sizes, out_hw, paste=torchvision_paste) -> torch.Tensor:
    """The padded batch pasted image by image at each image's size: float ``[B, P, H, W]``."""
    b, p = masks.shape[:2]
    out = masks.new_zeros((b, p, *out_hw))
    for image in range(b):
        n = int(num_valid[image])
        height, width = image_sizes[image].tolist()
        out[image, :n, :height, :width] = paste(masks[image, :n, None], boxes[image, :n], (height, width))[:, 0]
    return out


@pytest.mark.parametrize("mask_size,padding", [(7, 1), (5, 0), (28, 2)])
def test_paste_matches_torchvision(backend, device, mask_size, padding):
    generator = torch.Generator().manual_seed(mask_size + padding)
    boxes = torch.cat([ODD_BOXES, _boxes_in_and_around(12, *IMAGE, generator)])
    masks = torch.rand(boxes.shape[0], 1, mask_size, mask_size, generator=generator)
    ours = ops.paste_masks_in_image(masks.to(device), boxes.to(device), IMAGE, padding)
    expected = torchvision_paste(masks, boxes, IMAGE, padding)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    assert_close(ours.cpu(), expected, torch.float32)


def test_paste_keeps_nan_and_inf_to_the_pixels_that_read_them(backend, device):
    """A NaN mask pixel, or an inf one read with a zero weight (inf * 0), makes NaN only the image
    pixels whose bilinear taps read it, an inf pixel read with positive weights makes them inf,
    +inf and -inf together NaN: torchvision's F.interpolate, not a NaN spread over the whole
    image by the zero weights of a matrix product."""
    nan, inf = float("nan"), float("inf")
    generator = torch.Generator().manual_seed(4)
    boxes = torch.cat([ODD_BOXES, _boxes_in_and_around(5, *IMAGE, generator)])
    masks = torch.rand(boxes.shape[0], 1, 5, 5, generator=generator)
    masks[0::3, 0, 2, 3] = nan
    masks[1::3, 0, 0, 0] = inf
    masks[1::3, 0, 4, 1] = -inf
    masks[2::3, 0, 1, 1] = inf
    masks[2::3, 0, 1, 2] = -inf
    masks[2::3, 0, 4, 4] = nan
    ours = ops.paste_masks_in_image(masks.to(device), boxes.to(device), IMAGE)
    expected = torchvision_paste(masks, boxes, IMAGE)
    assert torch.equal(ours.isnan().cpu(), expected.isnan())
    assert_close(ours.cpu(), expected, torch.float32)
    num_valid, image_sizes = torch.tensor([boxes.shape[0]]), torch.tensor([IMAGE])
    args = (masks[None, :, 0], boxes[None], num_valid, image_sizes)
    thresholded = ops.paste_masks_padded(*(t.to(device) for t in args), IMAGE)
    assert torch.equal(thresholded.cpu(), expected[None, :, 0] > 0.5)


def test_paste_nothing_and_a_box_entirely_outside(backend, device):
    empty = ops.paste_masks_in_image(torch.rand(0, 1, 7, 7).to(device), torch.zeros(0, 4).to(device), IMAGE)
    assert empty.shape == (0, 1, *IMAGE)
    # Entirely outside the image on each side (torchvision's slices fail or wrap around): nothing.
    outside = torch.tensor(
        [[-20.0, 3.0, -5.0, 9.0], [2.0, -30.0, 9.0, -8.0], [35.0, 2.0, 40.0, 8.0], [3.0, 26.0, 9.0, 30.0]]
    )
    pasted = ops.paste_masks_in_image(torch.ones(4, 1, 7, 7, device=device), outside.to(device), IMAGE)
    assert not pasted.any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_paste_dtypes_and_strides(backend, device, dtype):
    generator = torch.Generator().manual_seed(3)
    boxes = _boxes_in_and_around(6, *IMAGE, generator)
    masks = torch.rand(6, 1, 9, 14, generator=generator)[..., ::2]  # [6, 1, 9, 7], not contiguous
    ours = ops.paste_masks_in_image(masks.to(dtype).to(device), boxes.to(device), IMAGE)
    assert ours.dtype == dtype
    expected = torchvision_paste(masks.to(dtype).double(), boxes, IMAGE)
    assert_close(ours.cpu().double(), expected, dtype)


def test_paste_padded_thresholds_every_image_in_one_call(backend, device):
    generator = torch.Generator().manual_seed(5)
    b, p, m = 3, 7, 6
    masks = torch.rand(b, p, m, m, generator=generator)
    image_sizes = torch.tensor([IMAGE, (17, 29), (23, 12)])
    boxes = torch.stack([_boxes_in_and_around(p, *size, generator) for size in image_sizes.tolist()])
    num_valid = torch.tensor([7, 0, 4])
    out_hw = (IMAGE[0] + 2, IMAGE[1] + 3)
    values = _paste_per_image(masks, boxes, num_valid, image_sizes, out_hw)
    args = [t.to(device) for t in (masks, boxes, num_valid, image_sizes)]
    for threshold, out_dtype in [(0.5, torch.bool), (0.3, torch.uint8)]:
        ours = ops.paste_masks_padded(*args, out_hw, threshold, out_dtype)
        assert ours.dtype == out_dtype and ours.shape == (b, p, *out_hw)
        # Our float paste thresholded: the same values, so the same pixels exactly.
        ours_values = _paste_per_image(masks, boxes, num_valid, image_sizes, out_hw, ops.paste_masks_in_image)
        assert torch.equal(ours.cpu(), (ours_values > threshold).to(out_dtype))
        # torchvision's, away from values within the fp32 tolerance of the threshold.
        clear = (values - threshold).abs() > 1e-5
        assert torch.equal(ours.cpu()[clear], (values > threshold).to(out_dtype)[clear])
    unthresholded = ops.paste_masks_padded(*args, out_hw, None, torch.float32)
    assert_close(unthresholded.cpu(), values, torch.float32)
    assert not unthresholded[1].any() and not unthresholded[0, :, IMAGE[0] :].any()


def test_paste_padded_negative_threshold_marks_the_image_only(backend, device):
    masks = torch.zeros(1, 2, 4, 4, device=device)
    boxes = torch.tensor([[[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]]], device=device)
    out = ops.paste_masks_padded(
        masks, boxes, torch.tensor([1], device=device), torch.tensor([[5, 6]], device=device), (7, 8), -0.1
    )
    assert out[0, 0, :5, :6].all() and not out[0, 0, 5:].any() and not out[0, 0, :, 6:].any()
    assert not out[0, 1].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paste_padded_half_masks(backend, device, dtype):
    generator = torch.Generator().manual_seed(7)
    masks = torch.rand(2, 3, 5, 5, generator=generator).to(dtype)
    boxes = torch.stack([_boxes_in_and_around(3, *IMAGE, generator) for _ in range(2)])
    num_valid, image_sizes = torch.tensor([3, 2]), torch.tensor([IMAGE, IMAGE])
    args = [t.to(device) for t in (masks, boxes, num_valid, image_sizes)]
    values = ops.paste_masks_padded(*args, IMAGE, None, dtype)
    assert values.dtype == dtype
    expected = _paste_per_image(masks.double(), boxes, num_valid, image_sizes, IMAGE)
    assert_close(values.cpu().double(), expected, dtype)
    assert torch.equal(ops.paste_masks_padded(*args, IMAGE).cpu(), values.cpu() > 0.5)


def test_paste_compiles_and_passes_opcheck(backend, device):
    generator = torch.Generator().manual_seed(9)
    masks = torch.rand(2, 3, 5, 5, generator=generator).to(device)
    boxes = torch.stack([_boxes_in_and_around(3, 12, 14, generator) for _ in range(2)]).to(device)
    num_valid, sizes = torch.tensor([3, 1], device=device), torch.tensor([[12, 14], [10, 9]], device=device)
    torch.library.opcheck(
        torch.ops.tritondet.paste_masks.default, (masks, boxes, num_valid, sizes, 12, 14, 1, 0.5, torch.bool)
    )
    compiled = torch.compile(ops.paste_masks_padded, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(masks, boxes, num_valid, sizes, (12, 14)), ops.paste_masks_padded(
        masks, boxes, num_valid, sizes, (12, 14)
    ))  # fmt: skip
    single = torch.compile(ops.paste_masks_in_image, fullgraph=True, backend="aot_eager")
    assert_close(
        single(masks[0, :, None], boxes[0], (12, 14)),
        ops.paste_masks_in_image(masks[0, :, None], boxes[0], (12, 14)),
        torch.float32,
    )


# ----------------------------------------------------------------------------------------------
# Mask targets
# ----------------------------------------------------------------------------------------------


def _targets_inputs(generator, sizes=((20, 25), (20, 25)), counts=(3, 2), proposals_per_image=5):
    gt = [torch.rand(3, h, w, generator=generator) > 0.5 for h, w in sizes]
    proposals = torch.stack([_boxes_in_and_around(proposals_per_image, h, w, generator) for h, w in sizes])
    proposals[0, 0] = torch.tensor([2.0, 3.0, 2.5, 3.2])  # smaller than a pixel
    proposals[0, 1] = torch.tensor([-30.0, -5.0, 40.0, 60.0])  # bigger than the image
    matched = torch.stack([torch.randint(0, c, (proposals_per_image,), generator=generator) for c in counts])
    return gt, torch.tensor(counts), proposals, matched


def _torchvision_targets(gt, counts, proposals, matched, num_valid, m):
    out = torch.zeros(*proposals.shape[:2], m, m)
    for image in range(len(gt)):
        n = int(num_valid[image])
        keep = (matched[image, :n] >= 0) & (matched[image, :n] < counts[image])
        rows = keep.nonzero()[:, 0]
        if rows.numel():
            out[image, rows] = project_masks_on_boxes(gt[image], proposals[image, rows], matched[image, rows], m)
    return out


@pytest.mark.parametrize("m", [5, 28])
def test_mask_targets_match_torchvision(backend, device, m):
    generator = torch.Generator().manual_seed(m)
    gt, counts, proposals, matched = _targets_inputs(generator)
    matched[1, 2] = -1  # unmatched: zero
    num_valid = torch.tensor([5, 3])
    expected = _torchvision_targets(gt, counts, proposals, matched, num_valid, m)
    dense = torch.stack(gt).transpose(2, 3).contiguous().transpose(2, 3).to(device)  # column-major planes
    args = [t.to(device) for t in (counts, proposals.transpose(0, 1).contiguous().transpose(0, 1), matched, num_valid)]
    ours = ops.mask_targets(dense, *args, m)
    assert ours.dtype == torch.float32 and ours.shape == (2, 5, m, m)
    assert_close(ours.cpu(), expected, torch.float32)
    assert not ours[1, 2:].any()


def test_mask_targets_of_proposals_many_pixels_wide_match_torchvision(backend, device):
    """Proposals of up to the whole mask and beyond: adaptive grids of 1 to 15 samples per bin on
    each axis, samples at and past every edge."""
    generator = torch.Generator().manual_seed(19)
    gt = torch.rand(2, 3, 60, 90, generator=generator) > 0.5
    corner = torch.rand(2, 6, 2, generator=generator) * torch.tensor([80.0, 50.0]) - 5
    size = torch.rand(2, 6, 2, generator=generator) * torch.tensor([100.0, 70.0]) + 0.5
    proposals = torch.cat([corner, corner + size], -1)
    proposals[1, 0] = torch.tensor([-10.0, -10.0, 100.0, 70.0])  # the whole mask and more
    matched = torch.randint(0, 3, (2, 6), generator=generator)
    counts, num_valid = torch.tensor([3, 3]), torch.tensor([6, 6])
    expected = _torchvision_targets(list(gt), counts, proposals, matched, num_valid, 7)
    ours = ops.mask_targets(gt.to(device), *[t.to(device) for t in (counts, proposals, matched, num_valid)], 7)
    assert_close(ours.cpu(), expected, torch.float32)


def test_mask_targets_from_a_list_of_image_sizes(backend, device):
    generator = torch.Generator().manual_seed(11)
    gt, counts, proposals, matched = _targets_inputs(generator, sizes=((20, 25), (13, 31)))
    gt[1] = gt[1].to(torch.uint8)[:2]  # uint8 masks, G_1 = 2
    gt[0] = gt[0].to(torch.uint8)
    counts = torch.tensor([3, 2])
    matched = matched.clamp(max=1)
    num_valid = torch.tensor([5, 5])
    expected = _torchvision_targets(gt, counts, proposals, matched, num_valid, 6)
    ours = ops.mask_targets(
        [g.to(device) for g in gt], *[t.to(device) for t in (counts, proposals, matched, num_valid)], 6
    )
    assert_close(ours.cpu(), expected, torch.float32)


def test_mask_targets_empty_and_float_masks(backend, device):
    generator = torch.Generator().manual_seed(13)
    proposals = _boxes_in_and_around(4, 10, 12, generator)[None].to(device)
    nothing = ops.mask_targets(
        torch.zeros(1, 0, 10, 12, dtype=torch.bool, device=device), torch.tensor([0], device=device), proposals,
        torch.zeros(1, 4, dtype=torch.int64, device=device), torch.tensor([4], device=device), 7,
    )  # fmt: skip
    assert nothing.shape == (1, 4, 7, 7) and not nothing.any()
    none = ops.mask_targets(
        torch.zeros(0, 2, 10, 12, device=device), torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, 3, 4, device=device), torch.zeros(0, 3, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device), 7,
    )  # fmt: skip
    assert none.shape == (0, 3, 7, 7)
    soft = torch.rand(1, 2, 10, 12, generator=generator)
    matched = torch.tensor([[0, 1, 1, 0]])
    ours = ops.mask_targets(soft.to(device), torch.tensor([2], device=device), proposals, matched.to(device),
                            torch.tensor([4], device=device), 7)  # fmt: skip
    assert_close(ours[0].cpu(), project_masks_on_boxes(soft[0], proposals[0].cpu(), matched[0], 7), torch.float32)


def test_mask_targets_compile_and_opcheck(backend, device):
    generator = torch.Generator().manual_seed(17)
    gt, counts, proposals, matched = _targets_inputs(generator, proposals_per_image=3)
    args = [torch.stack(gt).to(device), *[t.to(device) for t in (counts, proposals, matched, torch.tensor([3, 2]))]]
    torch.library.opcheck(torch.ops.tritondet.mask_targets.default, (args[0], [20, 25, 20, 25], *args[1:], 4))
    compiled = torch.compile(ops.mask_targets, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args, 4), ops.mask_targets(*args, 4))


# ----------------------------------------------------------------------------------------------
# Mask loss
# ----------------------------------------------------------------------------------------------


def _loss_inputs(generator, k=6, c=4, m=5, dtype=torch.float32):
    logits = (torch.randn(k, c, m, m, generator=generator) * 4).to(dtype)
    labels = torch.randint(0, c, (k,), generator=generator)
    targets = (torch.rand(k, m, m, generator=generator) > 0.5).float()
    return logits, labels, targets


def _torchvision_loss(logits, labels, targets):
    if targets.numel() == 0:
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits[torch.arange(labels.shape[0]), labels], targets)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mask_loss_and_gradient_match_torchvision(backend, device, dtype):
    generator = torch.Generator().manual_seed(19)
    logits, labels, targets = _loss_inputs(generator, dtype=dtype)
    ours_leaf = logits.to(device).requires_grad_()
    ours = ops.mask_loss(ours_leaf.transpose(2, 3), labels.to(device), targets.to(device))  # any strides
    ours.backward()
    expected_leaf = logits.detach().double().requires_grad_()
    expected = _torchvision_loss(expected_leaf.transpose(2, 3), labels, targets.double())
    expected.backward()
    assert ours.dtype == dtype and ours_leaf.grad.dtype == dtype
    assert_close(ours.cpu().double(), expected.detach(), dtype)
    assert_close(ours_leaf.grad.cpu().double(), expected_leaf.grad, dtype)
    unlabelled = torch.ones_like(ours_leaf.grad, dtype=torch.bool)
    unlabelled[torch.arange(labels.shape[0]), labels] = False
    assert not ours_leaf.grad[unlabelled].any()


def test_mask_loss_weights_skip_padded_rows(backend, device):
    generator = torch.Generator().manual_seed(23)
    logits, labels, targets = _loss_inputs(generator, k=7)
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    labels[2] = -1  # a padded row's label is not read
    logits[4] = float("nan")  # nor its logits
    leaf = logits.to(device).requires_grad_()
    ours = ops.mask_loss(leaf, labels.to(device), targets.to(device), weights.to(device))
    ours.backward()
    kept = weights > 0
    expected_leaf = logits.detach()[kept].clone().requires_grad_()
    expected = _torchvision_loss(expected_leaf, labels[kept], targets[kept])
    expected.backward()
    assert_close(ours.cpu(), expected.detach(), torch.float32)
    assert_close(leaf.grad.cpu()[kept], expected_leaf.grad, torch.float32)
    assert not leaf.grad[~kept.to(device)].any()
    zero = ops.mask_loss(leaf, labels.to(device), targets.to(device), torch.zeros(7, device=device))
    assert zero.item() == 0.0


def test_mask_loss_of_no_rois_is_zero_with_a_zero_gradient(backend, device):
    leaf = torch.randn(0, 3, 5, 5, device=device, requires_grad=True)
    loss = ops.mask_loss(leaf, torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 5, 5, device=device))
    loss.backward()
    assert loss.item() == 0.0 and loss.shape == () and leaf.grad.shape == leaf.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mask_loss_backward_cpu_equals_reference_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(31)
    grad = torch.randn(6, 5, 5, generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    grad[3] = float("nan")  # an unlabelled row's gradient is never read
    labels = torch.tensor([2, -1, 0, 4, 3, 2])  # -1 and 4 (= C) label no channel
    scale = torch.tensor(0.37, dtype=grad.dtype)
    ours = masks_kernels.mask_loss_backward_cpu(grad, labels, scale, 4, dtype)
    expected = masks_kernels.mask_loss_backward_reference(grad, labels, scale, 4, dtype)
    assert ours.dtype == expected.dtype == dtype and ours.shape == expected.shape == (6, 4, 5, 5)
    assert torch.equal(ours, expected)  # no NaN reaches either: rows labelling no channel stay 0
    assert not ours[[1, 3]].any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mask_loss_cpu_equals_reference_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(37)
    logits, labels, targets = _loss_inputs(generator, k=8, dtype=dtype)
    logits[2] = float("nan")  # rows that do not count: their logits never reach the sum
    labels[[1, 4]] = torch.tensor([-1, 4])  # -1 and 4 (= C) label no channel
    targets[5] = torch.rand(5, 5, generator=generator) * 3 - 1  # soft targets outside [0, 1]
    weights = torch.tensor([1.0, 1.0, 0.0, 2.5, 1.0, 0.5, float("nan"), -1.0])
    for args in (
        (logits, labels, targets, None),
        (logits.transpose(2, 3), labels, targets.to(dtype), weights.to(dtype)),  # any strides and dtypes
        (logits, labels.clamp(0, 3), targets, None),  # every row counts: logits[2] reaches the sum
    ):
        ours = masks_kernels.mask_loss_cpu(*args)
        expected = masks_kernels.mask_loss_reference(*args)
        for mine, theirs in zip(ours, expected, strict=True):
            assert mine.dtype == theirs.dtype and mine.stride() == theirs.stride()
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mask_loss_backward_cpu_equals_reference_over_huge_pages(dtype):
    """A gradient buffer of several huge pages (its zero fill runs on advised memory) is still the
    reference's, bit for bit."""
    generator = torch.Generator().manual_seed(41)
    grad = torch.randn(
        40, 28, 28, generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    labels = torch.randint(-1, 92, (40,), generator=generator)  # -1 and 91 (= C) label no channel
    scale = torch.tensor(0.37, dtype=grad.dtype)
    ours = masks_kernels.mask_loss_backward_cpu(grad, labels, scale, 91, dtype)
    assert ours.numel() * ours.element_size() >= 2 * _cpu.HUGE_PAGE_BYTES
    assert torch.equal(ours, masks_kernels.mask_loss_backward_reference(grad, labels, scale, 91, dtype))


def test_mask_loss_gradcheck_opcheck_and_compile(backend, device):
    generator = torch.Generator().manual_seed(29)
    logits, labels, targets = _loss_inputs(generator, k=3, c=2, m=3, dtype=torch.float64)
    logits, labels, targets = logits.to(device), labels.to(device), targets.double().to(device)
    weights = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64, device=device)
    leaf = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.mask_loss(x, labels, targets), (leaf,))
    assert torch.autograd.gradcheck(lambda x: ops.mask_loss(x, labels, targets, weights), (leaf,))
    single = leaf.detach().float().requires_grad_()
    torch.library.opcheck(torch.ops.tritondet.mask_loss.default, (single, labels, targets.float(), None))
    torch.library.opcheck(torch.ops.tritondet.mask_loss.default, (single, labels, targets.float(), weights.float()))
    compiled = torch.compile(ops.mask_loss, fullgraph=True, backend="aot_eager")
    assert_close(
        compiled(single, labels, targets.float()), ops.mask_loss(single, labels, targets.float()), torch.float32
    )
    grads = [torch.autograd.grad(fn(single, labels, targets.float()), single)[0] for fn in (compiled, ops.mask_loss)]
    assert_close(grads[0], grads[1], torch.float32)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_is_named():
    masks, boxes = torch.rand(2, 1, 5, 5), torch.rand(2, 4)
    with pytest.raises(ValueError, match="masks must have shape"):
        ops.paste_masks_in_image(torch.rand(2, 2, 5, 5), boxes, IMAGE)
    with pytest.raises(TypeError, match="masks must hold real numbers"):
        ops.paste_masks_in_image(masks > 0.5, boxes, IMAGE)
    with pytest.raises(ValueError, match="boxes must have shape"):
        ops.paste_masks_in_image(masks, torch.rand(3, 4), IMAGE)
    with pytest.raises(ValueError, match="padding"):
        ops.paste_masks_in_image(masks, boxes, IMAGE, padding=-1)
    with pytest.raises(TypeError, match="img_shape"):
        ops.paste_masks_in_image(masks, boxes, 5)
    padded = (torch.rand(1, 2, 5, 5), torch.rand(1, 2, 4), torch.tensor([2]), torch.tensor([IMAGE]), IMAGE)
    with pytest.raises(ValueError, match="num_valid values"):
        ops.paste_masks_padded(*padded[:2], torch.tensor([3]), *padded[3:])
    with pytest.raises(ValueError, match="image_sizes must have shape"):
        ops.paste_masks_padded(*padded[:3], torch.tensor([IMAGE, IMAGE]), IMAGE)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.paste_masks_padded(*padded, threshold=None)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.paste_masks_padded(*padded, out_dtype=torch.float32)
    proposals, matched, count = torch.rand(1, 2, 4), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([1])
    with pytest.raises(ValueError, match="gt_count values"):
        ops.mask_targets(torch.zeros(1, 1, 4, 4, dtype=torch.bool), torch.tensor([2]), proposals, matched, count, 3)
    with pytest.raises(TypeError, match="gt_masks must be"):
        ops.mask_targets("masks", count, proposals, matched, count, 3)
    with pytest.raises(ValueError, match="gt_masks must hold 1"):
        ops.mask_targets([], count, proposals, matched, count, 3)
    with pytest.raises(ValueError, match="M must be"):
        ops.mask_targets(torch.zeros(1, 1, 4, 4, dtype=torch.bool), count, proposals, matched, count, 0)
    logits, labels, targets = _loss_inputs(torch.Generator().manual_seed(0), k=2, c=3, m=4)
    with pytest.raises(ValueError, match="labels of rows"):
        ops.mask_loss(logits, torch.tensor([0, 3]), targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        ops.mask_loss(logits, labels, targets[:, :3])
    with pytest.raises(TypeError, match="labels must be an integer"):
        ops.mask_loss(logits, labels.float(), targets)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.mask_loss(logits, labels, targets, torch.ones(3))


def test_bad_input_raises_tritondet_errors_naming_the_argument():
    """The mask ops raise tritondet's errors (caught as ValueError or TypeError and, as
    torchvision's, as RuntimeError), naming the argument; sizes and thresholds are ints and real
    numbers, never strings."""
    masks, boxes = torch.rand(2, 1, 5, 5), torch.rand(2, 4)
    padded = (torch.rand(1, 2, 5, 5), torch.rand(1, 2, 4), torch.tensor([2]), torch.tensor([IMAGE]), IMAGE)
    proposals, matched, count = torch.rand(1, 2, 4), torch.zeros(1, 2, dtype=torch.int64), torch.tensor([1])
    gt_masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    type_errors = [
        ("img_shape", lambda: ops.paste_masks_in_image(masks, boxes, "67")),
        ("img_shape", lambda: ops.paste_masks_in_image(masks, boxes, (6.0, 7))),
        ("padding", lambda: ops.paste_masks_in_image(masks, boxes, IMAGE, "1")),
        ("out_hw", lambda: ops.paste_masks_padded(*padded[:4], "66")),
        ("threshold", lambda: ops.paste_masks_padded(*padded, threshold="0.5")),
        ("num_valid", lambda: ops.paste_masks_padded(*padded[:2], torch.tensor([2.0]), *padded[3:])),
        ("gt_masks", lambda: ops.mask_targets("masks", count, proposals, matched, count, 3)),
        ("M", lambda: ops.mask_targets(gt_masks, count, proposals, matched, count, "3")),
    ]
    for name, call in type_errors:
        with pytest.raises(errors.ArgumentTypeError, match=name):
            call()
    value_errors = [
        ("masks", lambda: ops.paste_masks_in_image(torch.rand(2, 2, 5, 5), boxes, IMAGE)),
        ("img_shape", lambda: ops.paste_masks_in_image(masks, boxes, (-1, 5))),
        ("padding", lambda: ops.paste_masks_in_image(masks, boxes, IMAGE, padding=-1)),
        ("out_dtype", lambda: ops.paste_masks_padded(*padded, threshold=None)),
        ("gt_masks", lambda: ops.mask_targets([], count, proposals, matched, count, 3)),
        ("M", lambda: ops.mask_targets(gt_masks, count, proposals, matched, count, 0)),
        ("targets", lambda: ops.mask_loss(torch.rand(2, 3, 4, 4), count.expand(2), torch.rand(2, 3, 4))),
    ]
    for name, call in value_errors:
        with pytest.raises(errors.ArgumentValueError, match=name):
            call()


def test_mask_targets_of_huge_proposals_bound_their_work(monkeypatch):
    """Proposals with 1e30 corners: the RoIAlign reference (CPU path and oracle) clamps the
    adaptive sampling grid as the kernels do and visits only the samples near the mask, so it
    finishes (no OverflowError, no grid of 1e30 samples), and so does the Triton kernel (exact
    sample spans); ordinary rows still equal torchvision."""
    generator = torch.Generator().manual_seed(6)
    gt_masks = torch.rand(1, 2, 6, 5, generator=generator) > 0.5
    proposals = torch.tensor([[[0, 0, 1e30, 3.0], [1, 1, 4, 5], [-1e30, -1e30, 1e30, 1e30], [1e30, 0, 1e30, 2]]])
    matched = torch.tensor([[0, 1, 0, 1]])
    expected = project_masks_on_boxes(gt_masks[0], proposals[0, 1:2], matched[0, 1:2], 3)
    for backend in ("reference", "cpu", "triton"):
        monkeypatch.setenv("TRITONDET_BACKEND", backend)
        targets = ops.mask_targets(gt_masks, torch.tensor([2]), proposals, matched, torch.tensor([4]), 3)
        assert torch.isfinite(targets).all()
        assert_close(targets[0, 1:2], expected.float(), torch.float32)
        assert_close(targets[0, [0, 2, 3]], torch.zeros(3, 3, 3), torch.float32)
