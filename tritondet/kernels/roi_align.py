"""RoIAlign over one or several feature maps (Mask R-CNN; FPN's multi-scale pooling) and RoIPool.

Shapes: features ``L`` levels ``[N, C, H_l, W_l]`` (any strides: NCHW and channels_last are read
in place), rois ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` -> ``[K, C, PH, PW]``, always
contiguous (NCHW). With ``L == 1`` this is torchvision's ``roi_align``; with ``L > 1`` every RoI
picks its level inside the kernel with FPN's Eqn. (1) (torchvision's ``LevelMapper``), so
``MultiScaleRoIAlign`` is one launch with no per-level gather and no host sync.

Order of this file: Triton helpers and kernels -> host launchers -> pure-PyTorch reference (test
oracle and CPU path) -> ``torch.library`` registration -> AOT specializations.

Numerics: sampling positions, bilinear weights and sums are computed in fp32 (fp64 for fp64
features) in torchvision's formulas and order; fp16/bf16 features are upcast as they are loaded
and the result is rounded once to the feature dtype. The backward is the exact transpose of the
forward. With ``torch.use_deterministic_algorithms(True)`` the backward gathers instead of
scattering (one program owns each tile of the input gradient and visits the RoIs in order), so the
gradient is bitwise identical run to run, needs no float atomics and no per-RoI buffers.

Bounded work: a bin visits only its samples within a pixel of the map (``_sample_span``, exact, about
``(size + 1) / step`` per axis), so a RoI of any size costs at most a few times the map per bin.
torchvision's adaptive grid (``ceil(bin)`` samples per axis) is capped at ``MAX_GRID`` = 2**23: a bin
of more map pixels, beyond fp32's pixel resolution (where torchvision's own loop never finishes),
samples that grid, on every backend.

Out-of-bounds safety: a RoI whose batch index is not an integer in ``[0, N)`` (or whose corners are
not finite) samples nothing: its output is zero and it receives no gradient. So does a RoI of
several levels whose area is negative or NaN (on no level, ``_common.roi_level``).
"""

from __future__ import annotations

import itertools
import warnings

import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import (
    NO_FP_FUSION,
    NO_LEVEL,
    NUM_WARPS,
    SINGLE_LEVEL_MAPPER,
    compute_dtype_of,
    ieee_div,
    level_area_thresholds,
    level_pointers,
    no_pixels,
    pick_level,
    roi_level,
    roi_levels_reference,
)
from ._cpu import empty_on_huge_pages, ps_roi_align_backward_cpu, ps_roi_align_cpu, torchvision_reads
from ._launch import device_table, launch

# Per-level geometry table columns (int64): H, W, then the feature's and the gradient's strides.
_GEOMETRY_COLUMNS = tl.constexpr(10)
# Largest sample grid per bin axis. Below 2**23, fp32 holds every sample's ``i + 0.5`` exactly and
# consecutive sample positions stay apart (a few at most share one), so the samples near the map
# number about (size + 1) / step (_sample_span): bounded work. A bin of more map pixels samples
# this grid, on every backend: beyond fp32's pixel resolution, where torchvision's own adaptive
# loop (2**46 or more samples per bin) never finishes.
MAX_GRID = tl.constexpr(2.0**23)


# ----------------------------------------------------------------------------------------------
# Triton helpers shared by the kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def roi_bin_tile(C, PH, PW, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The program layout of every per-RoI kernel: RoI ``k`` = program 0, a block of channels
    (program 1) by a block of output bins (program 2). Returns (k, channels [BLOCK_C],
    bins [BLOCK_P], their in-range masks, and each bin's row ph and column pw)."""
    k = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    return k, channels, bins, channels < C, bins < PH * PW, bins // PW, bins % PW


@triton.jit
def load_roi(rois_ptr, k, stride_rk, stride_rc, N, compute_dtype: tl.constexpr):
    """(batch index, valid, x1, y1, x2, y2) of RoI ``k``; invalid when the batch index is not an
    integer in [0, N) or a corner is not finite."""
    row = rois_ptr + k * stride_rk.to(tl.int64)
    b = tl.load(row).to(compute_dtype)
    x1 = tl.load(row + stride_rc).to(compute_dtype)
    y1 = tl.load(row + 2 * stride_rc).to(compute_dtype)
    x2 = tl.load(row + 3 * stride_rc).to(compute_dtype)
    y2 = tl.load(row + 4 * stride_rc).to(compute_dtype)
    # |v| < inf is false for NaN and +-inf.
    finite = (tl.abs(x1) < float("inf")) & (tl.abs(y1) < float("inf"))
    finite = finite & (tl.abs(x2) < float("inf")) & (tl.abs(y2) < float("inf"))
    valid = (b >= 0) & (b < N) & (b == tl.floor(b)) & finite
    batch = tl.where(valid, b, 0).to(tl.int64)
    return batch, valid, x1, y1, x2, y2


@triton.jit
def _level_view(
    geometry_ptr,
    level,
    batch,
    channels,
    bins,
    PH,
    PW,
    ptr0,
    ptr1,
    ptr2,
    ptr3,
    ptr4,
    COLUMN: tl.constexpr,
    POSITION_SENSITIVE: tl.constexpr,
):
    """Where RoI ``level``'s tensor lives: H, W, the image's base pointer, per-(channel, bin)
    offsets [BLOCK_C, BLOCK_P] and the row and column strides. ``COLUMN`` picks the geometry
    columns of the features (2) or of their gradients (6); ``ptr0..4`` are those tensors."""
    geometry = geometry_ptr + level * _GEOMETRY_COLUMNS
    H = tl.load(geometry).to(tl.int32)
    W = tl.load(geometry + 1).to(tl.int32)
    base = pick_level(level, ptr0, ptr1, ptr2, ptr3, ptr4) + batch * tl.load(geometry + COLUMN)
    if POSITION_SENSITIVE:
        chan_offsets = (channels.to(tl.int64)[:, None] * (PH * PW) + bins[None, :]) * tl.load(geometry + COLUMN + 1)
    else:
        chan_offsets = channels.to(tl.int64)[:, None] * tl.load(geometry + COLUMN + 1)
    return H, W, base, chan_offsets, tl.load(geometry + COLUMN + 2), tl.load(geometry + COLUMN + 3)


@triton.jit
def bin_grid(x1, y1, x2, y2, scale, aligned, PH, PW, sampling_ratio, valid):
    """torchvision's RoIAlign geometry: start, bin size and sampling grid per axis, sample count."""
    offset = tl.where(aligned != 0, 0.5, 0.0)
    start_w = x1 * scale - offset
    start_h = y1 * scale - offset
    roi_w = x2 * scale - offset - start_w
    roi_h = y2 * scale - offset - start_h
    # Legacy (non-aligned) mode forces malformed RoIs to be 1x1.
    roi_w = tl.where(aligned != 0, roi_w, tl.maximum(roi_w, 1.0))
    roi_h = tl.where(aligned != 0, roi_h, tl.maximum(roi_h, 1.0))
    bin_h = ieee_div(roi_h, PH)
    bin_w = ieee_div(roi_w, PW)
    # Sample counts stay floats, clamped before any integer conversion: only the samples near the
    # map are visited (_sample_span), so the loops are bounded by the map, not by the RoI.
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_h))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_w))
    grid_h = tl.where(valid, tl.minimum(tl.maximum(grid_h, 0.0), MAX_GRID), 0.0)
    grid_w = tl.where(valid, tl.minimum(tl.maximum(grid_w, 0.0), MAX_GRID), 0.0)
    count = tl.maximum(grid_h * grid_w, 1.0)
    return start_h, start_w, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _sample_position(i, origin, bin_size, grid):
    """Position of sample ``i`` (int32) of a bin along one axis, torchvision's formula in its order
    of operations: ``origin + (i + 0.5) * bin_size / grid``."""
    return origin + ieee_div((i + 0.5) * bin_size, grid)


@triton.jit
def _any_open(lo, hi):
    """Whether a bracket ``[lo, hi)`` of one bin (a scalar: the deterministic backward's) or of a
    vector of bins is still open."""
    if lo.numel == 1:
        return hi > lo
    else:
        return tl.max(hi - lo, 0) > 0


@triton.jit
def _samples_before(lo, hi, limit, OR_AT: tl.constexpr, direction, origin, bin_size, grid):
    """How many samples of ``[0, hi)`` (int32; the first ``lo`` of them do) lie before ``limit``:
    ``direction * position < limit`` (``<=`` with ``OR_AT``). Positions are monotone in the sample
    (each rounding is), so these samples are a prefix: bisection in the positions' own arithmetic,
    about log2(hi - lo) steps."""
    while _any_open(lo, hi):
        mid = (lo + hi) // 2
        key = direction * _sample_position(mid, origin, bin_size, grid)
        before = key < limit
        if OR_AT:
            before = before | (key == limit)
        open_bracket = lo < hi
        lo = tl.where(open_bracket & before, mid + 1, lo)
        hi = tl.where(open_bracket & ~before, mid, hi)
    return lo


@triton.jit
def _sample_span(origin, bin_size, grid, size):
    """(first, count) int32: the samples ``i`` in ``[0, grid)`` of a bin (:func:`_sample_position`)
    that land in ``[-1, size]``, the only ones with a bilinear tap (:func:`axis_weights`). Their
    positions increase with ``i`` for a positive bin size and decrease for a negative one (an
    inverted RoI or a negative scale walks the samples backwards), so the samples on the map are
    consecutive and :func:`_samples_before` finds both ends exactly. Consecutive positions are about
    a step apart (``MAX_GRID``): about ``(size + 1) / step`` samples, at most ``2 * size + 4`` with an
    adaptive grid (step >= 1/2 unless the grid is one sample), however large the RoI. A non-finite
    origin or bin size puts no sample on the map."""
    backwards = bin_size < 0
    # direction * position grows with i; the map is [low, high] in those units.
    direction = tl.where(backwards, -1.0, 1.0)
    low = tl.where(backwards, -size, -1.0)
    high = tl.where(backwards, 1.0, size)
    # |v| < inf and grid > 0 are false for NaN. (Nested where: the interpreter cannot & a vector
    # of bins with a RoI's scalar.)
    samples = tl.where((tl.abs(bin_size) < float("inf")) & (grid > 0), grid, 0.0)
    samples = tl.where(tl.abs(origin) < float("inf"), samples, 0.0).to(tl.int32)
    none = tl.zeros_like(samples)
    first = _samples_before(none, samples, low, False, direction, origin, bin_size, grid)
    end = _samples_before(first, samples, high, True, direction, origin, bin_size, grid)
    return first, end - first


@triton.jit(noinline=True)
def _called_sample_span(origin, bin_size, grid, size):
    """:func:`_sample_span` of one bin as a call, for the deterministic backward: its bisection
    loops inlined into that kernel's loop nest spilled 24-40 bytes of registers on sm_80/sm_90
    (`tritondet compile-report`); called, none."""
    return _sample_span(origin, bin_size, grid, size)


@triton.jit
def bin_spans(start_h, start_w, bin_h, bin_w, grid_h, grid_w, ph, pw, p_ok, H, W):
    """Each bin (ph, pw)'s origin and :func:`_sample_span` along both axes (empty for bins out of
    range): (origin_y, first_y, span_y, origin_x, first_x, span_x)."""
    origin_y = start_h + ph * bin_h
    origin_x = start_w + pw * bin_w
    first_y, span_y = _sample_span(origin_y, bin_h, grid_h, H)
    first_x, span_x = _sample_span(origin_x, bin_w, grid_w, W)
    return origin_y, first_y, tl.where(p_ok, span_y, 0), origin_x, first_x, tl.where(p_ok, span_x, 0)


@triton.jit
def sample_taps(step, first, span, origin, bin_size, grid, size, stride):
    """Sample ``first + step`` of a bin along one axis, at ``origin + (i + 0.5) * bin_size / grid``:
    the element offsets (int64, ``stride`` per pixel) of its low and high bilinear taps, their
    weights, and whether it counts (within the bin's ``span`` and the map's reach)."""
    coord = _sample_position(first + step, origin, bin_size, grid)
    low, high, w_low, w_high, inside = axis_weights(coord, size)
    return low.to(tl.int64) * stride, high.to(tl.int64) * stride, w_low, w_high, inside & (step < span)


@triton.jit
def bilinear_sample(ptr, row_low, row_high, col_low, col_high, wy_low, wy_high, wx_low, wx_high, mask, dtype):
    """torchvision's bilinear interpolation from the four taps at ``ptr`` + row + column offsets
    (any broadcastable shapes), in ``dtype`` and in torchvision's order of operations."""
    v1 = tl.load(ptr + (row_low + col_low), mask=mask, other=0).to(dtype)
    v2 = tl.load(ptr + (row_low + col_high), mask=mask, other=0).to(dtype)
    v3 = tl.load(ptr + (row_high + col_low), mask=mask, other=0).to(dtype)
    v4 = tl.load(ptr + (row_high + col_high), mask=mask, other=0).to(dtype)
    return wy_low * wx_low * v1 + wy_low * wx_high * v2 + wy_high * wx_low * v3 + wy_high * wx_high * v4


@triton.jit
def axis_weights(coord, size):
    """Bilinear taps along one axis, torchvision's boundary rules: (low, high, w_low, w_high, inside).

    A sample further than one pixel outside the map (coord < -1 or coord > size) contributes
    nothing; otherwise it is clamped to [0, size - 1]."""
    inside = (coord >= -1.0) & (coord <= size)
    c = tl.where(inside, tl.maximum(coord, 0.0), 0.0)
    low = c.to(tl.int32)
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, size - 1, low + 1)
    c = tl.where(at_edge, low.to(c.dtype), c)
    w_high = c - low
    w_low = 1.0 - w_high
    return low, high, w_low, w_high, inside


@triton.jit
def bin_sample_sums(
    plane, mask, origin_y, first_y, span_y, bin_h, grid_h, origin_x, first_x, span_x, bin_w, grid_w,
    H, W, stride_h, stride_w, compute_dtype: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_C, BLOCK_P]``: the sum of each bin's bilinear samples (RoIAlign's forward before the
    division by the sample count, torchvision's positions and order of operations), read at the
    pointers ``plane`` (``[BLOCK_C, BLOCK_P]`` or broadcastable) plus each tap's row and column
    offset, on the lanes of ``mask``; only the samples of each bin's span are visited
    (:func:`bin_spans`: bounded by the map, not by the RoI)."""
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=compute_dtype)
    for dy in range(tl.max(span_y, 0)):
        row_low, row_high, wy_low, wy_high, y_in = sample_taps(
            dy, first_y, span_y, origin_y, bin_h, grid_h, H, stride_h
        )
        for dx in range(tl.max(span_x, 0)):
            col_low, col_high, wx_low, wx_high, x_in = sample_taps(
                dx, first_x, span_x, origin_x, bin_w, grid_w, W, stride_w
            )
            acc += bilinear_sample(
                plane, row_low[None, :], row_high[None, :], col_low[None, :], col_high[None, :],
                wy_low[None, :], wy_high[None, :], wx_low[None, :], wx_high[None, :],
                mask & (y_in & x_in)[None, :], compute_dtype,
            )  # fmt: skip
    return acc


@triton.jit
def _pooled_bins(
    rois_ptr, geometry_ptr, scales_ptr, level_areas_ptr, ptr0, ptr1, ptr2, ptr3, ptr4,
    N, C, PH, PW, stride_rk, stride_rc, sampling_ratio, aligned, num_levels,
    COLUMN: tl.constexpr, COMPUTE_FP64: tl.constexpr, POSITION_SENSITIVE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """What the forward and the atomic backward program of one (RoI, channel block, bin block)
    share: the output offsets [BLOCK_C, BLOCK_P] and their mask, the RoI's level tensor (H, W, base
    pointer, channel offsets, row and column strides; ``COLUMN`` and ``ptr0..4`` as in
    :func:`_level_view`), and each bin's sampling (origins, spans, bin sizes, grids, count)."""
    k, channels, bins, c_ok, p_ok, ph, pw = roi_bin_tile(C, PH, PW, BLOCK_C, BLOCK_P)
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    batch, valid, x1, y1, x2, y2 = load_roi(rois_ptr, k, stride_rk, stride_rc, N, compute_dtype)
    level = roi_level(x1, y1, x2, y2, level_areas_ptr, num_levels)
    # A RoI on no level samples nothing (zero output, no gradient); it reads level 0's table.
    valid = valid & (level != NO_LEVEL)
    level = tl.maximum(level, 0)
    H, W, base, chan_offsets, stride_h, stride_w = _level_view(
        geometry_ptr, level, batch, channels, bins, PH, PW, ptr0, ptr1, ptr2, ptr3, ptr4, COLUMN, POSITION_SENSITIVE
    )
    scale = tl.load(scales_ptr + level)
    start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = bin_grid(
        x1, y1, x2, y2, scale, aligned, PH, PW, sampling_ratio, valid
    )
    origin_y, first_y, span_y, origin_x, first_x, span_x = bin_spans(
        start_h, start_w, bin_h, bin_w, grid_h, grid_w, ph, pw, p_ok, H, W
    )
    out_offsets = (k.to(tl.int64) * C + channels)[:, None] * (PH * PW) + bins[None, :]
    return (
        out_offsets, c_ok[:, None] & p_ok[None, :], H, W, base + chan_offsets, stride_h, stride_w,
        origin_y, first_y, span_y, bin_h, grid_h, origin_x, first_x, span_x, bin_w, grid_w, count,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Forward: one program per (RoI, channel block, bin block).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _roi_align_fwd_kernel(
    # pointers
    rois_ptr,  # [K, 5] any strides
    feat0,  # level feature maps [N, C, H_l, W_l], any strides; unused levels repeat feat0
    feat1,
    feat2,
    feat3,
    feat4,
    geometry_ptr,  # [L, 10] int64: H, W, feature strides (n, c, h, w), gradient strides
    scales_ptr,  # [L] spatial scale per level, in the compute dtype
    out_ptr,  # [K, C, PH, PW] contiguous
    # sizes
    N,
    C,
    PH,
    PW,
    # strides (in elements)
    stride_rk,
    stride_rc,
    # scalars
    sampling_ratio,
    aligned,
    num_levels,
    level_areas_ptr,  # [MAX_LEVELS - 1] fp32: _common.level_area_thresholds
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    POSITION_SENSITIVE: tl.constexpr,  # R-FCN: bin (ph, pw) of output channel c reads input channel c * PH * PW + ph * PW + pw
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    (
        out_offsets, mask_cp, H, W, plane, stride_h, stride_w,
        origin_y, first_y, span_y, bin_h, grid_h, origin_x, first_x, span_x, bin_w, grid_w, count,
    ) = _pooled_bins(
        rois_ptr, geometry_ptr, scales_ptr, level_areas_ptr, feat0, feat1, feat2, feat3, feat4,
        N, C, PH, PW, stride_rk, stride_rc, sampling_ratio, aligned, num_levels,
        2, COMPUTE_FP64, POSITION_SENSITIVE, BLOCK_C, BLOCK_P,
    )  # fmt: skip
    acc = bin_sample_sums(
        plane, mask_cp, origin_y, first_y, span_y, bin_h, grid_h, origin_x, first_x, span_x, bin_w, grid_w,
        H, W, stride_h, stride_w, compute_dtype, BLOCK_C, BLOCK_P,
    )  # fmt: skip
    acc = ieee_div(acc, count)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask_cp)


# ----------------------------------------------------------------------------------------------
# Backward, default mode: the forward's program layout, scattering with atomic adds.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _roi_align_bwd_atomic_kernel(
    # pointers
    rois_ptr,  # [K, 5] any strides
    grad_out_ptr,  # [K, C, PH, PW] contiguous
    grad0,  # level input gradients (fp32, fp64 for fp64 features), zero-filled
    grad1,
    grad2,
    grad3,
    grad4,
    geometry_ptr,  # [L, 10] int64, as in the forward
    scales_ptr,  # [L] compute dtype
    # sizes
    N,
    C,
    PH,
    PW,
    # strides (in elements)
    stride_rk,
    stride_rc,
    # scalars
    sampling_ratio,
    aligned,
    num_levels,
    level_areas_ptr,  # [MAX_LEVELS - 1] fp32: _common.level_area_thresholds
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    POSITION_SENSITIVE: tl.constexpr,  # R-FCN: bin (ph, pw) of output channel c reads input channel c * PH * PW + ph * PW + pw
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    (
        out_offsets, mask_cp, H, W, plane, stride_h, stride_w,
        origin_y, first_y, span_y, bin_h, grid_h, origin_x, first_x, span_x, bin_w, grid_w, count,
    ) = _pooled_bins(
        rois_ptr, geometry_ptr, scales_ptr, level_areas_ptr, grad0, grad1, grad2, grad3, grad4,
        N, C, PH, PW, stride_rk, stride_rc, sampling_ratio, aligned, num_levels,
        6, COMPUTE_FP64, POSITION_SENSITIVE, BLOCK_C, BLOCK_P,
    )  # fmt: skip
    grad = ieee_div(tl.load(grad_out_ptr + out_offsets, mask=mask_cp, other=0).to(compute_dtype), count)
    for dy in range(tl.max(span_y, 0)):
        row_low, row_high, wy_low, wy_high, y_in = sample_taps(
            dy, first_y, span_y, origin_y, bin_h, grid_h, H, stride_h
        )
        for dx in range(tl.max(span_x, 0)):
            col_low, col_high, wx_low, wx_high, x_in = sample_taps(
                dx, first_x, span_x, origin_x, bin_w, grid_w, W, stride_w
            )
            mask = mask_cp & (y_in & x_in)[None, :]
            tl.atomic_add(plane + (row_low + col_low)[None, :], grad * (wy_low * wx_low)[None, :], mask)
            tl.atomic_add(plane + (row_low + col_high)[None, :], grad * (wy_low * wx_high)[None, :], mask)
            tl.atomic_add(plane + (row_high + col_low)[None, :], grad * (wy_high * wx_low)[None, :], mask)
            tl.atomic_add(plane + (row_high + col_high)[None, :], grad * (wy_high * wx_high)[None, :], mask)


# ----------------------------------------------------------------------------------------------
# Backward, deterministic mode: one program per (input tile, channel block) gathers from the
# RoIs in index order. The bilinear weight of a sample factorizes into a row weight and a column
# weight (a sample outside the map in either axis is zero in both factors' product), so a RoI
# bin adds grad * Ay[h] * Ax[w] to the tile: no atomics, fixed summation order.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _axis_tap_weight(coord, size, positions):
    """Weight of the bilinear taps of ``coord`` on each of ``positions`` (one axis); zero when the
    sample is outside the map along this axis, so the product of the two axes' weights is the
    forward's weight."""
    low, high, w_low, w_high, inside = axis_weights(coord, size)
    weight = tl.where(positions == low, w_low, 0.0) + tl.where(positions == high, w_high, 0.0)
    return tl.where(inside, weight, 0.0)


@triton.jit
def _roi_align_bwd_gather_kernel(
    # pointers
    rois_ptr,  # [K, 5] any strides
    grad_out_ptr,  # [K, C, PH, PW] contiguous
    grad0,  # level input gradients (fp32, fp64 for fp64 features), fully written here
    grad1,
    grad2,
    grad3,
    grad4,
    geometry_ptr,  # [L, 10] int64, as in the forward
    scales_ptr,  # [L] compute dtype
    tiles_ptr,  # [L + 1] int32: first tile index of each level (prefix sums), then the total
    # sizes
    K,
    N,
    C,
    PH,
    PW,
    # strides (in elements)
    stride_rk,
    stride_rc,
    # scalars
    sampling_ratio,
    aligned,
    num_levels,
    level_areas_ptr,  # [MAX_LEVELS - 1] fp32: _common.level_area_thresholds
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    POSITION_SENSITIVE: tl.constexpr,  # R-FCN: bin (ph, pw) of output channel c reads input channel c * PH * PW + ph * PW + pw
    BLOCK_C: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
):
    tile = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    c_ok = channels < C

    level = 0
    for lvl in range(1, num_levels):
        level = tl.where(tile >= tl.load(tiles_ptr + lvl), lvl, level)
    geometry = geometry_ptr + level * _GEOMETRY_COLUMNS
    H = tl.load(geometry).to(tl.int32)
    W = tl.load(geometry + 1).to(tl.int32)
    tiles_h = tl.cdiv(H, TILE_H)
    tiles_w = tl.cdiv(W, TILE_W)
    local = tile - tl.load(tiles_ptr + level)
    image = local // (tiles_h * tiles_w)
    tile_y0 = (local // tiles_w) % tiles_h * TILE_H
    tile_x0 = local % tiles_w * TILE_W
    pixels = tl.arange(0, TILE_H * TILE_W)
    rows = tile_y0 + pixels // TILE_W
    cols = tile_x0 + pixels % TILE_W
    scale = tl.load(scales_ptr + level)

    acc = tl.zeros((BLOCK_C, TILE_H * TILE_W), dtype=compute_dtype)
    for k in range(K):
        batch, valid, x1, y1, x2, y2 = load_roi(rois_ptr, k, stride_rk, stride_rc, N, compute_dtype)
        this_level = roi_level(x1, y1, x2, y2, level_areas_ptr, num_levels)  # NO_LEVEL matches no tile
        start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = bin_grid(
            x1, y1, x2, y2, scale, aligned, PH, PW, sampling_ratio, valid
        )
        # Samples lie between start and start + PH * bin; their taps one pixel around (a
        # conservative footprint: the weights below are exact either way).
        end_h = start_h + PH * bin_h
        end_w = start_w + PW * bin_w
        mine = valid & (this_level == level) & (batch == image)
        mine = mine & (tl.minimum(start_h, end_h) <= tile_y0 + TILE_H) & (tl.maximum(start_h, end_h) >= tile_y0 - 1)
        mine = mine & (tl.minimum(start_w, end_w) <= tile_x0 + TILE_W) & (tl.maximum(start_w, end_w) >= tile_x0 - 1)
        if mine:
            if POSITION_SENSITIVE:  # C counts input channels here, C // (PH * PW) outputs
                grad_row = grad_out_ptr + (tl.cast(k, tl.int64) * (C // (PH * PW)) + channels // (PH * PW)) * (PH * PW)
            else:
                grad_row = grad_out_ptr + (tl.cast(k, tl.int64) * C + channels) * (PH * PW)
            for ph in range(PH):
                bin_y0 = start_h + ph * bin_h
                near_y = (tl.minimum(bin_y0, bin_y0 + bin_h) <= tile_y0 + TILE_H) & (
                    tl.maximum(bin_y0, bin_y0 + bin_h) >= tile_y0 - 1
                )
                if near_y:
                    wy = tl.zeros((TILE_H * TILE_W,), dtype=compute_dtype)
                    first_y, span_y = _called_sample_span(bin_y0, bin_h, grid_h, H)
                    for iy in range(first_y, first_y + span_y):
                        wy += _axis_tap_weight(_sample_position(iy, bin_y0, bin_h, grid_h), H, rows)
                    for pw in range(PW):
                        bin_x0 = start_w + pw * bin_w
                        near_x = (tl.minimum(bin_x0, bin_x0 + bin_w) <= tile_x0 + TILE_W) & (
                            tl.maximum(bin_x0, bin_x0 + bin_w) >= tile_x0 - 1
                        )
                        if near_x:
                            grad_mask = c_ok
                            if POSITION_SENSITIVE:
                                grad_mask = grad_mask & (channels % (PH * PW) == ph * PW + pw)
                            grad = ieee_div(
                                tl.load(grad_row + ph * PW + pw, mask=grad_mask, other=0).to(compute_dtype), count
                            )
                            wx = tl.zeros((TILE_H * TILE_W,), dtype=compute_dtype)
                            first_x, span_x = _called_sample_span(bin_x0, bin_w, grid_w, W)
                            for ix in range(first_x, first_x + span_x):
                                wx += _axis_tap_weight(_sample_position(ix, bin_x0, bin_w, grid_w), W, cols)
                            acc += grad[:, None] * (wy * wx)[None, :]
    in_map = (rows < H) & (cols < W)
    base = pick_level(level, grad0, grad1, grad2, grad3, grad4) + image.to(tl.int64) * tl.load(geometry + 6)
    offsets = (
        channels.to(tl.int64)[:, None] * tl.load(geometry + 7)
        + (rows.to(tl.int64) * tl.load(geometry + 8) + cols.to(tl.int64) * tl.load(geometry + 9))[None, :]
    )
    tl.store(base + offsets, acc, mask=c_ok[:, None] & in_map[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _pool_blocks(num_bins: int, compute_dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the forward and atomic backward programs.

    Bins: 16 lanes cover output sizes up to 4x4, 64 lanes a 7x7 output (49 bins) in one block;
    larger outputs take several bin blocks. Channels fill the tile to 1024 fp32 elements (512
    fp64): 8 accumulators per thread at 4 warps plus the four gathered taps, no spills on
    sm_80/sm_90 (`tritondet compile-report`).
    """
    block_p = 16 if num_bins <= 16 else 64
    tile = 512 if compute_dtype == torch.float64 else 1024
    return tile // block_p, block_p


# (BLOCK_C, TILE_H, TILE_W) of the deterministic backward: a 4x16 pixel tile (16 columns are 64
# contiguous bytes of an fp32 row) times 8 channels. Its sample loops (bounded spans, IEEE
# divisions) leave few registers for the accumulators: 16 channels spilled 8 bytes for
# position-sensitive maps on sm_90, an 8x16 tile 16-32 bytes (`tritondet compile-report`).
_GATHER_TILE = (8, 4, 16)


def _gather_warps(compute_dtype: torch.dtype) -> int:
    """Warps of the deterministic backward: fp64 accumulators spilled 16-32 bytes on sm_90 at 4
    warps; 8 warps halve the accumulators per thread (~115 registers, no spills)."""
    return 8 if compute_dtype == torch.float64 else NUM_WARPS


def _geometry(features: list[torch.Tensor], grads: list[torch.Tensor], scales: list[float]):
    """The per-level tables the kernels read: int64 [L, 10] geometry and [L] scales in the
    compute dtype (torchvision scales fp64 maps by the fp64 scale, others by the fp32 one)."""
    rows = [[f.shape[2], f.shape[3], *f.stride(), *g.stride()] for f, g in zip(features, grads, strict=True)]
    device = features[0].device
    return device_table(rows, torch.int64, device), device_table(scales, compute_dtype_of(features[0].dtype), device)


def _shared_arguments(rois, sampling_ratio: int, aligned: bool, num_levels: int, mapper: tuple) -> tuple:
    """The trailing arguments every RoIAlign kernel takes: RoI strides, sampling, level mapper
    (``mapper``: k_min, canonical scale, canonical level) as its level area thresholds."""
    k_min, canonical_scale, canonical_level = mapper
    level_areas = level_area_thresholds(num_levels, int(k_min), float(canonical_scale), float(canonical_level))
    return (
        *rois.stride(),
        sampling_ratio,
        int(aligned),
        num_levels,
        device_table(list(level_areas), torch.float32, rois.device),
    )


# The three argument builders below give ``(args, meta)`` of a kernel for these tensors: what the
# launchers pass and what the ahead-of-time specs are derived from. ``rois`` are in the compute dtype.


def _bin_tile_meta(num_bins: int, compute_dtype: torch.dtype, position_sensitive: bool) -> dict:
    """Meta-parameters of the forward and atomic backward kernels (a channel block by a bin block)."""
    block_c, block_p = _pool_blocks(num_bins, compute_dtype)
    return {
        "COMPUTE_FP64": compute_dtype == torch.float64,
        "POSITION_SENSITIVE": position_sensitive,
        "BLOCK_C": block_c,
        "BLOCK_P": block_p,
        "num_warps": NUM_WARPS,
        **NO_FP_FUSION,
    }


def _forward_arguments(
    rois, features, geometry, scale_table, out, sampling_ratio, aligned, mapper, position_sensitive
):  # fmt: skip
    c, ph, pw = out.shape[1:]
    args = (
        rois,
        *level_pointers(features),
        geometry,
        scale_table,
        out,
        features[0].shape[0],
        c,
        ph,
        pw,
        *_shared_arguments(rois, sampling_ratio, aligned, len(features), mapper),
    )
    return args, _bin_tile_meta(ph * pw, rois.dtype, position_sensitive)


def _atomic_backward_arguments(
    rois, grad, grads, geometry, scale_table, sampling_ratio, aligned, mapper, position_sensitive
):  # fmt: skip
    c_out, ph, pw = grad.shape[1:]
    args = (
        rois,
        grad,
        *level_pointers(grads),
        geometry,
        scale_table,
        grads[0].shape[0],
        c_out,
        ph,
        pw,
        *_shared_arguments(rois, sampling_ratio, aligned, len(grads), mapper),
    )
    return args, _bin_tile_meta(ph * pw, rois.dtype, position_sensitive)


def _gather_backward_arguments(
    rois, grad, grads, geometry, scale_table, tiles, sampling_ratio, aligned, mapper, position_sensitive
):  # fmt: skip
    n, c = grads[0].shape[:2]
    ph, pw = grad.shape[2:]
    args = (
        rois,
        grad,
        *level_pointers(grads),
        geometry,
        scale_table,
        tiles,
        rois.shape[0],
        n,
        c,
        ph,
        pw,
        *_shared_arguments(rois, sampling_ratio, aligned, len(grads), mapper),
    )
    block_c, tile_h, tile_w = _GATHER_TILE
    meta = {
        "COMPUTE_FP64": rois.dtype == torch.float64,
        "POSITION_SENSITIVE": position_sensitive,
        "BLOCK_C": block_c,
        "TILE_H": tile_h,
        "TILE_W": tile_w,
        "num_warps": _gather_warps(rois.dtype),
        **NO_FP_FUSION,
    }
    return args, meta


def roi_align_triton(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float],
    position_sensitive: bool = False,
) -> torch.Tensor:
    """``L x [N, C, H_l, W_l], [K, 5] -> [K, C, PH, PW]`` in one launch (``C / (PH * PW)`` output
    channels when position-sensitive)."""
    first = features[0]
    rois = rois.to(compute_dtype_of(first.dtype))
    ph, pw = output_size
    c = first.shape[1] // (ph * pw) if position_sensitive else first.shape[1]
    out = torch.empty((rois.shape[0], c, ph, pw), dtype=first.dtype, device=first.device)
    geometry, scale_table = _geometry(features, features, scales)
    args, meta = _forward_arguments(
        rois, features, geometry, scale_table, out, sampling_ratio, aligned, mapper, position_sensitive
    )
    grid = (rois.shape[0], triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(ph * pw, meta["BLOCK_P"]))
    launch(_roi_align_fwd_kernel, grid, *args, **meta)
    return out


def roi_align_backward_triton(
    grad: torch.Tensor,
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float],
    position_sensitive: bool = False,
) -> list[torch.Tensor]:
    """Input gradients, one launch: atomic scatter, or the gather kernel in deterministic mode."""
    first = features[0]
    compute_dtype = compute_dtype_of(first.dtype)
    rois = rois.to(compute_dtype)
    grad = grad.contiguous()
    n, c = first.shape[:2]
    ph, pw = output_size
    deterministic = torch.are_deterministic_algorithms_enabled()
    make = torch.empty_like if deterministic else torch.zeros_like
    grads = [make(f, dtype=compute_dtype) for f in features]
    geometry, scale_table = _geometry(features, grads, scales)
    options = (sampling_ratio, aligned, mapper, position_sensitive)
    if deterministic:
        _, tile_h, tile_w = _GATHER_TILE
        counts = [n * triton.cdiv(f.shape[2], tile_h) * triton.cdiv(f.shape[3], tile_w) for f in features]
        starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
        tiles = device_table(starts, torch.int32, first.device)
        args, meta = _gather_backward_arguments(rois, grad, grads, geometry, scale_table, tiles, *options)
        launch(_roi_align_bwd_gather_kernel, (starts[-1], triton.cdiv(c, meta["BLOCK_C"])), *args, **meta)
    else:
        args, meta = _atomic_backward_arguments(rois, grad, grads, geometry, scale_table, *options)
        c_out = grad.shape[1]
        grid = (rois.shape[0], triton.cdiv(c_out, meta["BLOCK_C"]), triton.cdiv(ph * pw, meta["BLOCK_P"]))
        launch(_roi_align_bwd_atomic_kernel, grid, *args, **meta)
    return [g.to(f.dtype) for g, f in zip(grads, features, strict=True)]


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch, the test oracle and the CPU path. RoIAlign is a sparse linear
# map from the input pixels to the output bins: each bin row holds its samples' four bilinear
# taps. The reference builds that matrix (CSR, rows in output order, so no sort) and multiplies
# it with the pixels as rows of channels; the backward multiplies with its transpose.
# ----------------------------------------------------------------------------------------------


def _axis_taps(coord: torch.Tensor, size: torch.Tensor, used: torch.Tensor):
    """Reference of ``axis_weights``: taps ``[..., 2]`` (low, high), their weights, and whether
    the sample counts (``[...]``: in ``used`` and within one pixel of the map)."""
    size = size.to(coord.dtype)
    inside = (coord >= -1.0) & (coord <= size) & used
    c = torch.where(inside, coord.clamp(min=0), 0)
    low = c.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    c = torch.where(at_edge, low, c)
    w_high = torch.where(inside, c - low, 0)
    w_low = torch.where(inside, 1 - (c - low), 0)
    return torch.stack([low, high], -1).to(torch.int64), torch.stack([w_low, w_high], -1), inside


def _sample_position_reference(i, origin, bin_size, grid: float):
    """Reference of ``_sample_position``: the positions of samples ``i`` (integers in the compute
    dtype) of bins at ``origin`` of ``bin_size`` sampling ``grid`` samples (broadcast together)."""
    return origin + ((i + 0.5) * bin_size) / grid


def _samples_before_reference(lo, hi, limit, or_at: bool, direction, origin, bin_size, grid: float, samples: int):
    """Reference of ``_samples_before`` for bins ``[...]`` sharing one sampling grid (``hi`` at
    most ``samples``): the same bisection, its int64 brackets closed after ``bit_length(samples)``
    halvings."""
    for _ in range(samples.bit_length()):
        mid = (lo + hi) // 2
        key = direction * _sample_position_reference(mid.to(origin.dtype), origin, bin_size, grid)
        before = key <= limit if or_at else key < limit
        open_bracket = lo < hi
        lo = torch.where(open_bracket & before, mid + 1, lo)
        hi = torch.where(open_bracket & ~before, mid, hi)
    return lo


def _sample_span_reference(origin, bin_size, grid: float, size):
    """Reference of ``_sample_span`` for bins ``[...]`` sharing one sampling grid: (first, count)
    int64 of the samples that land in ``[-1, size]``, the only ones the kernels visit."""
    backwards = bin_size < 0
    size = size.to(origin.dtype)
    direction = torch.where(backwards, -1.0, 1.0).to(origin.dtype)
    low = torch.where(backwards, -size, -1.0)
    high = torch.where(backwards, 1.0, size)
    count = int(grid) if grid > 0 else 0  # not NaN
    samples = torch.where(origin.isfinite() & bin_size.isfinite(), count, 0)
    bisect = (direction, origin, bin_size, grid, count)
    first = _samples_before_reference(torch.zeros_like(samples), samples, low, False, *bisect)
    end = _samples_before_reference(first, samples, high, True, *bisect)
    return first, end - first


def _window_hits(relative: torch.Tensor, taps: torch.Tensor, window: int) -> torch.Tensor:
    """``[G, bins, window]`` bool: the window slots ``relative [G, bins, T]`` reaches on one of
    ``taps [G, bins, T / 2, 2]``."""
    hits = relative.new_zeros(*relative.shape[:2], window)
    return hits.scatter_add_(2, relative, taps.flatten(2).to(relative.dtype)) > 0


def axis_samples(
    first: torch.Tensor, bin_size: torch.Tensor, extent: torch.Tensor, samples: float, bins: int, adaptive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of RoIAlign's samples for G RoIs of ``samples`` samples per bin (the grid, clamped
    to ``MAX_GRID``): ``first [G]`` (the RoI's start in map pixels), ``bin_size [G]``, ``extent [G]``
    (the map's size on this axis) -> (map rows ``[G, bins, T, taps]`` int64, their bilinear weights,
    summed over the bin's samples for an ``adaptive`` grid visiting 3 or more samples). Only the
    samples that can reach the map are visited, as the kernels visit them (bounded work whatever
    the RoI's size); positions follow torchvision's formula in its order of operations.

    A row of -1 (weight 0) is read by no sample: a sample more than a pixel off the map, or a row
    of a summed window no sample taps. Every tap of a counted sample is a row, weight 0 included
    (torchvision multiplies it: 0 * inf is NaN); a summed window adds each row tapped with weight
    0 once more with weight 0, so that a non-finite pixel there is NaN as in torchvision, not the
    product of its summed weight."""
    device, compute_dtype = first.device, first.dtype
    p = torch.arange(bins, device=device, dtype=compute_dtype)
    bin_size = bin_size[:, None]
    origin = first[:, None] + p * bin_size  # [G, bins]
    first_sample, span = _sample_span_reference(origin, bin_size, samples, extent[:, None])
    # One visit at least (unused where no sample lands on the map): callers reduce over the visits.
    visits = max(int(span.max()), 1) if span.numel() else 0
    j = torch.arange(visits, device=device)
    i = (first_sample[..., None] + j).to(compute_dtype)
    coord = _sample_position_reference(i, origin[..., None], bin_size[..., None], samples)
    used = j < span[..., None]
    taps, tap_weights, counted = _axis_taps(coord, extent[:, None, None], used)  # [G, bins, visits, 2]
    counted = counted[..., None].expand_as(taps)
    if not adaptive or visits < 3:
        return taps.where(counted, -1), tap_weights
    # An adaptive grid below MAX_GRID samples at most once per pixel, so the 2 * visits taps of a
    # bin hit at most visits + 2 consecutive rows from the first one: sum them into that window
    # (fewer matrix entries); a clamped grid samples more sparsely, its window is the whole axis.
    # Either way, at most the map's rows.
    extent_max = int(extent.max())
    window = min(visits + 2, extent_max) if samples < MAX_GRID.value else extent_max
    first_tap = taps[:, :, :1, :1]
    # Out-of-map samples have weight 0 and count nowhere, so clamping their position is harmless.
    relative = (taps - first_tap).clamp(0, window - 1).flatten(2)
    dense = tap_weights.new_zeros(*taps.shape[:2], window).scatter_add_(2, relative, tap_weights.flatten(2))
    hits = _window_hits(relative, counted, window)
    zero_hits = _window_hits(relative, counted & (tap_weights == 0), window)
    rows = (first_tap[..., 0] + torch.arange(window, device=device)).clamp(max=extent[:, None, None] - 1)
    # The rows tapped with weight 0, first in each bin (a few: one per sample at most).
    zero_count = int(zero_hits.sum(2).max())
    zero_slots = torch.argsort(zero_hits.to(torch.uint8), dim=2, descending=True, stable=True)[..., :zero_count]
    zero_rows = rows.gather(2, zero_slots).where(zero_hits.gather(2, zero_slots), -1)
    rows = torch.cat([rows.where(hits, -1), zero_rows], 2)
    weights = torch.cat([dense, dense.new_zeros(zero_rows.shape)], 2)
    return rows[..., None], weights[..., None]  # [G, bins, window + zeros, 1]


# The offset of a map row or column no sample reads (see _sampling_matrix).
_UNREAD = -(2**40)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, without copying a single part (a fixed sampling grid makes one group:
    its million entries at 2000 RoIs would be copied for nothing)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rois_last(axis: torch.Tensor) -> torch.Tensor:
    """``[G, bins, T, taps]`` -> ``[bins, T, taps, G]`` contiguous (small: one axis's taps)."""
    return axis.permute(1, 2, 3, 0).contiguous()


def _rois_first(product: torch.Tensor) -> torch.Tensor:
    """``[..., G]`` contiguous -> its ``G * rest`` values RoI-major (``[G, ...]`` flattened), by one
    2-D transposed copy, which PyTorch tiles."""
    return product.reshape(-1, product.shape[-1]).t().reshape(-1)


def _csr(crow, columns, values, size) -> torch.Tensor:
    """A CSR tensor without invariant checks (rows are built in order) or the beta warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, columns, values, size=size, check_invariants=False)


def _sampling_matrix(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float],
) -> torch.Tensor:
    """(CSR ``[K * PH * PW, sum_l N * H_l * W_l]``, ``[K]`` RoI order): row = output bin of RoI
    ``order[row // (PH * PW)]``, column = input pixel."""
    compute_dtype = compute_dtype_of(features[0].dtype)
    device = rois.device
    rois = rois.to(compute_dtype)
    num_levels = len(features)
    n = features[0].shape[0]
    ph_count, pw_count = output_size
    k = rois.shape[0]
    level = roi_levels_reference(rois, num_levels, *mapper)
    # A RoI on no level samples nothing (below); it reads level 0's sizes.
    on_a_level = level != NO_LEVEL.value
    level = level.clamp(min=0)
    heights = torch.tensor([f.shape[2] for f in features], device=device)[level]
    widths = torch.tensor([f.shape[3] for f in features], device=device)[level]
    pixels = [n * f.shape[2] * f.shape[3] for f in features]
    level_start = torch.tensor([sum(pixels[:i]) for i in range(num_levels)], device=device)[level]
    scale = torch.tensor(scales, dtype=compute_dtype, device=device)[level]

    b, x1, y1, x2, y2 = rois.unbind(1)
    finite = torch.isfinite(rois[:, 1:]).all(1)
    valid = (b >= 0) & (b < n) & (b == b.floor()) & finite & on_a_level
    offset = 0.5 if aligned else 0.0
    start_w, start_h = x1 * scale - offset, y1 * scale - offset
    roi_w, roi_h = x2 * scale - offset - start_w, y2 * scale - offset - start_h
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph_count, roi_w / pw_count
    if sampling_ratio > 0:
        grid_h = torch.full_like(bin_h, sampling_ratio)
        grid_w = torch.full_like(bin_w, sampling_ratio)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph_count), torch.ceil(roi_w / pw_count)
    # bin_grid's clamp: the sample counts (and so the sample positions and the divisor) are the kernels'.
    grid_h = torch.where(valid, grid_h, 0).clamp(0, MAX_GRID.value)
    grid_w = torch.where(valid, grid_w, 0).clamp(0, MAX_GRID.value)
    count = (grid_h * grid_w).clamp(min=1)
    image_start = level_start + b.where(valid, 0).to(torch.int64) * heights * widths
    # RoIs grouped by sampling grid (one group when sampling_ratio > 0; a few dozen at most for
    # adaptive grids): each group's samples are a dense broadcast with no padding. The grid sizes
    # are read on the host, fine on the CPU path.
    grids = grid_h.long() * (grid_w.long().max() + 1 if k else 1) + grid_w.long()
    order = torch.argsort(grids, stable=True)
    _, group_sizes = torch.unique_consecutive(grids[order], return_counts=True)
    columns, weights, row_counts = [], [], []
    start = 0
    for size in group_sizes.tolist():
        members = order[start : start + size]
        start += size
        gh, gw = float(grid_h[members[0]]), float(grid_w[members[0]])

        adaptive = sampling_ratio <= 0
        y_taps, y_weights = axis_samples(start_h[members], bin_h[members], heights[members], gh, ph_count, adaptive)
        x_taps, x_weights = axis_samples(start_w[members], bin_w[members], widths[members], gw, pw_count, adaptive)
        # A row or column no sample reads (-1) moves its entries' columns far below 0 (a map has
        # fewer than 2**40 pixels): one comparison finds them.
        y_taps, x_taps = y_taps.where(y_taps >= 0, _UNREAD), x_taps.where(x_taps >= 0, _UNREAD)
        # The products over [PH, PW, gh, gw, 2, 2] (or windows) run with the RoIs innermost (inner
        # loops of G elements, where RoI-major ones would loop over 2), then one tiled transpose
        # makes them RoI-major: the same values, the broadcasts 1.7x faster (1400 RoIs, one thread).
        y_rows = (_rois_last(y_taps) * widths[members] + image_start[members])[:, None, :, None, :, None]
        group_columns = _rois_first(y_rows + _rois_last(x_taps)[None, :, None, :, None, :])
        y_weights, x_weights = _rois_last(y_weights)[:, None, :, None, :, None], _rois_last(x_weights)
        group_weights = _rois_first(y_weights * x_weights[None, :, None, :, None, :] / count[members])
        read = (group_columns >= 0).reshape(size * ph_count * pw_count, -1)
        row_counts.append(read.sum(1))
        if not bool(read.all()):
            # Only the pixels a sample reads, each bin's entries in order.
            kept = read.reshape(-1).nonzero().squeeze(1)
            group_columns, group_weights = group_columns.index_select(0, kept), group_weights.index_select(0, kept)
        columns.append(group_columns)
        weights.append(group_weights)
    crow = torch.zeros(k * ph_count * pw_count + 1, dtype=torch.int64, device=device)
    if k:
        torch.cumsum(_joined(row_counts), 0, out=crow[1:])
    matrix = _csr(
        crow,
        _joined(columns) if k else crow[:0],
        _joined(weights).to(compute_dtype) if k else crow[:0].to(compute_dtype),
        (k * ph_count * pw_count, sum(pixels)),
    )
    return matrix, order


def _transpose(matrix: torch.Tensor) -> torch.Tensor:
    """The CSR transpose of a CSR matrix: entries stably sorted by column."""
    rows, cols = matrix.shape
    columns = matrix.col_indices()
    crow = matrix.crow_indices()
    row_of_entry = torch.repeat_interleave(torch.arange(rows, device=columns.device), crow.diff())
    # int32 keys sort in half the time of int64 ones (1.2 ms for the 180k entries of a training
    # batch's P2 RoIs, one thread); a map has fewer than 2**31 pixels but for absurd sizes.
    keys = columns.to(torch.int32) if cols < 2**31 else columns
    by_column = torch.argsort(keys, stable=True)
    crow_t = torch.zeros(cols + 1, dtype=torch.int64, device=columns.device)
    torch.cumsum(torch.bincount(columns, minlength=cols), 0, out=crow_t[1:])
    entries = (row_of_entry.index_select(0, by_column), matrix.values().index_select(0, by_column))
    return _csr(crow_t, *entries, (cols, rows))


def _pixel_rows(features: list[torch.Tensor], compute_dtype: torch.dtype, by_image: bool = False) -> torch.Tensor:
    """``[sum_l N * H_l * W_l, C]`` contiguous: every level's pixels as rows of channels (no copy
    for one channels_last map in the compute dtype; fresh memory on huge pages otherwise). With
    ``by_image`` (the fast CPU path) an NCHW map is copied image by image as a 2-D transpose, which
    PyTorch tiles: about twice as fast as the 4-D permuted copy at 256 x 200 x 336; without it (the
    reference) one copy per level, the same ops whatever the batch."""
    first = features[0]
    if len(features) == 1 and first.dtype == compute_dtype and first.permute(0, 2, 3, 1).is_contiguous():
        return first.permute(0, 2, 3, 1).reshape(-1, first.shape[1])
    pixels = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    rows = empty_on_huge_pages((sum(pixels), first.shape[1]), compute_dtype, first.device)
    for f, level_rows in zip(features, rows.split(pixels), strict=True):
        n, c, h, w = f.shape
        if by_image and f.is_contiguous():
            for image, image_rows in enumerate(level_rows.split(h * w)):
                image_rows.copy_(f[image].view(c, h * w).t())
        else:
            level_rows.view(n, h, w, c).copy_(f.permute(0, 2, 3, 1))
    return rows


def _sparse_mm(matrix: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, P] (sparse) @ [P, C] -> [R, C]`` in the rows' dtype, with autocast off: under a bf16
    autocast region the matmul would otherwise be cast to bf16, which CPU sparse matmul lacks. Into
    ``out`` when given, zeroed and added to in place: ``torch.mm(..., out=out)`` zero-fills a
    temporary and copies it over, three passes over ``out``'s size where this makes two (the same
    sums: 6 in place of 14 ms into fresh 2 x 80 x 120 x 128 fp32 rows, one thread)."""
    with torch.autocast(rows.device.type, enabled=False):
        if out is None:
            return torch.mm(matrix, rows)
        return torch.addmm(out.zero_(), matrix, rows, out=out)


def roi_align_reference(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float] = SINGLE_LEVEL_MAPPER,
) -> torch.Tensor:
    """``L x [N, C, H_l, W_l], [K, 5] -> [K, C, PH, PW]`` contiguous, in the features' dtype."""
    first = features[0]
    compute_dtype = compute_dtype_of(first.dtype)
    matrix, order = _sampling_matrix(features, rois, scales, output_size, sampling_ratio, aligned, mapper)
    k, (ph, pw), c = rois.shape[0], output_size, first.shape[1]
    if k == 0:
        return first.new_empty((0, c, ph, pw))
    grouped = _sparse_mm(matrix, _pixel_rows(features, compute_dtype)).reshape(k, ph * pw, c)
    out = torch.empty_like(grouped).index_copy_(0, order, grouped)
    return out.reshape(k, ph, pw, c).permute(0, 3, 1, 2).contiguous().to(first.dtype)


def roi_align_backward_reference(
    grad: torch.Tensor,
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float] = SINGLE_LEVEL_MAPPER,
) -> list[torch.Tensor]:
    """The transpose of :func:`roi_align_reference` applied to ``grad`` ``[K, C, PH, PW]``."""
    pixel_grads = _pixel_gradients(grad, features, rois, scales, output_size, sampling_ratio, aligned, mapper)
    grads, start = [], 0
    for f in features:
        n, _, h, w = f.shape
        # Each level's gradient in its own storage (a custom op's outputs must not alias).
        grads.append(_map_from_rows(pixel_grads[start : start + n * h * w], f))
        start += n * h * w
    return grads


def _pixel_gradients(
    grad: torch.Tensor,
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float],
) -> torch.Tensor:
    """``[sum_l N * H_l * W_l, C]`` in the compute dtype: the sampling matrix's transpose applied to
    ``grad [K, C, PH, PW]``, every level's pixels as rows of channels (fresh memory on huge pages)."""
    compute_dtype = compute_dtype_of(features[0].dtype)
    c = features[0].shape[1]
    matrix, order = _sampling_matrix(features, rois, scales, output_size, sampling_ratio, aligned, mapper)
    grad_rows = grad.permute(0, 2, 3, 1)[order].reshape(-1, c).to(compute_dtype)
    pixel_grads = empty_on_huge_pages((matrix.shape[1], c), compute_dtype, grad.device)
    return _sparse_mm(_transpose(matrix), grad_rows, out=pixel_grads)


def _map_of_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N * H * W, C]`` pixel rows (which nothing else holds) -> ``[N, C, H, W]`` in ``like``'s dtype
    and memory format: the rows themselves for a channels_last ``like`` in their dtype, else a copy."""
    n, c, h, w = like.shape
    as_map = rows.view(n, h, w, c).permute(0, 3, 1, 2)
    if like.dtype == rows.dtype and as_map.stride() == like.stride():
        return as_map
    return _map_from_rows(rows, like)


def _map_from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N * H * W, C]`` pixel rows -> a new ``[N, C, H, W]`` map in ``like``'s dtype and memory
    format (autograd then keeps it as the gradient without another copy). Into an NCHW map image
    by image as a 2-D transposed copy, which PyTorch tiles: twice as fast as the 4-D permuted copy
    at 256 x 200 x 336."""
    n, c, h, w = like.shape
    out = torch.empty_like(like)
    if out.is_contiguous():
        for image in range(n):
            out[image].view(c, h * w).copy_(rows[image * h * w : (image + 1) * h * w].t())
    else:
        out.copy_(rows.reshape(n, h, w, c).permute(0, 3, 1, 2))
    return out


# ----------------------------------------------------------------------------------------------
# The fast CPU path: one level at a time on that level's RoIs (data-dependent, fine on the CPU),
# each level by the reference's sparse gather or torchvision's C++ kernel, whichever is faster.
# ----------------------------------------------------------------------------------------------

# The reference pays one pass over an NCHW map (its pixels as rows of channels), then does each
# output bin faster than torchvision's per-RoI loop: by about the time of 10 map pixels per bin
# (per channel; measured on one thread: even at ~270 RoIs on a 2 x 200 x 336 map, ~20 on 2 x 50 x 84).
_REFERENCE_PIXELS_PER_BIN = 10

# The sparse product fills one small buffer of bins a block of RoIs at a time, and each block goes
# from there, transposed to [C, PH * PW], into its RoIs' rows of the output: 1 MiB (40 RoIs of
# 7 x 7 bins at 128 fp32 channels) stays in the L2 cache between the two, where one buffer of all
# bins (35 MB at 1400 RoIs) would be written to fresh memory and read back from DRAM: 30 ms in
# place of 65 ms at 1400 RoIs x 128 channels on an 80 x 120 map, on one thread.
_BLOCK_BYTES = 1 << 20

# The sparse product reads each block's pixels from the L2 cache when its RoIs overlap: RoIs sorted
# by image, then by band of 4 map rows of their top edge, then by left edge, make it about 2 to 4
# times faster than in the proposals' order (1400 RoIs, 128 and 256 channels, an 80 x 120 map;
# bands of 2, 8 or 16 rows gain less).
_BAND_ROWS = 4

# An NCHW map whose RoIs read half its pixels or more is copied whole as rows of channels (one
# tiled copy per image) rather than gathered pixel by pixel: at 256 x 200 x 336 the gather of 70%
# of the pixels takes 1.4 times the whole copy, the gather of 30% two thirds of it.
_FULL_COPY_SHARE = 0.5


def _reference_pays_off(level_features: torch.Tensor, count: int, output_size: tuple[int, int]) -> bool:
    """Whether the reference pools ``count`` RoIs of ``level_features`` faster than torchvision:
    always on maps torchvision would copy first (not NCHW-contiguous, or fp16/bf16, which it
    cannot pool exactly), else when the RoIs' bins outweigh the map's pixels."""
    if not level_features.is_contiguous() or level_features.dtype not in (torch.float32, torch.float64):
        return True
    n, _, height, width = level_features.shape
    return count * output_size[0] * output_size[1] * _REFERENCE_PIXELS_PER_BIN >= n * height * width


def _corner_not_finite(level_features: torch.Tensor) -> bool:
    """Whether pixel (0, 0) of some image and channel is inf or NaN: torchvision's CPU forward
    multiplies each sample off the map by 0 at that pixel (NaN then), where ours skips the sample."""
    return not bool(torch.isfinite(level_features[:, :, 0, 0]).all())


def _touched_pixels(columns: torch.Tensor, pixel_count: int) -> torch.Tensor:
    """``[pixel_count]`` bool: the pixels ``columns [E]`` read, by one linear scatter (2 ms for the
    1M taps of 1400 RoIs on a 2 x 80 x 120 map, where ``torch.unique`` sorts them in 29 ms)."""
    return torch.zeros(pixel_count, dtype=torch.bool, device=columns.device).index_fill_(0, columns, True)


def _spatial_order(rois: torch.Tensor, scale: float, height: int) -> torch.Tensor:
    """``[K, 5] -> [K]``: the RoIs by image, then by band of ``_BAND_ROWS`` map rows of their top
    edge, then by left edge, so that the RoIs of one block of the sparse product read nearby
    pixels (clamped bands: any order gives the same values)."""
    band = (rois[:, 2] * scale / _BAND_ROWS).floor().clamp(-1, height) + 1
    by_left = torch.argsort(rois[:, 1], stable=True)
    by_band = torch.argsort((rois[:, 0] * (height + 2) + band)[by_left], stable=True)
    return by_left[by_band]


def _pool_level_into(
    out: torch.Tensor,
    destination: torch.Tensor,
    level_features: torch.Tensor,
    rois: torch.Tensor,
    scale: float,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> None:
    """:func:`roi_align_reference` of ``rois [K, 5]`` on one level ``[N, C, H, W]``, written into
    rows ``destination [K]`` of ``out [R, C, PH, PW]`` (contiguous, the map's dtype): the same
    products summed in the same order, so the same values. The RoIs go in :func:`_spatial_order`
    and their bins to ``out`` a block of RoIs at a time (``_BLOCK_BYTES``). Unless the map already
    is its pixel rows (channels_last in the compute dtype), its pixels are copied as rows of
    channels: all of them when the RoIs read ``_FULL_COPY_SHARE`` of the map or more (one tiled
    copy), else only the pixels the RoIs' taps read (the RoIs of a training batch read about 30 to
    70% of P2)."""
    spatial = _spatial_order(rois, scale, level_features.shape[2])
    rois, destination = rois[spatial], destination[spatial]
    matrix, order = _sampling_matrix(
        [level_features], rois, [scale], output_size, sampling_ratio, aligned, SINGLE_LEVEL_MAPPER
    )
    compute_dtype = compute_dtype_of(level_features.dtype)
    columns = matrix.col_indices()
    touched = None
    if level_features.dtype != compute_dtype or not level_features.permute(0, 2, 3, 1).is_contiguous():
        touched = _touched_pixels(columns, matrix.shape[1])
        pixels = touched.nonzero().squeeze(1)
    if touched is None or pixels.shape[0] >= _FULL_COPY_SHARE * touched.shape[0]:
        rows = _pixel_rows([level_features], compute_dtype, by_image=True)
    else:
        columns = (torch.cumsum(touched, 0) - 1).index_select(0, columns)
        height, width = level_features.shape[2:]
        # [N, H * W, C], a view for NCHW and channels_last maps alike.
        image_pixels = level_features.flatten(2).transpose(1, 2)
        rows = image_pixels[pixels // (height * width), pixels % (height * width)].to(compute_dtype).contiguous()
    count, channels, bins = rois.shape[0], rows.shape[1], output_size[0] * output_size[1]
    per_block = max(1, _BLOCK_BYTES // max(1, bins * channels * rows.element_size()))
    starts = [*range(0, count, per_block), count]
    crow, values = matrix.crow_indices(), matrix.values()
    entry_starts = crow[torch.tensor(starts, device=crow.device) * bins].tolist()
    buffer = rows.new_empty(min(per_block, count) * bins, channels)
    destination = destination[order]
    out_bins = out.view(out.shape[0], channels, bins)
    for start, stop, first, last in zip(starts, starts[1:], entry_starts, entry_starts[1:], strict=False):
        size = (stop - start) * bins
        block = _csr(
            crow[start * bins : stop * bins + 1] - first, columns[first:last], values[first:last], (size, rows.shape[0])
        )
        pooled = _sparse_mm(block, rows, out=buffer[:size]).view(stop - start, bins, channels)
        out_bins.index_copy_(0, destination[start:stop], pooled.transpose(1, 2).to(out.dtype))


def _level_members(rois: torch.Tensor, num_levels: int, mapper: tuple[int, float, float]) -> tuple[list, torch.Tensor]:
    """(each level's RoIs ``[K_l]``, the RoIs on no level ``[U]``): all of them on one level, else
    by torchvision's LevelMapper rule."""
    if num_levels == 1:
        return [torch.arange(rois.shape[0], device=rois.device)], rois.new_empty(0, dtype=torch.int64)
    level = roi_levels_reference(rois, num_levels, *mapper)
    members = [(level == index).nonzero().squeeze(1) for index in range(num_levels)]
    return members, (level == NO_LEVEL.value).nonzero().squeeze(1)


def roi_align_cpu(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float] = SINGLE_LEVEL_MAPPER,
) -> torch.Tensor:
    """``L x [N, C, H_l, W_l], [K, 5] -> [K, C, PH, PW]`` contiguous, in the features' dtype.
    torchvision's kernel reads the RoIs unchecked: callers pass only :func:`torchvision_reads` ones.
    Each level's bins are written straight into their rows of one uninitialized output (on huge
    pages: it is fresh memory), the rows of RoIs on no level zero-filled."""
    first = features[0]
    members, unpooled = _level_members(rois, len(features), mapper)
    out = empty_on_huge_pages((rois.shape[0], first.shape[1], *output_size), first.dtype, first.device)
    out.index_fill_(0, unpooled, 0)
    for level_features, scale, level_members in zip(features, scales, members, strict=True):
        level_rois = rois[level_members]
        if level_rois.shape[0] == 0:
            continue
        if _reference_pays_off(level_features, level_rois.shape[0], output_size) or _corner_not_finite(level_features):
            _pool_level_into(
                out, level_members, level_features, level_rois, scale, output_size, sampling_ratio, aligned
            )
        else:
            level_rois = level_rois.to(level_features.dtype)
            pooled = torch.ops.torchvision.roi_align(
                level_features, level_rois, scale, *output_size, sampling_ratio, aligned
            )
            out.index_copy_(0, level_members, pooled)
    return out


def roi_align_backward_cpu(
    grad: torch.Tensor,
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mapper: tuple[int, float, float] = SINGLE_LEVEL_MAPPER,
) -> list[torch.Tensor]:
    """The gradient of :func:`roi_align_cpu` for ``grad`` ``[K, C, PH, PW]``, level by level."""
    grads = []
    members_by_level, _ = _level_members(rois, len(features), mapper)
    for level_features, scale, members in zip(features, scales, members_by_level, strict=True):
        level_rois = rois[members]
        if _reference_pays_off(level_features, level_rois.shape[0], output_size):
            args = ([level_features], level_rois, [scale], output_size, sampling_ratio, aligned, SINGLE_LEVEL_MAPPER)
            grads.append(_map_of_rows(_pixel_gradients(grad[members], *args), level_features))
        else:
            dtype = level_features.dtype
            grads.append(
                torch.ops.torchvision._roi_align_backward(
                    grad[members].to(dtype),
                    level_rois.to(dtype),
                    scale,
                    *output_size,
                    *level_features.shape,
                    sampling_ratio,
                    aligned,
                )
            )
    return grads


# ----------------------------------------------------------------------------------------------
# torch.library registration: one forward and one backward op for one or several levels.
# ----------------------------------------------------------------------------------------------

# torchvision's CPU kernels visit (and its forward first precomputes) every sample of an adaptive
# grid, ceil(bin) per axis: up to this many per bin (bins of 256 x 256 map pixels, far beyond a
# detector's) a RoI takes them milliseconds; past it the reference, whose work the map bounds,
# takes the call (a RoI beyond fp32's pixel resolution would loop 2**46 times or more per bin).
_TORCHVISION_SAMPLES_PER_BIN = 2**16


def _fast_cpu_takes(
    rois: torch.Tensor, batch_size: int, scales: list[float], output_size: tuple[int, int], sampling_ratio: int
) -> bool:
    """Whether the fast CPU path (torchvision's CPU kernels, or our pooling where it pays off) takes
    ``rois`` ``[K, 5]``: on CPU tensors, RoIs torchvision's kernels may read
    (:func:`torchvision_reads`) and whose every bin they visit in at most
    ``_TORCHVISION_SAMPLES_PER_BIN`` samples (one host read each): always with a fixed grid; with
    an adaptive one, bounded from above by the finest scale and the RoIs' absolute extents."""
    if not (use_fast_cpu(rois.device) and torchvision_reads(rois, batch_size)):
        return False
    if sampling_ratio > 0 or rois.shape[0] == 0:
        return True
    extents = (rois[:, 3:] - rois[:, 1:3]).double().abs() * max(abs(scale) for scale in scales)
    grid = torch.ceil(extents / torch.tensor(output_size[::-1], dtype=torch.float64, device=rois.device)).clamp(min=1)
    return bool((grid.prod(1) <= _TORCHVISION_SAMPLES_PER_BIN).all())


@torch.library.custom_op("tritondet::roi_align", mutates_args=())
def roi_align_op(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    k_min: int,
    canonical_scale: float,
    canonical_level: float,
) -> torch.Tensor:
    """``L x [N, C, H_l, W_l], [K, 5] -> [K, C, PH, PW]`` (contiguous, the features' dtype)."""
    args = (scales, (pooled_height, pooled_width), sampling_ratio, aligned, (k_min, canonical_scale, canonical_level))
    if no_pixels(*features):
        return features[0].new_zeros((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))
    if use_triton(rois.device):
        return roi_align_triton(features, rois, *args)
    if _fast_cpu_takes(rois, features[0].shape[0], scales, (pooled_height, pooled_width), sampling_ratio):
        return roi_align_cpu(features, rois, *args)
    return roi_align_reference(features, rois, *args)


@roi_align_op.register_fake
def _(features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned, k_min, canonical_scale, level):
    first = features[0]
    return first.new_empty((rois.shape[0], first.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("tritondet::roi_align_backward", mutates_args=())
def roi_align_backward_op(
    grad: torch.Tensor,
    features: list[torch.Tensor],
    rois: torch.Tensor,
    scales: list[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    k_min: int,
    canonical_scale: float,
    canonical_level: float,
) -> list[torch.Tensor]:
    """Gradients with respect to each level's features (``features`` give shapes and strides)."""
    args = (scales, (pooled_height, pooled_width), sampling_ratio, aligned, (k_min, canonical_scale, canonical_level))
    if no_pixels(*features):
        return [torch.zeros_like(f) for f in features]
    if use_triton(rois.device):
        return roi_align_backward_triton(grad, features, rois, *args)
    if _fast_cpu_takes(rois, features[0].shape[0], scales, (pooled_height, pooled_width), sampling_ratio):
        return roi_align_backward_cpu(grad, features, rois, *args)
    return roi_align_backward_reference(grad, features, rois, *args)


@roi_align_backward_op.register_fake
def _(grad, features, rois, *args):
    return [torch.empty_like(f) for f in features]


def _setup_context(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.save_for_backward(*features, rois)
    ctx.args = args


def _backward(ctx, grad):
    *features, rois = ctx.saved_tensors
    grads = torch.ops.tritondet.roi_align_backward(grad, features, rois, *ctx.args)
    return (grads, None, *[None] * len(ctx.args))


roi_align_op.register_autograd(_backward, setup_context=_setup_context)


# Position-sensitive RoIAlign (R-FCN): the same sampling, bin (ph, pw) of output channel c read
# from input channel c * PH * PW + ph * PW + pw, boxes always shifted by -0.5 pixel (aligned).


def _diagonal_index(c_out: int, ph: int, pw: int, device) -> tuple[torch.Tensor, ...]:
    """Indices of the position-sensitive bins in a ``[K, C_out * PH * PW, PH, PW]`` pooled map."""
    rows = torch.arange(ph, device=device).view(1, ph, 1)
    cols = torch.arange(pw, device=device).view(1, 1, pw)
    channels = torch.arange(c_out, device=device).view(c_out, 1, 1) * (ph * pw) + rows * pw + cols
    return channels, rows, cols


def ps_roi_align_reference(input, rois, spatial_scale, output_size, sampling_ratio):
    """Every input channel pooled over every bin, then each output's own bin selected."""
    full = roi_align_reference([input], rois, [spatial_scale], output_size, sampling_ratio, True)
    channels, rows, cols = _diagonal_index(
        input.shape[1] // (output_size[0] * output_size[1]), *output_size, input.device
    )
    return full[:, channels, rows, cols]


@torch.library.custom_op("tritondet::ps_roi_align", mutates_args=())
def ps_roi_align_op(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
) -> torch.Tensor:
    """``[N, C * PH * PW, H, W], [K, 5] -> [K, C, PH, PW]`` (contiguous, the input dtype)."""
    size = (pooled_height, pooled_width)
    if no_pixels(input):
        return input.new_zeros((rois.shape[0], input.shape[1] // (pooled_height * pooled_width), *size))
    if use_triton(rois.device):
        return roi_align_triton([input], rois, [spatial_scale], size, sampling_ratio, True, SINGLE_LEVEL_MAPPER, True)
    if _fast_cpu_takes(rois, input.shape[0], [spatial_scale], size, sampling_ratio):
        return ps_roi_align_cpu(input, rois, spatial_scale, size, sampling_ratio)
    return ps_roi_align_reference(input, rois, spatial_scale, size, sampling_ratio).contiguous()


@ps_roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    c_out = input.shape[1] // (pooled_height * pooled_width)
    return input.new_empty((rois.shape[0], c_out, pooled_height, pooled_width))


@torch.library.custom_op("tritondet::ps_roi_align_backward", mutates_args=())
def ps_roi_align_backward_op(
    grad: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
) -> torch.Tensor:
    """Gradient with respect to ``input`` (which gives shape and strides)."""
    size = (pooled_height, pooled_width)
    if no_pixels(input):
        return torch.zeros_like(input)
    if use_triton(rois.device):
        args = ([spatial_scale], size, sampling_ratio, True, SINGLE_LEVEL_MAPPER, True)
        return roi_align_backward_triton(grad, [input], rois, *args)[0]
    if _fast_cpu_takes(rois, input.shape[0], [spatial_scale], size, sampling_ratio):
        channels = _diagonal_index(grad.shape[1], *size, grad.device)[0]
        return ps_roi_align_backward_cpu(grad, input, rois, spatial_scale, size, sampling_ratio, channels)
    full = grad.new_zeros((rois.shape[0], input.shape[1], *size))
    full[(slice(None), *_diagonal_index(grad.shape[1], *size, grad.device))] = grad
    return roi_align_backward_reference(full, [input], rois, [spatial_scale], size, sampling_ratio, True)[0]


@ps_roi_align_backward_op.register_fake
def _(grad, input, *args):
    return torch.empty_like(input)


def _ps_setup_context(ctx, inputs, output):
    input, rois, *args = inputs
    ctx.save_for_backward(input, rois)
    ctx.args = args


def _ps_backward(ctx, grad):
    input, rois = ctx.saved_tensors
    return torch.ops.tritondet.ps_roi_align_backward(grad, input, rois, *ctx.args), None, None, None, None, None


ps_roi_align_op.register_autograd(_ps_backward, setup_context=_ps_setup_context)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations: every (dtype, block shape) the launchers can produce.
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[KernelSpec]:
    specs = []
    mapper = (2, 224.0, 4.0)  # (k_min, canonical_scale, canonical_level): FPN's
    for dtype, ps in itertools.product((torch.float16, torch.bfloat16, torch.float32, torch.float64), (False, True)):
        compute_dtype = compute_dtype_of(dtype)
        rois = torch.zeros((1, 5), dtype=compute_dtype)
        features, grads = [torch.empty((1, 1, 1, 1), dtype=dtype)], [torch.empty((1, 1, 1, 1), dtype=compute_dtype)]
        tables = (torch.zeros((1, _GEOMETRY_COLUMNS.value), dtype=torch.int64), torch.zeros(1, dtype=compute_dtype))
        options = (2, True, mapper, ps)
        name = str(dtype).removeprefix("torch.") + (",position_sensitive" if ps else "")
        for pooled in (4, 7):  # 16 and 49 bins: the two bin-block widths of _pool_blocks
            out = torch.empty((1, 1, pooled, pooled), dtype=dtype)
            args, meta = _forward_arguments(rois, features, *tables, out, *options)
            label = f"{name},BLOCK_P={meta['BLOCK_P']}"
            specs.append(KernelSpec.from_example(_roi_align_fwd_kernel, args, meta, label))
            args, meta = _atomic_backward_arguments(rois, out, grads, *tables, *options)
            specs.append(KernelSpec.from_example(_roi_align_bwd_atomic_kernel, args, meta, label))
        tiles = torch.zeros(2, dtype=torch.int32)
        args, meta = _gather_backward_arguments(rois, out, grads, *tables, tiles, *options)
        specs.append(KernelSpec.from_example(_roi_align_bwd_gather_kernel, args, meta, name))
    return specs


# Kernels whose results are compared exactly with torchvision or rounded (to pixels, levels,
# keep/drop decisions): IEEE division and square root only, no contracted multiply-add (the
# compile gate's PTX lint, `tritondet compile-report`).
EXACT_KERNELS = frozenset({_roi_align_fwd_kernel, _roi_align_bwd_atomic_kernel, _roi_align_bwd_gather_kernel})
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("roi_align", "RoIAlign", "MultiScaleRoIAlign", "ps_roi_align", "PSRoIAlign")
