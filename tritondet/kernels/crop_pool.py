"""Crop pooling ("Spatial Transformer Networks" sampling, as in the PyTorch Faster R-CNN ports):
an ``affine_grid`` + ``grid_sample`` bilinear crop of each RoI followed by a max pool, fused in
one kernel and differentiable with respect to the input and the box coordinates.

Shapes: input ``[N, C, H, W]`` (any strides), rois ``[K, 5]`` rows ``(batch_index, x1, y1, x2,
y2)`` -> ``[K, C, PH, PW]`` contiguous in the input dtype, plus the int64 argmax sample of each
output (``iy * S + ix``, ``-1`` for an invalid RoI).

Definition, with ``S = sampling_ratio`` and box corners scaled by ``spatial_scale``: the crop is
``grid_sample(input[b], affine_grid(theta, (PH * S, PW * S), align_corners=True), "bilinear",
padding_mode="zeros", align_corners=True)`` with ``theta = [[(x2 - x1) / (W - 1), 0, (x1 + x2 -
W + 1) / (W - 1)], [0, (y2 - y1) / (H - 1), (y1 + y2 - H + 1) / (H - 1)]]``, i.e. ``PW * S``
samples spaced evenly from ``x1`` to ``x2`` inclusive (the centre for a single sample), then
``max_pool2d(S)``. The output moves with the box, so its gradient reaches the box corners
(Section 3.2 (iii) of the Faster R-CNN paper): through the bilinear weights of each maximal sample.

The backward is vectorized PyTorch from the argmax (four taps per output, scattered with
``index_put_(accumulate=True)``: deterministic under ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import use_triton
from ._aot import KernelSpec
from ._common import NO_FP_FUSION, NUM_WARPS, compute_dtype_of, ieee_div, no_pixels, scaled_rois
from ._launch import launch
from .roi_align import load_roi, roi_bin_tile


@triton.jit
def _sample_position(index, count, start, end):
    """Pixel coordinate of sample ``index`` of ``count`` spread from ``start`` to ``end``."""
    t = tl.where(count > 1, -1.0 + ieee_div(2.0 * index.to(start.dtype), tl.maximum(count - 1, 1)), 0.0)
    return start + (end - start) * ((t + 1.0) * 0.5)


@triton.jit
def _crop_pool_fwd_kernel(
    # pointers
    rois_ptr,  # [K, 5] any strides, corners already multiplied by the spatial scale
    input_ptr,  # [N, C, H, W] any strides
    out_ptr,  # [K, C, PH, PW] contiguous
    argmax_ptr,  # [K, C, PH, PW] contiguous int64
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
    # scalars
    sampling_ratio,
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    k, channels, bins, c_ok, p_ok, ph, pw = roi_bin_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    mask_cp = c_ok[:, None] & p_ok[None, :]

    batch, valid, x1, y1, x2, y2 = load_roi(rois_ptr, k, stride_rk, stride_rc, N, compute_dtype)
    base = input_ptr + batch * stride_n + channels.to(tl.int64)[:, None] * stride_c
    best = tl.full((BLOCK_C, BLOCK_P), float("-inf"), dtype=compute_dtype)
    best_index = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.int64)
    samples = tl.where(valid, sampling_ratio, 0)
    for iy in range(samples):
        y = _sample_position(ph * sampling_ratio + iy, PH * sampling_ratio, y1, y2)
        y_low = tl.floor(y)
        w_y = y - y_low
        # Clamped before the int conversion (a far sample's taps stay outside the map either way).
        row0 = tl.minimum(tl.maximum(y_low, -2.0), H).to(tl.int32)
        row0_in = (row0 >= 0) & (row0 < H)
        row1_in = (row0 + 1 >= 0) & (row0 + 1 < H)
        for ix in range(samples):
            x = _sample_position(pw * sampling_ratio + ix, PW * sampling_ratio, x1, x2)
            x_low = tl.floor(x)
            w_x = x - x_low
            col0 = tl.minimum(tl.maximum(x_low, -2.0), W).to(tl.int32)
            col0_in = (col0 >= 0) & (col0 < W)
            col1_in = (col0 + 1 >= 0) & (col0 + 1 < W)
            offset = row0.to(tl.int64) * stride_h + col0.to(tl.int64) * stride_w
            # zeros padding: a tap outside the map reads 0
            v00 = tl.load(base + offset[None, :], mask=mask_cp & (row0_in & col0_in)[None, :], other=0)
            v01 = tl.load(base + (offset + stride_w)[None, :], mask=mask_cp & (row0_in & col1_in)[None, :], other=0)
            v10 = tl.load(base + (offset + stride_h)[None, :], mask=mask_cp & (row1_in & col0_in)[None, :], other=0)
            v11 = tl.load(
                base + (offset + stride_h + stride_w)[None, :], mask=mask_cp & (row1_in & col1_in)[None, :], other=0
            )
            value = (
                v00.to(compute_dtype) * ((1 - w_y) * (1 - w_x))[None, :]
                + v01.to(compute_dtype) * ((1 - w_y) * w_x)[None, :]
                + v10.to(compute_dtype) * (w_y * (1 - w_x))[None, :]
                + v11.to(compute_dtype) * (w_y * w_x)[None, :]
            )
            # As max_pool2d: the first NaN sample wins and nothing replaces it.
            better = (best == best) & ((value > best) | (value != value))
            best = tl.where(better, value, best)
            best_index = tl.where(better, iy * sampling_ratio + ix, best_index)
    out_offsets = (k.to(tl.int64) * C + channels)[:, None] * (PH * PW) + bins[None, :]
    tl.store(out_ptr + out_offsets, tl.where(valid, best, 0.0).to(out_ptr.dtype.element_ty), mask=mask_cp)
    tl.store(argmax_ptr + out_offsets, tl.where(valid, best_index, -1), mask=mask_cp)


def _pool_blocks(num_bins: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): 16 bin lanes up to 4x4 outputs, 64 for 7x7 (49 bins); channels fill a
    256-element tile: four taps, the running maximum and its int64 index stay in registers (a
    512-element tile spills 20 bytes around the IEEE divisions on sm_80, `tritondet compile-report`)."""
    block_p = 16 if num_bins <= 16 else 64
    return 256 // block_p, block_p


def _crop_pool_arguments(rois, input, out, argmax, sampling_ratio: int) -> tuple[tuple, dict]:
    """``(args, meta)`` of :func:`_crop_pool_fwd_kernel` for scaled ``rois`` in the compute dtype:
    what the launcher passes and what the ahead-of-time specs are derived from."""
    ph, pw = out.shape[2:]
    args = (rois, input, out, argmax, *input.shape, ph, pw, *rois.stride(), *input.stride(), sampling_ratio)
    block_c, block_p = _pool_blocks(ph * pw)
    meta = {
        "COMPUTE_FP64": rois.dtype == torch.float64,
        "BLOCK_C": block_c,
        "BLOCK_P": block_p,
        "num_warps": NUM_WARPS,
        **NO_FP_FUSION,
    }
    return args, meta


def crop_pool_triton(input, rois, spatial_scale, output_size, sampling_ratio):
    compute_dtype = compute_dtype_of(input.dtype)
    rois = scaled_rois(rois, spatial_scale, compute_dtype)
    c = input.shape[1]
    ph, pw = output_size
    out = torch.empty((rois.shape[0], c, ph, pw), dtype=input.dtype, device=input.device)
    argmax = torch.empty(out.shape, dtype=torch.int64, device=input.device)
    args, meta = _crop_pool_arguments(rois, input, out, argmax, sampling_ratio)
    grid = (rois.shape[0], triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(ph * pw, meta["BLOCK_P"]))
    launch(_crop_pool_fwd_kernel, grid, *args, **meta)
    return out, argmax


# ----------------------------------------------------------------------------------------------
# Reference (vectorized PyTorch) and the shared backward
# ----------------------------------------------------------------------------------------------


def _positions(rois, spatial_scale, bins, sampling_ratio, axis, index):
    """Pixel coordinate and its derivative weights (d/d start, d/d end) of samples ``index``."""
    count = bins * sampling_ratio
    t = -1.0 + 2.0 * index / max(count - 1, 1) if count > 1 else torch.zeros_like(index)
    u = (t + 1.0) / 2.0
    start = rois[:, 1 + axis] * spatial_scale
    end = rois[:, 3 + axis] * spatial_scale
    shape = (-1,) + (1,) * (index.dim() - 1)
    return start.view(shape) + (end - start).view(shape) * u, u


def _valid(rois, n):
    b = rois[:, 0]
    return (b >= 0) & (b < n) & (b == b.floor()) & torch.isfinite(rois[:, 1:]).all(1)


def _taps(input, batch, y, x):
    """Bilinear taps with zeros padding: the four values and the fractional offsets."""
    _, c, h, w = input.shape
    y_low, x_low = y.floor(), x.floor()
    values = []
    for dy in (0, 1):
        for dx in (0, 1):
            row, col = y_low.long() + dy, x_low.long() + dx
            inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
            channel = torch.arange(c, device=input.device).view(1, c, *([1] * (y.dim() - 2)))
            shape = (-1,) + (1,) * (y.dim() - 1)
            v = input[batch.view(shape), channel, row.clamp(0, h - 1), col.clamp(0, w - 1)]
            values.append(torch.where(inside, v, 0))
    return values, y - y_low, x - x_low


def crop_pool_reference(input, rois, spatial_scale, output_size, sampling_ratio):
    compute_dtype = compute_dtype_of(input.dtype)
    rois = rois.to(compute_dtype)
    n, c = input.shape[:2]
    ph, pw = output_size
    s = sampling_ratio
    k = rois.shape[0]
    valid = _valid(rois, n)
    batch = torch.where(valid, rois[:, 0], 0).long()
    y, _ = _positions(
        rois, spatial_scale, ph, s, 1, torch.arange(ph * s, device=rois.device, dtype=compute_dtype)[None]
    )
    x, _ = _positions(
        rois, spatial_scale, pw, s, 0, torch.arange(pw * s, device=rois.device, dtype=compute_dtype)[None]
    )
    y = y[:, None, :, None].expand(k, 1, ph * s, pw * s)
    x = x[:, None, None, :].expand(k, 1, ph * s, pw * s)
    (v00, v01, v10, v11), w_y, w_x = _taps(input.to(compute_dtype), batch, y, x)
    crops = v00 * ((1 - w_y) * (1 - w_x)) + v01 * ((1 - w_y) * w_x) + v10 * (w_y * (1 - w_x)) + v11 * (w_y * w_x)
    windows = crops.reshape(k, c, ph, s, pw, s).permute(0, 1, 2, 4, 3, 5).reshape(k, c, ph, pw, s * s)
    best, argmax = windows.max(-1)
    valid = valid.view(-1, 1, 1, 1)
    return torch.where(valid, best, 0).to(input.dtype), torch.where(valid, argmax, -1)


def crop_pool_backward(grad, input, rois, argmax, spatial_scale, sampling_ratio):
    """Gradients with respect to ``input`` and ``rois`` from the argmax samples."""
    compute_dtype = compute_dtype_of(input.dtype)
    n, c, h, w = input.shape
    k, _, ph, pw = grad.shape
    s = sampling_ratio
    rois_c = rois.to(compute_dtype)
    taken = argmax >= 0
    index = argmax.clamp(min=0)
    rows = torch.arange(ph, device=grad.device).view(1, 1, ph, 1) * s + index // s
    cols = torch.arange(pw, device=grad.device).view(1, 1, 1, pw) * s + index % s
    y, u_y = _positions(rois_c, spatial_scale, ph, s, 1, rows.to(compute_dtype))
    x, u_x = _positions(rois_c, spatial_scale, pw, s, 0, cols.to(compute_dtype))
    batch = torch.where(taken[:, 0, 0, 0], rois_c[:, 0], 0).long()
    (v00, v01, v10, v11), w_y, w_x = _taps(input.to(compute_dtype), batch, y, x)
    g = torch.where(taken, grad.to(compute_dtype), 0)

    grad_input = torch.zeros(n * c * h * w, dtype=compute_dtype, device=grad.device)
    channel = torch.arange(c, device=grad.device).view(1, c, 1, 1)
    plane = (batch.view(-1, 1, 1, 1) * c + channel) * (h * w)
    y_low, x_low = y.floor().long(), x.floor().long()
    for dy, dx, weight in (
        (0, 0, (1 - w_y) * (1 - w_x)),
        (0, 1, (1 - w_y) * w_x),
        (1, 0, w_y * (1 - w_x)),
        (1, 1, w_y * w_x),
    ):
        row, col = y_low + dy, x_low + dx
        inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        flat = plane + row.clamp(0, h - 1) * w + col.clamp(0, w - 1)
        contribution = torch.where(inside, g * weight, 0)
        grad_input.index_put_((flat.expand_as(g).reshape(-1),), contribution.reshape(-1), accumulate=True)

    d_y = (1 - w_x) * (v10 - v00) + w_x * (v11 - v01)
    d_x = (1 - w_y) * (v01 - v00) + w_y * (v11 - v10)
    g_y, g_x = g * d_y * spatial_scale, g * d_x * spatial_scale
    grad_rois = torch.stack(
        [
            torch.zeros(k, dtype=compute_dtype, device=grad.device),
            (g_x * (1 - u_x)).sum((1, 2, 3)),
            (g_y * (1 - u_y)).sum((1, 2, 3)),
            (g_x * u_x).sum((1, 2, 3)),
            (g_y * u_y).sum((1, 2, 3)),
        ],
        1,
    )
    return grad_input.reshape(n, c, h, w).to(input.dtype), grad_rois.to(rois.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::crop_pool", mutates_args=())
def crop_pool_op(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, H, W], [K, 5] -> ([K, C, PH, PW] crops, [K, C, PH, PW] int64 argmax sample)``."""
    size = (pooled_height, pooled_width)
    if no_pixels(input):
        shape = (rois.shape[0], input.shape[1], *size)
        return input.new_zeros(shape), input.new_full(shape, -1, dtype=torch.int64)
    if use_triton(input.device):
        return crop_pool_triton(input, rois, spatial_scale, size, sampling_ratio)
    return crop_pool_reference(input, rois, spatial_scale, size, sampling_ratio)


@crop_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, _, _, sampling_ratio = inputs
    ctx.save_for_backward(input, rois, output[1])
    ctx.spatial_scale, ctx.sampling_ratio = spatial_scale, sampling_ratio


def _backward(ctx, grad, _grad_argmax):
    input, rois, argmax = ctx.saved_tensors
    if no_pixels(input):
        return torch.zeros_like(input), torch.zeros_like(rois), None, None, None, None
    grad_input, grad_rois = crop_pool_backward(grad, input, rois, argmax, ctx.spatial_scale, ctx.sampling_ratio)
    return grad_input, grad_rois, None, None, None, None


crop_pool_op.register_autograd(_backward, setup_context=_setup_context)


def _aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        rois = torch.zeros((1, 5), dtype=compute_dtype_of(dtype))
        features = torch.empty((1, 1, 1, 1), dtype=dtype)
        for pooled in (4, 7):  # 16 and 49 bins: the two bin-block widths of _pool_blocks
            out = torch.empty((1, 1, pooled, pooled), dtype=dtype)
            argmax = torch.empty(out.shape, dtype=torch.int64)
            args, meta = _crop_pool_arguments(rois, features, out, argmax, 2)
            label = f"{str(dtype).removeprefix('torch.')},BLOCK_P={meta['BLOCK_P']}"
            specs.append(KernelSpec.from_example(_crop_pool_fwd_kernel, args, meta, label))
    return specs


# Kernels whose results are compared exactly with torchvision or rounded (to pixels, levels,
# keep/drop decisions): IEEE division and square root only, no contracted multiply-add (the
# compile gate's PTX lint, `tritondet compile-report`).
EXACT_KERNELS = frozenset({_crop_pool_fwd_kernel})
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("crop_pool",)
