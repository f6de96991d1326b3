"""RPN proposals before NMS: from the raw head outputs of every level to padded candidate boxes.

Shapes (N images, L levels, A_l anchors per position on an ``H_l x W_l`` grid):
objectness ``[N, A_l, H_l, W_l]`` logits and deltas ``[N, 4 A_l, H_l, W_l]`` per level, exactly as an
RPN head emits them (read in place through their strides, any layout), image_sizes ``[N, 2]``
(height, width) -> candidates ``boxes [N, L, K, 4]`` and ranking ``keys [N, L, K]`` (``-score``,
+inf for dropped candidates) with ``K = min(pre_nms_top_n, max_l H_l W_l A_l)``: candidate j of
level l is level l's j-th best anchor. This is the ranked layout of
:func:`tritondet.kernels.nms.padded_nms` with levels as segments, so NMS needs no sort of its own.

Stages, each one launch for all images and levels (the level table of
:mod:`tritondet.kernels.anchors` carries every level's grid, anchors and head strides; the head
outputs of the (at most ``MAX_LEVELS``) levels are pointer arguments):

1. ``_gather_objectness_kernel``: the logits of every level in (y, x, anchor) order, as int32
   rank keys (:func:`logit_keys`), into one ``[N, L, max_l H_l W_l A_l]`` buffer padded with a key
   below every logit (-inf included: a level's -inf anchors are still its own picks);
   ``torch.topk`` then selects the ``min(pre_nms_top_n, H_l W_l A_l)`` best anchors of every level
   and image at once, in decreasing order (the sigmoid keeps that order, so it is the NMS rank
   order).
2. ``_decode_proposals_kernel``: for each selected anchor, the anchor from (level, y, x, a) in
   registers, its 4 deltas read from the head output, decoding (weights 1, ``dw``/``dh`` clamped to
   ``log(1000 / 16)``), clipping to the image, the small-box test (``w, h >= min_size``), sigmoid and
   the score test (``>= score_thresh``). Failing candidates get the key +inf.
3. :func:`tritondet.kernels.nms.padded_nms`: NMS per level and the merge of every image's levels
   by score (3 launches, one ``torch.sort``).

All math is fp32 (fp16/bf16 heads are upcast on load). torchvision computes in the head's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NUM_WARPS, clip_box, clip_to_images, level_pointers, load_four, pick_level, split_program
from ._launch import launch
from .anchors import (
    F_DELTAS_STRIDES,
    F_HEIGHT,
    F_NUM_ANCHORS,
    F_OBJECTNESS_STRIDES,
    F_WIDTH,
    FIXED_COLUMNS,
    grid_anchors_reference,
    level_anchor,
    level_table,
)
from .box_coder import RPN_WEIGHTS, decode_box, decode_reference
from .nms import padded_nms

HEAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _grid_position(index, row_ptr):
    """(y, x, a) of anchor ``index`` of a level in (y, x, anchor) order."""
    # int32 division: a level has far fewer than 2^31 anchors, and int64 division is slow on GPUs.
    width = tl.load(row_ptr + F_WIDTH).to(tl.int32)
    num_anchors = tl.load(row_ptr + F_NUM_ANCHORS).to(tl.int32)
    a = index % num_anchors
    position = index // num_anchors
    return position // width, position % width, a


# Rank keys: an fp32 logit's bits as an int32 that orders as torch.topk orders the logits (NaN
# above +inf, -0.0 with 0.0), so that the padding of the per-level buffer can rank strictly below
# every logit, -inf included (a float pad of -inf ties with a real -inf logit and topk may pick
# the pad, an anchor past the level, in its place).
PADDING_KEY = tl.constexpr(-(2**31))
# XOR with the magnitude bits turns a negative float's sign-magnitude bits into a two's complement
# order: larger magnitudes rank lower.
_NEGATIVE_FLIP = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _logit_key(logits):
    """int32 rank keys of fp32 ``logits`` (see :func:`logit_keys`)."""
    canonical = tl.where(logits != logits, float("nan"), logits + 0.0)
    bits = canonical.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ _NEGATIVE_FLIP, bits)


@triton.jit
def _key_logit(keys):
    """The fp32 logits of int32 rank keys (see :func:`key_logits`)."""
    bits = tl.where(keys < 0, keys ^ _NEGATIVE_FLIP, keys)
    return bits.to(tl.float32, bitcast=True)


def logit_keys(logits: torch.Tensor) -> torch.Tensor:
    """``[...]`` fp32 logits -> ``[...]`` int32 keys ranking as ``torch.topk`` ranks the logits:
    NaN (one canonical NaN, whatever its sign) above +inf, -0.0 as 0.0, -inf above
    ``PADDING_KEY``."""
    canonical = torch.where(logits.isnan(), float("nan"), logits + 0.0)
    bits = canonical.view(torch.int32)
    return torch.where(bits < 0, bits ^ _NEGATIVE_FLIP.value, bits)


def key_logits(keys: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`logit_keys`: ``[...]`` int32 keys -> fp32 logits (-inf for
    ``PADDING_KEY``)."""
    bits = torch.where(keys < 0, keys ^ _NEGATIVE_FLIP.value, keys)
    return torch.where(keys == PADDING_KEY.value, float("-inf"), bits.view(torch.float32))


@triton.jit
def _gather_objectness_kernel(
    # pointers
    table_ptr,  # [L, row_width] int64 level table (with the heads' strides)
    out_ptr,  # [N, L, max_count] int32 contiguous rank keys, PADDING_KEY past each level's count
    objectness0,  # [N, A_l, H_l, W_l] logits of each level, any strides; unused levels repeat level 0
    objectness1,
    objectness2,
    objectness3,
    objectness4,
    # sizes
    row_width,
    max_count,  # max_l H_l W_l A_l
    # meta-parameters
    BLOCK: tl.constexpr,
):
    image, tile = split_program(tl.cdiv(max_count, BLOCK))
    level = tl.program_id(1)
    num_levels = tl.num_programs(1)
    row_ptr = table_ptr + level * row_width
    count = tl.load(row_ptr + F_HEIGHT) * tl.load(row_ptr + F_WIDTH) * tl.load(row_ptr + F_NUM_ANCHORS)
    index = tile * BLOCK + tl.arange(0, BLOCK)
    in_level = index < count
    y, x, a = _grid_position(index, row_ptr)
    objectness = pick_level(level, objectness0, objectness1, objectness2, objectness3, objectness4)
    offset = (
        image * tl.load(row_ptr + F_OBJECTNESS_STRIDES)
        + a * tl.load(row_ptr + F_OBJECTNESS_STRIDES + 1)
        + y * tl.load(row_ptr + F_OBJECTNESS_STRIDES + 2)
        + x * tl.load(row_ptr + F_OBJECTNESS_STRIDES + 3)
    )
    logits = tl.load(objectness + offset, mask=in_level, other=0).to(tl.float32)
    keys = tl.where(in_level, _logit_key(logits), PADDING_KEY)
    tl.store(out_ptr + (image * num_levels + level) * max_count + index, keys, mask=index < max_count)


@triton.jit
def _decode_proposals_kernel(
    # pointers
    table_ptr,  # [L, row_width] int64 level table (with the heads' strides)
    deltas0,  # [N, 4 A_l, H_l, W_l] deltas of each level, any strides; unused levels repeat level 0
    deltas1,
    deltas2,
    deltas3,
    deltas4,
    top_keys_ptr,  # [N, L, K] int32 contiguous: the rank keys of each level's best logits
    top_index_ptr,  # [N, L, K] int64 contiguous: their anchors' indices within the level
    image_sizes_ptr,  # [N, 2] fp32 contiguous (height, width)
    boxes_ptr,  # [N, L, K, 4] fp32 contiguous
    keys_ptr,  # [N, L, K] fp32 contiguous: -score, +inf for dropped candidates
    # sizes
    row_width,
    K,
    pre_nms_top_n,
    # scalars
    min_size,
    score_thresh,
    clip,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    image, tile = split_program(tl.cdiv(K, BLOCK))
    level = tl.program_id(1)
    num_levels = tl.num_programs(1)
    row_ptr = table_ptr + level * row_width
    count = tl.load(row_ptr + F_HEIGHT) * tl.load(row_ptr + F_WIDTH) * tl.load(row_ptr + F_NUM_ANCHORS)
    j = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_buffer = j < K
    selected = j < tl.minimum(count, pre_nms_top_n)  # torchvision's per-level top n
    top = (image * num_levels + level) * K + j
    logits = _key_logit(tl.load(top_keys_ptr + top, mask=selected, other=0))
    index = tl.load(top_index_ptr + top, mask=selected, other=0).to(tl.int32)
    # A selected pick is one of the level's anchors (the padding ranks below them all); the mask
    # keeps the reads inside the head outputs whatever topk returns.
    selected = selected & (index < count)
    y, x, a = _grid_position(index, row_ptr)
    ax1, ay1, ax2, ay2 = level_anchor(row_ptr, y, x, a)

    deltas = pick_level(level, deltas0, deltas1, deltas2, deltas3, deltas4)
    stride_c = tl.load(row_ptr + F_DELTAS_STRIDES + 1)
    pd = deltas + (
        image * tl.load(row_ptr + F_DELTAS_STRIDES)
        + (4 * a) * stride_c
        + y * tl.load(row_ptr + F_DELTAS_STRIDES + 2)
        + x * tl.load(row_ptr + F_DELTAS_STRIDES + 3)
    )
    dx, dy, dw, dh = load_four(pd, stride_c, selected, 0, 0, tl.float32)
    x1, y1, x2, y2 = decode_box(ax1, ay1, ax2, ay2, dx, dy, dw, dh, 1.0, 1.0, 1.0, 1.0, clip)

    # Clip to the image before padding (torchvision's clip_boxes_to_image: clamp(min=0, max=size)).
    height = tl.load(image_sizes_ptr + image * 2)
    width = tl.load(image_sizes_ptr + image * 2 + 1)
    x1, y1, x2, y2 = clip_box(x1, y1, x2, y2, height, width)
    probability = tl.sigmoid(logits)
    keep = selected & ((x2 - x1) >= min_size) & ((y2 - y1) >= min_size) & (probability >= score_thresh)

    out = top  # candidate j of level l: the rank-j box of segment l, as padded_nms reads them
    tl.store(keys_ptr + out, tl.where(keep, -probability, float("inf")), mask=in_buffer)
    pb = boxes_ptr + out * 4
    tl.store(pb, tl.where(selected, x1, 0.0), mask=in_buffer)
    tl.store(pb + 1, tl.where(selected, y1, 0.0), mask=in_buffer)
    tl.store(pb + 2, tl.where(selected, x2, 0.0), mask=in_buffer)
    tl.store(pb + 3, tl.where(selected, y2, 0.0), mask=in_buffer)


# Gather: 1024 logits per program (8 per thread at 4 warps), a pure copy whose reads are strided
# across anchors; wide programs keep the grid of a 200x336x3 FPN level at ~200 programs per image.
_GATHER_BLOCK = 1024
# Decode: 256 candidates per program (2 per thread), each ~40 live fp32 values (anchor, deltas,
# box, table entries); 2000 candidates per level are 8 programs per level and image.
_DECODE_BLOCK = 256


def candidate_count(counts: list[int], pre_nms_top_n: int) -> int:
    """K: candidates per level in the padded output."""
    return min(pre_nms_top_n, max(counts)) if counts else 0


def _level_counts(objectness: list[torch.Tensor]) -> list[int]:
    return [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]


# The two argument builders give ``(args, meta)`` of a kernel for these tensors: what the launcher
# passes and what the ahead-of-time specs are derived from.


def _gather_arguments(table, logits, objectness) -> tuple[tuple, dict]:
    args = (table, logits, *level_pointers(objectness), table.shape[1], logits.shape[2])
    return args, {"BLOCK": _GATHER_BLOCK, "num_warps": NUM_WARPS}


def _decode_arguments(
    table, deltas, top_keys, top_index, image_sizes, boxes, keys, pre_nms_top_n, min_size, score_thresh, clip
):  # fmt: skip
    args = (
        table,
        *level_pointers(deltas),
        top_keys,
        top_index,
        image_sizes,
        boxes,
        keys,
        table.shape[1],
        keys.shape[2],
        pre_nms_top_n,
        float(min_size),
        float(score_thresh),
        float(clip),
    )
    return args, {"BLOCK": _DECODE_BLOCK, "num_warps": NUM_WARPS}


def rpn_candidates_triton(
    objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n,
    min_size, score_thresh, clip,
):  # fmt: skip
    """Two launches and one ``torch.topk``, whatever the number of images and levels."""
    batch, num_levels = image_sizes.shape[0], len(objectness)
    device = image_sizes.device
    counts = _level_counts(objectness)
    max_count = max(counts)
    k = candidate_count(counts, pre_nms_top_n)
    grid_sizes = [v for o in objectness for v in o.shape[2:]]
    table = level_table(
        grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device, heads=(objectness, deltas)
    )
    rank_keys = torch.empty((batch, num_levels, max_count), dtype=torch.int32, device=device)
    grid = (batch * triton.cdiv(max_count, _GATHER_BLOCK), num_levels)
    args, meta = _gather_arguments(table, rank_keys, objectness)
    launch(_gather_objectness_kernel, grid, *args, **meta)
    top_keys, top_index = rank_keys.topk(k, dim=2)
    boxes = torch.empty((batch, num_levels, k, 4), dtype=torch.float32, device=device)
    keys = torch.empty((batch, num_levels, k), dtype=torch.float32, device=device)
    sizes = image_sizes.to(torch.float32).contiguous()
    args, meta = _decode_arguments(
        table, deltas, top_keys, top_index, sizes, boxes, keys, pre_nms_top_n, min_size, score_thresh, clip
    )
    launch(_decode_proposals_kernel, (batch * triton.cdiv(k, _DECODE_BLOCK), num_levels), *args, **meta)
    return boxes, keys


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch (loops over the few levels only), the test oracle and CPU path.
# ----------------------------------------------------------------------------------------------


def _pad_levels(per_level: list[torch.Tensor], length: int, value: float) -> torch.Tensor:
    """Stack ``[N, n_l, ...]`` tensors into ``[N, L, length, ...]``, padding dim 1 with ``value``."""
    padded = []
    for t in per_level:
        pad = t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), value)
        padded.append(torch.cat([t, pad], dim=1))
    return torch.stack(padded, dim=1)


def rpn_candidates_reference(
    objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n,
    min_size, score_thresh, clip,
):  # fmt: skip
    grid_sizes = [v for o in objectness for v in o.shape[2:]]
    device = image_sizes.device
    anchors = grid_anchors_reference(grid_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, device)
    return candidates_from_anchors(
        objectness, deltas, anchors, image_sizes, pre_nms_top_n, min_size, score_thresh, clip
    )


def candidates_from_anchors(
    objectness: list[torch.Tensor],
    deltas: list[torch.Tensor],
    anchors: torch.Tensor,
    image_sizes: torch.Tensor,
    pre_nms_top_n: int,
    min_size: float,
    score_thresh: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The proposal stage before NMS in PyTorch: ``boxes [N, L, K, 4]`` fp32 and ``keys [N, L, K]``
    (see the module docstring) from the head outputs and ``anchors [sum_l H_l W_l A_l, 4]`` in
    (level, y, x, anchor) order. The boxes keep their gradient to ``deltas`` (the detector's joint
    training path); selection, decoding, clipping and the tests are those of the kernels."""
    batch = image_sizes.shape[0]
    counts = _level_counts(objectness)
    top_logits, top_index = _top_logits(objectness, counts, pre_nms_top_n)
    top_codes, top_anchors = [], []
    for level, (d, level_anchors) in enumerate(zip(deltas, anchors.split(counts), strict=True)):
        codes = (
            d.reshape(batch, d.shape[1] // 4, 4, *d.shape[2:]).permute(0, 3, 4, 1, 2).reshape(batch, counts[level], 4)
        )
        # Picks past the level's anchors (not selected) read an appended zero row: no empty gather.
        codes = torch.cat([codes.float(), codes.new_zeros((batch, 1, 4), dtype=torch.float32)], dim=1)
        level_anchors = torch.cat([level_anchors, level_anchors.new_zeros((1, 4))])
        index = top_index[:, level].clamp(max=counts[level])
        top_codes.append(codes.gather(1, index[..., None].expand(-1, -1, 4)))
        top_anchors.append(level_anchors[index])
    return _decoded_candidates(
        top_codes, top_anchors, top_logits, counts, image_sizes, pre_nms_top_n, min_size, score_thresh, clip
    )


def _top_logits(objectness: list[torch.Tensor], counts: list[int], pre_nms_top_n: int, host_reads: bool = False):
    """Each level's best ``K`` logits and their anchors' indices, ``[N, L, K]`` fp32 and int64
    (picks past a level's anchors when it has fewer than K: -inf and an index >= its count), ranked
    by the kernels' :func:`logit_keys`. With ``host_reads`` (the fast CPU path) the keys are built
    only when a pad could tie with a logit (one host read)."""
    batch = objectness[0].shape[0]
    # (y, x, anchor) order, as torchvision's permute_and_flatten.
    # Explicit sizes, not -1: a reshape of zero elements (B = 0) cannot infer a dimension.
    logits = [o.permute(0, 2, 3, 1).reshape(batch, c).float() for o, c in zip(objectness, counts, strict=True)]
    k, length = candidate_count(counts, pre_nms_top_n), max(counts)
    if host_reads and not _padding_ties(logits, counts):
        # The -inf padding ranks below every logit, as PADDING_KEY does: the same comparisons, the
        # same picks in the same order, without the keys' passes over every anchor.
        return _pad_levels(logits, length, float("-inf")).topk(k, dim=2)
    top_keys, top_index = _pad_levels([logit_keys(t) for t in logits], length, PADDING_KEY.value).topk(k, dim=2)
    return key_logits(top_keys), top_index


def _padding_ties(logits: list[torch.Tensor], counts: list[int]) -> bool:
    """Whether a level shorter than the longest one (padded with -inf) has a -inf logit."""
    return any(bool(t.isneginf().any()) for t, count in zip(logits, counts, strict=True) if count < max(counts))


def _decoded_candidates(
    top_codes, top_anchors, top_logits, counts, image_sizes, pre_nms_top_n, min_size, score_thresh, clip
):  # fmt: skip
    """``boxes [N, L, K, 4]``, ``keys [N, L, K]`` from each level's ``[N, K, 4]`` picked deltas and
    anchors (zeros past the level's anchors) and :func:`_top_logits`."""
    device = image_sizes.device
    # Built on the device (no host-to-device copy): candidate j of level l is one of its top n.
    top_n = torch.stack([torch.full((), min(c, pre_nms_top_n), device=device) for c in counts])
    selected = torch.arange(top_logits.shape[2], device=device) < top_n[:, None]
    boxes = decode_reference(torch.stack(top_codes, 1), torch.stack(top_anchors, 1), list(RPN_WEIGHTS), clip)
    boxes = clip_to_images(boxes, image_sizes)
    probability = torch.sigmoid(top_logits.detach())
    keep = selected & (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)
    keep = keep & (probability >= score_thresh)
    return torch.where(selected[..., None], boxes, 0.0), torch.where(keep, -probability, float("inf"))


def rpn_candidates_cpu(
    objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n,
    min_size, score_thresh, clip,
):  # fmt: skip
    """The fast CPU path of :func:`rpn_candidates_reference`, the same tensors: the deltas and
    anchors of the selected candidates only (``K`` per level, not every anchor of the level)."""
    batch, device = image_sizes.shape[0], image_sizes.device
    counts = _level_counts(objectness)
    top_logits, top_index = _top_logits(objectness, counts, pre_nms_top_n, host_reads=True)
    # The anchors of a one-position grid are the base anchors (plus a shift of exactly 0).
    base = grid_anchors_reference(
        [1, 1] * len(objectness), strides, anchor_sizes, anchor_ratios, anchors_per_level, device
    ).split(anchors_per_level)
    image = torch.arange(batch, device=device)[:, None]
    top_codes, top_anchors = [], []
    for level, (d, count) in enumerate(zip(deltas, counts, strict=True)):
        num_anchors, width = anchors_per_level[level], d.shape[3]
        index = top_index[:, level]
        # Picks past the level's anchors read zeros, as the reference's appended zero row.
        real = (index < count)[..., None]
        index = index.clamp(max=max(count - 1, 0))
        a, position = index % num_anchors, index // num_anchors
        y, x = position // width, position % width
        codes = (
            d.unflatten(1, (num_anchors, 4))[image, a, :, y, x].float()
            if count
            else real.new_zeros((*index.shape, 4), dtype=torch.float32)
        )
        top_codes.append(torch.where(real, codes, 0.0))
        # Integer shifts plus fp32 base anchors: the reference's anchor values, bit for bit.
        shift = torch.stack([x * strides[2 * level + 1], y * strides[2 * level]], dim=-1).repeat(1, 1, 2)
        top_anchors.append(torch.where(real, shift + base[level][a], 0.0))
    return _decoded_candidates(
        top_codes, top_anchors, top_logits, counts, image_sizes, pre_nms_top_n, min_size, score_thresh, clip
    )


def select_proposals(
    boxes: torch.Tensor, keys: torch.Tensor, nms_thresh: float, post_nms_top_n: int, with_index: bool = False
) -> tuple[torch.Tensor, ...]:
    """The proposal stage's NMS: per level (levels as segments, already in rank order), then the
    merge of every image's levels by score. ``boxes [N, L, K, 4]``, ``keys [N, L, K]`` ->
    ``boxes [N, P, 4]``, ``scores [N, P]`` fp32, ``levels [N, P]`` and ``ranks [N, P]`` (where each
    proposal is in ``boxes``, rank -1 for empty slots; None unless ``with_index``), ``num_valid [N]``."""
    labels = None
    if with_index:
        batch, num_levels, k = keys.shape
        order = torch.arange(k, device=keys.device).expand(batch, num_levels, k).contiguous()
        labels = (order, k, num_levels, False)
    return padded_nms(boxes, keys, nms_thresh, post_nms_top_n, torch.float32, torch.float32, labels)


# ----------------------------------------------------------------------------------------------
# torch.library registration (not differentiable: torchvision detaches the proposals too)
# ----------------------------------------------------------------------------------------------


def _candidates(
    objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n,
    min_size, score_thresh, clip,
):  # fmt: skip
    args = (objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level)
    if use_triton(image_sizes.device):
        return rpn_candidates_triton(*args, pre_nms_top_n, min_size, score_thresh, clip)
    if use_fast_cpu(image_sizes.device, calls_torchvision=False):
        return rpn_candidates_cpu(*args, pre_nms_top_n, min_size, score_thresh, clip)
    return rpn_candidates_reference(*args, pre_nms_top_n, min_size, score_thresh, clip)


@torch.library.custom_op("tritondet::rpn_candidates", mutates_args=())
def rpn_candidates(
    objectness: list[torch.Tensor],
    deltas: list[torch.Tensor],
    image_sizes: torch.Tensor,
    strides: list[int],
    anchor_sizes: list[float],
    anchor_ratios: list[float],
    anchors_per_level: list[int],
    pre_nms_top_n: int,
    min_size: float,
    score_thresh: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``boxes [N, L, K, 4]``, ``keys [N, L, K]`` fp32 (see the module docstring)."""
    return _candidates(
        objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n,
        min_size, score_thresh, clip,
    )  # fmt: skip


@rpn_candidates.register_fake
def _(objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n, *_):
    batch, num_levels = image_sizes.shape[0], len(objectness)
    k = candidate_count(_level_counts(objectness), pre_nms_top_n)
    boxes = image_sizes.new_empty((batch, num_levels, k, 4), dtype=torch.float32)
    return boxes, image_sizes.new_empty((batch, num_levels, k), dtype=torch.float32)


@torch.library.custom_op("tritondet::rpn_proposals", mutates_args=())
def rpn_proposals(
    objectness: list[torch.Tensor],
    deltas: list[torch.Tensor],
    image_sizes: torch.Tensor,
    strides: list[int],
    anchor_sizes: list[float],
    anchor_ratios: list[float],
    anchors_per_level: list[int],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``boxes [N, post_nms_top_n, 4]``, ``scores [N, post_nms_top_n]`` fp32 and ``num_valid [N]``:
    the candidates, NMS per level (levels as segments, already in rank order) and the merge."""
    boxes, keys = _candidates(
        objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n,
        min_size, score_thresh, clip,
    )  # fmt: skip
    boxes, scores, _, _, num_valid = select_proposals(boxes, keys, nms_thresh, post_nms_top_n)
    return boxes, scores, num_valid


@rpn_proposals.register_fake
def _(objectness, deltas, image_sizes, strides, anchor_sizes, anchor_ratios, anchors_per_level, pre_nms_top_n,
      post_nms_top_n, *_):  # fmt: skip
    batch = image_sizes.shape[0]
    return (
        image_sizes.new_empty((batch, post_nms_top_n, 4), dtype=torch.float32),
        image_sizes.new_empty((batch, post_nms_top_n), dtype=torch.float32),
        image_sizes.new_empty((batch,), dtype=torch.int64),
    )


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations: one per head dtype and kernel.
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[KernelSpec]:
    specs = []
    table = torch.zeros((1, FIXED_COLUMNS), dtype=torch.int64)
    rank_keys, index = torch.zeros((1, 1, 1), dtype=torch.int32), torch.zeros((1, 1, 1), dtype=torch.int64)
    image_sizes, boxes, keys = torch.zeros((1, 2)), torch.empty((1, 1, 1, 4)), torch.empty((1, 1, 1))
    for dtype in HEAD_DTYPES:
        label = f"head {str(dtype).removeprefix('torch.')}"
        head = [torch.empty((1, 1, 1, 1), dtype=dtype)]
        gather = _gather_arguments(table, rank_keys, head)
        specs.append(KernelSpec.from_example(_gather_objectness_kernel, *gather, label))
        args, meta = _decode_arguments(table, head, rank_keys, index, image_sizes, boxes, keys, 1000, 0.0, 0.0, 1.0)
        specs.append(KernelSpec.from_example(_decode_proposals_kernel, args, meta, label))
    return specs


# None: decoding takes an exp and the sigmoid an exp (approximate on a GPU; see CONTRIBUTING).
EXACT_KERNELS: frozenset = frozenset()
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("rpn_proposals",)
