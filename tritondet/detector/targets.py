"""Ground truth for training: validation, padding to a batch, and the two target layers.

Shapes: B images, G ground-truth slots (the first ``count[b]`` real), A anchors, P proposals.

The anchor target layer (RPN labels and regression targets) and the proposal target layer (box-head
samples, labels, the regression target of each sample's class row) are
:func:`tritondet.ops.anchor_targets` and :func:`tritondet.ops.proposal_targets`: batched, fixed
shapes, no host sync. This module turns
torchvision-style ``targets`` (a list of dicts) into their padded inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import ops
from .config import RoIHeadsConfig, RPNConfig


class GroundTruth(NamedTuple):
    """boxes ``[B, G, 4]`` fp32 xyxy (zeros past count), labels ``[B, G]`` int64 (0 past count),
    count ``[B]`` int64."""

    boxes: Tensor
    labels: Tensor
    count: Tensor


def check_targets(targets, num_images: int, num_classes: int) -> None:
    """Raise ``ValueError`` naming the image and field of the first bad target.

    Each target is a dict with ``boxes`` (floating ``[G, 4]`` xyxy with x2 > x1 and y2 > y1, as
    torchvision requires) and ``labels`` (integer ``[G]`` in ``[1, num_classes)``; 0 is background).
    Reads the values back to the host: a training-time check, like torchvision's.
    """
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"targets must be a list of dicts (one per image), got {type(targets).__name__}")
    if len(targets) != num_images:
        raise ValueError(f"targets has {len(targets)} entries for {num_images} images")
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels', got {type(target).__name__}")
        for key in ("boxes", "labels"):
            if key not in target:
                raise ValueError(f"targets[{i}] is missing the field {key!r}")
            if not isinstance(target[key], Tensor):
                raise ValueError(f"targets[{i}][{key!r}] must be a Tensor, got {type(target[key]).__name__}")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(
                f"targets[{i}]['boxes'] must be a floating Tensor[G, 4], got {boxes.dtype} {tuple(boxes.shape)}"
            )
        if labels.shape != boxes.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"targets[{i}]['labels'] must be an integer Tensor[G] with G = {boxes.shape[0]}, got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if boxes.shape[0] == 0:
            continue
        finite = torch.isfinite(boxes).all(dim=1)
        degenerate = ~finite | (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            j = int(degenerate.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is invalid: boxes need x2 > x1 and y2 > y1 "
                "(finite xyxy)"
            )
        bad = (labels < 1) | (labels >= num_classes)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}]['labels'][{j}] = {int(labels[j])} is out of range: labels must be in "
                f"[1, {num_classes}) (0 is background)"
            )


def pack_targets(targets, device: torch.device) -> GroundTruth:
    """Pad a list of ``{"boxes", "labels"}`` dicts into a :class:`GroundTruth` on ``device``.

    Counts come from shapes (no host sync); one small copy per image (B is small and fixed).
    """
    batch = len(targets)
    counts = [int(t["boxes"].shape[0]) for t in targets]
    slots = max(counts, default=0)
    boxes = torch.zeros((batch, slots, 4), dtype=torch.float32, device=device)
    labels = torch.zeros((batch, slots), dtype=torch.int64, device=device)
    for i, target in enumerate(targets):
        boxes[i, : counts[i]] = target["boxes"].to(device=device, dtype=torch.float32)
        labels[i, : counts[i]] = target["labels"].to(device=device, dtype=torch.int64)
    return GroundTruth(boxes, labels, torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True))


def anchor_target_layer(
    anchors: Tensor, gt: GroundTruth, config: RPNConfig, generator: torch.Generator | None = None
) -> ops.AnchorTargets:
    """RPN targets for ``anchors [A, 4]``: labels ``[B, A]`` (1 fg, 0 bg, -1 unsampled) and
    ``regression_targets [B, A, 4]`` (weights 1, 1, 1, 1)."""
    return ops.anchor_targets(
        anchors,
        gt.boxes,
        gt.count,
        fg_iou_thresh=config.fg_iou_thresh,
        bg_iou_thresh=config.bg_iou_thresh,
        batch_size_per_image=config.batch_size_per_image,
        positive_fraction=config.positive_fraction,
        generator=generator,
    )


def proposal_target_layer(
    proposals: Tensor,
    num_valid: Tensor,
    gt: GroundTruth,
    config: RoIHeadsConfig,
    generator: torch.Generator | None = None,
) -> ops.ProposalTargets:
    """Box-head samples for padded ``proposals [B, P, 4]`` (first ``num_valid[b]`` real), ground
    truth appended: ``S = batch_size_per_image`` slots per image (see ``ops.proposal_targets``)."""
    return ops.proposal_targets(
        proposals,
        gt.boxes,
        gt.labels,
        gt.count,
        config.num_classes,
        proposal_count=num_valid,
        fg_iou_thresh=config.fg_iou_thresh,
        bg_iou_thresh=config.bg_iou_thresh,
        bg_iou_thresh_low=config.bg_iou_thresh_low,
        batch_size_per_image=config.batch_size_per_image,
        positive_fraction=config.positive_fraction,
        weights=config.bbox_reg_weights,
        generator=generator,
    )
