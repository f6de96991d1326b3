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
(:func:`tritondet.kernels.box_iou._intersection_union`); suppression when IoU > threshold,
strictly, so a NaN IoU (two empty boxes) never suppresses. Ties in score keep the input order
(stable sort). NaN scores are ordered after every other score, so a NaN-scored box never
suppresses or precedes a box with a finite score.
"""

from __future__ import annotations

import numpy
import torch
import triton
import triton.language as tl

from .._backend import use_triton
from ._aot import KernelSpec
from ._launch import launch, triton_pointer_type
from .box_iou import _compute_dtype, _intersection_union, _iou_and_union

SOFT_NMS_METHODS = ("linear", "gaussian")
_METHOD_CODE = {method: code for code, method in enumerate(SOFT_NMS_METHODS)}


@triton.jit
def _load_box(ptr, ok, dtype):
    """Corners and area of boxes stored as contiguous rows of 4 (torchvision's area formula)."""
    x1 = tl.load(ptr, mask=ok, other=0).to(dtype)
    y1 = tl.load(ptr + 1, mask=ok, other=0).to(dtype)
    x2 = tl.load(ptr + 2, mask=ok, other=0).to(dtype)
    y2 = tl.load(ptr + 3, mask=ok, other=0).to(dtype)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


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
    tile = tl.program_id(0)
    first_word = tl.program_id(1) * WORDS
    segment = tl.load(tile_segment_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    n = tl.load(seg_len_ptr + segment)
    # Only tiles inside the segment with some column j > some row i have bits to write.
    if (row0 < n) & (first_word * 32 < n) & ((first_word + WORDS) * 32 > row0 + 1):
        dtype = tl.float64 if COMPUTE_FP64 else tl.float32
        start = tl.load(seg_start_ptr + segment).to(tl.int64)
        words_per_row = (n + 31) // 32
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        words = first_word + tl.arange(0, WORDS)
        bits = tl.arange(0, 32)
        cols = words[:, None] * 32 + bits[None, :]  # [WORDS, 32]
        row_ok = rows < n
        ax1, ay1, ax2, ay2, area_a = _load_box(boxes_ptr + (start + rows) * 4, row_ok, dtype)
        bx1, by1, bx2, by2, area_b = _load_box(boxes_ptr + (start + cols) * 4, cols < n, dtype)
        inter, union = _intersection_union(
            ax1[:, None, None], ay1[:, None, None], ax2[:, None, None], ay2[:, None, None], area_a[:, None, None],
            bx1[None, :, :], by1[None, :, :], bx2[None, :, :], by2[None, :, :], area_b[None, :, :],
        )  # fmt: skip
        iou_threshold = tl.load(threshold_ptr)
        suppress = (inter / union > iou_threshold) & (cols[None, :, :] > rows[:, None, None]) & (cols < n)[None, :, :]
        # Distinct bits: their sum is their OR (bit 31 wraps to the sign bit, as intended).
        packed = tl.sum(suppress.to(tl.int32) << bits[None, None, :], 2)  # [BLOCK_ROWS, WORDS]
        offsets = tl.load(seg_mask_offset_ptr + segment) + rows[:, None].to(tl.int64) * words_per_row + words[None, :]
        tl.store(mask_ptr + offsets, packed, mask=row_ok[:, None] & (words < words_per_row)[None, :])


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
    """One program per segment: the greedy pass over its rows in score order."""
    segment = tl.program_id(0)
    start = tl.load(seg_start_ptr + segment).to(tl.int64)
    n = tl.load(seg_len_ptr + segment)
    mask_base = mask_ptr + tl.load(seg_mask_offset_ptr + segment)
    removed = removed_ptr + start
    words_per_row = (n + 31) // 32
    lanes = tl.arange(0, BLOCK_WORDS)
    for word in range(0, words_per_row):
        # The removed words were ORed by every thread of the program: make their stores visible.
        tl.debug_barrier()
        current = tl.load(removed + word)
        for bit in range(0, 32):
            row = word * 32 + bit
            if (row < n) & (((current >> bit) & 1) == 0):
                tl.store(keep_ptr + start + row, tl.full((), 1, tl.int8))
                row_ptr = mask_base + row.to(tl.int64) * words_per_row
                current = current | tl.load(row_ptr + word)
                # Chunks aligned to BLOCK_WORDS, so each removed word always has the same owner thread.
                for chunk in range((word + 1) // BLOCK_WORDS * BLOCK_WORDS, words_per_row, BLOCK_WORDS):
                    offsets = chunk + lanes
                    ok = (offsets > word) & (offsets < words_per_row)
                    merged = tl.load(removed + offsets, mask=ok, other=0) | tl.load(row_ptr + offsets, mask=ok, other=0)
                    tl.store(removed + offsets, merged, mask=ok)


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
            ax1, ay1, ax2, ay2, area_a = _load_box(box, True, dtype)
            for chunk in range(0, N, BLOCK):
                offsets = chunk + lanes
                ok = offsets < N
                s = tl.load(scores_ptr + offsets, mask=ok, other=-float("inf")).to(dtype)
                bx1, by1, bx2, by2, area_b = _load_box(boxes_ptr + offsets.to(tl.int64) * 4, ok, dtype)
                inter, union = _intersection_union(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b)
                iou = inter / union
                if METHOD == 0:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
                    weight = tl.where(iou > iou_threshold, 1 - iou, 1.0)
                else:
                    weight = tl.exp(-(iou * iou) / sigma)
                s = s * weight
                s = tl.where((s < score_threshold) | (offsets == best_index), -float("inf"), s)
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
_NUM_WARPS = 4


def _mask_tile(compute_dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_ROWS, WORDS) of a suppression-mask program.

    2 words = 64 columns: each row's output is one 8-byte store; 32 rows (16 for fp64) x 64 columns
    keep 16 (8) IoU values per thread at 4 warps, which compiles without spills on sm_80/sm_90.
    """
    return (16, 2) if compute_dtype == torch.float64 else (32, 2)


# 256 removed-set words per chunk: 2 per thread at 4 warps; one chunk covers 8192 boxes.
_REDUCE_BLOCK_WORDS = 256
# 512 boxes per soft-NMS chunk: 4 per thread at 4 warps.
_SOFT_BLOCK = 512


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
    block_rows, words = _mask_tile(boxes.dtype)
    mask = torch.empty(mask_words, dtype=torch.int32, device=boxes.device)
    keep = torch.zeros(rows, dtype=torch.int8, device=boxes.device)
    removed = torch.zeros(rows, dtype=torch.int32, device=boxes.device)
    grid = (tile_segment.shape[0], triton.cdiv(max_len, 32 * words))
    launch(
        _suppression_mask_kernel,
        grid,
        boxes,
        mask,
        tile_segment,
        tile_row,
        seg_start,
        seg_len,
        seg_mask_offset,
        torch.full((1,), _comparable_threshold(iou_threshold, boxes.dtype), dtype=boxes.dtype, device=boxes.device),
        COMPUTE_FP64=boxes.dtype == torch.float64,
        BLOCK_ROWS=block_rows,
        WORDS=words,
        num_warps=_NUM_WARPS,
    )
    launch(
        _greedy_reduce_kernel,
        (seg_start.shape[0],),
        mask,
        removed,
        keep,
        seg_start,
        seg_len,
        seg_mask_offset,
        BLOCK_WORDS=_REDUCE_BLOCK_WORDS,
        num_warps=_NUM_WARPS,
    )
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


def _nan_to_minus_inf(scores: torch.Tensor) -> torch.Tensor:
    """A new tensor; soft-NMS never selects a NaN score."""
    return torch.where(scores.isnan(), torch.full_like(scores, -float("inf")), scores)


def soft_nms_triton(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    compute_dtype = _compute_dtype(boxes.dtype)
    n = boxes.shape[0]
    work_boxes = boxes.to(compute_dtype).contiguous()
    work_scores = _nan_to_minus_inf(scores.to(compute_dtype))
    keep = torch.empty(n, dtype=torch.int64, device=boxes.device)
    kept_scores = torch.empty(n, dtype=compute_dtype, device=boxes.device)
    count = torch.zeros(1, dtype=torch.int32, device=boxes.device)
    launch(
        _soft_nms_kernel,
        (1,),
        work_boxes,
        work_scores,
        keep,
        kept_scores,
        count,
        n,
        float(iou_threshold),
        float(sigma),
        float(score_threshold),
        METHOD=_METHOD_CODE[method],
        COMPUTE_FP64=compute_dtype == torch.float64,
        BLOCK=_SOFT_BLOCK,
        num_warps=_NUM_WARPS,
    )
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

    The formulas and order of :func:`tritondet.kernels.box_iou._iou_and_union`, restated on 2-D
    temporaries updated in place: this inner loop of the CPU path runs about 3x faster so.
    """
    ax1, ay1, ax2, ay2 = (c.unsqueeze(-1) for c in boxes1.unbind(-1))
    bx1, by1, bx2, by2 = (c.unsqueeze(-2) for c in boxes2.unbind(-1))
    width = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    inter = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0).mul_(width)
    union = ((ax2 - ax1) * (ay2 - ay1)) + ((bx2 - bx1) * (by2 - by1))
    threshold = _comparable_threshold(iou_threshold, inter.dtype)
    return inter.div_(union.sub_(inter)).gt_(threshold).bool()


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
    sorted_boxes = boxes[order].to(_compute_dtype(boxes.dtype))
    n = boxes.shape[0]
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
    order, rank, seg_len = _segments_by_class(scores, idxs)
    rows = order[rank]
    sorted_boxes = boxes[rows].to(_compute_dtype(boxes.dtype))
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


def batched_nms_padded_impl(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    max_output: int,
    score_threshold: float,
    class_agnostic: bool,
    pre_nms_top_n: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed shapes, no host sync: see :func:`tritondet.ops.batched_nms_padded`."""
    batch, n = scores.shape[:2]
    num_classes = scores.shape[2] if scores.dim() == 3 else 1
    device = scores.device
    # Candidates are (class c, box i) pairs with id c * N + i; a segment is one class of one image
    # (one image when class agnostic), sorted by decreasing score, failing scores last.
    pool = scores.reshape(batch, n, num_classes).transpose(1, 2)  # [B, C, N]
    if class_agnostic:
        pool = pool.reshape(batch, 1, num_classes * n)
    segments, pool_size = pool.shape[1], pool.shape[2]
    length = pool_size if pre_nms_top_n is None else min(pool_size, pre_nms_top_n)
    passing = pool > score_threshold  # NaN never passes
    sort_key = torch.where(passing, pool.neg(), torch.full_like(pool, float("inf")))
    position = torch.sort(sort_key, dim=-1, stable=True).indices[..., :length]  # [B, S, L]
    valid_count = passing.sum(-1).clamp(max=length)  # [B, S]
    candidate = position if class_agnostic else position + torch.arange(segments, device=device)[:, None] * n
    candidate = candidate.reshape(batch, segments * length)
    box_index, label = candidate % n, torch.div(candidate, n, rounding_mode="floor")
    flat_boxes = boxes.reshape(batch, n * (num_classes if boxes.dim() == 4 else 1), 4)  # [B, N(C), 4]
    box_row = box_index * num_classes + label if boxes.dim() == 4 else box_index
    candidate_boxes = flat_boxes.gather(1, box_row.unsqueeze(-1).expand(-1, -1, 4))
    candidate_scores = pool.reshape(batch, segments * pool_size).gather(
        1, (position + torch.arange(segments, device=device)[:, None] * pool_size).reshape(batch, segments * length)
    )
    work = candidate_boxes.to(_compute_dtype(boxes.dtype)).reshape(batch * segments, length, 4)
    if batch * segments * length == 0:  # nothing to choose from: every slot is padding
        candidate_boxes = boxes.new_zeros(batch, 1, 4)
        candidate_scores, box_index, label = (
            scores.new_zeros(batch, 1),
            candidate.new_zeros(batch, 1),
            candidate.new_zeros(batch, 1),
        )
        keep = torch.zeros(batch, 1, dtype=torch.bool, device=device)
    elif use_triton(device):
        keep = _padded_segment_keep_triton(work.contiguous(), valid_count.reshape(-1), iou_threshold)
    else:
        valid = torch.arange(length, device=device) < valid_count.reshape(-1, 1)
        keep = _padded_segment_keep_reference(work, valid, iou_threshold, sync_free=True)
    keep = keep.reshape(batch, candidate_scores.shape[1])

    # Merge the classes of each image by decreasing score (stable: class, then rank, among ties).
    merge_key = torch.where(keep, candidate_scores.neg(), torch.full_like(candidate_scores, float("inf")))
    chosen = torch.sort(merge_key, dim=1, stable=True).indices[:, :max_output]
    if chosen.shape[1] < max_output:
        chosen = torch.nn.functional.pad(chosen, (0, max_output - chosen.shape[1]))
    num_valid = keep.sum(1).clamp(max=max_output)
    slot_valid = torch.arange(max_output, device=device) < num_valid[:, None]
    out_boxes = torch.where(slot_valid[..., None], candidate_boxes.gather(1, chosen[..., None].expand(-1, -1, 4)), 0)
    out_scores = torch.where(slot_valid, candidate_scores.gather(1, chosen), 0)
    out_labels = torch.where(slot_valid, label.gather(1, chosen), 0)
    out_indices = torch.where(slot_valid, box_index.gather(1, chosen), -1)
    return out_boxes, out_scores, out_labels, out_indices, num_valid


def soft_nms_reference(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS with one vectorized step per selected box (each selection depends on the last)."""
    compute_dtype = _compute_dtype(boxes.dtype)
    work_boxes = boxes.to(compute_dtype)
    current = _nan_to_minus_inf(scores.to(compute_dtype))
    keep, kept_scores = [], []
    index = torch.arange(boxes.shape[0], device=boxes.device)
    while True:
        if boxes.shape[0] == 0:
            break
        best = int(torch.argmax(current))  # the first index among ties
        best_score = current[best]
        if not bool((best_score >= score_threshold) & (best_score > -float("inf"))):
            break
        keep.append(best)
        kept_scores.append(best_score)
        iou, _ = _iou_and_union(work_boxes[best : best + 1], work_boxes, "xyxy")
        iou = iou[0]
        if method == "linear":
            weight = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            weight = torch.exp(-(iou * iou) / sigma)
        current = current * weight
        dropped = (current < score_threshold) | (index == best)
        current = torch.where(dropped, torch.full_like(current, -float("inf")), current)
    keep_tensor = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
    new_scores = torch.stack(kept_scores) if kept_scores else current.new_empty(0)
    return keep_tensor, new_scores.to(scores.dtype)


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
    for compute_dtype in (torch.float32, torch.float64):
        name = str(compute_dtype).removeprefix("torch.")
        block_rows, words = _mask_tile(compute_dtype)
        signature = {
            "boxes_ptr": triton_pointer_type(compute_dtype),
            "mask_ptr": "*i32",
            "tile_segment_ptr": "*i32",
            "tile_row_ptr": "*i32",
            "seg_start_ptr": "*i32",
            "seg_len_ptr": "*i32",
            "seg_mask_offset_ptr": "*i64",
            "threshold_ptr": triton_pointer_type(compute_dtype),
            **dict.fromkeys(("COMPUTE_FP64", "BLOCK_ROWS", "WORDS"), "constexpr"),
        }
        constexprs = {"COMPUTE_FP64": compute_dtype == torch.float64, "BLOCK_ROWS": block_rows, "WORDS": words}
        specs.append(KernelSpec(_suppression_mask_kernel, signature, constexprs, name, num_warps=_NUM_WARPS))
        for method in SOFT_NMS_METHODS:
            signature = {
                "boxes_ptr": triton_pointer_type(compute_dtype),
                "scores_ptr": triton_pointer_type(compute_dtype),
                "keep_ptr": "*i64",
                "kept_scores_ptr": triton_pointer_type(compute_dtype),
                "count_ptr": "*i32",
                "N": "i32",
                **dict.fromkeys(("iou_threshold", "sigma", "score_threshold"), "fp32"),
                **dict.fromkeys(("METHOD", "COMPUTE_FP64", "BLOCK"), "constexpr"),
            }
            constexprs = {
                "METHOD": _METHOD_CODE[method],
                "COMPUTE_FP64": compute_dtype == torch.float64,
                "BLOCK": _SOFT_BLOCK,
            }
            specs.append(KernelSpec(_soft_nms_kernel, signature, constexprs, f"{name},{method}", num_warps=_NUM_WARPS))
    signature = {
        "mask_ptr": "*i32",
        "removed_ptr": "*i32",
        "keep_ptr": "*i8",
        "seg_start_ptr": "*i32",
        "seg_len_ptr": "*i32",
        "seg_mask_offset_ptr": "*i64",
        "BLOCK_WORDS": "constexpr",
    }
    specs.append(
        KernelSpec(_greedy_reduce_kernel, signature, {"BLOCK_WORDS": _REDUCE_BLOCK_WORDS}, num_warps=_NUM_WARPS)
    )
    return specs


AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("nms", "batched_nms", "batched_nms_padded", "soft_nms")
