"""The public op namespace: ``from tritondet import ops`` replaces ``from torchvision import ops``.

Every op that torchvision.ops has keeps torchvision's name, signature, defaults, dtypes and
results. This module only validates arguments and dispatches to the ``torch.library`` ops
registered in :mod:`tritondet.kernels`; each op's kernel, launcher and reference live there, one
file per op family.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor

from ._validate import check_choice, check_counts, check_same_device, check_tensor
from .kernels import box_iou as _box_iou_family

__all__ = [
    "batched_box_iou",
    "box_iou",
    "complete_box_iou",
    "distance_box_iou",
    "generalized_box_iou",
    "match_boxes",
]

_ROTATED_FORMATS = ("cxcywhr", "xywhr", "xyxyxyxy")


# ----------------------------------------------------------------------------------------------
# IoU family
# ----------------------------------------------------------------------------------------------


def _pairwise(boxes1: Tensor, boxes2: Tensor, kind: str, fmt: str = "xyxy", eps: float = 1e-7) -> Tensor:
    """``[..., N, 4] x [..., M, 4] -> [..., N, M]`` with broadcast leading dimensions."""
    check_tensor("boxes1", boxes1, min_dim=2, last_dim=4)
    check_tensor("boxes2", boxes2, min_dim=2, last_dim=4)
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    try:
        batch_shape = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError as error:
        raise ValueError(
            f"boxes1 and boxes2 leading dimensions do not broadcast: {tuple(boxes1.shape[:-2])} and "
            f"{tuple(boxes2.shape[:-2])}"
        ) from error
    if boxes1.dtype != boxes2.dtype:
        common = torch.promote_types(boxes1.dtype, boxes2.dtype)
        boxes1, boxes2 = boxes1.to(common), boxes2.to(common)
    n, m = boxes1.shape[-2], boxes2.shape[-2]
    batch = math.prod(batch_shape)
    flat1 = boxes1.expand(*batch_shape, n, 4).reshape(batch, n, 4)
    flat2 = boxes2.expand(*batch_shape, m, 4).reshape(batch, m, 4)
    result = torch.ops.tritondet.pairwise_box_iou(flat1, flat2, kind, fmt, float(eps))
    return result.reshape(*batch_shape, n, m)


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Intersection over union of every pair of boxes.

    Args:
        boxes1 (Tensor[..., N, 4]): first set of boxes in format ``fmt``.
        boxes2 (Tensor[..., M, 4]): second set; leading dimensions broadcast with boxes1's.
        fmt (str): ``"xyxy"`` (default), ``"xywh"`` or ``"cxcywh"``; the rotated formats
            ``"cxcywhr"``, ``"xywhr"`` and ``"xyxyxyxy"`` are passed to torchvision's rotated op.

    Returns:
        Tensor[..., N, M]: fp32 (fp64 for fp64 boxes), NaN where the union is zero.
    """
    if fmt in _ROTATED_FORMATS:
        return torchvision.ops.box_iou(boxes1, boxes2, fmt=fmt)
    check_choice("fmt", fmt, _box_iou_family.BOX_FORMATS + _ROTATED_FORMATS)
    return _pairwise(boxes1, boxes2, "iou", fmt)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of every pair of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes1 (Tensor[..., N, 4]), boxes2 (Tensor[..., M, 4]).

    Returns:
        Tensor[..., N, M]: fp32 (fp64 for fp64 boxes).
    """
    return _pairwise(boxes1, boxes2, "giou")


def distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Distance IoU (Zheng et al. 2020) of every pair of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes1 (Tensor[..., N, 4]), boxes2 (Tensor[..., M, 4]).
        eps (float): added to the squared hull diagonal against division by zero.

    Returns:
        Tensor[..., N, M]: fp32 (fp64 for fp64 boxes).
    """
    return _pairwise(boxes1, boxes2, "diou", eps=eps)


def complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU (Zheng et al. 2020) of every pair of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes1 (Tensor[..., N, 4]), boxes2 (Tensor[..., M, 4]).
        eps (float): added to denominators against division by zero.

    Returns:
        Tensor[..., N, M]: fp32 (fp64 for fp64 boxes).
    """
    return _pairwise(boxes1, boxes2, "ciou", eps=eps)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair within each image of a batch, in one kernel launch.

    Args:
        boxes1 (Tensor[B, N, 4]), boxes2 (Tensor[B, M, 4]): ``(x1, y1, x2, y2)`` boxes.

    Returns:
        Tensor[B, N, M]: fp32 (fp64 for fp64 boxes).
    """
    check_tensor("boxes1", boxes1, last_dim=4)
    check_tensor("boxes2", boxes2, last_dim=4)
    if boxes1.dim() != 3 or boxes2.dim() != 3:
        raise ValueError(
            f"boxes1 and boxes2 must be [B, N, 4] and [B, M, 4], got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(
            f"boxes1 and boxes2 must have the same batch size, got {boxes1.shape[0]} and {boxes2.shape[0]}"
        )
    return _pairwise(boxes1, boxes2, "iou")


# ----------------------------------------------------------------------------------------------
# Training targets: matching
# ----------------------------------------------------------------------------------------------


def _check_gt(gt_boxes: Tensor, gt_count) -> Tensor:
    """Validate ``gt_boxes [B, G, 4]`` and ``gt_count [B]``; the counts as int64 on the boxes' device."""
    check_tensor("gt_boxes", gt_boxes, last_dim=4)
    if gt_boxes.dim() != 3:
        raise ValueError(f"gt_boxes must have shape [B, G, 4], got {tuple(gt_boxes.shape)}")
    if not isinstance(gt_count, Tensor):
        gt_count = torch.as_tensor(gt_count)
    if gt_count.shape != (gt_boxes.shape[0],):
        raise ValueError(f"gt_count must have shape [B] = [{gt_boxes.shape[0]}], got {tuple(gt_count.shape)}")
    check_counts("gt_count", gt_count, gt_boxes.shape[1])
    return gt_count.to(device=gt_boxes.device, dtype=torch.int64, non_blocking=True).contiguous()


def _batched_boxes(name: str, boxes: Tensor, batch: int) -> Tensor:
    """``[A, 4]`` (shared by every image, expanded without a copy) or ``[B, A, 4]`` -> ``[B, A, 4]``."""
    check_tensor(name, boxes, last_dim=4)
    if boxes.dim() == 2:
        return boxes.expand(batch, *boxes.shape)
    if boxes.dim() != 3 or boxes.shape[0] != batch:
        raise ValueError(f"{name} must have shape [A, 4] or [B, A, 4] with B = {batch}, got {tuple(boxes.shape)}")
    return boxes


def _match(anchors: Tensor, gt_boxes: Tensor, gt_count, high: float, low: float, allow_low: bool, floor: float):
    if not low <= high:
        raise ValueError(f"low must be <= high, got low={low} and high={high}")
    gt_count = _check_gt(gt_boxes, gt_count)
    anchors = _batched_boxes("anchors_or_proposals", anchors, gt_boxes.shape[0])
    check_same_device(anchors_or_proposals=anchors, gt_boxes=gt_boxes)
    if anchors.dtype != gt_boxes.dtype:
        common = torch.promote_types(anchors.dtype, gt_boxes.dtype)
        anchors, gt_boxes = anchors.to(common), gt_boxes.to(common)
    return torch.ops.tritondet.match_boxes(
        anchors, gt_boxes, gt_count, float(high), float(low), float(floor), bool(allow_low)
    )


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
    return _match(anchors_or_proposals, gt_boxes, gt_count, high, low, allow_low_quality_matches, float("-inf"))
