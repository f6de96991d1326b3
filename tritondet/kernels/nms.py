"""Non-maximum suppression: greedy NMS, per-class (segmented) NMS, sync-free padded batched NMS
and soft-NMS.

Shapes: boxes ``[N, 4]`` xyxy, scores ``[N]``; the padded op takes ``[B, N, 4]`` or ``[B, N, C, 4]``
boxes and ``[B, N]`` or ``[B, N, C]`` scores (B images, N boxes, C classes).

Order of this file: Triton kernels -> host launchers -> pure-PyTorch reference (test oracle and
CPU path) -> ``torch.library`` registration -> AOT specializations.

Layout shared by every greedy NMS here: candidates are *rows*, grouped into *segments* (a class of
one image; the whole set for plain NMS), each segment sorted by decreasing score. For the GPU:

1. ``_suppression_mask_kernel`` writes, per segment of ``n`` rows, an ``n x ceil(n / 32)`` int32
   bit matrix: bit ``j`` of row ``i`` is set when ``j > i`` and ``IoU(i, j) > iou_threshold`` (one
   bit per box pair of a segment, block diagonal over segments: 100,000 boxes in one segment take
   1.25 GB). Tiles entirely at or below the diagonal are skipped.
2. ``_greedy_reduce_kernel`` runs one program per segment that walks the rows in score order and
   ORs the mask row of every kept box into a "removed" bit set in global scratch. No mask ever
   leaves the device.

Numerics: IoU in fp32 (fp64 for fp64 boxes) with torchvision's formulas
(:func:`tritondet.kernels.box_iou.intersection_union`); suppression when IoU > threshold,
strictly, so a NaN IoU (two empty boxes) never suppresses. Ties in score keep the input order
(stable sort). NaN scores are ordered after every other score, so a NaN-scored box never
suppresses or precedes a box with a finite score.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy
import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NO_FP_FUSION, NUM_WARPS, compute_dtype_of, ieee_div, load_box_and_area
from ._cpu import greedy_keep
from ._launch import launch
from .box_iou import intersection_union, iou_and_union

SOFT_NMS_METHODS = ("linear", "gaussian")
_METHOD_CODE = {method: code for code, method in enumerate(SOFT_NMS_METHODS)}


@triton.jit
def _write_mask_tile(
    boxes_ptr, mask_ptr, start, n, row0, first_word, mask_offset, iou_threshold,
    COMPUTE_FP64: tl.constexpr, BLOCK_ROWS: tl.constexpr, WORDS: tl.constexpr,
):  # fmt: skip
    """The suppression bits of rows ``row0 + [0, BLOCK_ROWS)`` against columns ``32 * (first_word
    + [0, WORDS))`` of a segment of ``n`` rows whose boxes start at row ``start`` and whose
    ``n x ceil(n / 32)`` words start at ``mask_offset``."""
    dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    words_per_row = (n + 31) // 32
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    words = first_word + tl.arange(0, WORDS)
    bits = tl.arange(0, 32)
    cols = words[:, None] * 32 + bits[None, :]  # [WORDS, 32]
    row_ok = rows < n
    ax1, ay1, ax2, ay2, area_a = load_box_and_area(boxes_ptr + (start + rows) * 4, 1, row_ok, dtype)
    bx1, by1, bx2, by2, area_b = load_box_and_area(boxes_ptr + (start + cols) * 4, 1, cols < n, dtype)
    inter, union = intersection_union(
        ax1[:, None, None], ay1[:, None, None], ax2[:, None, None], ay2[:, None, None], area_a[:, None, None],
        bx1[None, :, :], by1[None, :, :], bx2[None, :, :], by2[None, :, :], area_b[None, :, :],
    )  # fmt: skip
    iou = ieee_div(inter, union)
    suppress = (iou > iou_threshold) & (cols[None, :, :] > rows[:, None, None]) & (cols < n)[None, :, :]
    # Distinct bits: their sum is their OR (bit 31 wraps to the sign bit, as intended).
    packed = tl.sum(suppress.to(tl.int32) << bits[None, None, :], 2)  # [BLOCK_ROWS, WORDS]
    offsets = mask_offset + rows[:, None].to(tl.int64) * words_per_row + words[None, :]
    tl.store(mask_ptr + offsets, packed, mask=row_ok[:, None] & (words < words_per_row)[None, :])


@triton.jit
def _suppression_mask_kernel(
    # pointers
    boxes_ptr,  # [R, 4] contiguous rows, grouped by segment, decreasing score within a segment
    mask_ptr,  # int32 words; segment s: n_s rows of ceil(n_s / 32) words from seg_mask_offset[s]
    tile_segment_ptr,  # [T] int32: the segment of each row tile (grid axis 0)
    tile_row_ptr,  # [T] int32: the tile's first row, counted from its segment's start
    seg_start_ptr,  # [S] int32: the segment's first row in boxes
    seg_len_ptr,  # [S] int32: the segment's rows taking part (n_s)
    seg_mask_offset_ptr,  # [S] int64: the segment's first word in mask
    threshold_ptr,  # [1] compute dtype: see _comparable_threshold
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    WORDS: tl.constexpr,  # int32 words (32 columns each) per program
):
    """Packed segments of any lengths, described by tables (``nms``, ``batched_nms``)."""
    tile = tl.program_id(0)
    first_word = tl.program_id(1) * WORDS
    segment = tl.load(tile_segment_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    n = tl.load(seg_len_ptr + segment)
    # Only tiles inside the segment with some column j > some row i have bits to write.
    if (row0 < n) & (first_word * 32 < n) & ((first_word + WORDS) * 32 > row0 + 1):
        start = tl.load(seg_start_ptr + segment).to(tl.int64)
        mask_offset = tl.load(seg_mask_offset_ptr + segment)
        iou_threshold = tl.load(threshold_ptr)
        _write_mask_tile(
            boxes_ptr, mask_ptr, start, n, row0, first_word, mask_offset, iou_threshold, COMPUTE_FP64, BLOCK_ROWS, WORDS
        )


@triton.jit
def _padded_suppression_mask_kernel(
    # pointers
    boxes_ptr,  # [S, L, 4] contiguous: each segment's candidates by decreasing score
    key_ptr,  # [S, key_stride]: a candidate's ranking key, +inf when it takes no part
    mask_ptr,  # int32 words; segment s: L rows of ceil(L / 32) words from s * L * ceil(L / 32)
    threshold_ptr,  # [1] compute dtype: see _comparable_threshold
    # sizes
    length,  # L
    key_stride,
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    WORDS: tl.constexpr,  # int32 words (32 columns each) per program
):
    """Segments of equal length L (``batched_nms_padded``); tiles whose rows or columns all take no
    part are skipped (their words are never read)."""
    tile = tl.program_id(0)
    first_word = tl.program_id(1) * WORDS
    tiles_per_segment = tl.cdiv(length, BLOCK_ROWS)
    segment = (tile // tiles_per_segment).to(tl.int64)
    row0 = tile % tiles_per_segment * BLOCK_ROWS
    key = key_ptr + segment * key_stride
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    cols = first_word * 32 + tl.arange(0, WORDS * 32)
    rows_take_part = tl.max((tl.load(key + rows, mask=rows < length, other=float("inf")) < float("inf")).to(tl.int32))
    cols_take_part = tl.max((tl.load(key + cols, mask=cols < length, other=float("inf")) < float("inf")).to(tl.int32))
    if (rows_take_part > 0) & (cols_take_part > 0) & ((first_word + WORDS) * 32 > row0 + 1):
        start = segment * length
        iou_threshold = tl.load(threshold_ptr)
        _write_mask_tile(
            boxes_ptr, mask_ptr, start, length, row0, first_word, start * ((length + 31) // 32), iou_threshold,
            COMPUTE_FP64, BLOCK_ROWS, WORDS,
        )  # fmt: skip


@triton.jit
def _greedy_pass(
    mask_base, removed, n, words_per_row, out_ptr, key_ptr, BLOCK_WORDS: tl.constexpr, PADDED: tl.constexpr
):
    """The greedy pass over one segment's first ``n`` rows in score order (mask rows of
    ``words_per_row`` words): a row is kept unless a kept earlier row's mask bit removed it, and
    then ORs its own mask row into the removed set.

    Packed (``PADDED`` false): every row takes part; a kept row stores 1 (int8) at ``out_ptr + row``.
    Padded: rows whose ``key`` is +inf take no part; a kept row stores its key at ``out_ptr + row``.
    """
    active_words = (n + 31) // 32  # rows past n take no part: their removed bits are never read
    lanes = tl.arange(0, BLOCK_WORDS)
    for word in range(0, active_words):
        # The removed words were ORed by every thread of the program: make their stores visible.
        tl.debug_barrier()
        current = tl.load(removed + word)
        for bit in range(0, 32):
            row = word * 32 + bit
            if PADDED:
                key = tl.load(key_ptr + row, mask=row < n, other=float("inf"))
                takes_part = key < float("inf")
            else:
                takes_part = row < n
            if takes_part & (((current >> bit) & 1) == 0):
                if PADDED:
                    tl.store(out_ptr + row, key)
                else:
                    tl.store(out_ptr + row, tl.full((), 1, tl.int8))
                row_ptr = mask_base + row.to(tl.int64) * words_per_row
                current = current | tl.load(row_ptr + word)
                # Chunks aligned to BLOCK_WORDS, so each removed word always has the same owner thread.
                for chunk in range((word + 1) // BLOCK_WORDS * BLOCK_WORDS, active_words, BLOCK_WORDS):
                    offsets = chunk + lanes
                    ok = (offsets > word) & (offsets < active_words)
                    merged = tl.load(removed + offsets, mask=ok, other=0) | tl.load(row_ptr + offsets, mask=ok, other=0)
                    tl.store(removed + offsets, merged, mask=ok)


@triton.jit
def _greedy_reduce_kernel(
    # pointers
    mask_ptr,  # int32 words written by _suppression_mask_kernel
    removed_ptr,  # [R] int32 zeros: scratch, segment s uses ceil(n_s / 32) words from seg_start[s]
    keep_ptr,  # [R] int8 zeros: set to 1 for every kept row
    seg_start_ptr,  # [S] int32
    seg_len_ptr,  # [S] int32
    seg_mask_offset_ptr,  # [S] int64
    # meta-parameters
    BLOCK_WORDS: tl.constexpr,
):
    """One program per packed segment."""
    segment = tl.program_id(0)
    start = tl.load(seg_start_ptr + segment).to(tl.int64)
    n = tl.load(seg_len_ptr + segment)
    mask_base = mask_ptr + tl.load(seg_mask_offset_ptr + segment)
    _greedy_pass(mask_base, removed_ptr + start, n, (n + 31) // 32, keep_ptr + start, keep_ptr, BLOCK_WORDS, False)


@triton.jit
def _padded_greedy_reduce_kernel(
    # pointers
    mask_ptr,  # int32 words written by _padded_suppression_mask_kernel
    removed_ptr,  # [S * L] int32 zeros: scratch, segment s uses ceil(L / 32) words from s * L
    key_ptr,  # [S, key_stride]: ranking keys, +inf when taking no part
    merged_ptr,  # [S * L] +inf: set to the key of every kept row
    # sizes
    length,  # L
    key_stride,
    # meta-parameters
    BLOCK_WORDS: tl.constexpr,
):
    """One program per segment of length L; the pass ends after the last row taking part (with
    a score threshold, most classes of a detector have a few)."""
    segment = tl.program_id(0).to(tl.int64)
    start = segment * length
    words_per_row = (length + 31) // 32
    key = key_ptr + segment * key_stride
    lanes = tl.arange(0, BLOCK_WORDS)
    end = 0
    for first in range(0, length, BLOCK_WORDS):
        rows = first + lanes
        takes_part = tl.load(key + rows, mask=rows < length, other=float("inf")) < float("inf")
        end = tl.maximum(end, tl.max(tl.where(takes_part, rows + 1, 0)))
    mask_base = mask_ptr + start * words_per_row
    _greedy_pass(mask_base, removed_ptr + start, end, words_per_row, merged_ptr + start, key, BLOCK_WORDS, True)


@triton.jit
def _candidate(segment, position, N, C, class_agnostic):
    """(image, class, box) of the candidate at ``position`` of a segment's pool.

    A segment is one class of one image (``segment = image * C + class``, pool position = box), or
    one image when ``class_agnostic`` (pool position = class * N + box).
    """
    image = tl.where(class_agnostic, segment, segment // C)
    label = tl.where(class_agnostic, position // N, segment % C)
    box = tl.where(class_agnostic, position % N, position)
    return image, label, box


@triton.jit
def _candidate_key_kernel(
    # pointers
    scores_ptr,  # [B, N] or [B, N, C], any strides and floating dtype
    threshold_ptr,  # [1] key dtype: candidates need score > threshold
    key_ptr,  # [B, S, P] contiguous key dtype: -score, or +inf for failing candidates
    # sizes
    N,
    C,
    P,  # pool size: N, or C * N when class agnostic
    total,  # B * S * P
    # strides (in elements)
    stride_b,
    stride_n,
    stride_c,
    # flags
    class_agnostic,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    # One flat index over every segment's pool: short pools (a few boxes per class) share a program.
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = flat < total
    segment = flat // P
    position = flat % P
    image, label, box = _candidate(segment, position, N, C, class_agnostic)
    threshold = tl.load(threshold_ptr)
    offsets = image * stride_b + box.to(tl.int64) * stride_n + label.to(tl.int64) * stride_c
    score = tl.load(scores_ptr + offsets, mask=ok).to(threshold.dtype)
    key = tl.where(score > threshold, -score, float("inf"))  # NaN never passes
    tl.store(key_ptr + flat, key, mask=ok)


@triton.jit
def _rank_boxes_kernel(
    # pointers
    boxes_ptr,  # [B, N, 4] or [B, N, C, 4], any strides and floating dtype
    order_ptr,  # [B, S, P] int64 contiguous: pool positions by increasing key
    ranked_ptr,  # [B, S, L, 4] contiguous compute dtype: the boxes of the first L
    # sizes
    N,
    C,
    P,
    L,
    total,  # B * S * L
    # strides (in elements; stride_c is 0 for [B, N, 4] boxes)
    stride_b,
    stride_n,
    stride_c,
    stride_xy,
    # flags
    class_agnostic,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    # One flat index over every segment's first L ranks, as in _candidate_key_kernel.
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = flat < total
    segment = flat // L
    rank = flat % L
    position = tl.load(order_ptr + segment * P + rank, mask=ok, other=0)
    image, label, box = _candidate(segment, position, N, C, class_agnostic)
    source = boxes_ptr + image * stride_b + box * stride_n + label * stride_c
    out = ranked_ptr + flat * 4
    for coordinate in tl.static_range(4):
        value = tl.load(source + coordinate * stride_xy, mask=ok)
        tl.store(out + coordinate, value.to(ranked_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gather_detections_kernel(
    # pointers
    merged_key_ptr,  # [B, M] sorted merged keys (M = S * L), +inf past the kept candidates
    merged_index_ptr,  # [B, M] int64: their positions s * L + rank
    ranked_ptr,  # [B, S, L, 4] contiguous compute dtype
    order_ptr,  # [B, S, P] int64: pool positions by rank (read when WITH_LABELS)
    out_boxes_ptr,  # [B, D, 4] contiguous, the boxes' dtype
    out_scores_ptr,  # [B, D] contiguous, the scores' dtype
    out_labels_ptr,  # [B, D] int64 (written when WITH_LABELS)
    out_indices_ptr,  # [B, D] int64 (written when WITH_LABELS)
    num_valid_ptr,  # [B] int64
    # sizes
    M,
    L,
    P,
    N,
    C,
    D,  # max_output
    # flags
    class_agnostic,
    # meta-parameters
    WITH_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per image: the first D merged candidates, zeros (index -1) past the kept ones."""
    image = tl.program_id(0).to(tl.int64)
    segments = M // L
    lanes = tl.arange(0, BLOCK)
    count = tl.full((), 0, tl.int64)
    for first in range(0, D, BLOCK):
        slot = first + lanes
        in_output = slot < D
        key = tl.load(merged_key_ptr + image * M + slot, mask=in_output & (slot < M), other=float("inf"))
        kept = key < float("inf")
        merged = tl.load(merged_index_ptr + image * M + slot, mask=kept, other=0)
        segment = image * segments + merged // L
        rank = merged % L
        source = ranked_ptr + (segment * L + rank) * 4
        out = out_boxes_ptr + (image * D + slot) * 4
        for coordinate in tl.static_range(4):
            value = tl.load(source + coordinate, mask=kept, other=0)
            tl.store(out + coordinate, value.to(out_boxes_ptr.dtype.element_ty), mask=in_output)
        score = tl.where(kept, -key, 0)
        tl.store(out_scores_ptr + image * D + slot, score.to(out_scores_ptr.dtype.element_ty), mask=in_output)
        if WITH_LABELS:
            position = tl.load(order_ptr + segment * P + rank, mask=kept, other=0)
            _, label, box = _candidate(segment, position, N, C, class_agnostic)
            tl.store(out_labels_ptr + image * D + slot, tl.where(kept, label, 0), mask=in_output)
            tl.store(out_indices_ptr + image * D + slot, tl.where(kept, box, -1), mask=in_output)
        count += tl.sum(kept.to(tl.int64))
    tl.store(num_valid_ptr + image, count)


@triton.jit
def _soft_nms_kernel(
    # pointers
    boxes_ptr,  # [N, 4] contiguous, compute dtype
    scores_ptr,  # [N] compute dtype, scratch: decayed scores, -inf once selected or dropped
    keep_ptr,  # [N] int64: selected box indices in selection order
    kept_scores_ptr,  # [N] compute dtype: their scores when selected
    count_ptr,  # [1] int32: number of selected boxes
    # sizes
    N,
    # scalars
    iou_threshold,
    sigma,
    score_threshold,
    # meta-parameters
    METHOD: tl.constexpr,  # 0 linear, 1 gaussian
    COMPUTE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: repeatedly select the highest remaining score (lowest index among ties), then
    decay every other remaining score by its overlap with the selected box (Bodla et al. 2017)."""
    dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    lanes = tl.arange(0, BLOCK)
    count = 0
    searching = N > 0
    while searching:
        best_score = tl.full((), -float("inf"), dtype)
        best_index = N
        for chunk in range(0, N, BLOCK):
            offsets = chunk + lanes
            s = tl.load(scores_ptr + offsets, mask=offsets < N, other=-float("inf")).to(dtype)
            chunk_best = tl.max(s, 0)
            chunk_index = tl.min(tl.where(s == chunk_best, offsets, N), 0)
            better = chunk_best > best_score
            best_index = tl.where(better, chunk_index, best_index)
            best_score = tl.where(better, chunk_best, best_score)
        searching = (best_index < N) & (best_score >= score_threshold) & (best_score > -float("inf"))
        if searching:
            tl.store(keep_ptr + count, best_index.to(tl.int64))
            tl.store(kept_scores_ptr + count, best_score)
            count += 1
            box = boxes_ptr + best_index.to(tl.int64) * 4
            ax1, ay1, ax2, ay2, area_a = load_box_and_area(box, 1, True, dtype)
            for chunk in range(0, N, BLOCK):
                offsets = chunk + lanes
                ok = offsets < N
                s = tl.load(scores_ptr + offsets, mask=ok, other=-float("inf")).to(dtype)
                bx1, by1, bx2, by2, area_b = load_box_and_area(boxes_ptr + offsets.to(tl.int64) * 4, 1, ok, dtype)
                inter, union = intersection_union(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b)
                iou = ieee_div(inter, union)
                iou = tl.where(iou == iou, iou, 0.0)  # a NaN IoU (zero or infinite areas) is no overlap
                if METHOD == 0:  # a constexpr branch: only one side is compiled
                    weight = tl.where(iou > iou_threshold, 1 - iou, 1.0)
                else:
                    weight = tl.exp(ieee_div(-(iou * iou), sigma))
                s = s * weight
                # NaN (an infinite score times a zero weight) is dropped like a NaN input score.
                s = tl.where((s < score_threshold) | (s != s) | (offsets == best_index), -float("inf"), s)
                tl.store(scores_ptr + offsets, s, mask=ok)
            # Every thread must see the decayed scores before the next selection pass.
            tl.debug_barrier()
    tl.store(count_ptr, count)


def _comparable_threshold(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``t`` of ``dtype`` with ``x > t`` exactly when ``x > threshold`` for every ``x``
    of ``dtype``: torchvision compares its fp32 IoU with the threshold as a double (0.1f > 0.1).
    Host arithmetic only (numpy), no tensor read back."""
    kind = numpy.float64 if dtype == torch.float64 else numpy.float32
    rounded = kind(threshold)
    if float(rounded) > threshold:
        rounded = numpy.nextafter(rounded, kind(-numpy.inf))
    return float(rounded)


# The block sizes of every launch, with their reasons.


def _mask_tile(compute_dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_ROWS, WORDS) of a suppression-mask program.

    2 words = 64 columns: each row's output is one 8-byte store; 32 rows (16 for fp64) x 64 columns
    keep 16 (8) IoU values per thread at 4 warps, which compiles without spills on sm_80/sm_90.
    """
    return (16, 2) if compute_dtype == torch.float64 else (32, 2)


# 256 removed-set words per chunk: 2 per thread at 4 warps; one chunk covers 8192 boxes.
_REDUCE_BLOCK_WORDS = 256
# 512 boxes per soft-NMS chunk: 4 per thread at 4 warps. The fp64 Gaussian decay: 128 (1 per
# thread), as its fp64 exp without FMA contraction spills 16-24 bytes at 256 and 512 on sm_90
# (and the fp64 linear decay spills 12 bytes at 128 on sm_80, none at 512).
_SOFT_BLOCK = 512
_SOFT_BLOCK_FP64_GAUSSIAN = 128


# The argument builders give ``(args, meta)`` of a kernel for these tensors: what the launchers
# pass and what the ahead-of-time specs are derived from.


def _mask_meta(compute_dtype: torch.dtype) -> dict:
    """Meta-parameters of both suppression-mask kernels for boxes in ``compute_dtype``."""
    block_rows, words = _mask_tile(compute_dtype)
    return {
        "COMPUTE_FP64": compute_dtype == torch.float64,
        "BLOCK_ROWS": block_rows,
        "WORDS": words,
        "num_warps": NUM_WARPS,
        **NO_FP_FUSION,
    }


def _suppression_mask_arguments(
    boxes, mask, tile_segment, tile_row, seg_start, seg_len, seg_mask_offset, threshold
):  # fmt: skip
    args = (boxes, mask, tile_segment, tile_row, seg_start, seg_len, seg_mask_offset, threshold)
    return args, _mask_meta(boxes.dtype)


def _greedy_reduce_arguments(mask, removed, keep, seg_start, seg_len, seg_mask_offset):
    args = (mask, removed, keep, seg_start, seg_len, seg_mask_offset)
    return args, {"BLOCK_WORDS": _REDUCE_BLOCK_WORDS, "num_warps": NUM_WARPS}


def _segment_keep_triton(
    boxes: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_mask_offset: torch.Tensor,
    tile_segment: torch.Tensor,
    tile_row: torch.Tensor,
    mask_words: int,
    max_len: int,
    iou_threshold: float,
) -> torch.Tensor:
    """``[R]`` bool: the greedy NMS result of every segment; two launches, no host sync.

    boxes (Tensor[R, 4]): contiguous, compute dtype, rows laid out as the segment tensors say.
    seg_* (Tensor[S]): first row (int32), rows taking part (int32), first mask word (int64).
    tile_* (Tensor[T]): segment and first row (relative to the segment) of every row tile.
    mask_words, max_len: mask size in words and the longest segment, bounds known on the host.
    """
    rows = boxes.shape[0]
    words = _mask_tile(boxes.dtype)[1]
    mask = torch.empty(mask_words, dtype=torch.int32, device=boxes.device)
    keep = torch.zeros(rows, dtype=torch.int8, device=boxes.device)
    removed = torch.zeros(rows, dtype=torch.int32, device=boxes.device)
    grid = (tile_segment.shape[0], triton.cdiv(max_len, 32 * words))
    threshold = torch.full(
        (1,), _comparable_threshold(iou_threshold, boxes.dtype), dtype=boxes.dtype, device=boxes.device
    )
    segments = (seg_start, seg_len, seg_mask_offset)
    args, meta = _suppression_mask_arguments(boxes, mask, tile_segment, tile_row, *segments, threshold)
    launch(_suppression_mask_kernel, grid, *args, **meta)
    args, meta = _greedy_reduce_arguments(mask, removed, keep, *segments)
    launch(_greedy_reduce_kernel, (seg_start.shape[0],), *args, **meta)
    return keep.bool()


def _padded_segment_keep_triton(boxes: torch.Tensor, valid_count: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``[S, L, 4]`` boxes, ``[S]`` rows taking part -> ``[S, L]`` keep; no host sync."""
    num_segments, length = boxes.shape[:2]
    block_rows = _mask_tile(boxes.dtype)[0]
    words_per_row = triton.cdiv(length, 32)
    tiles_per_segment = triton.cdiv(length, block_rows)
    device = boxes.device
    tiles = torch.arange(num_segments * tiles_per_segment, dtype=torch.int32, device=device)
    segments = torch.arange(num_segments, dtype=torch.int64, device=device)
    keep = _segment_keep_triton(
        boxes.reshape(-1, 4),
        (segments * length).to(torch.int32),
        valid_count.to(torch.int32),
        segments * (length * words_per_row),
        tiles // tiles_per_segment,
        tiles % tiles_per_segment * block_rows,
        num_segments * length * words_per_row,
        length,
        iou_threshold,
    )
    return keep.view(num_segments, length)


def _packed_segment_keep_triton(boxes: torch.Tensor, seg_len: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``[R, 4]`` boxes in consecutive segments of ``seg_len`` rows (some may be empty) -> ``[R]`` keep.

    One host sync to size the mask and the grid (total words, row tiles, longest segment).
    """
    block_rows = _mask_tile(boxes.dtype)[0]
    seg_len = seg_len.to(torch.int64)
    words = seg_len * ((seg_len + 31) // 32)
    tiles = (seg_len + block_rows - 1) // block_rows
    mask_words, num_tiles, max_len = torch.stack([words.sum(), tiles.sum(), seg_len.max()]).tolist()
    device = boxes.device
    segments = torch.arange(seg_len.shape[0], device=device)
    tile_segment = torch.repeat_interleave(segments, tiles, output_size=num_tiles)
    tile_first = torch.cumsum(tiles, 0) - tiles
    tile_row = (torch.arange(num_tiles, device=device) - tile_first[tile_segment]) * block_rows
    return _segment_keep_triton(
        boxes,
        (torch.cumsum(seg_len, 0) - seg_len).to(torch.int32),
        seg_len.to(torch.int32),
        torch.cumsum(words, 0) - words,
        tile_segment.to(torch.int32),
        tile_row.to(torch.int32),
        mask_words,
        max_len,
        iou_threshold,
    )


# 1024 candidates per program (8 per thread at 4 warps): the key, rank and detection passes only
# gather and store, so wide programs keep the grid small.
_CANDIDATE_BLOCK = 1024


def _pool_shape(scores: torch.Tensor, class_agnostic: bool) -> tuple[int, int, int, int]:
    """(N boxes, C classes, S segments per image, P pool size per segment) of ``batched_nms_padded``."""
    n = scores.shape[1]
    num_classes = scores.shape[2] if scores.dim() == 3 else 1
    return (n, num_classes, 1, num_classes * n) if class_agnostic else (n, num_classes, num_classes, n)


def _class_strides(t: torch.Tensor, class_dim: int) -> tuple[int, int, int]:
    """(image, box, class) strides of ``[B, N(, C)...]``; class stride 0 without a class axis."""
    return t.stride(0), t.stride(1), t.stride(2) if t.dim() > class_dim else 0


def _candidate_key_arguments(scores, threshold, keys, n, num_classes, class_agnostic):
    args = (
        scores,
        threshold,
        keys,
        max(n, 1),  # no program runs when a size is 0; 1 keeps the divisions defined
        max(num_classes, 1),
        keys.shape[2],
        keys.numel(),
        *_class_strides(scores, 2),
        class_agnostic,
    )
    return args, {"BLOCK": _CANDIDATE_BLOCK, "num_warps": NUM_WARPS}


def candidate_keys_triton(scores: torch.Tensor, score_threshold: float, class_agnostic: bool) -> torch.Tensor:
    """``[B, N(, C)]`` scores -> ``[B, S, P]`` ranking keys (see :func:`candidate_keys_reference`)."""
    n, num_classes, segments, pool = _pool_shape(scores, class_agnostic)
    batch = scores.shape[0]
    key_dtype = compute_dtype_of(scores.dtype)
    keys = torch.empty((batch, segments, pool), dtype=key_dtype, device=scores.device)
    threshold = torch.full((1,), score_threshold, dtype=key_dtype, device=scores.device)
    args, meta = _candidate_key_arguments(scores, threshold, keys, n, num_classes, class_agnostic)
    launch(_candidate_key_kernel, (triton.cdiv(keys.numel(), _CANDIDATE_BLOCK),), *args, **meta)
    return keys


def _rank_boxes_arguments(boxes, order, ranked, num_classes, class_agnostic):
    args = (
        boxes,
        order,
        ranked,
        max(boxes.shape[1], 1),  # no program runs when a size is 0; 1 keeps the divisions defined
        max(num_classes, 1),
        order.shape[2],
        ranked.shape[2],
        ranked.numel() // 4,
        *_class_strides(boxes, 3),
        boxes.stride(-1),
        class_agnostic,
    )
    return args, {"BLOCK": _CANDIDATE_BLOCK, "num_warps": NUM_WARPS}


def rank_boxes_triton(
    boxes: torch.Tensor, order: torch.Tensor, length: int, num_classes: int, class_agnostic: bool
) -> torch.Tensor:
    """The boxes of the first ``length`` candidates of every segment in ``order`` (``[B, S, P]``
    pool positions) -> ``[B, S, L, 4]`` contiguous, compute dtype."""
    batch, segments = order.shape[:2]
    ranked = torch.empty((batch, segments, length, 4), dtype=compute_dtype_of(boxes.dtype), device=boxes.device)
    args, meta = _rank_boxes_arguments(boxes, order, ranked, num_classes, class_agnostic)
    launch(_rank_boxes_kernel, (triton.cdiv(ranked.numel() // 4, _CANDIDATE_BLOCK),), *args, **meta)
    return ranked


def _padded_suppression_mask_arguments(ranked, keys, mask, threshold):
    args = (ranked, keys, mask, threshold, ranked.shape[2], keys.shape[2])
    return args, _mask_meta(ranked.dtype)


def _padded_greedy_reduce_arguments(mask, removed, keys, merged, length):
    args = (mask, removed, keys, merged, length, keys.shape[2])
    return args, {"BLOCK_WORDS": _REDUCE_BLOCK_WORDS, "num_warps": NUM_WARPS}


def merged_keys_triton(ranked: torch.Tensor, keys: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``[B, S, L, 4]`` ranked boxes, ``[B, S, >= L]`` keys -> ``[B, S * L]``: the key of every
    candidate that greedy NMS keeps within its segment, +inf elsewhere. Two launches."""
    batch, segments, length = ranked.shape[:3]
    rows = batch * segments * length
    device = ranked.device
    merged = torch.full((batch, segments * length), float("inf"), dtype=keys.dtype, device=device)
    mask = torch.empty(rows * triton.cdiv(length, 32), dtype=torch.int32, device=device)
    removed = torch.zeros(rows, dtype=torch.int32, device=device)
    threshold = torch.full((1,), _comparable_threshold(iou_threshold, ranked.dtype), dtype=ranked.dtype, device=device)
    args, meta = _padded_suppression_mask_arguments(ranked, keys, mask, threshold)
    grid = (batch * segments * triton.cdiv(length, meta["BLOCK_ROWS"]), triton.cdiv(length, 32 * meta["WORDS"]))
    launch(_padded_suppression_mask_kernel, grid, *args, **meta)
    args, meta = _padded_greedy_reduce_arguments(mask, removed, keys, merged, length)
    launch(_padded_greedy_reduce_kernel, (batch * segments,), *args, **meta)
    return merged


def _gather_detections_arguments(
    merged_key, merged_index, ranked, order, outputs, n, num_classes, class_agnostic, with_labels
):  # fmt: skip
    """``outputs``: boxes, scores, labels, indices, num_valid."""
    args = (
        merged_key,
        merged_index,
        ranked,
        order,
        *outputs,
        merged_key.shape[1],
        max(ranked.shape[2], 1),  # nothing is kept when L = 0; 1 keeps the kernel's divisions defined
        order.shape[-1],
        max(n, 1),
        max(num_classes, 1),
        outputs[0].shape[1],
        class_agnostic,
    )
    return args, {"WITH_LABELS": with_labels, "BLOCK": _CANDIDATE_BLOCK, "num_warps": NUM_WARPS}


def gather_detections_triton(
    merged_key: torch.Tensor,
    merged_index: torch.Tensor,
    ranked: torch.Tensor,
    max_output: int,
    boxes_dtype: torch.dtype,
    scores_dtype: torch.dtype,
    labels: tuple[torch.Tensor, int, int, bool] | None,
) -> tuple[torch.Tensor, ...]:
    """The first ``max_output`` merged candidates of every image (see :func:`padded_nms`). One launch."""
    batch = merged_key.shape[0]
    device = ranked.device
    out_boxes = torch.empty((batch, max_output, 4), dtype=boxes_dtype, device=device)
    out_scores = torch.empty((batch, max_output), dtype=scores_dtype, device=device)
    num_valid = torch.empty((batch,), dtype=torch.int64, device=device)
    if labels is None:
        order, n, num_classes, class_agnostic = merged_index, 1, 1, False
        out_labels = out_indices = num_valid  # not written
    else:
        order, n, num_classes, class_agnostic = labels
        out_labels = torch.empty((batch, max_output), dtype=torch.int64, device=device)
        out_indices = torch.empty((batch, max_output), dtype=torch.int64, device=device)
    outputs = (out_boxes, out_scores, out_labels, out_indices, num_valid)
    args, meta = _gather_detections_arguments(
        merged_key, merged_index, ranked, order, outputs, n, num_classes, class_agnostic, labels is not None
    )
    launch(_gather_detections_kernel, (batch,), *args, **meta)
    if labels is None:
        return out_boxes, out_scores, None, None, num_valid
    return out_boxes, out_scores, out_labels, out_indices, num_valid


def _nan_to_minus_inf(scores: torch.Tensor) -> torch.Tensor:
    """A new tensor; soft-NMS never selects a NaN score."""
    return torch.where(scores.isnan(), torch.full_like(scores, -float("inf")), scores)


def _soft_nms_arguments(boxes, scores, keep, kept_scores, count, iou_threshold, sigma, score_threshold, method):
    args = (
        boxes,
        scores,
        keep,
        kept_scores,
        count,
        boxes.shape[0],
        float(iou_threshold),
        float(sigma),
        float(score_threshold),
    )
    meta = {
        "METHOD": _METHOD_CODE[method],
        "COMPUTE_FP64": boxes.dtype == torch.float64,
        "BLOCK": _SOFT_BLOCK_FP64_GAUSSIAN if boxes.dtype == torch.float64 and method == "gaussian" else _SOFT_BLOCK,
        "num_warps": NUM_WARPS,
        **NO_FP_FUSION,
    }
    return args, meta


def soft_nms_triton(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    compute_dtype = compute_dtype_of(boxes.dtype)
    n = boxes.shape[0]
    work_boxes = boxes.to(compute_dtype).contiguous()
    work_scores = _nan_to_minus_inf(scores.to(compute_dtype))
    keep = torch.empty(n, dtype=torch.int64, device=boxes.device)
    kept_scores = torch.empty(n, dtype=compute_dtype, device=boxes.device)
    count = torch.zeros(1, dtype=torch.int32, device=boxes.device)
    args, meta = _soft_nms_arguments(
        work_boxes, work_scores, keep, kept_scores, count, iou_threshold, sigma, score_threshold, method
    )
    launch(_soft_nms_kernel, (1,), *args, **meta)
    k = int(count.item())  # the one host sync: the output size
    return keep[:k], kept_scores[:k].to(scores.dtype)


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch, the test oracle and the CPU path.
# ----------------------------------------------------------------------------------------------

# 128 rows per block: the in-block fixed point costs 128^2 per iteration, the cross-block IoU is
# [128, rest]; measured fastest on CPU at N = 2000 and 12000.
_REFERENCE_BLOCK = 128
# 32768 pairs per element-wise op: at most PyTorch's parallel grain size (at::internal::GRAIN_SIZE),
# so each op runs on one thread from cache-resident temporaries; on shared or busy CPUs, splitting
# these small ops over threads was up to 10x slower (measured at N = 2000 and 12000, and for the
# padded op at B=1, N=1000, C=91, where whole-batch temporaries were also memory bound).
_REFERENCE_PAIRS_PER_OP = 32768
# Sync-free, every block runs block-size fixed-point iterations: 32 rows keep that cubic cost small.
_REFERENCE_SYNC_FREE_BLOCK = 32


def _overlaps_above(boxes1: torch.Tensor, boxes2: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``[..., K, 4] x [..., M, 4] -> [..., K, M]`` bool: IoU > iou_threshold.

    The formulas and order of :func:`tritondet.kernels.box_iou.iou_and_union` (torchvision's NMS
    kernel's too), restated on 2-D temporaries updated in place, from contiguous coordinate planes
    (so that every broadcast pass is vectorized): this inner loop of the CPU paths runs about 3x
    faster so, and 3x faster again than from the boxes' strided columns.
    """
    ax1, ay1, ax2, ay2 = (c.unsqueeze(-1) for c in boxes1.movedim(-1, 0).contiguous())
    bx1, by1, bx2, by2 = (c.unsqueeze(-2) for c in boxes2.movedim(-1, 0).contiguous())
    width = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    inter = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0).mul_(width)
    union = ((ax2 - ax1) * (ay2 - ay1)) + ((bx2 - bx1) * (by2 - by1))
    threshold = _comparable_threshold(iou_threshold, inter.dtype)
    return torch.gt(inter.div_(union.sub_(inter)), threshold)


def _padded_segment_keep_reference(
    boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float, sync_free: bool
) -> torch.Tensor:
    """``[S, L, 4]`` boxes (decreasing score along L), ``[S, L]`` taking part -> ``[S, L]`` kept.

    Blocks of rows in score order. Inside a block, without ``sync_free``, "kept = taking part and
    not suppressed by a kept earlier row" is iterated until nothing changes (after k iterations the
    first k rows are final, so it ends after at most block-size iterations, usually a few). Greedy
    NMS is inherently sequential, so the sync-free variant, whose Python loops must depend on
    shapes only, settles the rows of a block one at a time instead (the same step count as the
    worst case of the fixed point, on smaller tensors). A block's kept rows then suppress all
    later rows at once. Element-wise work is split into pieces of at most
    ``_REFERENCE_PAIRS_PER_OP`` pairs.
    """
    keep = valid.clone()
    num_segments, length = boxes.shape[:2]
    block_size = _REFERENCE_SYNC_FREE_BLOCK if sync_free else _REFERENCE_BLOCK
    steps = torch.arange(block_size, device=boxes.device)
    # IoU is symmetric (bit for bit: min, max and the sum of areas commute), so every overlap
    # test below is laid out [later row, earlier row] and reduced along its contiguous last axis.
    earlier = steps[:, None] > steps[None, :]
    for begin in range(0, length, block_size):
        end = min(begin + block_size, length)
        block = boxes[:, begin:end]
        size = end - begin
        group = max(1, _REFERENCE_PAIRS_PER_OP // (size * size))
        suppress = torch.cat(
            [
                _overlaps_above(block[first : first + group], block[first : first + group], iou_threshold)
                for first in range(0, num_segments, group)
            ]
        )
        suppress &= earlier[:size, :size]  # [S, row j, earlier row i]: i suppresses j if i is kept
        candidates = keep[:, begin:end]
        if sync_free:
            kept = candidates.clone()
            for row in range(1, size):
                kept[:, row] &= ~(kept[:, :row] & suppress[:, row, :row]).any(-1)
        else:
            kept = candidates
            for _ in range(size):
                update = candidates & ~(kept.unsqueeze(-2) & suppress).any(-1)
                if torch.equal(update, kept):
                    break
                kept = update
        keep[:, begin:end] = kept
        if end < length:
            rest = boxes[:, end:]
            if not sync_free and num_segments == 1:  # plain NMS: only kept rows and alive columns
                alive = keep[0, end:].nonzero().squeeze(1)
                alive_boxes = rest[0].index_select(0, alive)  # one gather per block, sliced below
                chosen = block[0, kept[0]]
                step = max(1, _REFERENCE_PAIRS_PER_OP // max(1, chosen.shape[0]))
                hits = [
                    _overlaps_above(alive_boxes[first : first + step], chosen, iou_threshold).any(-1)
                    for first in range(0, alive.shape[0], step)
                ]
                if hits:
                    keep[0, end + alive[torch.cat(hits)]] = False
            else:
                group = max(1, _REFERENCE_PAIRS_PER_OP // (size * rest.shape[1]))
                for first in range(0, num_segments, group):
                    last = first + group
                    hit = _overlaps_above(rest[first:last], block[first:last], iou_threshold)
                    keep[first:last, end:] &= ~(hit & kept[first:last].unsqueeze(-2)).any(-1)
    return keep


def _score_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score, ties in input order, NaN last (an ascending sort puts NaN last)."""
    return torch.sort(scores.neg(), stable=True).indices


def _segments_by_class(scores: torch.Tensor, idxs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, rank, seg_len), no host sync: ``order`` sorts by decreasing score; rows
    ``order[rank]`` are grouped by class, each class by decreasing score; ``seg_len[r]`` is the
    size of the class starting at row r, 0 on rows that start none (empty segments cost nothing)."""
    order = _score_order(scores)
    classes, rank = torch.sort(idxs[order], stable=True)
    rows = classes.shape[0]
    position = torch.arange(rows, device=classes.device)
    starts = torch.ones_like(classes, dtype=torch.bool)
    starts[1:] = classes[1:] != classes[:-1]
    # The next class start after each row (rows when none): a reversed running minimum.
    later_start = torch.where(starts, position, rows).roll(-1)
    later_start[-1] = rows
    next_start = later_start.flip(0).cummin(0).values.flip(0)
    return order, rank, torch.where(starts, next_start - position, 0)


def _kept_in_score_order(order: torch.Tensor, keep_at_rank: torch.Tensor) -> torch.Tensor:
    return order[keep_at_rank]  # the one host sync of nms: learning K


def nms_impl(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = _score_order(scores)
    sorted_boxes = boxes[order].to(compute_dtype_of(boxes.dtype))
    n = boxes.shape[0]
    if use_fast_cpu(boxes.device):
        return order[greedy_keep_cpu(sorted_boxes, iou_threshold)]
    if use_triton(boxes.device):
        keep = _padded_segment_keep_triton(
            sorted_boxes.unsqueeze(0).contiguous(), torch.full((1,), n, device=boxes.device), iou_threshold
        )[0]
    else:
        valid = torch.ones(1, n, dtype=torch.bool, device=boxes.device)
        keep = _padded_segment_keep_reference(sorted_boxes.unsqueeze(0), valid, iou_threshold, sync_free=False)[0]
    return _kept_in_score_order(order, keep)


def batched_nms_impl(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if use_fast_cpu(boxes.device):
        return batched_nms_cpu(boxes, scores, idxs, iou_threshold)
    order, rank, seg_len = _segments_by_class(scores, idxs)
    rows = order[rank]
    sorted_boxes = boxes[rows].to(compute_dtype_of(boxes.dtype))
    if use_triton(boxes.device):
        keep_rows = _packed_segment_keep_triton(sorted_boxes.contiguous(), seg_len, iou_threshold)
    else:
        # Pad the classes into [S, longest, 4] (the reference's layout).
        seg_len = seg_len[seg_len > 0]
        num_segments, longest = seg_len.shape[0], int(seg_len.max())
        segment = torch.repeat_interleave(torch.arange(num_segments, device=boxes.device), seg_len)
        position = torch.arange(rows.shape[0], device=boxes.device) - (torch.cumsum(seg_len, 0) - seg_len)[segment]
        padded = sorted_boxes.new_zeros(num_segments, longest, 4)
        padded[segment, position] = sorted_boxes
        valid = torch.arange(longest, device=boxes.device) < seg_len[:, None]
        keep_rows = _padded_segment_keep_reference(padded, valid, iou_threshold, sync_free=False)[segment, position]
    keep_at_rank = torch.empty_like(keep_rows)
    keep_at_rank[rank] = keep_rows
    return _kept_in_score_order(order, keep_at_rank)


def batched_nms_cpu(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """The fast CPU path of :func:`batched_nms`: ``[N, 4], [N], [N] -> [K]``, the reference's
    result. Boxes by decreasing score, grouped by class (one stable sort each), then
    torchvision's C++ NMS on each class's contiguous rows (host reads: the class sizes)."""
    order = _score_order(scores)
    classes, rank = torch.sort(idxs[order], stable=True)
    ranked = boxes[order[rank]].to(compute_dtype_of(boxes.dtype))
    kept, start = [], 0
    for size in torch.unique_consecutive(classes, return_counts=True)[1].tolist():
        kept.append(start + greedy_keep_cpu(ranked[start : start + size], iou_threshold))
        start += size
    # kept rows of the class-grouped order -> their positions in score order, ascending
    return order[torch.sort(rank[torch.cat(kept)]).values]


# From this many ranked boxes on, :func:`greedy_keep_cpu` runs the reference's blocked NMS: about
# 1.5x as fast as torchvision's C++ loop at 2000 boxes (one thread, contiguous coordinate planes in
# :func:`_overlaps_above`); at 1000 (the RPN's levels) the two are even in isolation and the blocks'
# hundreds of small ops lose inside rpn_proposals (80 against 72 ms), at 300 the loop is 3x faster.
_BLOCKED_NMS_FROM = 1500


def greedy_keep_cpu(ranked: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """The fast CPU path's greedy NMS: ``[N, 4]`` boxes by decreasing score (compute dtype) ->
    ``[K]`` int64 kept positions, ascending: torchvision's C++ NMS below ``_BLOCKED_NMS_FROM``
    boxes, else :func:`_padded_segment_keep_reference` (with host reads), the same decisions."""
    n = ranked.shape[0]
    if n < _BLOCKED_NMS_FROM:
        return greedy_keep(ranked, iou_threshold)
    every = torch.ones((1, n), dtype=torch.bool, device=ranked.device)
    return _padded_segment_keep_reference(ranked[None], every, iou_threshold, sync_free=False)[0].nonzero().squeeze(1)


def candidate_keys_reference(scores: torch.Tensor, score_threshold: float, class_agnostic: bool) -> torch.Tensor:
    """``[B, N]`` or ``[B, N, C]`` scores -> ``[B, S, P]`` ranking keys: ``-score`` for candidates
    with score > score_threshold (compared in fp32, fp64 for fp64 scores; NaN never passes), +inf
    for the others. Segment s is class s of an image (pool position = box), or the whole image
    when class agnostic (pool position = class * N + box)."""
    batch = scores.shape[0]
    n, num_classes, segments, pool = _pool_shape(scores, class_agnostic)
    scores = scores.to(compute_dtype_of(scores.dtype)).reshape(batch, n, num_classes).transpose(1, 2)
    return torch.where(scores > score_threshold, -scores, float("inf")).reshape(batch, segments, pool)


def rank_boxes_reference(
    boxes: torch.Tensor, order: torch.Tensor, length: int, num_classes: int, class_agnostic: bool
) -> torch.Tensor:
    batch, segments = order.shape[:2]
    n = max(boxes.shape[1], 1)  # no candidate exists when N = 0; 1 keeps the divisions defined
    position = order[..., :length]
    label = position // n if class_agnostic else torch.arange(segments, device=order.device)[:, None]
    box = position % n if class_agnostic else position
    rows = (box if boxes.dim() == 3 else box * num_classes + label).reshape(batch, segments * length)
    flat = boxes.reshape(batch, boxes.shape[1] * (num_classes if boxes.dim() == 4 else 1), 4).to(
        compute_dtype_of(boxes.dtype)
    )
    return flat.gather(1, rows[..., None].expand(-1, -1, 4)).reshape(batch, segments, length, 4)


def merged_keys_reference(ranked: torch.Tensor, keys: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    batch, segments, length = ranked.shape[:3]
    keys = keys[..., :length]
    if keys.numel() == 0:
        return keys.reshape(batch, segments * length)
    taking_part = (keys < float("inf")).reshape(batch * segments, length)
    keep = _padded_segment_keep_reference(ranked.reshape(-1, length, 4), taking_part, iou_threshold, sync_free=True)
    return torch.where(keep.reshape(keys.shape), keys, float("inf")).reshape(batch, segments * length)


# The first pass of :func:`merged_top_cpu` runs NMS on each image's ``_PREFIX_FACTOR *
# max_output`` best candidates, a margin over the kept boxes it must find: in the bench 4 of the
# first 1004 proposals are suppressed, and fewer of the first detections. Measured on the bench
# (proposals, detections of 8 images): 1.25 to 1.5 is fastest, 1 needs a second pass (25-70%
# slower), 2 does needless NMS work (~50% slower) and 3 more. A miss doubles the prefix, so the
# work stays within a constant factor of what the needed prefix takes. :func:`batched_nms_padded_cpu`
# takes its cut at the same count of candidates and doubles it the same way.
_PREFIX_FACTOR = 1.5
# A first pass over at most this many candidates of a segment joins one vectorized NMS per image
# and pass (:func:`_padded_segment_keep_reference`, whose in-block fixed point costs up to this many
# iterations): the bench's detections make first passes of 1 to 9 boxes in ~70 classes per image,
# and one call of torchvision's NMS per class took 3x the time (the padded op: 30% faster at 8
# to 32 than at 0); the proposals' small levels (20 to 30 boxes) ran no faster vectorized.
_SMALL_FIRST_PASS = 8


def _prefix_cuts(candidate_keys: torch.Tensor, max_output: int) -> Iterator[tuple[torch.Tensor | float, bool]]:
    """The cuts of the fast CPU paths' passes over ``candidate_keys [T]``: ``(cut, last)``, the key
    of the ``_PREFIX_FACTOR * max_output``-th best candidate (at least the first; -inf when there
    are none), then of twice as many per further pass; ``last`` once the cut takes every candidate."""
    total = candidate_keys.shape[0]
    wanted = min(total, max(1, math.ceil(_PREFIX_FACTOR * max_output)))
    while True:
        yield (candidate_keys.kthvalue(wanted).values if total > 0 else float("-inf")), wanted == total
        wanted = min(total, 2 * wanted)


def merged_top_cpu(
    ranked: torch.Tensor, keys: torch.Tensor, iou_threshold: float, max_output: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast CPU path of :func:`merged_keys_reference` and the merge's sort, cut where
    :func:`padded_nms` cuts: ``[B, S, L, 4], [B, S, P] -> merged_key [B, D], merged_index [B, D]``
    (D = max_output): each image's first D entries of the stable sort of the reference's merged
    keys, +inf (index 0) past the image's kept count.

    Greedy NMS is prefix-stable: among a segment's first m candidates it keeps exactly the boxes
    that the run over the whole segment keeps among them. So the kept boxes whose key is at most
    a cut ``t`` all come from each segment's prefix up to its last candidate with key <= t (ties
    at t included), and they precede every other kept box in the merge; once D of them are known,
    they are the image's D first. Each image takes its cut from its own candidates' keys (the key
    of its ``_PREFIX_FACTOR * D``-th best), runs greedy NMS on every segment's prefix
    (:func:`greedy_keep_cpu`; the first passes of at most ``_SMALL_FIRST_PASS`` candidates all in
    one :func:`_padded_segment_keep_reference`) and, while fewer than D kept keys are <= t,
    doubles the prefix and resumes the segments whose prefix grew: a new candidate is kept exactly when no earlier kept box suppresses it, so the
    new candidates that the segment's kept boxes leave go through greedy NMS among themselves.
    Host reads: the candidate counts and the prefix lengths of every pass.
    """
    batch, segments, length = ranked.shape[:3]
    keys = keys[..., :length]
    merged_key = keys.new_full((batch, max_output), float("inf"))
    merged_index = torch.zeros((batch, max_output), dtype=torch.int64, device=keys.device)
    segment_start = torch.arange(segments + 1, device=keys.device) * length  # flat [S * L] positions
    position = torch.arange(length, device=keys.device)
    for image in range(batch if max_output > 0 else 0):
        image_keys = keys[image]
        flat_keys = image_keys.reshape(-1)
        where = (flat_keys < float("inf")).nonzero().squeeze(1)  # the candidates' flat positions, ascending
        candidate_keys = flat_keys[where]
        flat_boxes = ranked[image].reshape(-1, 4)
        total = candidate_keys.shape[0]
        first = torch.searchsorted(where, segment_start).tolist()  # each segment's first candidate in where
        kept = torch.zeros(total, dtype=torch.bool, device=keys.device)
        reached = first[:-1]  # each segment's end (in where) of the candidates already through NMS
        for cut, every_candidate in _prefix_cuts(candidate_keys, max_output) if total > 0 else ():
            last = torch.where(image_keys <= cut, position, -1).amax(1)  # -1: no key <= cut
            reach = torch.searchsorted(where, segment_start[:-1] + last, right=True).tolist()
            small = []  # (begin, end) of first passes over few candidates: one vectorized NMS
            for segment in range(segments):
                begin, end = reached[segment], reach[segment]
                reached[segment] = max(begin, end)
                if end <= begin:
                    continue
                if begin == first[segment] and end - begin <= _SMALL_FIRST_PASS:
                    small.append((begin, end))
                    continue
                new_boxes = flat_boxes.index_select(0, where[begin:end])
                if begin > first[segment]:  # the new candidates no earlier kept box suppresses, NMS among them
                    earlier = flat_boxes[where[first[segment] : begin][kept[first[segment] : begin]]]
                    alive = (~_overlaps_above(new_boxes, earlier, iou_threshold).any(1)).nonzero().squeeze(1)
                    kept[begin + alive[greedy_keep_cpu(new_boxes[alive], iou_threshold)]] = True
                else:
                    kept[begin + greedy_keep_cpu(new_boxes, iou_threshold)] = True
            if small:
                begin, end = torch.tensor(small, device=keys.device).unbind(1)
                at = begin[:, None] + torch.arange(int((end - begin).max()), device=keys.device)
                taking_part = at < end[:, None]
                at = torch.where(taking_part, at, begin[:, None])
                keep = _padded_segment_keep_reference(
                    flat_boxes[where[at]], taking_part, iou_threshold, sync_free=False
                )
                kept[at[keep]] = True
            if every_candidate or int((kept & (candidate_keys <= cut)).sum()) >= max_output:
                break
        kept_at = kept.nonzero().squeeze(1)  # by flat position: the merge's order among equal keys
        image_merged_key, order = torch.sort(candidate_keys[kept_at], stable=True)
        count = min(max_output, order.shape[0])
        merged_key[image, :count] = image_merged_key[:count]
        merged_index[image, :count] = where[kept_at[order[:count]]]
    return merged_key, merged_index


def gather_detections_reference(
    merged_key: torch.Tensor,
    merged_index: torch.Tensor,
    ranked: torch.Tensor,
    max_output: int,
    boxes_dtype: torch.dtype,
    scores_dtype: torch.dtype,
    labels: tuple[torch.Tensor, int, int, bool] | None,
) -> tuple[torch.Tensor, ...]:
    batch, segments, length = ranked.shape[:3]
    merged_count = segments * length  # merged_key holds these, or (fast CPU path) its first ones
    pad = max(0, max_output - merged_key.shape[1])
    key = torch.nn.functional.pad(merged_key[:, :max_output], (0, pad), value=float("inf"))
    kept = key < float("inf")
    # Empty slots read an appended zero row (index M), so that M = 0 needs no special case.
    index = torch.where(kept, torch.nn.functional.pad(merged_index[:, :max_output], (0, pad)), merged_count)
    flat = torch.cat([ranked.reshape(batch, merged_count, 4), ranked.new_zeros(batch, 1, 4)], dim=1)
    out_boxes = flat.gather(1, index[..., None].expand(-1, -1, 4)).to(boxes_dtype)
    out_scores = torch.where(kept, -key, 0).to(scores_dtype)
    num_valid = kept.sum(1)
    if labels is None:
        return out_boxes, out_scores, None, None, num_valid
    order, n, _, class_agnostic = labels
    flat_order = torch.cat([order[..., :length].reshape(batch, merged_count), order.new_zeros(batch, 1)], dim=1)
    position = flat_order.gather(1, index)
    segment = index // max(length, 1)
    label = position // max(n, 1) if class_agnostic else segment
    box = position % max(n, 1) if class_agnostic else position
    return out_boxes, out_scores, torch.where(kept, label, 0), torch.where(kept, box, -1), num_valid


def padded_nms(
    ranked: torch.Tensor,
    keys: torch.Tensor,
    iou_threshold: float,
    max_output: int,
    boxes_dtype: torch.dtype,
    scores_dtype: torch.dtype,
    labels: tuple[torch.Tensor, int, int, bool] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Greedy NMS in every segment, then each image's kept candidates merged by score.

    ranked (Tensor[B, S, L, 4]): contiguous, compute dtype: each segment's candidates by
        increasing key (decreasing score).
    keys (Tensor[B, S, P >= L]): contiguous ranking keys (``-score``), +inf for candidates taking
        no part (anywhere in the segment).
    labels: ``(order [B, S, P] pool positions by rank, N, C, class_agnostic)`` to return labels and
        box indices as :func:`tritondet.ops.batched_nms_padded` does; None returns None for both.

    Returns ``boxes [B, D, 4]`` (``boxes_dtype``), ``scores [B, D]`` (``scores_dtype``), labels,
    indices and ``num_valid [B]``, D = max_output. Without host sync; on the Triton backend three
    launches and one ``torch.sort``.
    """
    if use_fast_cpu(ranked.device):
        merged_key, merged_index = merged_top_cpu(ranked, keys, iou_threshold, max_output)
        return gather_detections_reference(
            merged_key, merged_index, ranked, max_output, boxes_dtype, scores_dtype, labels
        )
    merged_keys = merged_keys_triton if use_triton(ranked.device) else merged_keys_reference
    # Ties keep segment (class) order, then rank: torchvision's order among equal scores.
    merged_key, merged_index = torch.sort(merged_keys(ranked, keys, iou_threshold), dim=1, stable=True)
    gather = gather_detections_triton if use_triton(ranked.device) else gather_detections_reference
    return gather(merged_key, merged_index, ranked, max_output, boxes_dtype, scores_dtype, labels)


def batched_nms_padded_cpu(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    max_output: int,
    score_threshold: float,
    class_agnostic: bool,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast CPU path of :func:`batched_nms_padded_impl` for B >= 1 images (``length``: each
    segment's first candidates taking part, ``pre_nms_top_n`` or the pool size), the reference's
    result bit for bit: each image sorts, ranks and gathers only the candidates whose key is at
    most a cut.

    The cut is the key of the image's ``_PREFIX_FACTOR * D``-th best candidate (ties at it
    included). Those candidates are each segment's first ones in the reference's order (by key,
    ties by pool position), cut at ``length``; :func:`merged_top_cpu` and
    :func:`gather_detections_reference` on them give the kept candidates with key <= cut, which
    precede every other kept one (greedy NMS is prefix-stable, see :func:`merged_top_cpu`). When
    fewer than D are kept and candidates lie past the cut, the image starts again with twice the
    candidates. Host reads, per image and pass: the widest segment's count and the kept count,
    besides :func:`merged_top_cpu`'s.
    """
    n, num_classes, segments, pool = _pool_shape(scores, class_agnostic)
    keys = candidate_keys_reference(scores, score_threshold, class_agnostic)
    outputs = []
    for image in range(scores.shape[0]):
        flat_keys = keys[image].reshape(-1)
        candidate_keys = flat_keys[flat_keys < float("inf")]
        for cut, every_candidate in _prefix_cuts(candidate_keys, max_output):
            # The candidates with key <= cut by (segment, key, pool position): the reference's order.
            chosen = (flat_keys <= cut).nonzero().squeeze(1)
            chosen = chosen[torch.sort(flat_keys[chosen], stable=True).indices]
            segment, by_segment = torch.sort(chosen // max(pool, 1), stable=True)
            chosen = chosen[by_segment]
            counts = torch.bincount(segment, minlength=segments)
            rank = torch.arange(chosen.shape[0], device=keys.device) - (counts.cumsum(0) - counts)[segment]
            width = min(length, int(counts.max()) if chosen.shape[0] > 0 else 0)
            inside = rank < width
            segment, rank, chosen = segment[inside], rank[inside], chosen[inside]
            order = torch.zeros((1, segments, width), dtype=torch.int64, device=keys.device)
            order[0, segment, rank] = chosen % max(pool, 1)
            chosen_keys = keys.new_full((1, segments, width), float("inf"))
            chosen_keys[0, segment, rank] = flat_keys[chosen]
            ranked = rank_boxes_reference(boxes[image : image + 1], order, width, num_classes, class_agnostic)
            merged_key, merged_index = merged_top_cpu(ranked, chosen_keys, iou_threshold, max_output)
            labels = (order, n, num_classes, class_agnostic)
            detections = gather_detections_reference(
                merged_key, merged_index, ranked, max_output, boxes.dtype, scores.dtype, labels
            )
            if every_candidate or int(detections[-1][0]) >= max_output:
                break
        outputs.append(detections)
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def batched_nms_padded_impl(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    max_output: int,
    score_threshold: float,
    class_agnostic: bool,
    pre_nms_top_n: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed shapes, no host sync: see :func:`tritondet.ops.batched_nms_padded`. On the Triton
    backend 5 launches and 2 sorts, whatever the data."""
    n, num_classes, _, pool = _pool_shape(scores, class_agnostic)
    length = pool if pre_nms_top_n is None else min(pool, pre_nms_top_n)
    if use_fast_cpu(scores.device) and scores.shape[0] > 0:
        return batched_nms_padded_cpu(boxes, scores, iou_threshold, max_output, score_threshold, class_agnostic, length)
    triton_path = use_triton(scores.device)
    keys = (candidate_keys_triton if triton_path else candidate_keys_reference)(scores, score_threshold, class_agnostic)
    keys, order = torch.sort(keys, dim=-1, stable=True)  # ties keep input order
    rank = rank_boxes_triton if triton_path else rank_boxes_reference
    ranked = rank(boxes, order, length, num_classes, class_agnostic)
    labels = (order, n, num_classes, class_agnostic)
    return padded_nms(ranked, keys, iou_threshold, max_output, boxes.dtype, scores.dtype, labels)


def soft_nms_reference(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS with one vectorized step per selected box (each selection depends on the last).

    As the kernel: a NaN IoU (a zero-area or infinite box) is no overlap, and a score that is or
    becomes NaN is dropped. Memory is O(N): kept scores are copied into one preallocated vector."""
    compute_dtype = compute_dtype_of(boxes.dtype)
    work_boxes = boxes.to(compute_dtype)
    current = _nan_to_minus_inf(scores.to(compute_dtype))
    keep = []
    kept_scores = current.new_empty(boxes.shape[0])
    index = torch.arange(boxes.shape[0], device=boxes.device)
    while True:
        if boxes.shape[0] == 0:
            break
        best = int(torch.argmax(current))  # the first index among ties
        best_score = current[best]
        if not bool((best_score >= score_threshold) & (best_score > -float("inf"))):
            break
        kept_scores[len(keep)] = best_score
        keep.append(best)
        iou, _ = iou_and_union(work_boxes[best : best + 1], work_boxes, "xyxy")
        iou = iou[0].nan_to_num(nan=0.0, posinf=torch.inf, neginf=-torch.inf)
        if method == "linear":
            weight = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            weight = torch.exp(-(iou * iou) / sigma)
        current = current * weight
        dropped = (current < score_threshold) | current.isnan() | (index == best)
        current = torch.where(dropped, torch.full_like(current, -float("inf")), current)
    keep_tensor = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
    return keep_tensor, kept_scores[: len(keep)].to(scores.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library registration.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::nms", mutates_args=())
def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``[N, 4], [N] -> [K]`` int64 kept indices by decreasing score."""
    return nms_impl(boxes, scores, iou_threshold)


@nms.register_fake
def _(boxes, scores, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.custom_op("tritondet::batched_nms", mutates_args=())
def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``[N, 4], [N], [N] -> [K]`` int64 kept indices by decreasing score, NMS within each idx."""
    return batched_nms_impl(boxes, scores, idxs, iou_threshold)


@batched_nms.register_fake
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.custom_op("tritondet::batched_nms_padded", mutates_args=())
def batched_nms_padded(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    max_output: int,
    score_threshold: float,
    class_agnostic: bool,
    pre_nms_top_n: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-size per-image NMS results; see :func:`tritondet.ops.batched_nms_padded`."""
    return batched_nms_padded_impl(
        boxes, scores, iou_threshold, max_output, score_threshold, class_agnostic, pre_nms_top_n
    )


@batched_nms_padded.register_fake
def _(boxes, scores, iou_threshold, max_output, score_threshold, class_agnostic, pre_nms_top_n):
    batch = scores.shape[0]
    return (
        boxes.new_empty((batch, max_output, 4)),
        scores.new_empty((batch, max_output)),
        scores.new_empty((batch, max_output), dtype=torch.int64),
        scores.new_empty((batch, max_output), dtype=torch.int64),
        scores.new_empty((batch,), dtype=torch.int64),
    )


@torch.library.custom_op("tritondet::soft_nms", mutates_args=())
def soft_nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 4], [N] -> ([K] int64, [K])``: selected indices in selection order and their scores."""
    if use_triton(boxes.device):
        return soft_nms_triton(boxes, scores, iou_threshold, sigma, score_threshold, method)
    return soft_nms_reference(boxes, scores, iou_threshold, sigma, score_threshold, method)


@soft_nms.register_fake
def _(boxes, scores, iou_threshold, sigma, score_threshold, method):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64), scores.new_empty((k,))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations.
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[KernelSpec]:
    specs = []
    int32, int64 = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    for compute_dtype in (torch.float32, torch.float64):
        name = str(compute_dtype).removeprefix("torch.")
        boxes, values = torch.empty((1, 4), dtype=compute_dtype), torch.empty(1, dtype=compute_dtype)
        args, meta = _suppression_mask_arguments(boxes, int32, int32, int32, int32, int32, int64, values)
        specs.append(KernelSpec.from_example(_suppression_mask_kernel, args, meta, name))
        for method in SOFT_NMS_METHODS:
            args, meta = _soft_nms_arguments(boxes, values, int64, values, int32, 0.5, 0.5, 0.0, method)
            specs.append(KernelSpec.from_example(_soft_nms_kernel, args, meta, f"{name},{method}"))
    specs += _padded_specs()
    keep = torch.zeros(1, dtype=torch.int8)
    specs.append(
        KernelSpec.from_example(
            _greedy_reduce_kernel, *_greedy_reduce_arguments(int32, int32, keep, int32, int32, int64)
        )
    )
    return specs


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _padded_specs() -> list[KernelSpec]:
    """``batched_nms_padded``'s kernels: every box and score dtype (keys and boxes are computed in
    fp32, fp64 for fp64 inputs)."""
    specs = []
    int32, order = torch.zeros(1, dtype=torch.int32), torch.zeros((1, 1, 1), dtype=torch.int64)
    for dtype in _FLOATS:
        name, compute = str(dtype).removeprefix("torch."), compute_dtype_of(dtype)
        keys, ranked = torch.empty((1, 1, 1), dtype=compute), torch.empty((1, 1, 1, 4), dtype=compute)
        threshold = torch.zeros(1, dtype=compute)
        args, meta = _candidate_key_arguments(torch.empty((1, 1, 1), dtype=dtype), threshold, keys, 1, 1, False)
        specs.append(KernelSpec.from_example(_candidate_key_kernel, args, meta, name))
        args, meta = _rank_boxes_arguments(torch.empty((1, 1, 1, 4), dtype=dtype), order, ranked, 1, False)
        specs.append(KernelSpec.from_example(_rank_boxes_kernel, args, meta, name))
    for box_compute in (torch.float32, torch.float64):
        ranked, threshold = torch.empty((1, 1, 1, 4), dtype=box_compute), torch.zeros(1, dtype=box_compute)
        for key_dtype in (torch.float32, torch.float64):
            name = f"boxes {str(box_compute).removeprefix('torch.')}, keys {str(key_dtype).removeprefix('torch.')}"
            keys = torch.empty((1, 1, 1), dtype=key_dtype)
            args, meta = _padded_suppression_mask_arguments(ranked, keys, int32, threshold)
            specs.append(KernelSpec.from_example(_padded_suppression_mask_kernel, args, meta, name))
    for key_dtype in (torch.float32, torch.float64):
        keys, merged = torch.empty((1, 1, 1), dtype=key_dtype), torch.empty((1, 1), dtype=key_dtype)
        args, meta = _padded_greedy_reduce_arguments(int32, int32, keys, merged, 1)
        specs.append(
            KernelSpec.from_example(_padded_greedy_reduce_kernel, args, meta, str(key_dtype).removeprefix("torch."))
        )
    # Outputs: every (boxes, scores) dtype pair with labels; the RPN's fp32 proposals without.
    pairs = [(b, s, True) for b in _FLOATS for s in _FLOATS] + [(torch.float32, torch.float32, False)]
    index = torch.zeros((1, 1), dtype=torch.int64)
    for boxes_dtype, scores_dtype, with_labels in pairs:
        merged_key = torch.empty((1, 1), dtype=compute_dtype_of(scores_dtype))
        ranked = torch.empty((1, 1, 1, 4), dtype=compute_dtype_of(boxes_dtype))
        outputs = (
            torch.empty((1, 1, 4), dtype=boxes_dtype),
            torch.empty((1, 1), dtype=scores_dtype),
            index,
            index,
            index,
        )
        args, meta = _gather_detections_arguments(merged_key, index, ranked, order, outputs, 1, 1, False, with_labels)
        name = f"boxes {str(boxes_dtype).removeprefix('torch.')}, scores {str(scores_dtype).removeprefix('torch.')}"
        specs.append(KernelSpec.from_example(_gather_detections_kernel, args, meta, name))
    return specs


# Kernels whose results are compared exactly with torchvision or rounded (to pixels, levels,
# keep/drop decisions): IEEE division and square root only, no contracted multiply-add (the
# compile gate's PTX lint, `tritondet compile-report`).
EXACT_KERNELS = frozenset(
    {
        _suppression_mask_kernel,
        _padded_suppression_mask_kernel,
        _greedy_reduce_kernel,
        _padded_greedy_reduce_kernel,
        _candidate_key_kernel,
        _rank_boxes_kernel,
        _gather_detections_kernel,
        _soft_nms_kernel,
    }
)
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("nms", "batched_nms", "batched_nms_padded", "soft_nms")
