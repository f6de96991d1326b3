"""Anchors (Faster R-CNN, sec. 3.1.1) computed in registers from (level, y, x, anchor).

Shapes: L levels (feature maps), level l has an ``H_l x W_l`` grid with stride ``(s_h, s_w)`` pixels
and ``A_l`` anchors per position: one per (aspect ratio, size) pair, ratio-major as torchvision
orders them. The anchors of level l are ``[H_l * W_l * A_l, 4]`` in (y, x, anchor) order; all levels
concatenated give ``[sum_l H_l W_l A_l, 4]``.

Values are torchvision's exactly: for size s and ratio r = h / w, ``h_ratio = sqrt(r)``,
``w_ratio = 1 / h_ratio``, the base anchor ``(-w, -h, w, h) / 2`` with ``w = w_ratio * s`` and
``h = h_ratio * s`` is rounded half to even (``torch.round``) in fp32, then shifted by
``(x s_w, y s_h, x s_w, y s_h)``. Every operation is IEEE round-to-nearest, so the kernels'
anchors equal torchvision's bit for bit.

Kernels never read a materialized anchor tensor. A **level table** (``int64 [L, ROW]``, built by
:func:`level_table`, a few hundred bytes) describes every level: grid, strides, per-anchor
(size, ratio) as fp32 bit patterns, and for the proposal kernels the addresses and strides of the
RPN head outputs of that level. :func:`level_anchor` computes an anchor from a table row and
(y, x, a) in registers; :func:`grid_anchors` still returns the anchor tensor for users and tests.
"""

from __future__ import annotations

import numpy
import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NO_FP_FUSION, NUM_WARPS
from ._launch import device_table, launch

# Level-table columns (int64).
F_HEIGHT = tl.constexpr(0)  # grid rows H
F_WIDTH = tl.constexpr(1)  # grid columns W
F_STRIDE_H = tl.constexpr(2)  # pixels between rows
F_STRIDE_W = tl.constexpr(3)  # pixels between columns
F_NUM_ANCHORS = tl.constexpr(4)  # A, anchors per position
F_OFFSET = tl.constexpr(5)  # sum of H W A over the previous levels
F_OBJECTNESS_STRIDES = tl.constexpr(6)  # 4 columns: strides of objectness in elements (b, a, y, x)
F_DELTAS_STRIDES = tl.constexpr(10)  # 4 columns: strides of deltas in elements (b, channel, y, x)
F_ANCHORS = tl.constexpr(14)  # 2 A columns: fp32 bits of (size, ratio) of anchor a at 14 + 2a
FIXED_COLUMNS = 14


@triton.jit
def _round_half_even(v):
    """torch.round of fp32 values well below 2^22 (half-pixel anchor extents)."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def level_anchor(row_ptr, y, x, a):
    """Anchor ``(x1, y1, x2, y2)`` in fp32 at grid position (y, x), anchor index a of one level.

    ``row_ptr`` points at the level's row of the level table; y, x, a are integer tensors of one
    shape. Equals torchvision's ``AnchorGenerator`` exactly (see the module docstring).
    """
    stride_h = tl.load(row_ptr + F_STRIDE_H)
    stride_w = tl.load(row_ptr + F_STRIDE_W)
    size = tl.load(row_ptr + F_ANCHORS + 2 * a).to(tl.int32).to(tl.float32, bitcast=True)
    ratio = tl.load(row_ptr + F_ANCHORS + 2 * a + 1).to(tl.int32).to(tl.float32, bitcast=True)
    h_ratio = tl.sqrt_rn(ratio)
    w_ratio = tl.div_rn(1.0, h_ratio)
    half_w = _round_half_even((w_ratio * size) * 0.5)
    half_h = _round_half_even((h_ratio * size) * 0.5)
    shift_x = (x * stride_w).to(tl.float32)
    shift_y = (y * stride_h).to(tl.float32)
    return shift_x - half_w, shift_y - half_h, shift_x + half_w, shift_y + half_h


@triton.jit
def _grid_anchors_kernel(
    # pointers
    table_ptr,  # [L, row_width] int64 level table
    out_ptr,  # [sum_l H_l W_l A_l, 4] fp32 contiguous
    # sizes
    row_width,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    level = tl.program_id(1)
    row_ptr = table_ptr + level * row_width
    # int32 index math: a level has far fewer than 2^31 anchors, and int64 division is slow on GPUs.
    height = tl.load(row_ptr + F_HEIGHT).to(tl.int32)
    width = tl.load(row_ptr + F_WIDTH).to(tl.int32)
    num_anchors = tl.load(row_ptr + F_NUM_ANCHORS).to(tl.int32)
    offset = tl.load(row_ptr + F_OFFSET)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = index < height * width * num_anchors
    a = index % num_anchors
    position = index // num_anchors
    x = position % width
    y = position // width
    x1, y1, x2, y2 = level_anchor(row_ptr, y, x, tl.where(ok, a, 0))
    po = out_ptr + (offset + index) * 4
    tl.store(po, x1, mask=ok)
    tl.store(po + 1, y1, mask=ok)
    tl.store(po + 2, x2, mask=ok)
    tl.store(po + 3, y2, mask=ok)


# 512 anchors per program, 4 per thread at 4 warps: one 16-byte store per coordinate row segment
# and enough work per program that the (few) programs of small levels stay cheap.
_BLOCK = 512


# ----------------------------------------------------------------------------------------------
# Host side: the anchor configuration and the level table.
# ----------------------------------------------------------------------------------------------


def normalize_config(sizes, aspect_ratios) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """torchvision's conventions: ``sizes=(32, 64)`` means one size per level; a flat
    ``aspect_ratios`` is shared by all levels. Returns per-level tuples of sizes and ratios."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty sequence (of sequences) of anchor sizes, got {sizes!r}")
    if not isinstance(sizes[0], (list, tuple)):
        sizes = tuple((s,) for s in sizes)
    if not isinstance(aspect_ratios, (list, tuple)) or len(aspect_ratios) == 0:
        raise ValueError(f"aspect_ratios must be a non-empty sequence, got {aspect_ratios!r}")
    if not isinstance(aspect_ratios[0], (list, tuple)):
        aspect_ratios = (aspect_ratios,) * len(sizes)
    if len(sizes) != len(aspect_ratios):
        raise ValueError(
            f"sizes and aspect_ratios must have one entry per feature map, got {len(sizes)} and {len(aspect_ratios)}"
        )
    for name, groups in (("sizes", sizes), ("aspect_ratios", aspect_ratios)):
        for group in groups:
            if len(group) == 0 or any(not isinstance(v, (int, float)) or not v > 0 for v in group):
                raise ValueError(f"{name} must hold positive numbers for every level, got {groups!r}")
    return tuple(tuple(float(s) for s in g) for g in sizes), tuple(tuple(float(r) for r in g) for g in aspect_ratios)


def anchor_parameters(sizes, aspect_ratios) -> tuple[list[float], list[float], list[int]]:
    """Flattened per-anchor (size, ratio), ratio-major per level, and the anchor count per level."""
    flat_sizes, flat_ratios, counts = [], [], []
    for level_sizes, level_ratios in zip(sizes, aspect_ratios, strict=True):
        for ratio in level_ratios:
            for size in level_sizes:
                flat_sizes.append(size)
                flat_ratios.append(ratio)
        counts.append(len(level_sizes) * len(level_ratios))
    return flat_sizes, flat_ratios, counts


def _fp32_bits(values: list[float]) -> list[int]:
    """The int32 bit patterns of ``values`` rounded to fp32 (numpy: host arithmetic, no ATen op)."""
    return numpy.asarray(values, dtype=numpy.float32).view(numpy.int32).tolist()


def level_table(
    grid_sizes: list[int],
    strides: list[int],
    anchor_sizes: list[float],
    anchor_ratios: list[float],
    anchors_per_level: list[int],
    device: torch.device,
    heads: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``int64 [L, 14 + 2 max_l A_l]``: the level table the kernels read (columns ``F_*`` above).

    ``grid_sizes`` and ``strides`` are flattened ``(H, W)`` and ``(s_h, s_w)`` pairs per level.
    ``heads``: the proposal kernels' per-level objectness and deltas, whose strides go into the
    table (the tensors are kernel arguments). The table depends on shapes only, so it is cached on
    the device (:func:`tritondet.kernels._launch.device_table`).
    """
    max_anchors = max(anchors_per_level)
    rows, offset, first = [], 0, 0
    size_bits, ratio_bits = _fp32_bits(anchor_sizes), _fp32_bits(anchor_ratios)
    for level, count in enumerate(anchors_per_level):
        height, width = grid_sizes[2 * level], grid_sizes[2 * level + 1]
        row = [height, width, strides[2 * level], strides[2 * level + 1], count, offset]
        if heads is None:
            row += [0] * (FIXED_COLUMNS - len(row))
        else:
            row += [*heads[0][level].stride(), *heads[1][level].stride()]
        for a in range(max_anchors):
            index = first + min(a, count - 1)  # unused columns repeat the last anchor
            row += [size_bits[index], ratio_bits[index]]
        rows.append(row)
        offset += height * width * count
        first += count
    return device_table(rows, torch.int64, device)


def _anchors_arguments(table: torch.Tensor, out: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, meta)`` of :func:`_grid_anchors_kernel`: what the launcher passes and what the
    ahead-of-time spec is derived from."""
    return (table, out, table.shape[1]), {"BLOCK": _BLOCK, "num_warps": NUM_WARPS, **NO_FP_FUSION}


def grid_anchors_triton(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device) -> torch.Tensor:
    """``[sum_l H_l W_l A_l, 4]`` fp32 anchors of every level, one launch."""
    counts = [grid_sizes[2 * i] * grid_sizes[2 * i + 1] * a for i, a in enumerate(anchors_per_level)]
    out = torch.empty((sum(counts), 4), dtype=torch.float32, device=device)
    table = level_table(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device)
    grid = (triton.cdiv(max(counts), _BLOCK), len(counts))
    args, meta = _anchors_arguments(table, out)
    launch(_grid_anchors_kernel, grid, *args, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch (a loop over the few levels), the test oracle; the fast CPU path.
# ----------------------------------------------------------------------------------------------


def _base_anchors(sizes: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """``[A, 4]`` zero-centred anchors of pairwise (size, ratio), fp32, rounded half to even."""
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws, hs = w_ratios * sizes, h_ratios * sizes
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def cell_anchors_reference(level_sizes, level_ratios, device=None) -> torch.Tensor:
    """``[A, 4]`` base anchors of one level (torchvision's ``cell_anchors``), ratio-major."""
    sizes, ratios, _ = anchor_parameters((tuple(level_sizes),), (tuple(level_ratios),))
    return _base_anchors(
        torch.tensor(sizes, dtype=torch.float32, device=device),
        torch.tensor(ratios, dtype=torch.float32, device=device),
    )


def grid_anchors_reference(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device):
    sizes = torch.tensor(anchor_sizes, dtype=torch.float32, device=device)
    ratios = torch.tensor(anchor_ratios, dtype=torch.float32, device=device)
    levels = []
    for level, base in enumerate(_base_anchors(sizes, ratios).split(anchors_per_level)):
        height, width = grid_sizes[2 * level], grid_sizes[2 * level + 1]
        shift_x = torch.arange(width, device=device) * strides[2 * level + 1]
        shift_y = torch.arange(height, device=device) * strides[2 * level]
        shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
        levels.append((shifts + base[None]).reshape(-1, 4))
    return torch.cat(levels)


def grid_anchors_cpu(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device):
    """The fast CPU path of :func:`grid_anchors_reference`, bit for bit the same ``[sum_l H_l W_l
    A_l, 4]``. Each level is one ``addcmul`` written straight into its slice of the output, viewed
    ``[H, W A 4]``: a grid row ``[W A 4]`` (the base anchors, their x coordinates shifted by the
    column's x) plus the y shifts ``[H, 1]`` times the y coordinates' mask ``(0, 1, 0, 1, ...)``
    (one mask for every level). No meshgrid, stack, ``[H W, 1, 4]`` shift tensor or
    concatenation, and each output row is one contiguous run. The integer shifts are rounded to
    fp32 first, as type promotion rounds them in the reference and torchvision; the mask's
    products are exact, so every coordinate is rounded once, by the reference's add."""
    sizes = torch.tensor(anchor_sizes, dtype=torch.float32, device=device)
    ratios = torch.tensor(anchor_ratios, dtype=torch.float32, device=device)
    counts = [grid_sizes[2 * i] * grid_sizes[2 * i + 1] * a for i, a in enumerate(anchors_per_level)]
    row_sizes = [grid_sizes[2 * i + 1] * a * 4 for i, a in enumerate(anchors_per_level)]
    out = torch.empty((sum(counts), 4), dtype=torch.float32, device=device)
    is_y = torch.tensor([0.0, 1.0], device=device).repeat(max(row_sizes) // 2)
    offset = 0
    for level, base in enumerate(_base_anchors(sizes, ratios).split(anchors_per_level)):
        height, width, row_size = grid_sizes[2 * level], grid_sizes[2 * level + 1], row_sizes[level]
        shift_x = (torch.arange(width, device=device) * strides[2 * level + 1]).to(torch.float32)
        shift_y = (torch.arange(height, device=device) * strides[2 * level]).to(torch.float32)
        row = base.view(1, -1, 2, 2).repeat(width, 1, 1, 1)  # [W, A, corner, (x, y)]
        row[..., 0] += shift_x[:, None, None]
        level_out = out[offset : offset + counts[level]].view(height, row_size)
        torch.addcmul(row.view(1, row_size), shift_y[:, None], is_y[:row_size], out=level_out)
        offset += counts[level]
    return out


# ----------------------------------------------------------------------------------------------
# torch.library registration (not differentiable: anchors depend on no tensor)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::grid_anchors", mutates_args=())
def grid_anchors(
    grid_sizes: list[int],
    strides: list[int],
    anchor_sizes: list[float],
    anchor_ratios: list[float],
    anchors_per_level: list[int],
    device: torch.device,
) -> torch.Tensor:
    """``[sum_l H_l W_l A_l, 4]`` fp32 anchors; the arguments are flattened per level (see
    :func:`level_table`)."""
    if use_triton(device):
        return grid_anchors_triton(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device)
    if use_fast_cpu(device, calls_torchvision=False):
        return grid_anchors_cpu(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device)
    return grid_anchors_reference(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device)


@grid_anchors.register_fake
def _(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device):
    total = sum(grid_sizes[2 * i] * grid_sizes[2 * i + 1] * a for i, a in enumerate(anchors_per_level))
    return torch.empty((total, 4), dtype=torch.float32, device=device)


# Kernels whose results are compared exactly with torchvision or rounded (to pixels, levels,
# keep/drop decisions): IEEE division and square root only, no contracted multiply-add (the
# compile gate's PTX lint, `tritondet compile-report`).
EXACT_KERNELS = frozenset({_grid_anchors_kernel})
AOT_SPECS = [
    KernelSpec.from_example(
        _grid_anchors_kernel,
        *_anchors_arguments(torch.zeros((1, FIXED_COLUMNS), dtype=torch.int64), torch.empty((1, 4))),
    )
]
PUBLIC_OPS = ("AnchorGenerator", "grid_anchors")
