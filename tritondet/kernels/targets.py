"""Training targets: balanced sampling, the anchor target layer (RPN) and the proposal target layer
(box head), batched over images with fixed shapes and no host sync.

Shapes: B images, A anchors, P proposals, G ground-truth slots (the first ``gt_count[b]`` real),
S = ``batch_size_per_image`` sampled proposals, C classes (background included).

These compose the Triton kernels of the matcher (``matcher.py``) and the box coder
(``box_coder.py``) with a few fixed-shape PyTorch ops (random keys, ``topk``, ``gather``,
``scatter``), so they run on either backend; no kernel of their own (an empty ``AOT_SPECS``).
Only the sampler draws random numbers (from ``generator``); everything else is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import use_fast_cpu
from ._common import compute_dtype_of
from .box_coder import encode_cpu
from .matcher import BELOW_FLOOR, BELOW_LOW_THRESHOLD, ground_truth_iou_cpu

# Keys of non-members: above every torch.rand key in [0, 1), so members are taken first.
_NON_MEMBER_KEY = 2.0


def _smallest_keys_mask(keys: torch.Tensor, members: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, N]`` mask of the ``counts[b] <= k`` members of each row with the smallest keys."""
    order = torch.where(members, keys, _NON_MEMBER_KEY).topk(k, dim=1, largest=False).indices  # [B, k]
    chosen = torch.arange(k, device=keys.device) < counts[:, None]
    return torch.zeros_like(members).scatter_(1, order, chosen)


def _sample_keys(matched_idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform key per ``[B, N]`` element, from ``generator``: fp64, whose 2^53 values make
    ties (which topk breaks by position) practically impossible."""
    return torch.rand(matched_idx.shape, generator=generator, dtype=torch.float64, device=matched_idx.device)


def sample_balanced(
    matched_idx: torch.Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N]`` matched indices -> (positive mask, negative mask), both ``[B, N]`` bool.

    torchvision's ``BalancedPositiveNegativeSampler`` per image: positives are ``matched >= 0``,
    negatives ``matched == -1``; ``num_pos = min(int(batch_size_per_image * positive_fraction),
    #positives)``, ``num_neg = min(batch_size_per_image - num_pos, #negatives)``, each a uniformly
    random subset. One fp64 uniform key per element (from ``generator``) and two fixed-size
    ``topk`` calls replace torchvision's per-image ``randperm``, so nothing waits for the device.
    """
    n = matched_idx.shape[1]
    positive = matched_idx >= 0
    negative = matched_idx == BELOW_LOW_THRESHOLD
    max_positive = int(batch_size_per_image * positive_fraction)
    num_pos = positive.sum(dim=1).clamp(max=max_positive)
    num_neg = torch.minimum(negative.sum(dim=1), batch_size_per_image - num_pos)
    keys = _sample_keys(matched_idx, generator)
    pos_mask = _smallest_keys_mask(keys, positive, num_pos, min(max_positive, n))
    neg_mask = _smallest_keys_mask(keys, negative, num_neg, min(batch_size_per_image, n))
    return pos_mask, neg_mask


def _gather_boxes(boxes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, M, 4]`` gathered at ``[B, K]`` indices -> ``[B, K, 4]``; M = 0 gives zero boxes."""
    if boxes.shape[1] == 0:  # a static shape decision: one zero slot keeps the gather valid
        boxes = boxes.new_zeros((boxes.shape[0], 1, 4))
    return boxes.gather(1, index[..., None].expand(*index.shape, 4))


def _encode(reference_boxes: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """``[B, K, 4]`` regression targets of ``reference_boxes`` relative to ``boxes`` (compute dtype)."""
    shape = boxes.shape
    encoded = torch.ops.tritondet.encode_boxes(reference_boxes.reshape(-1, 4), boxes.reshape(-1, 4), list(weights))
    return encoded.reshape(shape)


class AnchorTargets(NamedTuple):
    """labels ``[B, A]`` int64: 1 sampled foreground, 0 sampled background, -1 not sampled;
    regression_targets ``[B, A, 4]``: encoded matched ground truth for sampled foreground, else 0;
    matched_idx ``[B, A]`` int64: the matcher's output (before sampling)."""

    labels: torch.Tensor
    regression_targets: torch.Tensor
    matched_idx: torch.Tensor


def anchor_targets(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_count: torch.Tensor,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
    weights: tuple[float, ...],
    generator: torch.Generator | None,
) -> AnchorTargets:
    """Anchor target layer on validated ``[B, A, 4]`` anchors (see ``tritondet.ops.anchor_targets``)."""
    matched = torch.ops.tritondet.match_boxes(
        anchors, gt_boxes, gt_count, fg_iou_thresh, bg_iou_thresh, float("-inf"), True
    )
    pos_mask, neg_mask = sample_balanced(matched, batch_size_per_image, positive_fraction, generator)
    labels = torch.where(pos_mask, 1, torch.where(neg_mask, 0, -1))
    compute_dtype = compute_dtype_of(anchors.dtype)
    matched_gt = _gather_boxes(gt_boxes, matched.clamp(min=0)).to(compute_dtype)
    encoded = _encode(matched_gt, anchors.to(compute_dtype).expand_as(matched_gt), weights)
    regression = torch.where(pos_mask[..., None], encoded, 0)
    return AnchorTargets(labels, regression, matched)


def _sampled_slots(
    matched: torch.Tensor, keys: torch.Tensor, batch_size_per_image: int, positive_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_balanced` on the drawn ``keys [B, N]``, compacted: ``[B, N]`` matched indices
    -> (index ``[B, S]`` into N, the sampled candidates first in index order, torchvision's order;
    unfilled ``[B, S]`` bool, the slots holding none), S = ``batch_size_per_image``.

    The same sets as :func:`sample_balanced` with the same keys, in a third of its small ops (they
    cost more than their arithmetic at 512 slots): the sampled positives are those whose key is at
    most the ``int(S * positive_fraction)``-th smallest positive key (every positive when there are
    fewer); one ``topk`` then takes them (key -1), the negatives by key and, in unfilled slots,
    non-members; a sort puts the slots in index order. Fixed shapes, no host sync. (Equal keys
    at the cut, which fp64 keys make practically impossible, would be taken together.)"""
    batch, num_candidates = matched.shape
    max_positive = min(int(batch_size_per_image * positive_fraction), num_candidates)
    slot_keys = keys.masked_fill(matched != BELOW_LOW_THRESHOLD, _NON_MEMBER_KEY)  # negatives' keys
    if max_positive > 0:
        member_keys = keys.masked_fill(matched < 0, _NON_MEMBER_KEY)
        # Every key is below 1: the cut of fewer positives than max_positive (a non-member's key)
        # lowered to 1 takes them all and no non-member.
        cut = member_keys.kthvalue(max_positive, dim=1, keepdim=True).values.clamp_(max=1.0)
        slot_keys.masked_fill_(member_keys <= cut, -1.0)
    slots = min(batch_size_per_image, num_candidates)
    taken, index = slot_keys.topk(slots, dim=1, largest=False)
    unfilled = taken >= _NON_MEMBER_KEY  # a suffix: topk sorts its values
    index = index.masked_fill_(unfilled, num_candidates - 1).sort(dim=1).values  # unfilled slots last
    pad = batch_size_per_image - slots
    if pad:  # fewer candidates than slots: pad statically
        index = torch.cat([index, index.new_zeros((batch, pad))], dim=1)
        unfilled = torch.cat([unfilled, unfilled.new_ones((batch, pad))], dim=1)
    return index, unfilled


def _sampled_slots_cpu(
    positive: torch.Tensor,
    negative: torch.Tensor,
    keys: torch.Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast CPU path of :func:`_sampled_slots`, from the candidates' masks ``positive`` (matched
    ``>= 0``) and ``negative`` (matched ``== -1``) ``[B, N]``: the same (index ``[B, S]``, unfilled
    ``[B, S]``) at the filled slots (an unfilled slot's index is 0, the output masks it).

    The same cuts, each a ``kthvalue``, take the place of ``topk`` and ``sort``: the sampled
    candidates are those whose slot key (chosen positives -1, negatives their key, non-members 2)
    is at most the ``min(S, N)``-th smallest, lowered to 1 (every member when there are fewer); a
    cumulative sum numbers them in index order, and one ``scatter`` writes each index to its slot
    (the unsampled ones to a column dropped after). Equal keys at a cut, which fp64 keys make
    practically impossible, would be taken together, the extras past slot S dropped."""
    batch, num_candidates = positive.shape
    max_positive = min(int(batch_size_per_image * positive_fraction), num_candidates)
    slots = min(batch_size_per_image, num_candidates)
    if slots == 0:  # no slots or no candidates: every slot unfilled
        unfilled = positive.new_ones((batch, batch_size_per_image))
        return torch.zeros_like(unfilled, dtype=torch.int64), unfilled
    slot_keys = torch.where(negative, keys, _NON_MEMBER_KEY)
    if max_positive > 0:
        member_keys = torch.where(positive, keys, _NON_MEMBER_KEY)
        cut = member_keys.kthvalue(max_positive, dim=1, keepdim=True).values.clamp_(max=1.0)
        slot_keys.masked_fill_(member_keys <= cut, -1.0)
    cut = slot_keys.kthvalue(slots, dim=1, keepdim=True).values.clamp_(max=1.0)
    sampled = slot_keys <= cut  # [B, N]
    slot = sampled.cumsum(1)  # [B, N]: 1 + the slot of a sampled candidate
    unfilled = torch.arange(batch_size_per_image, device=positive.device) >= slot[:, -1:]
    # Column 0 collects the unsampled candidates; N columns more hold every candidate.
    width = 1 + max(num_candidates, batch_size_per_image)
    candidates = torch.arange(num_candidates, device=positive.device).expand(batch, num_candidates)
    index = positive.new_zeros((batch, width), dtype=torch.int64).scatter_(1, slot.mul_(sampled), candidates)
    return index[:, 1 : batch_size_per_image + 1], unfilled


def _candidate_padding(
    proposal_count: torch.Tensor, gt_count: torch.Tensor, num_proposals: int, num_gt: int, device: torch.device
) -> torch.Tensor:
    """``[B, P + G]`` bool: the padding slots of the candidates ``cat([proposals, gt_boxes], 1)``."""
    return torch.cat(
        [
            torch.arange(num_proposals, device=device) >= proposal_count[:, None],
            torch.arange(num_gt, device=device) >= gt_count[:, None],
        ],
        dim=1,
    )


class ProposalTargets(NamedTuple):
    """S = batch_size_per_image slots per image, sampled positives and negatives first in index order.

    proposals ``[B, S, 4]``: the sampled boxes (zeros in padding slots);
    labels ``[B, S]`` int64: matched ground truth's class for foreground, 0 background, -1 padding;
    regression_targets ``[B, S, 4]``: the encoded matched ground truth of foreground slots, 0 elsewhere:
    the target of the label's class row of the class-specific regressor (the paper's ``[B, S, C, 4]``
    targets are zero outside that row and weighted 0 there, so the loss gathers the predicted
    deltas of the label's class, as torchvision's ``fastrcnn_loss``, instead of building them);
    matched_idx ``[B, S]`` int64: matched ground-truth index for foreground, -1 otherwise;
    sampled_idx ``[B, S]`` int64: index into ``cat([proposals, gt_boxes], 1)``, -1 for padding."""

    proposals: torch.Tensor
    labels: torch.Tensor
    regression_targets: torch.Tensor
    matched_idx: torch.Tensor
    sampled_idx: torch.Tensor


def proposal_targets(
    proposals: torch.Tensor,
    proposal_count: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_count: torch.Tensor,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    bg_iou_thresh_low: float,
    batch_size_per_image: int,
    positive_fraction: float,
    weights: tuple[float, ...],
    generator: torch.Generator | None,
) -> ProposalTargets:
    """Proposal target layer on validated inputs (see ``tritondet.ops.proposal_targets``)."""
    args = (proposals, proposal_count, gt_boxes, gt_labels, gt_count, fg_iou_thresh, bg_iou_thresh, bg_iou_thresh_low)
    # The CPU path reads the counts and sizes its steps from them: not while compiling, where the
    # fixed-shape path traces in one graph.
    if use_fast_cpu(proposals.device, calls_torchvision=False) and not torch.compiler.is_compiling():
        return proposal_targets_cpu(*args, batch_size_per_image, positive_fraction, weights, generator)
    batch, num_proposals, num_gt = proposals.shape[0], proposals.shape[1], gt_boxes.shape[1]
    device = proposals.device
    candidates = torch.cat([proposals, gt_boxes], dim=1)  # [B, P + G, 4]: ground truth appended
    padding = _candidate_padding(proposal_count, gt_count, num_proposals, num_gt, device)
    # >= fg: foreground; [bg_low, bg_high): background (-1); below bg_low and padding: -3, never sampled.
    matched = torch.ops.tritondet.match_boxes(
        candidates, gt_boxes, gt_count, fg_iou_thresh, bg_iou_thresh, bg_iou_thresh_low, False
    )
    matched.masked_fill_(padding, BELOW_FLOOR)
    index, unfilled = _sampled_slots(matched, _sample_keys(matched, generator), batch_size_per_image, positive_fraction)

    compute_dtype = compute_dtype_of(candidates.dtype)
    sampled_boxes = _gather_boxes(candidates, index).masked_fill_(unfilled[..., None], 0).to(compute_dtype)
    # Sampled slots hold foreground (>= 0) or background (BELOW_LOW_THRESHOLD, -1): with the
    # unfilled slots set to -1 too, these are the output's matched indices.
    sampled_matched = matched.gather(1, index).masked_fill_(unfilled, BELOW_LOW_THRESHOLD)
    background = sampled_matched < 0  # background and unfilled slots
    gt_index = sampled_matched.clamp(min=0)
    if num_gt == 0:
        gt_labels = gt_labels.new_zeros((batch, 1))
    labels = gt_labels.gather(1, gt_index).to(torch.int64).masked_fill_(background, 0).masked_fill_(unfilled, -1)

    matched_gt = _gather_boxes(gt_boxes, gt_index).to(compute_dtype)
    encoded = _encode(matched_gt, sampled_boxes, weights)  # [B, S, 4]
    return ProposalTargets(
        sampled_boxes,
        labels,
        encoded.masked_fill_(background[..., None], 0),
        sampled_matched,
        index.masked_fill_(unfilled, -1),
    )


def proposal_targets_cpu(
    proposals: torch.Tensor,
    proposal_count: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_count: torch.Tensor,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    bg_iou_thresh_low: float,
    batch_size_per_image: int,
    positive_fraction: float,
    weights: tuple[float, ...],
    generator: torch.Generator | None,
) -> ProposalTargets:
    """The fast CPU path of :func:`proposal_targets`, its result for the same ``generator`` state
    (host read: the counts). Matching needs only each candidate's best IoU (``amax``, a tenth of
    ``Tensor.max``'s time over the ground truth) to class it foreground or background; the
    matched index (``Tensor.max``'s, as the matcher's) is taken for the S sampled slots only. The
    slots come from :func:`_sampled_slots_cpu`, the targets from the box coder's CPU path."""
    batch, num_proposals, num_gt = proposals.shape[0], proposals.shape[1], gt_boxes.shape[1]
    device = proposals.device
    candidates = torch.cat([proposals, gt_boxes], dim=1)  # [B, P + G, 4]: ground truth appended
    counts = gt_count.tolist()
    iou = None
    if max(counts, default=0) > 0:
        iou, _ = ground_truth_iou_cpu(candidates, gt_boxes, gt_count, counts)  # [B, G_used, P + G]
        best = iou.amax(dim=1)
        # The matcher's classes: a NaN best (some NaN IoU) is foreground, as Tensor.max takes it.
        below_fg = best < fg_iou_thresh
        positive = ~below_fg
        below_bg = below_fg if bg_iou_thresh == fg_iou_thresh else best < bg_iou_thresh
        negative = below_bg.logical_and_(best >= bg_iou_thresh_low)
        if min(counts) == 0:  # images without ground truth: every candidate is background
            negative.logical_or_(gt_count[:, None] == 0)
    else:
        positive = torch.zeros(candidates.shape[:2], dtype=torch.bool, device=device)
        negative = torch.ones_like(positive)
    if min(proposal_count.tolist(), default=num_proposals) < num_proposals or min(counts, default=num_gt) < num_gt:
        padding = _candidate_padding(proposal_count, gt_count, num_proposals, num_gt, device)
        positive.masked_fill_(padding, False)
        negative.masked_fill_(padding, False)
    keys = _sample_keys(positive, generator)
    index, unfilled = _sampled_slots_cpu(positive, negative, keys, batch_size_per_image, positive_fraction)

    compute_dtype = compute_dtype_of(candidates.dtype)
    sampled_boxes = _gather_boxes(candidates, index).masked_fill_(unfilled[..., None], 0).to(compute_dtype)
    background = positive.gather(1, index).logical_not_().logical_or_(unfilled)  # background and unfilled slots
    if iou is None:
        gt_index = torch.zeros_like(index)
    else:
        gt_index = iou.gather(2, index[:, None].expand(-1, iou.shape[1], -1)).max(dim=1).indices
    if num_gt == 0:
        gt_labels = gt_labels.new_zeros((batch, 1))
    labels = gt_labels.gather(1, gt_index).to(torch.int64).masked_fill_(background, 0).masked_fill_(unfilled, -1)
    matched_gt = _gather_boxes(gt_boxes, gt_index).to(compute_dtype)
    encoded = encode_cpu(matched_gt.reshape(-1, 4), sampled_boxes.reshape(-1, 4), list(weights))
    return ProposalTargets(
        sampled_boxes,
        labels,
        encoded.reshape(matched_gt.shape).masked_fill_(background[..., None], 0),
        gt_index.masked_fill(background, BELOW_LOW_THRESHOLD),
        index.masked_fill(unfilled, -1),
    )


# No kernel of its own: the compiled code is the matcher's and the box coder's.
# None: this family launches no kernel of its own.
EXACT_KERNELS: frozenset = frozenset()
AOT_SPECS = []
PUBLIC_OPS = ("sample_balanced", "anchor_targets", "proposal_targets")
