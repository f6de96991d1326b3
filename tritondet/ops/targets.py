"""Training targets: ``match_boxes`` (torchvision's ``Matcher``), ``sample_balanced``, the anchor
target layer (``anchor_targets``) and the proposal target layer (``proposal_targets``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError
from ..kernels import targets as _targets_family
from ._checks import box_coder_weights, check_counts, check_floating, check_real, check_same_device, check_tensor


def _check_gt(gt_boxes: Tensor, gt_count) -> Tensor:
    """Validate ``gt_boxes [B, G, 4]`` and ``gt_count [B]``; the counts as int64 on the boxes' device."""
    check_tensor("gt_boxes", gt_boxes, last_dim=4)
    if gt_boxes.dim() != 3:
        raise ArgumentValueError(f"gt_boxes must have shape [B, G, 4], got {tuple(gt_boxes.shape)}")
    if not isinstance(gt_count, Tensor):
        gt_count = torch.as_tensor(gt_count)
    if gt_count.shape != (gt_boxes.shape[0],):
        raise ArgumentValueError(f"gt_count must have shape [B] = [{gt_boxes.shape[0]}], got {tuple(gt_count.shape)}")
    check_counts("gt_count", gt_count, gt_boxes.shape[1])
    return gt_count.to(device=gt_boxes.device, dtype=torch.int64, non_blocking=True).contiguous()


def _batched_boxes(name: str, boxes: Tensor, batch: int) -> Tensor:
    """``[A, 4]`` (shared by every image, expanded without a copy) or ``[B, A, 4]`` -> ``[B, A, 4]``."""
    check_tensor(name, boxes, last_dim=4)
    if boxes.dim() == 2:
        return boxes.expand(batch, *boxes.shape)
    if boxes.dim() != 3 or boxes.shape[0] != batch:
        raise ArgumentValueError(
            f"{name} must have shape [A, 4] or [B, A, 4] with B = {batch}, got {tuple(boxes.shape)}"
        )
    return boxes


def match_boxes(
    anchors_or_proposals: Tensor,
    gt_boxes: Tensor,
    gt_count,
    high: float,
    low: float,
    allow_low_quality_matches: bool = False,
) -> Tensor:
    """Match every anchor (or proposal) to a ground-truth box, as torchvision's ``Matcher``.

    Equal, image by image, to ``Matcher(high, low, allow_low_quality_matches)`` applied to
    ``box_iou(gt_boxes[b, :gt_count[b]], anchors)``, without building the IoU matrix on the GPU:
    two kernel launches, O(B·(A + G)) extra memory, no host sync.

    Args:
        anchors_or_proposals (Tensor[A, 4] or Tensor[B, A, 4]): xyxy boxes, shared or per image.
        gt_boxes (Tensor[B, G, 4]): xyxy ground truth, padded; only the first ``gt_count[b]``
            rows of image ``b`` are used.
        gt_count (Tensor[B] or sequence of int): real ground-truth boxes per image, in ``[0, G]``.
        high (float): IoU at or above which a match is kept.
        low (float): IoU below which an anchor is background (-1); ``[low, high)`` gives -2.
        allow_low_quality_matches (bool): also keep the best match of every anchor that attains
            some ground truth's highest IoU (ties included).

    Returns:
        Tensor[B, A] int64: matched ground-truth index, -1 (below ``low``) or -2 (between);
        -1 everywhere for images without ground truth (torchvision raises there).
    """
    check_real("high", high)
    check_real("low", low)
    if not low <= high:
        raise ArgumentValueError(f"low must be <= high, got low={low} and high={high}")
    gt_count = _check_gt(gt_boxes, gt_count)
    anchors = _batched_boxes("anchors_or_proposals", anchors_or_proposals, gt_boxes.shape[0])
    check_same_device(anchors_or_proposals=anchors, gt_boxes=gt_boxes)
    if anchors.dtype != gt_boxes.dtype:
        common = torch.promote_types(anchors.dtype, gt_boxes.dtype)
        anchors, gt_boxes = anchors.to(common), gt_boxes.to(common)
    # floor -inf: the public op never returns the internal -3 (see kernels/matcher.py).
    return torch.ops.tritondet.match_boxes(
        anchors, gt_boxes, gt_count, float(high), float(low), float("-inf"), bool(allow_low_quality_matches)
    )


def _check_sampling(batch_size_per_image: int, positive_fraction: float, generator, device: torch.device) -> None:
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) or batch_size_per_image < 0:
        raise ArgumentValueError(f"batch_size_per_image must be a non-negative int, got {batch_size_per_image!r}")
    check_real("positive_fraction", positive_fraction)
    if not 0.0 <= positive_fraction <= 1.0:
        raise ArgumentValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ArgumentValueError(
            f"generator must be on the {device.type} device of the boxes, got a {generator.device.type} one"
        )


def sample_balanced(
    matched_idx: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample positives and negatives per image, as torchvision's ``BalancedPositiveNegativeSampler``.

    Per image: positives are ``matched_idx >= 0``, negatives ``matched_idx == -1`` (-2 and other
    negative values are ignored); ``num_pos = min(int(batch_size_per_image * positive_fraction),
    #positives)`` and ``num_neg = min(batch_size_per_image - num_pos, #negatives)`` are drawn
    uniformly at random. Batched, fixed shapes, no host sync; the same ``generator`` state gives
    the same masks.

    Args:
        matched_idx (Tensor[B, N] integer): e.g. the output of :func:`match_boxes`.
        batch_size_per_image (int): e.g. 256 for the RPN, 512 (torchvision) or 128 for the box head.
        positive_fraction (float): e.g. 0.5 for the RPN, 0.25 for the box head.
        generator (torch.Generator, optional): on ``matched_idx``'s device.

    Returns:
        (Tensor[B, N] bool, Tensor[B, N] bool): the sampled positives and negatives.
    """
    check_tensor("matched_idx", matched_idx)
    if matched_idx.is_floating_point() or matched_idx.dim() != 2:
        raise ArgumentValueError(
            f"matched_idx must be an integer tensor of shape [B, N], got {matched_idx.dtype} {tuple(matched_idx.shape)}"
        )
    _check_sampling(batch_size_per_image, positive_fraction, generator, matched_idx.device)
    return _targets_family.sample_balanced(matched_idx, batch_size_per_image, positive_fraction, generator)


def _check_weights(weights) -> tuple[float, ...]:
    if isinstance(weights, Tensor):
        raise ArgumentTypeError("weights must be 4 Python numbers (a tensor would be read back from the device)")
    return tuple(box_coder_weights(weights))


def anchor_targets(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_count,
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    weights=(1.0, 1.0, 1.0, 1.0),
    generator: torch.Generator | None = None,
) -> _targets_family.AnchorTargets:
    """Anchor target layer (RPN training targets) for a batch of images in one call.

    As torchvision's RPN: ``Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)``,
    ``BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)`` and
    ``BoxCoder(weights).encode``; images without ground truth are all background.

    Args:
        anchors (Tensor[A, 4] or Tensor[B, A, 4]): xyxy anchors, shared or per image.
        gt_boxes (Tensor[B, G, 4]), gt_count (Tensor[B] or sequence of int): padded ground truth.
        generator (torch.Generator, optional): for the sampler, on the anchors' device.

    Returns:
        AnchorTargets: labels ``[B, A]`` int64 (1 sampled foreground, 0 sampled background,
        -1 not sampled), regression_targets ``[B, A, 4]`` (fp32, fp64 for fp64 boxes; zero except
        at sampled foreground), matched_idx ``[B, A]`` (see :func:`match_boxes`).
    """
    values = _check_weights(weights)
    check_real("fg_iou_thresh", fg_iou_thresh)
    check_real("bg_iou_thresh", bg_iou_thresh)
    if not bg_iou_thresh <= fg_iou_thresh:
        raise ArgumentValueError(f"bg_iou_thresh must be <= fg_iou_thresh, got {bg_iou_thresh} and {fg_iou_thresh}")
    gt_count = _check_gt(gt_boxes, gt_count)
    _check_sampling(batch_size_per_image, positive_fraction, generator, gt_boxes.device)
    anchors = _batched_boxes("anchors", anchors, gt_boxes.shape[0])
    check_same_device(anchors=anchors, gt_boxes=gt_boxes)
    check_floating("anchors", anchors)
    gt_boxes = gt_boxes.to(anchors.dtype)
    return _targets_family.anchor_targets(
        anchors,
        gt_boxes,
        gt_count,
        fg_iou_thresh,
        bg_iou_thresh,
        batch_size_per_image,
        positive_fraction,
        values,
        generator,
    )


def proposal_targets(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_count,
    num_classes: int,
    proposal_count=None,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.5,
    bg_iou_thresh_low: float = 0.0,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    weights=(10.0, 10.0, 5.0, 5.0),
    generator: torch.Generator | None = None,
) -> _targets_family.ProposalTargets:
    """Proposal target layer (box-head training targets) for a batch of images in one call.

    Appends the ground truth to the proposals, matches at ``fg_iou_thresh`` (foreground: IoU at or
    above it), takes background from ``[bg_iou_thresh_low, bg_iou_thresh)`` (torchvision: 0.0 and
    0.5; Girshick's Fast R-CNN: 0.1 and 0.5; IoUs below ``bg_iou_thresh_low`` are ignored), samples
    ``batch_size_per_image`` with ``positive_fraction`` foreground (torchvision 512 / 0.25, the
    original 128 / 0.25) and encodes the regression targets with ``weights``.

    The class-specific regression targets of the paper (``[B, S, C, 4]``: the encoded box in the
    label's class row, zero and weighted 0 in every other row) are returned compactly, as
    torchvision's ``select_training_samples`` does: ``regression_targets [B, S, 4]`` beside
    ``labels``; the loss gathers the predicted deltas of each foreground slot's label (see
    ``tritondet.detector.roi_heads``).

    Args:
        proposals (Tensor[B, P, 4]): xyxy proposals, padded; the first ``proposal_count[b]`` are real.
        gt_boxes (Tensor[B, G, 4]), gt_labels (Tensor[B, G] integer classes in [1, num_classes)),
        gt_count (Tensor[B] or sequence of int): padded ground truth.
        num_classes (int): C, background (0) included.
        proposal_count (Tensor[B] or sequence of int, optional): all P when omitted.
        generator (torch.Generator, optional): for the sampler, on the proposals' device.

    Returns:
        ProposalTargets with S = ``batch_size_per_image`` slots per image: proposals ``[B, S, 4]``,
        labels ``[B, S]`` (class, 0 background, -1 padding), regression_targets ``[B, S, 4]``
        (fp32, fp64 for fp64 boxes; the label's class row: zero except at foreground),
        matched_idx ``[B, S]``, sampled_idx ``[B, S]``.
    """
    values = _check_weights(weights)
    check_real("bg_iou_thresh_low", bg_iou_thresh_low)
    check_real("bg_iou_thresh", bg_iou_thresh)
    check_real("fg_iou_thresh", fg_iou_thresh)
    if not bg_iou_thresh_low <= bg_iou_thresh <= fg_iou_thresh:
        raise ArgumentValueError(
            "need bg_iou_thresh_low <= bg_iou_thresh <= fg_iou_thresh, got "
            f"{bg_iou_thresh_low}, {bg_iou_thresh} and {fg_iou_thresh}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ArgumentValueError(f"num_classes must be a positive int, got {num_classes!r}")
    gt_count = _check_gt(gt_boxes, gt_count)
    _check_sampling(batch_size_per_image, positive_fraction, generator, gt_boxes.device)
    check_tensor("proposals", proposals, last_dim=4)
    if proposals.dim() != 3 or proposals.shape[0] != gt_boxes.shape[0]:
        raise ArgumentValueError(
            f"proposals must have shape [B, P, 4] with B = {gt_boxes.shape[0]}, got {tuple(proposals.shape)}"
        )
    check_floating("proposals", proposals)
    check_same_device(proposals=proposals, gt_boxes=gt_boxes)
    if proposals.shape[1] + gt_boxes.shape[1] == 0:
        raise ArgumentValueError("proposals and gt_boxes are both empty: there is nothing to sample")
    batch, num_gt = gt_boxes.shape[:2]
    check_tensor("gt_labels", gt_labels)
    if gt_labels.is_floating_point() or gt_labels.shape != (batch, num_gt):
        raise ArgumentValueError(
            f"gt_labels must be an integer tensor of shape [B, G] = [{batch}, {num_gt}], got "
            f"{gt_labels.dtype} {tuple(gt_labels.shape)}"
        )
    real_gt = torch.arange(num_gt, device=gt_boxes.device) < gt_count[:, None]
    check_counts("gt_labels", torch.where(real_gt, gt_labels.to(gt_boxes.device), 0), num_classes - 1)
    if proposal_count is None:
        proposal_count = torch.full((batch,), proposals.shape[1], dtype=torch.int64, device=proposals.device)
    else:
        if not isinstance(proposal_count, Tensor):
            proposal_count = torch.as_tensor(proposal_count)
        if proposal_count.shape != (batch,):
            raise ArgumentValueError(
                f"proposal_count must have shape [B] = [{batch}], got {tuple(proposal_count.shape)}"
            )
        check_counts("proposal_count", proposal_count, proposals.shape[1])
        proposal_count = proposal_count.to(device=proposals.device, dtype=torch.int64, non_blocking=True)
    return _targets_family.proposal_targets(
        proposals,
        proposal_count,
        gt_boxes.to(proposals.dtype),
        gt_labels.to(proposals.device),
        gt_count,
        fg_iou_thresh,
        bg_iou_thresh,
        bg_iou_thresh_low,
        batch_size_per_image,
        positive_fraction,
        values,
        generator,
    )
