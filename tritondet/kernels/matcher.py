"""Anchor / proposal matching to ground truth without the IoU matrix (torchvision's ``Matcher``).

Shapes: B images, A anchors (or proposals) per image, G ground-truth slots per image of which the
first ``gt_count[b]`` are real. anchors ``[B, A, 4]`` (a shared ``[A, 4]`` set arrives as a
stride-0 ``expand``), gt boxes ``[B, G, 4]``, gt_count ``[B]`` -> matched index ``[B, A]`` int64.

Result per image, as ``Matcher(high, low, allow_low_quality_matches)(box_iou(gt, anchors))``:
the index of the best ground truth (the first one among equal IoUs, as ``Tensor.max``) when its
IoU is ``>= high``, -2 when it lies in ``[low, high)``, -1 below ``low``; with
``allow_low_quality_matches`` every anchor that attains some ground truth's highest IoU (ties
included) keeps its best index whatever its IoU. Images without ground truth get -1 everywhere.
An internal ``floor`` threshold (``-inf`` for the public op) turns IoUs below it into -3: the
proposal target layer uses it for the background band ``[bg_low, bg_high)``.

Triton path, two launches (one without the low-quality rule), never the ``[B, G, A]`` matrix:

1. ``_gt_max_kernel``: each program takes a tile of anchors, computes its IoU with the image's
   ground truth chunk by chunk and folds the tile maxima into the per-GT maxima with
   ``atomic_max`` on order-preserving integer keys of the IoU bits (a max is exact and order
   independent, so the result is deterministic).
2. ``_match_kernel``: each program recomputes its tile's IoUs with the same helper
   (``box_iou.pairwise_iou_tile``, so the values are bit-identical to pass 1), keeps the running
   max / first argmax over G, and flags anchors whose IoU equals a GT's maximum.

Extra memory: the ``[B, G]`` per-GT maxima (int32 keys, int64 for fp64 boxes), a 3-element
threshold tensor and the ``[B, A]`` int64 output: O(B·(A + G)). Work: 2·B·A·G IoUs.

Numerics: boxes are upcast on load (fp16/bf16 -> fp32, fp64 stays fp64) like ``box_iou``; the
thresholds are rounded to the compute dtype as PyTorch does when comparing a fp32 tensor with a
Python float, so the threshold decisions equal torchvision's on fp32/fp64 boxes. A NaN IoU (a NaN
or infinite box, two empty boxes) behaves as in torchvision's ``Tensor.max``: the anchor matches
the first ground truth with a NaN IoU whatever the thresholds, and that ground truth's maximum is
NaN, which no anchor attains.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NO_FP_FUSION, NUM_WARPS, compute_dtype_of, load_box_and_area, split_program
from ._launch import device_table, launch
from .box_iou import pairwise_iou_cpu, pairwise_iou_reference, pairwise_iou_tile

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2
BELOW_FLOOR = -3


@triton.jit
def _order_key(value, COMPUTE_FP64: tl.constexpr):
    """Signed integer whose order is the float order of ``value`` (an involution on the bits)."""
    if COMPUTE_FP64:
        bits = value.to(tl.int64, bitcast=True)
        return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    else:
        bits = value.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_order_key(key, COMPUTE_FP64: tl.constexpr):
    if COMPUTE_FP64:
        return (key ^ ((key >> 63) & 0x7FFFFFFFFFFFFFFF)).to(tl.float64, bitcast=True)
    else:
        return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _anchor_tile(
    anchors_ptr, A, stride_anchor_b, stride_anchor_a, stride_anchor_c, compute_dtype: tl.constexpr, BLOCK_A: tl.constexpr
):  # fmt: skip
    """(image, anchor rows [BLOCK_A], their mask, corners, areas) of this program; images share
    grid axis x with their anchor tiles."""
    batch, pid_a = split_program(tl.cdiv(A, BLOCK_A))
    rows = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    row_ok = rows < A
    ax1, ay1, ax2, ay2, area_a = load_box_and_area(
        anchors_ptr + batch * stride_anchor_b + rows.to(tl.int64) * stride_anchor_a,
        stride_anchor_c,
        row_ok,
        compute_dtype,
    )
    return batch, rows, row_ok, ax1, ay1, ax2, ay2, area_a


@triton.jit
def _gt_tile_iou(
    gt_ptr, batch, g0, count, stride_gt_b, stride_gt_g, stride_gt_c,
    ax1, ay1, ax2, ay2, area_a, compute_dtype: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """(columns [BLOCK_G], their mask, IoU [BLOCK_A, BLOCK_G]) of the image's ground-truth boxes
    ``g0 + [0, BLOCK_G)`` (of ``count``) against the anchor tile."""
    cols = g0 + tl.arange(0, BLOCK_G)
    col_ok = cols < count
    bx1, by1, bx2, by2, area_b = load_box_and_area(
        gt_ptr + batch * stride_gt_b + cols.to(tl.int64) * stride_gt_g, stride_gt_c, col_ok, compute_dtype
    )
    iou, _ = pairwise_iou_tile(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b)
    return cols, col_ok, iou


@triton.jit
def _gt_max_kernel(
    # pointers
    anchors_ptr,  # [B, A, 4], any strides (stride_anchor_b 0 for a shared set)
    gt_ptr,  # [B, G, 4], any strides
    count_ptr,  # [B] int64: valid ground-truth boxes per image
    gt_max_ptr,  # [B, G] contiguous order keys of the per-GT max IoU, preset to the minimum key
    # sizes
    A,
    G,
    # strides (in elements)
    stride_anchor_b,
    stride_anchor_a,
    stride_anchor_c,
    stride_gt_b,
    stride_gt_g,
    stride_gt_c,
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    batch, _, row_ok, ax1, ay1, ax2, ay2, area_a = _anchor_tile(
        anchors_ptr, A, stride_anchor_b, stride_anchor_a, stride_anchor_c, compute_dtype, BLOCK_A
    )
    count = tl.load(count_ptr + batch).to(tl.int32)
    for g0 in tl.range(0, count, BLOCK_G):
        cols, col_ok, iou = _gt_tile_iou(
            gt_ptr, batch, g0, count, stride_gt_b, stride_gt_g, stride_gt_c,
            ax1, ay1, ax2, ay2, area_a, compute_dtype, BLOCK_G,
        )  # fmt: skip
        nan_iou = (iou != iou) & row_ok[:, None]
        iou = tl.where(row_ok[:, None] & ~nan_iou, iou, float("-inf"))
        # A NaN IoU makes the ground truth's maximum NaN, as Tensor.amax; the key of the positive
        # NaN literal orders above +inf, so it wins the atomic max.
        tile_max = tl.where(tl.max(nan_iou.to(tl.int32), axis=0) > 0, float("nan"), tl.max(iou, axis=0))
        tl.atomic_max(gt_max_ptr + batch * G + cols, _order_key(tile_max, COMPUTE_FP64), mask=col_ok)


@triton.jit
def _match_kernel(
    # pointers
    anchors_ptr,  # [B, A, 4], any strides (stride_anchor_b 0 for a shared set)
    gt_ptr,  # [B, G, 4], any strides
    count_ptr,  # [B] int64
    gt_max_ptr,  # [B, G] order keys from _gt_max_kernel (read only with ALLOW_LOW)
    thresholds_ptr,  # [3] compute dtype: high, low, floor
    out_ptr,  # [B, A] int64 contiguous
    # sizes
    A,
    G,
    # strides (in elements)
    stride_anchor_b,
    stride_anchor_a,
    stride_anchor_c,
    stride_gt_b,
    stride_gt_g,
    stride_gt_c,
    # meta-parameters
    ALLOW_LOW: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    batch, rows, row_ok, ax1, ay1, ax2, ay2, area_a = _anchor_tile(
        anchors_ptr, A, stride_anchor_b, stride_anchor_a, stride_anchor_c, compute_dtype, BLOCK_A
    )
    count = tl.load(count_ptr + batch).to(tl.int32)
    best = tl.full((BLOCK_A,), float("-inf"), compute_dtype)
    best_idx = tl.zeros((BLOCK_A,), tl.int32)
    attains_gt_max = tl.zeros((BLOCK_A,), tl.int32)
    for g0 in tl.range(0, count, BLOCK_G):
        cols, col_ok, iou = _gt_tile_iou(
            gt_ptr, batch, g0, count, stride_gt_b, stride_gt_g, stride_gt_c,
            ax1, ay1, ax2, ay2, area_a, compute_dtype, BLOCK_G,
        )  # fmt: skip
        nan_iou = (iou != iou) & col_ok[None, :]
        ordered_iou = tl.where(col_ok[None, :] & ~nan_iou, iou, float("-inf"))
        chunk_max = tl.max(ordered_iou, axis=1)
        # The first column attaining the chunk's max; chunks run in ascending order and replace
        # the running best only when strictly better, so the first maximal index wins overall.
        chunk_arg = tl.min(tl.where(ordered_iou == chunk_max[:, None], cols[None, :], 2147483647), axis=1)
        # As Tensor.max, the first NaN IoU wins over any number, and nothing replaces it.
        chunk_nan_arg = tl.min(tl.where(nan_iou, cols[None, :], 2147483647), axis=1)
        chunk_has_nan = chunk_nan_arg < 2147483647
        better = (best == best) & (chunk_has_nan | (chunk_max > best))
        best = tl.where(better, tl.where(chunk_has_nan, float("nan"), chunk_max), best)
        best_idx = tl.where(better, tl.where(chunk_has_nan, chunk_nan_arg, chunk_arg), best_idx)
        if ALLOW_LOW:
            gt_max_key = tl.load(gt_max_ptr + batch * G + cols, mask=col_ok, other=0)
            gt_max = _from_order_key(gt_max_key, COMPUTE_FP64)
            hit = (iou == gt_max[None, :]) & col_ok[None, :]
            attains_gt_max = tl.maximum(attains_gt_max, tl.max(hit.to(tl.int32), axis=1))
    high = tl.load(thresholds_ptr)
    low = tl.load(thresholds_ptr + 1)
    floor = tl.load(thresholds_ptr + 2)
    # torchvision's order of assignments: below low, then between, then the low-quality rule.
    matched = tl.where(best < low, -1, best_idx)
    matched = tl.where((best >= low) & (best < high), -2, matched)
    matched = tl.where(best < floor, -3, matched)
    if ALLOW_LOW:
        matched = tl.where(attains_gt_max > 0, best_idx, matched)
    matched = tl.where(count > 0, matched, -1)
    tl.store(out_ptr + batch * A + rows, matched.to(tl.int64), mask=row_ok)


def _tile_shape(compute_dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_G): anchors per program and ground-truth boxes per inner step.

    128 anchors at 4 warps is one anchor per thread for the per-anchor state (corners, running
    max/argmax); 16 ground-truth columns give 16 IoUs in flight per thread, enough to hide the
    division latency while the ~10 live values per IoU stay in registers (zero spills on
    sm_80/sm_90 in `tritondet compile-report`). fp64 halves the anchors (twice the registers).
    """
    return (64, 16) if compute_dtype == torch.float64 else (128, 16)


def _thresholds(high: float, low: float, floor: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The thresholds rounded to the compute dtype, as PyTorch rounds a Python float compared with
    a tensor: a cached device table (a kernel's float scalar is fp32, too coarse for fp64 boxes),
    so a repeated call, or a CUDA-graph capture after a warm-up call, copies nothing."""
    return device_table([high, low, floor], dtype, device)


def _matcher_arguments(anchors, gt_boxes, gt_count, gt_max, thresholds, out) -> tuple[tuple, tuple, dict]:
    """``(args of _gt_max_kernel, args of _match_kernel, meta shared by both)``: what the launcher
    passes and what the ahead-of-time specs are derived from (``_match_kernel`` adds ``ALLOW_LOW``)."""
    common = (anchors.shape[1], gt_boxes.shape[1], *anchors.stride(), *gt_boxes.stride())
    block_a, block_g = _tile_shape(thresholds.dtype)
    meta = {
        "COMPUTE_FP64": thresholds.dtype == torch.float64,
        "BLOCK_A": block_a,
        "BLOCK_G": block_g,
        "num_warps": NUM_WARPS,
        **NO_FP_FUSION,
    }
    return (
        (anchors, gt_boxes, gt_count, gt_max, *common),
        (anchors, gt_boxes, gt_count, gt_max, thresholds, out, *common),
        meta,
    )


def match_boxes_triton(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_count: torch.Tensor,
    high: float,
    low: float,
    floor: float,
    allow_low_quality_matches: bool,
) -> torch.Tensor:
    """``[B, A, 4] x [B, G, 4] -> [B, A]`` int64 in two launches (the first only with low-quality matches)."""
    batch, num_anchors, num_gt = gt_boxes.shape[0], anchors.shape[1], gt_boxes.shape[1]
    compute_dtype = compute_dtype_of(anchors.dtype)
    if not anchors.is_floating_point():  # integer boxes: one fp32 copy, then the fp32 kernels
        anchors, gt_boxes = anchors.float(), gt_boxes.float()
    key_dtype = torch.int64 if compute_dtype == torch.float64 else torch.int32
    out = torch.empty((batch, num_anchors), dtype=torch.int64, device=anchors.device)
    gt_max = torch.full((batch, num_gt), torch.iinfo(key_dtype).min, dtype=key_dtype, device=anchors.device)
    thresholds = _thresholds(high, low, floor, compute_dtype, anchors.device)
    gt_max_args, match_args, meta = _matcher_arguments(anchors, gt_boxes, gt_count, gt_max, thresholds, out)
    grid = (batch * triton.cdiv(num_anchors, meta["BLOCK_A"]),)
    if allow_low_quality_matches:
        launch(_gt_max_kernel, grid, *gt_max_args, **meta)
    launch(_match_kernel, grid, *match_args, ALLOW_LOW=allow_low_quality_matches, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch on the [B, G, A] IoU matrix, the test oracle and the CPU path.
# ----------------------------------------------------------------------------------------------


def match_boxes_reference(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_count: torch.Tensor,
    high: float,
    low: float,
    floor: float,
    allow_low_quality_matches: bool,
) -> torch.Tensor:
    """``[B, A, 4] x [B, G, 4] -> [B, A]`` int64; builds the ``[B, G, A]`` IoU matrix."""
    num_gt = gt_boxes.shape[1]
    iou = pairwise_iou_reference(gt_boxes, anchors, "iou")  # [B, G, A]
    valid = torch.arange(num_gt, device=gt_boxes.device) < gt_count[:, None]  # [B, G]
    matched = _matches_from_iou(
        iou.masked_fill(~valid[..., None], float("-inf")), valid, high, low, floor, allow_low_quality_matches
    )
    return torch.where(gt_count[:, None] > 0, matched, BELOW_LOW_THRESHOLD)


def _matches_from_iou(
    iou: torch.Tensor,
    valid: torch.Tensor | None,
    high: float,
    low: float,
    floor: float,
    allow_low_quality_matches: bool,
) -> torch.Tensor:
    """``[B, G, A]`` IoU (-inf on padding rows), ``[B, G]`` real rows (None: every row is) ->
    ``[B, A]`` int64 matches."""
    batch, num_gt, num_anchors = iou.shape
    if num_gt == 0:
        best = iou.new_full((batch, num_anchors), float("-inf"))
        best_idx = torch.zeros((batch, num_anchors), dtype=torch.int64, device=iou.device)
    else:
        best, best_idx = iou.max(dim=1)
    matched = best_idx
    if low < high:  # else the band [low, high) is empty; below it, overwritten next
        matched = torch.where(best < high, BETWEEN_THRESHOLDS, matched)
    matched = torch.where(best < low, BELOW_LOW_THRESHOLD, matched)
    if floor > float("-inf"):  # else nothing lies below the floor
        matched = torch.where(best < floor, BELOW_FLOOR, matched)
    if allow_low_quality_matches and num_gt > 0 and num_anchors > 0:
        gt_max = iou.amax(dim=2, keepdim=True)  # [B, G, 1]
        attains = iou == gt_max
        if valid is not None:  # padding rows' -inf equals their -inf maximum
            attains &= valid[..., None]
        attains = attains.any(dim=1)
        matched = torch.where(attains, best_idx, matched)
    return matched


def ground_truth_iou_cpu(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_count: torch.Tensor, counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, A, 4] x [B, G, 4]`` with ``counts = gt_count.tolist()`` (largest ``G_used > 0``) ->
    (IoU ``[B, G_used, A]``, ``-inf`` on the padding rows; the real rows ``[B, G_used]``, None when
    every row is real): every image in one pass over the ground-truth slots some image uses, the
    IoU computed in place; the few padding rows of images with fewer boxes cost less than a pass
    of small ops per image."""
    num_gt = max(counts)
    if num_gt < gt_boxes.shape[1]:
        gt_boxes = gt_boxes[:, :num_gt]
    iou = pairwise_iou_cpu(gt_boxes, anchors, "iou", "xyxy")  # [B, G_used, A]
    valid = None
    if min(counts) < num_gt:  # padding rows: never anyone's best
        valid = torch.arange(num_gt, device=gt_boxes.device) < gt_count[:, None]  # [B, G_used]
        iou.masked_fill_(~valid[..., None], float("-inf"))
    return iou, valid


def match_boxes_cpu(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_count: torch.Tensor,
    high: float,
    low: float,
    floor: float,
    allow_low_quality_matches: bool,
) -> torch.Tensor:
    """The fast CPU path, the reference's result on :func:`ground_truth_iou_cpu`'s matrix (host
    read: the counts)."""
    counts = gt_count.tolist()
    if max(counts, default=0) == 0:
        return torch.full((gt_boxes.shape[0], anchors.shape[1]), BELOW_LOW_THRESHOLD, device=anchors.device)
    iou, valid = ground_truth_iou_cpu(anchors, gt_boxes, gt_count, counts)
    matched = _matches_from_iou(iou, valid, high, low, floor, allow_low_quality_matches)
    if min(counts) == 0:
        matched = torch.where(gt_count[:, None] > 0, matched, BELOW_LOW_THRESHOLD)
    return matched


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::match_boxes", mutates_args=())
def match_boxes(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_count: torch.Tensor,
    high: float,
    low: float,
    floor: float,
    allow_low_quality_matches: bool,
) -> torch.Tensor:
    """``[B, A, 4] x [B, G, 4] x [B] -> [B, A]`` int64 matched ground-truth index (see module doc)."""
    if use_triton(anchors.device):
        return match_boxes_triton(anchors, gt_boxes, gt_count, high, low, floor, allow_low_quality_matches)
    if use_fast_cpu(anchors.device):
        return match_boxes_cpu(anchors, gt_boxes, gt_count, high, low, floor, allow_low_quality_matches)
    return match_boxes_reference(anchors, gt_boxes, gt_count, high, low, floor, allow_low_quality_matches)


@match_boxes.register_fake
def _(anchors, gt_boxes, gt_count, high, low, floor, allow_low_quality_matches):
    return anchors.new_empty((gt_boxes.shape[0], anchors.shape[1]), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations: every (box dtype, low-quality rule) the launcher can produce.
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        compute_dtype = compute_dtype_of(dtype)
        key_dtype = torch.int64 if compute_dtype == torch.float64 else torch.int32
        boxes = torch.empty((1, 1, 4), dtype=dtype)
        gt_max_args, match_args, meta = _matcher_arguments(
            boxes,
            boxes,
            torch.zeros(1, dtype=torch.int64),
            torch.zeros((1, 1), dtype=key_dtype),
            torch.zeros(3, dtype=compute_dtype),
            torch.zeros((1, 1), dtype=torch.int64),
        )
        label = str(dtype).removeprefix("torch.")
        specs.append(KernelSpec.from_example(_gt_max_kernel, gt_max_args, meta, label))
        for allow_low in (False, True):
            match_meta = {"ALLOW_LOW": allow_low, **meta}
            specs.append(
                KernelSpec.from_example(_match_kernel, match_args, match_meta, f"{label},allow_low={allow_low}")
            )
    return specs


# Kernels whose results are compared exactly with torchvision or rounded (to pixels, levels,
# keep/drop decisions): IEEE division and square root only, no contracted multiply-add (the
# compile gate's PTX lint, `tritondet compile-report`).
EXACT_KERNELS = frozenset({_gt_max_kernel, _match_kernel})
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("match_boxes",)
