"""Mask R-CNN's mask ops: pasting predicted masks into images, mask targets and the mask loss.

Shapes: B images, P boxes per image (padded; the first ``num_valid[b]`` are real), K = RoIs,
C classes, G ground-truth masks per image, M x M masks (MH x MW where any rectangle works),
H x W images.

- paste: ``masks [B, P, MH, MW]`` resized into their integer boxes and written into
  ``[B, P, H, W]``, torchvision's ``paste_masks_in_image`` (``expand_masks``, ``expand_boxes``,
  ``paste_mask_in_image``): the mask is padded by ``padding`` zero pixels, its box grown by
  ``(MW + 2 * padding) / MW`` and truncated to integers, the padded mask resized to the box's
  ``(y1 - y0 + 1) x (x1 - x0 + 1)`` pixels (at least 1) by ``F.interpolate(mode="bilinear",
  align_corners=False)`` and pasted at ``(x0, y0)``, clipped to the image. Optionally thresholded
  in the same launch (``value > threshold``, the value first rounded to the masks' dtype).
- mask targets: torchvision's ``project_masks_on_boxes``: ``roi_align`` (spatial scale 1,
  adaptive sampling grid, ``aligned=False``) of each proposal's matched ground-truth mask into
  ``M x M``, for every image of the batch in one launch, each image read with its own mask size.
- mask loss: torchvision's ``maskrcnn_loss`` value, binary cross-entropy with logits of each
  RoI's labelled channel, averaged over its ``M * M`` pixels and the RoIs (optionally only those
  with a weight above 0, each scaled by its weight); the forward also writes the labelled
  channel's gradient, which the backward scales and spreads into the ``C`` channels.

Order of this file: Triton kernels -> argument builders and host launchers -> pure-PyTorch
references (vectorized: the test oracle) and the fast CPU paths beside them -> ``torch.library``
registration -> AOT specializations.

Numerics: fp32 (fp64 for fp64 inputs), fp16/bf16 upcast as loaded; divisions whose result is
floored or compared are IEEE (``ieee_div``). Box expansion runs in PyTorch on the boxes' dtype in
torchvision's order of operations, so the integer boxes are torchvision's exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NO_FP_FUSION, NUM_WARPS, compute_dtype_of, ieee_div
from ._cpu import empty_on_huge_pages
from ._launch import device_table, launch
from .roi_align import MAX_GRID, axis_samples, bin_grid, bin_sample_sums, bin_spans, roi_align_reference

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _resize_axis(coords, start, end, padding, mask_size, compute_dtype: tl.constexpr):
    """One axis of the paste: for image coordinates ``coords`` and the integer box side
    ``[start, end]``, the two source rows (or columns) of the unpadded mask, their weights and
    whether each tap lies in the mask (padding pixels are zero), as F.interpolate's
    ``align_corners=False`` rule on the padded mask of ``mask_size + 2 * padding`` pixels."""
    padded = mask_size + 2 * padding
    box = tl.maximum(end - start + 1, 1)
    scale = ieee_div(padded.to(compute_dtype), box.to(compute_dtype))
    source = scale * ((coords - start).to(compute_dtype) + 0.5) - 0.5
    source = tl.maximum(source, 0.0)
    low = tl.minimum(tl.floor(source).to(tl.int32), padded - 1)
    w_high = tl.minimum(tl.maximum(source - low.to(compute_dtype), 0.0), 1.0)
    w_low = 1.0 - w_high
    high = low + (low < padded - 1).to(tl.int32)
    low = low - padding
    high = high - padding
    return low, high, w_low, w_high, (low >= 0) & (low < mask_size), (high >= 0) & (high < mask_size)


@triton.jit
def _paste_masks_kernel(
    # pointers
    masks_ptr,  # [B, P, MH, MW] any strides
    boxes_ptr,  # [B, P, 4] int64 contiguous: expanded integer boxes (x0, y0, x1, y1)
    num_valid_ptr,  # [B] int64
    image_sizes_ptr,  # [B, 2] int64 contiguous: (height, width) of each image
    out_ptr,  # [B, P, H, W] contiguous: the masks' dtype, or uint8 (0/1) when thresholded
    # sizes
    P,
    MH,
    MW,
    H,
    W,
    # strides (in elements)
    stride_mb,
    stride_mp,
    stride_mh,
    stride_mw,
    # scalars
    padding,
    threshold,  # rounded to the masks' dtype on the host
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    THRESHOLD: tl.constexpr,  # store value > threshold as 0/1 instead of the value
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    row = tl.program_id(0)
    b = row // P
    p = row % P
    ys = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    xs = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)

    valid = p < tl.load(num_valid_ptr + b)
    image_h = tl.load(image_sizes_ptr + 2 * b)
    image_w = tl.load(image_sizes_ptr + 2 * b + 1)
    box = boxes_ptr + row.to(tl.int64) * 4
    x0 = tl.load(box)
    y0 = tl.load(box + 1)
    x1 = tl.load(box + 2)
    y1 = tl.load(box + 3)
    in_image_y = ys < image_h
    in_image_x = xs < image_w
    in_box_y = in_image_y & (ys >= y0) & (ys <= y1) & valid
    in_box_x = in_image_x & (xs >= x0) & (xs <= x1)

    y_low, y_high, wy_low, wy_high, y_low_in, y_high_in = _resize_axis(ys, y0, y1, padding, MH, compute_dtype)
    x_low, x_high, wx_low, wx_high, x_low_in, x_high_in = _resize_axis(xs, x0, x1, padding, MW, compute_dtype)
    base = masks_ptr + b.to(tl.int64) * stride_mb + p.to(tl.int64) * stride_mp
    row_low = (y_low.to(tl.int64) * stride_mh)[:, None]
    row_high = (y_high.to(tl.int64) * stride_mh)[:, None]
    col_low = (x_low.to(tl.int64) * stride_mw)[None, :]
    col_high = (x_high.to(tl.int64) * stride_mw)[None, :]
    in_box = in_box_y[:, None] & in_box_x[None, :]
    low_low = in_box & y_low_in[:, None] & x_low_in[None, :]
    low_high = in_box & y_low_in[:, None] & x_high_in[None, :]
    high_low = in_box & y_high_in[:, None] & x_low_in[None, :]
    high_high = in_box & y_high_in[:, None] & x_high_in[None, :]
    v00 = tl.load(base + row_low + col_low, mask=low_low, other=0).to(compute_dtype)
    v01 = tl.load(base + row_low + col_high, mask=low_high, other=0).to(compute_dtype)
    v10 = tl.load(base + row_high + col_low, mask=high_low, other=0).to(compute_dtype)
    v11 = tl.load(base + row_high + col_high, mask=high_high, other=0).to(compute_dtype)
    # F.interpolate's order: each source row along the width first, then the two rows.
    top = v00 * wx_low[None, :] + v01 * wx_high[None, :]
    bottom = v10 * wx_low[None, :] + v11 * wx_high[None, :]
    value = top * wy_low[:, None] + bottom * wy_high[:, None]
    value = tl.where(in_box, value, 0.0).to(masks_ptr.dtype.element_ty)

    out_offsets = row.to(tl.int64) * H * W + (ys.to(tl.int64) * W)[:, None] + xs[None, :]
    in_output = (ys < H)[:, None] & (xs < W)[None, :]
    if THRESHOLD:
        in_image = (in_image_y & valid)[:, None] & in_image_x[None, :]
        above = in_image & (value.to(compute_dtype) > threshold)
        tl.store(out_ptr + out_offsets, above.to(tl.uint8), mask=in_output)
    else:
        tl.store(out_ptr + out_offsets, value, mask=in_output)


@triton.jit
def _mask_targets_kernel(
    # pointers
    gt_masks_ptr,  # [B, G, HG, WG] any strides, uint8 (bool viewed as uint8) or fp32
    gt_sizes_ptr,  # [B, 2] int64 contiguous: the height and width of each image's masks
    gt_count_ptr,  # [B] int64
    proposals_ptr,  # [B, P, 4] fp32 any strides
    matched_ptr,  # [B, P] int64 any strides: index of the matched mask among the image's G
    num_valid_ptr,  # [B] int64
    out_ptr,  # [B, P, M, M] fp32 contiguous
    # sizes
    P,
    M,
    # strides (in elements)
    stride_gb,
    stride_gg,
    stride_gh,
    stride_gw,
    stride_pb,
    stride_pp,
    stride_pc,
    stride_ib,
    stride_ip,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // P
    p = row % P
    bins = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    bins_ok = bins < M * M
    ph = bins // M
    pw = bins % M

    box = proposals_ptr + b.to(tl.int64) * stride_pb + p.to(tl.int64) * stride_pp
    x1 = tl.load(box).to(tl.float32)
    y1 = tl.load(box + stride_pc).to(tl.float32)
    x2 = tl.load(box + 2 * stride_pc).to(tl.float32)
    y2 = tl.load(box + 3 * stride_pc).to(tl.float32)
    matched = tl.load(matched_ptr + b.to(tl.int64) * stride_ib + p.to(tl.int64) * stride_ip)
    valid = (p < tl.load(num_valid_ptr + b)) & (matched >= 0) & (matched < tl.load(gt_count_ptr + b))
    H = tl.load(gt_sizes_ptr + 2 * b).to(tl.int32)
    W = tl.load(gt_sizes_ptr + 2 * b + 1).to(tl.int32)
    plane = gt_masks_ptr + b.to(tl.int64) * stride_gb + tl.where(valid, matched, 0) * stride_gg

    start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = bin_grid(x1, y1, x2, y2, 1.0, 0, M, M, -1, valid)
    # Only the samples that can land on the mask are visited: bounded by the mask, not the proposal.
    origin_y, first_y, span_y, origin_x, first_x, span_x = bin_spans(
        start_h, start_w, bin_h, bin_w, grid_h, grid_w, ph, pw, bins_ok, H, W
    )
    # One row of lanes: RoIAlign's [channels, bins] tile for a single-channel plane.
    sums = bin_sample_sums(
        plane, bins_ok[None, :], origin_y, first_y, span_y, bin_h, grid_h, origin_x, first_x, span_x, bin_w, grid_w,
        H, W, stride_gh, stride_gw, tl.float32, 1, BLOCK,
    )  # fmt: skip
    acc = tl.sum(sums, axis=0)
    acc = ieee_div(acc, count)
    tl.store(out_ptr + row.to(tl.int64) * M * M + bins, acc, mask=bins_ok)


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small x without libdevice (which the interpreter lacks): the
    rounding of ``1 + x`` is cancelled by the factor ``x / (u - 1)``."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * ieee_div(x, u - 1.0))


@triton.jit
def _mask_loss_fwd_kernel(
    # pointers
    logits_ptr,  # [K, C, M, M] any strides
    labels_ptr,  # [K] int64 contiguous
    targets_ptr,  # [K, M, M] any strides, in the compute dtype
    weights_ptr,  # [K] contiguous, in the compute dtype (unused without HAS_WEIGHTS)
    partial_ptr,  # [K, blocks] contiguous: each block's weighted loss sum
    grad_ptr,  # [K, M, M] contiguous: d(loss sum)/d(logit) of the labelled channel
    # sizes
    C,
    M,
    # strides (in elements)
    stride_lk,
    stride_lc,
    stride_lh,
    stride_lw,
    stride_tk,
    stride_th,
    stride_tw,
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    k = tl.program_id(0)
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pixels_ok = pixels < M * M
    h = (pixels // M).to(tl.int64)
    w = (pixels % M).to(tl.int64)
    label = tl.load(labels_ptr + k)
    active = (label >= 0) & (label < C)
    if HAS_WEIGHTS:
        weight = tl.load(weights_ptr + k)
        # Rows with weight <= 0 (padding) are skipped whatever their label.
        active = active & (weight > 0)
    else:
        weight = 1.0
    label = tl.where(active, label, 0)
    used = pixels_ok & active
    x = tl.load(
        logits_ptr + k.to(tl.int64) * stride_lk + label * stride_lc + h * stride_lh + w * stride_lw, mask=used, other=0
    ).to(compute_dtype)
    t = tl.load(targets_ptr + k.to(tl.int64) * stride_tk + h * stride_th + w * stride_tw, mask=used, other=0)
    t = t.to(compute_dtype)
    # PyTorch's binary_cross_entropy_with_logits: (1 - t) * x - log_sigmoid(x), with
    # log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)).
    e = tl.exp(-tl.abs(x))
    loss = (1.0 - t) * x - (tl.minimum(x, 0.0) - _log1p(e))
    sigmoid = tl.where(x >= 0, ieee_div(tl.zeros_like(e) + 1.0, 1.0 + e), ieee_div(e, 1.0 + e))
    grad = tl.where(used, (sigmoid - t) * weight, 0.0)
    loss = tl.where(used, loss * weight, 0.0)
    tl.store(grad_ptr + k.to(tl.int64) * M * M + pixels, grad, mask=pixels_ok)
    tl.store(partial_ptr + k * tl.num_programs(1) + tl.program_id(1), tl.sum(loss, axis=0))


@triton.jit
def _mask_loss_bwd_kernel(
    # pointers
    grad_ptr,  # [K, M, M] contiguous: the forward's labelled-channel gradient
    labels_ptr,  # [K] int64 contiguous
    scale_ptr,  # [] the loss's gradient over the loss's denominator, in the compute dtype
    out_ptr,  # [K, C, M, M] contiguous
    # sizes
    C,
    M,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # k * C + c
    k = row // C
    c = row % C
    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pixels_ok = pixels < M * M
    labelled = tl.load(labels_ptr + k) == c
    grad = tl.load(grad_ptr + k.to(tl.int64) * M * M + pixels, mask=pixels_ok & labelled, other=0)
    value = grad * tl.load(scale_ptr)
    tl.store(out_ptr + row.to(tl.int64) * M * M + pixels, value.to(out_ptr.dtype.element_ty), mask=pixels_ok)


# ----------------------------------------------------------------------------------------------
# Argument builders and host launchers
# ----------------------------------------------------------------------------------------------

# Paste tiles of 4 rows x 128 columns: 4 values per thread of 4 warps (8 spilled fp16 tiles on
# sm_90); each row's 128 pixels are one contiguous store (128 bytes of uint8 masks, 512 of fp32).
_PASTE_BLOCK_H, _PASTE_BLOCK_W = 4, 128
# Mask targets: 256 bins per program, 2 per thread; a 28 x 28 target spreads over 4 programs,
# which keeps the SMs busy at a few hundred RoIs.
_TARGETS_BLOCK = 256
# Mask loss: 1024 pixels per program, 8 per thread: a 28 x 28 mask (784 pixels) in one program.
_LOSS_BLOCK = 1024


def expand_boxes(boxes: torch.Tensor, mask_width: int, padding: int) -> torch.Tensor:
    """``[..., 4] -> [..., 4]`` int64: torchvision's ``expand_boxes`` by ``(mask_width + 2 *
    padding) / mask_width`` about each box's centre (in the boxes' dtype, its order of
    operations), truncated toward zero as its ``.to(torch.int64)``."""
    scale = float(mask_width + 2 * padding) / mask_width
    x1, y1, x2, y2 = boxes.unbind(-1)
    half_w = (x2 - x1) * 0.5 * scale
    half_h = (y2 - y1) * 0.5 * scale
    centre_x = (x2 + x1) * 0.5
    centre_y = (y2 + y1) * 0.5
    grown = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], -1)
    return grown.to(torch.int64)


def _paste_masks_arguments(masks, int_boxes, num_valid, image_sizes, out, padding: int, threshold):
    """``(args, meta)`` of :func:`_paste_masks_kernel`; ``threshold`` None stores the values."""
    _, p, mh, mw = masks.shape
    h, w = out.shape[-2:]
    args = (masks, int_boxes, num_valid, image_sizes, out, p, mh, mw, h, w, *masks.stride(), padding)
    args = (*args, 0.0 if threshold is None else threshold)
    meta = {
        "COMPUTE_FP64": masks.dtype == torch.float64,
        "THRESHOLD": threshold is not None,
        "BLOCK_H": _PASTE_BLOCK_H,
        "BLOCK_W": _PASTE_BLOCK_W,
        "num_warps": NUM_WARPS,
    }
    return args, meta


def _threshold_in(dtype: torch.dtype, threshold: float) -> float:
    """``threshold`` rounded to ``dtype``, as a tensor comparison with a Python number rounds it
    (for fp64 masks the kernel's threshold is that number in fp32: Triton passes floats as fp32)."""
    return float(torch.tensor(threshold, dtype=dtype))


def paste_masks_triton(masks, boxes, num_valid, image_sizes, out_hw, padding, threshold, out_dtype):
    """``[B, P, MH, MW] -> [B, P, H, W]`` in one launch (see :func:`paste_masks_reference`)."""
    b, p, _, mw = masks.shape
    int_boxes = expand_boxes(boxes, mw, padding).contiguous()
    out = torch.empty((b, p, *out_hw), dtype=out_dtype, device=masks.device)
    thresholded = threshold is not None
    if thresholded:
        threshold = _threshold_in(masks.dtype, threshold)
    kernel_out = out.view(torch.uint8) if thresholded else out
    args, meta = _paste_masks_arguments(
        masks, int_boxes, num_valid.to(torch.int64), image_sizes.to(torch.int64).contiguous(), kernel_out, padding,
        threshold,
    )  # fmt: skip
    grid = (b * p, triton.cdiv(out_hw[0], _PASTE_BLOCK_H), triton.cdiv(out_hw[1], _PASTE_BLOCK_W))
    launch(_paste_masks_kernel, grid, *args, **meta)
    return out


def _mask_targets_arguments(gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, out):
    _, p, m, _ = out.shape
    args = (gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, out, p, m)
    args = (*args, *gt_masks.stride(), *proposals.stride(), *matched_idxs.stride())
    return args, {"BLOCK": _TARGETS_BLOCK, "num_warps": NUM_WARPS, **NO_FP_FUSION}


def _kernel_masks(gt_masks: torch.Tensor) -> torch.Tensor:
    """Ground-truth masks as the kernel reads them: bool viewed as uint8, other floats as fp32."""
    if gt_masks.dtype == torch.bool:
        return gt_masks.view(torch.uint8)
    return gt_masks if gt_masks.dtype == torch.uint8 else gt_masks.to(torch.float32)


def mask_targets_triton(gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, mask_size):
    """``[B, G, HG, WG]`` masks (image ``b``'s are ``gt_sizes[b]``, top left) -> ``[B, P, M, M]`` fp32."""
    b, p = proposals.shape[:2]
    out = torch.empty((b, p, mask_size, mask_size), dtype=torch.float32, device=proposals.device)
    args, meta = _mask_targets_arguments(
        _kernel_masks(gt_masks), gt_sizes, gt_count.to(torch.int64), proposals.to(torch.float32),
        matched_idxs.to(torch.int64), num_valid.to(torch.int64), out,
    )  # fmt: skip
    launch(_mask_targets_kernel, (b * p, triton.cdiv(mask_size * mask_size, _TARGETS_BLOCK)), *args, **meta)
    return out


def _mask_loss_arguments(logits, labels, targets, weights, partial, grad):
    c, m = logits.shape[1], logits.shape[-1]
    has_weights = weights is not None
    args = (logits, labels, targets, weights if has_weights else labels, partial, grad, c, m)
    args = (*args, *logits.stride(), *targets.stride())
    meta = {
        "COMPUTE_FP64": logits.dtype == torch.float64,
        "HAS_WEIGHTS": has_weights,
        "BLOCK": _LOSS_BLOCK,
        "num_warps": NUM_WARPS,
    }
    return args, meta


def mask_loss_triton(logits, labels, targets, weights):
    """``(weighted loss sum, [K, M, M] labelled-channel gradient of that sum)``, in the compute dtype."""
    compute_dtype = compute_dtype_of(logits.dtype)
    k, m = logits.shape[0], logits.shape[-1]
    blocks = triton.cdiv(m * m, _LOSS_BLOCK)
    partial = torch.empty((k, blocks), dtype=compute_dtype, device=logits.device)
    grad = torch.empty((k, m, m), dtype=compute_dtype, device=logits.device)
    weights = None if weights is None else weights.to(compute_dtype).contiguous()
    args, meta = _mask_loss_arguments(
        logits, labels.to(torch.int64).contiguous(), targets.to(compute_dtype), weights, partial, grad
    )
    launch(_mask_loss_fwd_kernel, (k, blocks), *args, **meta)
    return partial.sum(), grad


def _mask_loss_backward_arguments(grad, labels, scale, out):
    c, m = out.shape[1], out.shape[-1]
    return (grad, labels, scale, out, c, m), {"BLOCK": _LOSS_BLOCK, "num_warps": NUM_WARPS}


def mask_loss_backward_triton(grad, labels, scale, num_classes, dtype):
    k, m = grad.shape[0], grad.shape[-1]
    out = torch.empty((k, num_classes, m, m), dtype=dtype, device=grad.device)
    args, meta = _mask_loss_backward_arguments(grad, labels.to(torch.int64).contiguous(), scale, out)
    launch(_mask_loss_bwd_kernel, (k * num_classes, triton.cdiv(m * m, meta["BLOCK"])), *args, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# References: vectorized PyTorch (the test oracle); the fast CPU paths
# ----------------------------------------------------------------------------------------------


# Non-finite mask pixels in the matrix-product paste: the Triton kernel (and torchvision's
# F.interpolate) multiply each tap it reads by its weight, so a NaN tap, or an inf tap read with a
# zero weight (inf * 0), makes the pixel NaN, and an inf tap read with positive weights makes it
# inf. The reference multiplies the finite pixels by the weight matrices and marks where non-finite
# ones land with a second, exact product of small integers: each tap read with positive weights
# along an axis counts 1 in that axis's tap matrix, read with a zero weight _ZERO_WEIGHT_TAP; a
# +inf pixel counts _POS_INF, -inf _NEG_INF, NaN _NAN. A pixel reads at most 4 taps, so the sum
# over its taps holds the number of +inf taps read with positive weights in its lowest 3 bits, of
# -inf ones in the next 3, and is _NAN or more when any tap makes it NaN; at most 4 * 64**3 = 2**20,
# exact in fp32.
_POS_INF, _NEG_INF, _NAN = 1, 8, 64
_ZERO_WEIGHT_TAP = 64


def _resize_matrix(start, end, coords, inside, padding, mask_size, compute_dtype, taps: bool = False):
    """``[..., len(coords), mask_size]``: row ``o`` holds the bilinear weights of image coordinate
    ``coords[o]`` on the mask's pixels (zero rows outside the box ``[start, end]`` (``[...]``) and
    where ``inside`` is false): the Triton ``_resize_axis`` in PyTorch. With ``taps``, the marks of
    the pixels row ``o`` reads instead: 1, or ``_ZERO_WEIGHT_TAP`` where one of its two taps reads
    the pixel with a zero weight."""
    device = start.device
    padded = mask_size + 2 * padding
    box = (end - start + 1).clamp(min=1).to(compute_dtype)
    scale = (padded / box)[..., None]
    source = (scale * ((coords - start[..., None]).to(compute_dtype) + 0.5) - 0.5).clamp(min=0)
    low = source.floor().clamp(max=padded - 1)
    w_high = (source - low).clamp(0, 1)
    high = low + (low < padded - 1).to(low.dtype)
    used = inside & (coords >= start[..., None]) & (coords <= end[..., None])
    matrix = torch.zeros((*source.shape, padded), dtype=compute_dtype, device=device)
    for index, weight in ((low.long()[..., None], 1 - w_high), (high.long()[..., None], w_high)):
        if taps:
            mark = torch.where(weight == 0, _ZERO_WEIGHT_TAP, 1).to(compute_dtype)
            matrix.scatter_reduce_(-1, index, torch.where(used, mark, 0)[..., None], "amax")
        else:
            matrix.scatter_add_(-1, index, torch.where(used, weight, 0)[..., None])
    return matrix[..., padding : padding + mask_size]


def _with_non_finite(values, masks, finite, row_taps, col_taps):
    """``values [B, P, H, W]`` (the paste of the finite mask pixels) with NaN and inf where the
    Triton kernel gives them (see ``_NAN``): ``masks [B, P, MH, MW]``, ``finite`` its mask,
    ``row_taps [B, P, H, MH]`` and ``col_taps [B, P, W, MW]`` from ``_resize_matrix(taps=True)``."""
    codes = torch.where(masks > 0, _POS_INF, _NEG_INF)
    codes = torch.where(finite, 0, torch.where(masks.isnan(), _NAN, codes)).to(masks.dtype)
    hits = row_taps @ (codes @ col_taps.transpose(-1, -2))
    positive, negative = hits % _NEG_INF > 0, hits >= _NEG_INF
    infinity = torch.where(positive, torch.inf, -torch.inf)
    non_finite = torch.where((hits >= _NAN) | (positive & negative), torch.nan, infinity)
    return torch.where(hits == 0, values, non_finite)


def paste_masks_reference(masks, boxes, num_valid, image_sizes, out_hw, padding, threshold, out_dtype):
    """``masks [B, P, MH, MW]``, ``boxes [B, P, 4]``, ``num_valid [B]``, ``image_sizes [B, 2]`` ->
    ``[B, P, H, W]`` (``out_hw``): each valid mask pasted into its image, zero elsewhere; with a
    ``threshold``, ``value > threshold`` inside the image and False (0) outside it."""
    compute_dtype = compute_dtype_of(masks.dtype)
    b, p, mh, mw = masks.shape
    height, width = out_hw
    device = masks.device
    x0, y0, x1, y1 = expand_boxes(boxes, mw, padding).unbind(-1)
    image_sizes = image_sizes.to(device)
    valid = torch.arange(p, device=device) < num_valid.to(device)[:, None]  # [B, P]
    in_image_y = (torch.arange(height, device=device) < image_sizes[:, None, 0, None]) & valid[..., None]
    in_image_x = (torch.arange(width, device=device) < image_sizes[:, None, 1, None]).expand(b, p, width)
    rows = (y0, y1, torch.arange(height, device=device), in_image_y, padding, mh, compute_dtype)
    cols = (x0, x1, torch.arange(width, device=device), in_image_x, padding, mw, compute_dtype)
    values = _resized(masks, rows, cols)  # [B, P, H, W]
    if threshold is None:
        return values.to(out_dtype)
    above = (values > threshold) & in_image_y[..., :, None] & in_image_x[..., None, :]
    return above.to(out_dtype)


# From images of this many pixels on, the CPU pastes mask by mask over the box's window: below it
# the reference's image-sized weight products cost less than the window path's ~50 small ops per
# mask (one thread: 20 masks into 96x120, 0.9 ms against 15 ms; 100 masks into 800x1333, 1.19 s
# against 0.64 s, torchvision's loop 1.56 s).
WINDOWED_PASTE_PIXELS = 2**17


def _resized(masks: torch.Tensor, row_axis: tuple, col_axis: tuple) -> torch.Tensor:
    """``masks [..., MH, MW]`` resized by the weights :func:`_resize_matrix` gives for ``row_axis``
    (``[..., H, MH]``) and ``col_axis`` (``[..., W, MW]``, their arguments) -> ``[..., H, W]`` in the
    masks' dtype (computed in the weights'), non-finite pixels landing where the kernel's taps put
    them (see ``_NAN``)."""
    rows, cols = _resize_matrix(*row_axis), _resize_matrix(*col_axis)
    pixels = masks.to(rows.dtype)
    finite = torch.isfinite(pixels)
    values = rows @ (torch.where(finite, pixels, 0) @ cols.transpose(-1, -2))
    # On the CPU reading the check back waits for nothing, and spares finite masks the marking.
    if masks.device.type != "cpu" or not bool(finite.all()):
        row_taps, col_taps = _resize_matrix(*row_axis, taps=True), _resize_matrix(*col_axis, taps=True)
        values = _with_non_finite(values, pixels, finite, row_taps, col_taps)
    return values.to(masks.dtype)


def paste_masks_cpu(masks, boxes, num_valid, image_sizes, out_hw, padding, threshold, out_dtype):
    """The fast CPU path of :func:`paste_masks_reference`, the same values: each valid mask resized
    over its box's window inside its image only (host reads of the counts, boxes and sizes), where
    the reference multiplies weight matrices as large as the image for every mask."""
    compute_dtype = compute_dtype_of(masks.dtype)
    b, p, mh, mw = masks.shape
    height, width = out_hw
    int_boxes = expand_boxes(boxes, mw, padding).tolist()
    sizes = image_sizes.tolist()
    out = torch.zeros((b, p, height, width), dtype=out_dtype)
    # A valid mask's pixels outside its window hold the value 0: True inside the image if 0 passes.
    zero_passes = threshold is not None and bool(torch.zeros((), dtype=masks.dtype) > threshold)
    yes = torch.ones((), dtype=torch.bool)
    for image, count in enumerate(num_valid.clamp(0, p).tolist()):
        image_h, image_w = min(sizes[image][0], height), min(sizes[image][1], width)
        if zero_passes:
            out[image, :count, :image_h, :image_w] = True
        for row in range(count):
            x0, y0, x1, y1 = int_boxes[image][row]
            top, bottom = max(y0, 0), min(y1 + 1, image_h)
            left, right = max(x0, 0), min(x1 + 1, image_w)
            if top >= bottom or left >= right:
                continue
            corners = torch.tensor([x0, y0, x1, y1])
            rows = (corners[1], corners[3], torch.arange(top, bottom), yes, padding, mh, compute_dtype)
            cols = (corners[0], corners[2], torch.arange(left, right), yes, padding, mw, compute_dtype)
            values = _resized(masks[image, row], rows, cols)
            out[image, row, top:bottom, left:right] = values if threshold is None else values > threshold
    return out


def mask_targets_reference(gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, mask_size):
    """The RoIAlign reference per image (a loop over images, vectorized over masks and
    proposals); rows past ``num_valid`` or matched outside ``[0, gt_count)`` get a batch index
    RoIAlign treats as invalid (zero). ``gt_sizes``: ``2 * B`` ints, each image's mask size."""
    b, p = proposals.shape[:2]
    device = proposals.device
    matched = matched_idxs.to(device).long()
    valid = (torch.arange(p, device=device) < num_valid.to(device)[:, None]) & (matched >= 0)
    valid &= matched < gt_count.to(device)[:, None]
    index = torch.where(valid, matched, -1).to(torch.float32)
    targets = []
    for image in range(b):
        height, width = gt_sizes[2 * image : 2 * image + 2]
        planes = gt_masks[image, :, None, :height, :width].to(torch.float32)
        rois = torch.cat([index[image, :, None], proposals[image].to(torch.float32)], 1)
        targets.append(roi_align_reference([planes], rois, [1.0], (mask_size, mask_size), -1, False)[:, 0])
    if not targets:
        return torch.zeros((0, p, mask_size, mask_size), device=device)
    return torch.stack(targets)


def _axis_windows(first, bin_size, grid, bins: int, extent: int) -> list[tuple[torch.Tensor, int, int]]:
    """Per RoI, ``(weights [bins, L], start, end)``: the summed bilinear weights of each bin's
    samples (:func:`~.roi_align.axis_samples`) on the map's rows (or columns) ``start .. end - 1``,
    the window its samples touch (``L >= end - start``, zero past it; ``end == start`` when none
    lands on the map). One vectorized call per distinct sample count."""
    windows: list = [None] * first.shape[0]
    extents = torch.full_like(grid, extent, dtype=torch.int64)
    for samples in grid.unique().tolist():
        members = (grid == samples).nonzero().squeeze(1)
        taps, weights = axis_samples(first[members], bin_size[members], extents[members], samples, bins, True)
        taps, weights = taps.flatten(1), weights.flatten(1)
        touched = weights != 0
        start = torch.where(touched, taps, extent).amin(1)
        end = torch.where(touched, taps + 1, 0).amax(1)
        length = int((end - start).amax().clamp(min=1))
        # Taps of weight 0 may lie anywhere: clamped into the window, they add nothing.
        relative = (taps - start[:, None]).clamp(0, length - 1).view(-1, bins, taps.shape[1] // bins)
        matrix = weights.new_zeros((members.shape[0], bins, length))
        matrix.scatter_add_(2, relative, weights.view_as(relative))
        for member, row, first_row, end_row in zip(members.tolist(), matrix, start.tolist(), end.tolist(), strict=True):
            windows[member] = (row, first_row, max(end_row, first_row))
    return windows


def mask_targets_cpu(gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, mask_size):
    """The fast CPU path (see :func:`mask_targets_reference`): RoIAlign split into its two axes. A
    bin is the mean of its samples' bilinear values, and a sample's weights are a row weight
    times a column weight, so a target is ``rows @ mask @ cols.T / count`` with ``rows [M, H]``
    and ``cols [M, W]`` each axis's summed sample weights (torchvision's sample positions). Each
    proposal reads (as fp32) only the rows and columns its samples touch, where torchvision's
    ``project_masks_on_boxes`` converts every mask whole; a loop over the proposals on the host."""
    b, p = proposals.shape[:2]
    device = proposals.device
    out = torch.zeros((b, p, mask_size, mask_size), dtype=torch.float32, device=device)
    matched = matched_idxs.to(device).long()
    boxes = proposals.to(torch.float32)
    valid = (torch.arange(p, device=device) < num_valid.to(device)[:, None]) & (matched >= 0)
    valid &= (matched < gt_count.to(device)[:, None]) & torch.isfinite(boxes).all(-1)
    for image in range(b):
        members = valid[image].nonzero().squeeze(1)
        if members.numel() == 0:
            continue
        height, width = gt_sizes[2 * image : 2 * image + 2]
        x1, y1, x2, y2 = boxes[image, members].unbind(1)
        # torchvision's roi_align at spatial scale 1, aligned=False: RoIs of at least 1 x 1 pixel,
        # ceil(RoI / M) samples per bin on each axis (clamped as the kernels clamp them).
        roi_h, roi_w = (y2 - y1).clamp(min=1.0), (x2 - x1).clamp(min=1.0)
        grid_h = torch.ceil(roi_h / mask_size).clamp(max=MAX_GRID.value)
        grid_w = torch.ceil(roi_w / mask_size).clamp(max=MAX_GRID.value)
        rows = _axis_windows(y1, roi_h / mask_size, grid_h, mask_size, height)
        cols = _axis_windows(x1, roi_w / mask_size, grid_w, mask_size, width)
        planes = gt_masks[image]
        targets = out.new_zeros((members.shape[0], mask_size, mask_size))
        for j, mask in enumerate(matched[image, members].tolist()):
            (row_weights, top, bottom), (col_weights, left, right) = rows[j], cols[j]
            if bottom > top and right > left:
                crop = planes[mask, top:bottom, left:right].to(torch.float32)
                targets[j] = row_weights[:, : bottom - top] @ crop @ col_weights[:, : right - left].T
        out[image, members] = targets / (grid_h * grid_w).clamp(min=1)[:, None, None]
    return out


def mask_loss_reference(logits, labels, targets, weights):
    """``(weighted loss sum, [K, M, M] labelled-channel gradient of that sum)``, in the compute dtype."""
    compute_dtype = compute_dtype_of(logits.dtype)
    k, c = logits.shape[:2]
    weight = torch.ones(k, dtype=compute_dtype, device=logits.device) if weights is None else weights
    weight = weight.to(compute_dtype)[:, None, None]
    active = (weight > 0) & (labels >= 0)[:, None, None] & (labels < c)[:, None, None]
    x = logits[torch.arange(k, device=logits.device), labels.clamp(0, max(c - 1, 0))].to(compute_dtype)
    t = targets.to(compute_dtype)
    loss = (1 - t) * x - torch.nn.functional.logsigmoid(x)
    loss = torch.where(active, loss * weight, 0)
    grad = torch.where(active, (torch.sigmoid(x) - t) * weight, 0)
    return loss.sum(), grad


def mask_loss_cpu(logits, labels, targets, weights):
    """The fast CPU path of :func:`mask_loss_reference`, bit for bit the same ``(weighted loss
    sum, [K, M, M] labelled-channel gradient of that sum)``: the loss in one fused ATen call
    (``binary_cross_entropy_with_logits``, whose eager kernel computes the reference's ``(1 - t) *
    x - logsigmoid(x)``), the gradient updated in place; three ``[K, M, M]`` tensors of ours (the
    gathered logits, the loss, the gradient) where the reference makes a dozen. Rows that do not
    count are filled with 0 after the arithmetic, so their logits (NaN in padded rows, say) reach
    neither the sum nor the gradient."""
    compute_dtype = compute_dtype_of(logits.dtype)
    k, c = logits.shape[:2]
    counted = ((labels >= 0) & (labels < c))[:, None, None]
    x = logits[torch.arange(k, device=logits.device), labels.clamp(0, max(c - 1, 0))].to(compute_dtype)
    t = targets.to(compute_dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    grad = torch.sigmoid(x).sub_(t)
    if weights is not None:
        weight = weights.to(compute_dtype)[:, None, None]
        counted = counted & (weight > 0)
        loss.mul_(weight)
        grad.mul_(weight)
    return loss.masked_fill_(~counted, 0).sum(), grad.masked_fill_(~counted, 0)


def mask_loss_backward_reference(grad, labels, scale, num_classes, dtype):
    channels = torch.arange(num_classes, device=grad.device)
    labelled = channels[None, :, None, None] == labels[:, None, None, None]
    return torch.where(labelled, grad[:, None] * scale, 0).to(dtype)


def mask_loss_backward_cpu(grad, labels, scale, num_classes, dtype):
    """The fast CPU path of :func:`mask_loss_backward_reference`, the same ``[K, C, M, M]``: a
    zeroed buffer (on huge pages, :func:`~._cpu.empty_on_huge_pages`) and one scatter of each row's
    labelled channel, no select over every channel. A row labelling no channel writes a zero into
    channel 0 (its own row, already zero)."""
    out = empty_on_huge_pages((grad.shape[0], num_classes, *grad.shape[1:]), dtype, grad.device).zero_()
    if num_classes == 0:
        return out
    labelled = (labels >= 0) & (labels < num_classes)
    channel = torch.where(labelled, labels, 0)
    rows = torch.arange(grad.shape[0], device=grad.device)
    out[rows, channel] = torch.where(labelled[:, None, None], grad * scale, 0).to(dtype)
    return out


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::paste_masks", mutates_args=())
def paste_masks_op(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    num_valid: torch.Tensor | None,
    image_sizes: torch.Tensor | None,
    height: int,
    width: int,
    padding: int,
    threshold: float | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``[B, P, MH, MW], [B, P, 4], [B] | None, [B, 2] | None -> [B, P, H, W]`` of ``out_dtype``
    (no ``num_valid``: every row is valid; no ``image_sizes``: every image is ``height x width``)."""
    b, p = masks.shape[:2]
    if num_valid is None:
        num_valid = device_table([p] * b, torch.int64, masks.device)
    if image_sizes is None:
        image_sizes = device_table([[height, width]] * b, torch.int64, masks.device)
    args = (masks, boxes, num_valid, image_sizes, (height, width), padding, threshold, out_dtype)
    if use_triton(masks.device):
        return paste_masks_triton(*args)
    if use_fast_cpu(masks.device, calls_torchvision=False) and height * width >= WINDOWED_PASTE_PIXELS:
        return paste_masks_cpu(*args)
    return paste_masks_reference(*args)


@paste_masks_op.register_fake
def _(masks, boxes, num_valid, image_sizes, height, width, padding, threshold, out_dtype):
    return masks.new_empty((*masks.shape[:2], height, width), dtype=out_dtype)


@torch.library.custom_op("tritondet::mask_targets", mutates_args=())
def mask_targets_op(
    gt_masks: torch.Tensor,
    gt_sizes: list[int],
    gt_count: torch.Tensor,
    proposals: torch.Tensor,
    matched_idxs: torch.Tensor,
    num_valid: torch.Tensor,
    mask_size: int,
) -> torch.Tensor:
    """``[B, G, HG, WG], 2B sizes, [B], [B, P, 4], [B, P], [B] -> [B, P, M, M]`` fp32; image
    ``b``'s masks are the top left ``gt_sizes[2 * b] x gt_sizes[2 * b + 1]`` of its planes."""
    if use_triton(proposals.device):
        pairs = [gt_sizes[i : i + 2] for i in range(0, len(gt_sizes), 2)]
        sizes = device_table(pairs, torch.int64, proposals.device)
        return mask_targets_triton(gt_masks, sizes, gt_count, proposals, matched_idxs, num_valid, mask_size)
    if use_fast_cpu(proposals.device):
        return mask_targets_cpu(gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, mask_size)
    return mask_targets_reference(gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, mask_size)


@mask_targets_op.register_fake
def _(gt_masks, gt_sizes, gt_count, proposals, matched_idxs, num_valid, mask_size):
    return proposals.new_empty((*proposals.shape[:2], mask_size, mask_size), dtype=torch.float32)


@torch.library.custom_op("tritondet::mask_loss", mutates_args=())
def mask_loss_op(
    logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, C, M, M], [K], [K, M, M], [K] | None -> (loss [], labelled-channel gradient [K, M, M])``:
    the mean loss in the logits' dtype and the gradient of the loss sum, in the compute dtype."""
    if use_triton(logits.device):
        total, grad = mask_loss_triton(logits, labels, targets, weights)
    elif use_fast_cpu(logits.device, calls_torchvision=False):
        total, grad = mask_loss_cpu(logits, labels, targets, weights)
    else:
        total, grad = mask_loss_reference(logits, labels, targets, weights)
    return (total / loss_denominator(weights, logits.shape)).to(logits.dtype), grad


@mask_loss_op.register_fake
def _(logits, labels, targets, weights):
    k, m = logits.shape[0], logits.shape[-1]
    return logits.new_empty(()), logits.new_empty((k, m, m), dtype=compute_dtype_of(logits.dtype))


def loss_denominator(weights: torch.Tensor | None, logits_shape) -> torch.Tensor | int:
    """What the loss sum is divided by: the pixels of every RoI (of the RoIs with a weight above
    0 when weighted), at least one RoI's, so that no RoI gives 0 like torchvision."""
    k, pixels = logits_shape[0], logits_shape[-1] * logits_shape[-2]
    if weights is None:
        return max(k, 1) * pixels
    return (weights > 0).sum().clamp(min=1) * pixels


@torch.library.custom_op("tritondet::mask_loss_backward", mutates_args=())
def mask_loss_backward_op(
    grad: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, num_classes: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[K, M, M], [K], [] -> [K, C, M, M]`` of ``dtype``: ``grad * scale`` in each RoI's labelled channel, 0 elsewhere."""
    if use_triton(grad.device):
        return mask_loss_backward_triton(grad, labels, scale, num_classes, dtype)
    if use_fast_cpu(grad.device, calls_torchvision=False):
        return mask_loss_backward_cpu(grad, labels, scale, num_classes, dtype)
    return mask_loss_backward_reference(grad, labels, scale, num_classes, dtype)


@mask_loss_backward_op.register_fake
def _(grad, labels, scale, num_classes, dtype):
    k, m = grad.shape[0], grad.shape[-1]
    return grad.new_empty((k, num_classes, m, m), dtype=dtype)


def _loss_setup_context(ctx, inputs, output):
    logits, labels, _, weights = inputs
    ctx.save_for_backward(output[1], labels)
    ctx.denominator = loss_denominator(weights, logits.shape)
    ctx.num_classes, ctx.dtype = logits.shape[1], logits.dtype


def _loss_backward(ctx, grad_loss, _grad_of_gradient):
    grad, labels = ctx.saved_tensors
    scale = grad_loss.to(grad.dtype) / ctx.denominator
    grad_logits = torch.ops.tritondet.mask_loss_backward(grad, labels, scale, ctx.num_classes, ctx.dtype)
    return grad_logits, None, None, None


mask_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[KernelSpec]:
    specs = []
    index = torch.zeros(1, dtype=torch.int64)
    sizes = torch.zeros((1, 2), dtype=torch.int64)
    boxes = torch.zeros((1, 1, 4), dtype=torch.int64)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        compute_dtype = compute_dtype_of(dtype)
        masks = torch.empty((1, 1, 1, 1), dtype=dtype)
        for threshold in (None, 0.5):
            out = torch.empty((1, 1, 1, 1), dtype=dtype if threshold is None else torch.uint8)
            args, meta = _paste_masks_arguments(masks, boxes, index, sizes, out, 1, threshold)
            label = f"{name}" + ("" if threshold is None else ",threshold")
            specs.append(KernelSpec.from_example(_paste_masks_kernel, args, meta, label))
        logits = torch.empty((1, 1, 28, 28), dtype=dtype)
        targets = torch.empty((1, 28, 28), dtype=compute_dtype)
        partial = torch.empty((1, 1), dtype=compute_dtype)
        for weights in (None, torch.empty(1, dtype=compute_dtype)):
            args, meta = _mask_loss_arguments(logits, index, targets, weights, partial, targets)
            label = f"{name}" + ("" if weights is None else ",weights")
            specs.append(KernelSpec.from_example(_mask_loss_fwd_kernel, args, meta, label))
        args, meta = _mask_loss_backward_arguments(targets, index, partial[0, 0], logits)
        specs.append(KernelSpec.from_example(_mask_loss_bwd_kernel, args, meta, name))
    proposals = torch.zeros((1, 1, 4))
    for gt_dtype in (torch.uint8, torch.float32):
        gt = torch.empty((1, 1, 1, 1), dtype=gt_dtype)
        out = torch.empty((1, 1, 28, 28))
        args, meta = _mask_targets_arguments(gt, sizes, index, proposals, index[None], index, out)
        specs.append(KernelSpec.from_example(_mask_targets_kernel, args, meta, str(gt_dtype).removeprefix("torch.")))
    return specs


# Mask targets are RoIAlign's samples (sample counts and positions rounded as torchvision's); the
# pasting and the loss are compared within tolerance (bilinear weights, exp and log).
EXACT_KERNELS = frozenset({_mask_targets_kernel})
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("paste_masks_in_image", "paste_masks_padded", "mask_targets", "mask_loss")
