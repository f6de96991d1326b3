"""RoIPool (Fast R-CNN): the maximum over each bin of each region, with its argmax.

Shapes: input ``[N, C, H, W]`` (any strides, channels_last read in place), rois ``[K, 5]`` rows
``(batch_index, x1, y1, x2, y2)`` -> output ``[K, C, PH, PW]`` contiguous in the input dtype and
argmax ``[K, C, PH, PW]`` int64 (``h * W + w`` within the RoI's image and channel, ``-1`` for an
empty bin), as torchvision.

torchvision's geometry: corners rounded half away from zero after scaling, inclusive RoI extent
(``x2 - x1 + 1``, at least 1), bin ``[floor(p * bin), ceil((p + 1) * bin))`` shifted by the RoI
start and clipped to the map; an empty bin gives 0. The first maximum in row-major order wins.

Order of this file: Triton kernel -> host launcher -> pure-PyTorch reference -> registration
(the backward scatters the gradient to the argmax with ``index_put_(accumulate=True)``, which
PyTorch makes deterministic under ``torch.use_deterministic_algorithms``) -> AOT specializations.
A RoI whose batch index is not an integer in ``[0, N)``, or with a corner that is not finite once
scaled, pools zeros (argmax -1); torchvision casts such corners to int, which C leaves undefined.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NO_FP_FUSION, NUM_WARPS, compute_dtype_of, ieee_div, no_pixels, scaled_rois
from ._cpu import ps_roi_pool_cpu, roi_pool_cpu, torchvision_reads
from ._launch import launch
from .roi_align import load_roi, roi_bin_tile


@triton.jit
def _round_half_away(v):
    """C's round(): halves away from zero (torch.round rounds halves to even)."""
    return tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))


@triton.jit
def _roi_pool_fwd_kernel(
    # pointers
    rois_ptr,  # [K, 5] any strides, corners already multiplied by the spatial scale
    input_ptr,  # [N, C, H, W] any strides
    out_ptr,  # [K, C, PH, PW] contiguous
    argmax_ptr,  # [K, C, PH, PW] contiguous int64 (not written when position-sensitive)
    # sizes
    N,
    C,
    H,
    W,
    PH,
    PW,
    # strides (in elements)
    stride_rk,
    stride_rc,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    POSITION_SENSITIVE: tl.constexpr,  # R-FCN's average: output channel c, bin b reads input channel c * PH * PW + b
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    k, channels, bins, c_ok, p_ok, ph, pw = roi_bin_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32

    batch, valid, x1, y1, x2, y2 = load_roi(rois_ptr, k, stride_rk, stride_rc, N, compute_dtype)
    start_w = _round_half_away(x1)
    start_h = _round_half_away(y1)
    # RoIPool counts the end pixel (inclusive extent); position-sensitive pooling does not.
    inclusive = 0.0 if POSITION_SENSITIVE else 1.0
    roi_w = tl.maximum(_round_half_away(x2) - start_w + inclusive, 1.0)
    roi_h = tl.maximum(_round_half_away(y2) - start_h + inclusive, 1.0)
    bin_h = ieee_div(roi_h, PH)
    bin_w = ieee_div(roi_w, PW)
    # torchvision clips bins to [0, H] for RoIPool, to [0, H - 1] for position-sensitive pooling.
    clip_h = H - 1 if POSITION_SENSITIVE else H
    clip_w = W - 1 if POSITION_SENSITIVE else W
    h_start = tl.minimum(tl.maximum(tl.floor(ph * bin_h) + start_h, 0), clip_h).to(tl.int32)
    h_end = tl.minimum(tl.maximum(tl.ceil((ph + 1) * bin_h) + start_h, 0), clip_h).to(tl.int32)
    w_start = tl.minimum(tl.maximum(tl.floor(pw * bin_w) + start_w, 0), clip_w).to(tl.int32)
    w_end = tl.minimum(tl.maximum(tl.ceil((pw + 1) * bin_w) + start_w, 0), clip_w).to(tl.int32)
    # The loops span the program's widest clipped bin (at most the map), none for an invalid RoI.
    span_h = tl.where(valid, tl.max(tl.where(p_ok, h_end - h_start, 0), 0), 0)
    span_w = tl.where(valid, tl.max(tl.where(p_ok, w_end - w_start, 0), 0), 0)

    if POSITION_SENSITIVE:
        base = input_ptr + batch * stride_n + (channels.to(tl.int64)[:, None] * (PH * PW) + bins[None, :]) * stride_c
    else:
        base = input_ptr + batch * stride_n + channels.to(tl.int64)[:, None] * stride_c
    best = tl.full((BLOCK_C, BLOCK_P), -3.4028234663852886e38, dtype=compute_dtype)
    best_index = tl.full((BLOCK_C, BLOCK_P), -1, dtype=tl.int64)
    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=compute_dtype)
    mask_cp = c_ok[:, None] & p_ok[None, :]
    for dh in range(span_h):
        h = h_start + dh
        for dw in range(span_w):
            w = w_start + dw
            inside = p_ok & (h < h_end) & (w < w_end)
            offsets = h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w
            value = tl.load(base + offsets[None, :], mask=mask_cp & inside[None, :], other=0).to(compute_dtype)
            if POSITION_SENSITIVE:
                total += value  # masked taps read 0
            else:
                better = inside[None, :] & (value > best)
                best = tl.where(better, value, best)
                best_index = tl.where(better, (h * W + w).to(tl.int64)[None, :], best_index)
    empty = (h_end <= h_start) | (w_end <= w_start) | (not valid)
    out_offsets = (k.to(tl.int64) * C + channels)[:, None] * (PH * PW) + bins[None, :]
    if POSITION_SENSITIVE:
        area = tl.maximum((h_end - h_start).to(compute_dtype) * (w_end - w_start), 1.0)
        mean = tl.where(empty[None, :], 0.0, ieee_div(total, area[None, :]))
        tl.store(out_ptr + out_offsets, mean.to(out_ptr.dtype.element_ty), mask=mask_cp)
    else:
        best = tl.where(empty[None, :], 0.0, best)
        tl.store(out_ptr + out_offsets, best.to(out_ptr.dtype.element_ty), mask=mask_cp)
        tl.store(argmax_ptr + out_offsets, tl.where(empty[None, :], -1, best_index), mask=mask_cp)


def _pool_blocks(num_bins: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): 16 bin lanes up to 4x4 outputs, 64 for 7x7 (49 bins); channels fill a
    512-element tile: value, running maximum and int64 argmax per element stay in registers."""
    block_p = 16 if num_bins <= 16 else 64
    return 512 // block_p, block_p


def _roi_pool_arguments(rois, input, out, argmax, position_sensitive: bool) -> tuple[tuple, dict]:
    """``(args, meta)`` of :func:`_roi_pool_fwd_kernel` for scaled ``rois`` in the compute dtype:
    what the launcher passes and what the ahead-of-time specs are derived from."""
    n, _, h, w = input.shape
    c, ph, pw = out.shape[1:]
    args = (rois, input, out, argmax, n, c, h, w, ph, pw, *rois.stride(), *input.stride())
    block_c, block_p = _pool_blocks(ph * pw)
    meta = {
        "COMPUTE_FP64": rois.dtype == torch.float64,
        "POSITION_SENSITIVE": position_sensitive,
        "BLOCK_C": block_c,
        "BLOCK_P": block_p,
        "num_warps": NUM_WARPS,
        **NO_FP_FUSION,
    }
    return args, meta


def roi_pool_triton(input, rois, spatial_scale, output_size, position_sensitive=False):
    """RoIPool's ``(maxima, argmax)``; position-sensitive: ``(means, empty argmax)``."""
    compute_dtype = compute_dtype_of(input.dtype)
    rois = scaled_rois(rois, spatial_scale, compute_dtype)
    ph, pw = output_size
    c = input.shape[1] // (ph * pw) if position_sensitive else input.shape[1]
    out = torch.empty((rois.shape[0], c, ph, pw), dtype=input.dtype, device=input.device)
    argmax = torch.empty(0 if position_sensitive else out.shape, dtype=torch.int64, device=input.device)
    args, meta = _roi_pool_arguments(rois, input, out, argmax, position_sensitive)
    grid = (rois.shape[0], triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(ph * pw, meta["BLOCK_P"]))
    launch(_roi_pool_fwd_kernel, grid, *args, **meta)
    return out, argmax


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch (candidates padded to the largest bin; a host read on the CPU).
# ----------------------------------------------------------------------------------------------


def _round_half_away_reference(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 0, torch.floor(v + 0.5), -torch.floor(0.5 - v))


def _bins(input, rois, spatial_scale, output_size, inclusive, clip_to_last=False):
    """Per-axis candidate pixels of every bin, padded to the largest bin (a host read).

    ``inclusive``: 1 for RoIPool's geometry (the end pixel counts), 0 for position-sensitive
    pooling; ``clip_to_last``: bins clipped to [0, size - 1] instead of [0, size] (torchvision's
    position-sensitive forward does this, its backward does not).
    Returns batch [K], rows/cols [K, bins, span] (clamped into the map), their masks, empty
    [K, PH, PW] (an empty bin or an invalid RoI) and each bin's pixel count."""
    compute_dtype = compute_dtype_of(input.dtype)
    n, _, height, width = input.shape
    device = input.device
    rois = rois.to(compute_dtype)
    b = rois[:, 0]
    corners = rois[:, 1:] * torch.tensor(spatial_scale, dtype=compute_dtype, device=device)
    # As the kernel's load_roi: a RoI with a non-finite scaled corner is invalid; its geometry is
    # computed from zeros so that no NaN reaches the bin sizes.
    valid = (b >= 0) & (b < n) & (b == b.floor()) & torch.isfinite(corners).all(1)
    x1, y1, x2, y2 = torch.where(valid[:, None], corners, 0).unbind(1)
    start_w, start_h = _round_half_away_reference(x1), _round_half_away_reference(y1)
    roi_w = (_round_half_away_reference(x2) - start_w + inclusive).clamp(min=1)
    roi_h = (_round_half_away_reference(y2) - start_h + inclusive).clamp(min=1)

    def axis(start, bin_size, bins, size):
        p = torch.arange(bins, dtype=compute_dtype, device=device)
        clip = size - 1 if clip_to_last else size
        lo = (torch.floor(p * bin_size[:, None]) + start[:, None]).clamp(0, clip)
        hi = (torch.ceil((p + 1) * bin_size[:, None]) + start[:, None]).clamp(0, clip)
        # At least one (masked) candidate, so that a max over candidates exists when every bin is empty.
        span = max(int((hi - lo).max()) if lo.numel() else 0, 1)
        index = lo[:, :, None] + torch.arange(span, dtype=compute_dtype, device=device)  # [K, bins, span]
        return index.long().clamp(max=size - 1), index < hi[:, :, None], hi <= lo, hi - lo

    ph_count, pw_count = output_size
    rows, rows_ok, empty_h, extent_h = axis(start_h, roi_h / ph_count, ph_count, height)
    cols, cols_ok, empty_w, extent_w = axis(start_w, roi_w / pw_count, pw_count, width)
    empty = empty_h[:, :, None] | empty_w[:, None, :] | ~valid[:, None, None]
    area = extent_h[:, :, None] * extent_w[:, None, :]
    return torch.where(valid, b, 0).long(), rows, rows_ok, cols, cols_ok, empty, area


def roi_pool_reference(input, rois, spatial_scale, output_size):
    compute_dtype = compute_dtype_of(input.dtype)
    c, width = input.shape[1], input.shape[3]
    ph_count, pw_count = output_size
    k = rois.shape[0]
    batch, rows, rows_ok, cols, cols_ok, empty, _ = _bins(input, rois, spatial_scale, output_size, 1.0)
    # [K, C, PH, PW, span_h, span_w] candidates, masked ones at -inf
    values = input[
        batch[:, None, None, None, None, None],
        torch.arange(c, device=input.device)[None, :, None, None, None, None],
        rows[:, None, :, None, :, None],
        cols[:, None, None, :, None, :],
    ].to(compute_dtype)
    ok = rows_ok[:, None, :, None, :, None] & cols_ok[:, None, None, :, None, :]
    # torchvision keeps a value only if it is greater than the running maximum, which starts at
    # the lowest finite float: NaN and values <= that never win (argmax -1).
    values = torch.where(ok & ~values.isnan(), values, -torch.inf).flatten(-2)
    best, position = values.max(-1)
    lowest = torch.finfo(torch.float32).min
    found = best > lowest
    best = torch.where(found, best, lowest)
    span_w = max(cols.shape[-1], 1)
    shape = (k, c, ph_count, pw_count, -1)
    best_row = rows[:, None, :, None, :].expand(shape).gather(-1, (position.long() // span_w)[..., None])[..., 0]
    best_col = cols[:, None, None, :, :].expand(shape).gather(-1, (position.long() % span_w)[..., None])[..., 0]
    empty = empty[:, None].expand(k, c, ph_count, pw_count)
    out = torch.where(empty, 0, best).to(input.dtype)
    argmax = torch.where(empty | ~found, -1, best_row * width + best_col)
    return out, argmax


def _ps_candidates(input, rois, spatial_scale, output_size, clip_to_last):
    """Flat input indices ``[K, C_out, PH, PW, span_h, span_w]``, their mask, empty and area."""
    _, c_in, height, width = input.shape
    ph_count, pw_count = output_size
    batch, rows, rows_ok, cols, cols_ok, empty, area = _bins(input, rois, spatial_scale, output_size, 0.0, clip_to_last)
    c_out = c_in // (ph_count * pw_count)
    channel = torch.arange(c_out, device=input.device)[:, None, None] * (ph_count * pw_count) + torch.arange(
        ph_count * pw_count, device=input.device
    ).view(ph_count, pw_count)  # [C_out, PH, PW]
    plane = batch[:, None, None, None] * c_in + channel  # [K, C_out, PH, PW]
    index = (plane[..., None, None] * height + rows[:, None, :, None, :, None]) * width + cols[
        :, None, None, :, None, :
    ]
    ok = rows_ok[:, None, :, None, :, None] & cols_ok[:, None, None, :, None, :] & ~empty[:, None, :, :, None, None]
    return index, ok.expand(index.shape), empty[:, None], area[:, None]


def ps_roi_pool_reference(input, rois, spatial_scale, output_size):
    compute_dtype = compute_dtype_of(input.dtype)
    index, ok, empty, area = _ps_candidates(input, rois, spatial_scale, output_size, True)
    values = torch.where(ok, input.reshape(-1)[index].to(compute_dtype), 0).sum((-1, -2))
    return torch.where(empty, 0, values / area.clamp(min=1)).to(input.dtype)


@torch.library.custom_op("tritondet::ps_roi_pool_backward", mutates_args=())
def ps_roi_pool_backward(
    grad: torch.Tensor, input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, output_size: list[int]
) -> torch.Tensor:
    """Each bin's gradient spread evenly over its pixels (deterministic in deterministic mode).

    Vectorized PyTorch on every backend; an op of its own because the candidate padding is sized
    from the data."""
    if no_pixels(input):
        return torch.zeros_like(input, memory_format=torch.contiguous_format)
    # torchvision's backward clips bins to [0, H] and [0, W], unlike its forward: its gradient is
    # reproduced here (so it is not the exact derivative for bins on the last row or column).
    index, ok, empty, area = _ps_candidates(input, rois, spatial_scale, tuple(output_size), False)
    share = torch.where(empty, 0, grad / area.clamp(min=1))[..., None, None].expand(index.shape)
    grad_input = grad.new_zeros(input.numel())
    grad_input.index_put_((index[ok],), share[ok], accumulate=True)
    return grad_input.reshape(input.shape)


@ps_roi_pool_backward.register_fake
def _(grad, input, rois, spatial_scale, output_size):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::roi_pool", mutates_args=())
def roi_pool_op(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, H, W], [K, 5] -> ([K, C, PH, PW] maxima, [K, C, PH, PW] int32 argmax)``: torchvision's
    schema and dtypes (``torchvision::roi_pool`` returns an int32 argmax)."""
    if no_pixels(input):
        shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
        return input.new_zeros(shape), input.new_full(shape, -1, dtype=torch.int32)
    if use_triton(input.device):
        maxima, argmax = roi_pool_triton(input, rois, spatial_scale, (pooled_height, pooled_width))
    elif use_fast_cpu(input.device) and torchvision_reads(rois, input.shape[0]):
        maxima, argmax = roi_pool_cpu(input, rois, spatial_scale, (pooled_height, pooled_width))
    else:
        maxima, argmax = roi_pool_reference(input, rois, spatial_scale, (pooled_height, pooled_width))
    return maxima, argmax.to(torch.int32)


@roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


def roi_pool_backward(grad: torch.Tensor, argmax: torch.Tensor, rois: torch.Tensor, input_shape) -> torch.Tensor:
    """Scatter ``grad`` to the argmax of each bin (deterministic in deterministic mode)."""
    n, c, h, w = input_shape
    if n * c * h * w == 0:
        return grad.new_zeros(input_shape)
    batch = rois[:, 0].clamp(0, n - 1).long()  # argmax is -1 for bad RoIs: masked below
    planes = (batch[:, None] * c + torch.arange(c, device=grad.device))[:, :, None, None] * (h * w)
    index = torch.where(argmax >= 0, planes + argmax, 0).reshape(-1)
    values = torch.where(argmax >= 0, grad, 0).reshape(-1)
    grad_input = grad.new_zeros(n * c * h * w)
    return grad_input.index_put_((index,), values, accumulate=True).reshape(n, c, h, w)


def _setup_context(ctx, inputs, output):
    input, rois, *_ = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.input_shape = input.shape


def _backward(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    return roi_pool_backward(grad, argmax, rois, ctx.input_shape), None, None, None, None


roi_pool_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("tritondet::ps_roi_pool", mutates_args=())
def ps_roi_pool_op(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> torch.Tensor:
    """``[N, C * PH * PW, H, W], [K, 5] -> [K, C, PH, PW]`` bin means (R-FCN)."""
    size = (pooled_height, pooled_width)
    if no_pixels(input):
        return input.new_zeros((rois.shape[0], input.shape[1] // (pooled_height * pooled_width), *size))
    if use_triton(input.device):
        return roi_pool_triton(input, rois, spatial_scale, size, position_sensitive=True)[0]
    if use_fast_cpu(input.device) and torchvision_reads(rois, input.shape[0]):
        return ps_roi_pool_cpu(input, rois, spatial_scale, size)
    return ps_roi_pool_reference(input, rois, spatial_scale, size)


@ps_roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    c_out = input.shape[1] // (pooled_height * pooled_width)
    return input.new_empty((rois.shape[0], c_out, pooled_height, pooled_width))


def _ps_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    ctx.save_for_backward(input, rois)
    ctx.spatial_scale, ctx.output_size = spatial_scale, (pooled_height, pooled_width)


def _ps_backward(ctx, grad):
    input, rois = ctx.saved_tensors
    grad_input = torch.ops.tritondet.ps_roi_pool_backward(grad, input, rois, ctx.spatial_scale, list(ctx.output_size))
    return grad_input, None, None, None, None


ps_roi_pool_op.register_autograd(_ps_backward, setup_context=_ps_setup_context)


def _aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        rois = torch.zeros((1, 5), dtype=compute_dtype_of(dtype))
        features = torch.empty((1, 1, 1, 1), dtype=dtype)
        # 16 and 49 bins: the two bin-block widths of _pool_blocks.
        for pooled, ps in itertools.product((4, 7), (False, True)):
            out = torch.empty((1, 1, pooled, pooled), dtype=dtype)
            args, meta = _roi_pool_arguments(rois, features, out, torch.empty(0, dtype=torch.int64), ps)
            label = f"{str(dtype).removeprefix('torch.')},BLOCK_P={meta['BLOCK_P']}" + (
                ",position_sensitive" if ps else ""
            )
            specs.append(KernelSpec.from_example(_roi_pool_fwd_kernel, args, meta, label))
    return specs


# Kernels whose results are compared exactly with torchvision or rounded (to pixels, levels,
# keep/drop decisions): IEEE division and square root only, no contracted multiply-add (the
# compile gate's PTX lint, `tritondet compile-report`).
EXACT_KERNELS = frozenset({_roi_pool_fwd_kernel})
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("roi_pool", "RoIPool", "ps_roi_pool", "PSRoIPool")
