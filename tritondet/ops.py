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

from ._validate import check_choice, check_floating, check_same_device, check_tensor
from .kernels import box_iou as _box_iou_family
from .kernels import nms as _nms_family

__all__ = [
    "batched_box_iou",
    "batched_nms",
    "batched_nms_padded",
    "box_iou",
    "complete_box_iou",
    "distance_box_iou",
    "generalized_box_iou",
    "nms",
    "soft_nms",
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
# NMS family
# ----------------------------------------------------------------------------------------------


def _check_nms_inputs(boxes: Tensor, scores: Tensor, **extra: Tensor) -> None:
    check_tensor("boxes", boxes, last_dim=4)
    check_floating("boxes", boxes)
    check_tensor("scores", scores)
    check_floating("scores", scores)
    if boxes.dim() != 2:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape [N] = [{boxes.shape[0]}] like boxes, got {tuple(scores.shape)}")
    for name, value in extra.items():
        check_tensor(name, value)
        if value.dim() != 1 or value.shape[0] != boxes.shape[0]:
            raise ValueError(f"{name} must have shape [N] = [{boxes.shape[0]}] like boxes, got {tuple(value.shape)}")
    check_same_device(boxes=boxes, scores=scores, **extra)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: drop every box whose IoU with a higher-scoring kept box is
    greater than ``iou_threshold``.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes (floating point); IoU in fp32 (fp64 for fp64).
        scores (Tensor[N]): one score per box. Equal scores keep their input order; NaN scores
            count as lower than every other score (never kept ahead of a finite score).
        iou_threshold (float): suppress when IoU > iou_threshold (strictly).

    Returns:
        Tensor[K]: int64 indices of the kept boxes, by decreasing score. On the GPU the greedy pass
        runs on the device; the only host sync is learning K.
    """
    _check_nms_inputs(boxes, scores)
    return torch.ops.tritondet.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression within each category: boxes with different ``idxs`` never suppress
    each other.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]), iou_threshold (float): as in :func:`nms`.
        idxs (Tensor[N]): integer category of each box.

    Returns:
        Tensor[K]: int64 indices of the kept boxes, by decreasing score. All categories run as
        independent segments in two kernel launches (a block-diagonal bit mask, one bit per box
        pair of a category: 100,000 boxes of one category take 1.25 GB). Host syncs: two (the mask
        size, then K); no Python loop over categories.
    """
    _check_nms_inputs(boxes, scores, idxs=idxs)
    if idxs.is_floating_point():
        raise TypeError(f"idxs must be an integer tensor, got dtype {idxs.dtype}")
    return torch.ops.tritondet.batched_nms(boxes, scores, idxs, float(iou_threshold))


def batched_nms_padded(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    max_output: int,
    score_threshold: float = 0.0,
    class_agnostic: bool = False,
    pre_nms_top_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-image, per-class NMS with fixed output shapes and no host sync (like TensorRT's
    EfficientNMS): it traces under ``torch.compile(fullgraph=True)`` and captures in CUDA graphs.

    Per image, the result equals torchvision's ``batched_nms`` (labels as categories) over the
    candidates whose score is greater than ``score_threshold``, truncated to ``max_output``.

    Args:
        boxes (Tensor[B, N, 4] or Tensor[B, N, C, 4]): ``(x1, y1, x2, y2)`` boxes, shared by all
            classes or one per class.
        scores (Tensor[B, N] or Tensor[B, N, C]): a candidate is a (box, class) pair; ``[B, N]``
            means one class (label 0).
        iou_threshold (float): suppress when IoU > iou_threshold.
        max_output (int): detections returned per image.
        score_threshold (float): candidates need score > score_threshold (NaN never passes).
        class_agnostic (bool): one NMS over all classes of an image instead of one per class.
        pre_nms_top_n (int, optional): keep only the highest-scoring ``pre_nms_top_n`` candidates
            of each class (of each image when class agnostic) before NMS. Bounds the work: the
            GPU mask takes ``B * segments * L * ceil(L / 32)`` int32 words, L = min(pool, top n).

    Returns:
        boxes (Tensor[B, max_output, 4]), scores (Tensor[B, max_output]),
        labels (Tensor[B, max_output], int64), indices (Tensor[B, max_output], int64, into N),
        num_valid (Tensor[B], int64): slots past ``num_valid`` hold zeros (indices -1). Within an
        image, detections are by decreasing score (ties: lower class first, then input order).

    Kernel launches: 2 on the Triton backend (suppression mask, greedy pass), whatever the data;
    no host sync on either backend. The work is static, sized by the shapes: the CPU path costs
    ``B * segments * L^2 / 2`` box pairs (0.3-0.7 s per image at N = 1000, C = 91 on one core),
    so bound L with ``pre_nms_top_n`` where the pool is large.
    """
    check_tensor("boxes", boxes, last_dim=4)
    check_floating("boxes", boxes)
    check_tensor("scores", scores)
    check_floating("scores", scores)
    if scores.dim() not in (2, 3):
        raise ValueError(f"scores must have shape [B, N] or [B, N, C], got {tuple(scores.shape)}")
    if tuple(boxes.shape[:2]) != tuple(scores.shape[:2]) or boxes.dim() not in (3, 4):
        raise ValueError(
            f"boxes must have shape [B, N, 4] or [B, N, C, 4] with scores' B, N, got {tuple(boxes.shape)} "
            f"for scores {tuple(scores.shape)}"
        )
    if boxes.dim() == 4 and (scores.dim() != 3 or boxes.shape[2] != scores.shape[2]):
        raise ValueError(
            f"class-specific boxes {tuple(boxes.shape)} need scores of shape [B, N, C] with the same C, "
            f"got {tuple(scores.shape)}"
        )
    check_same_device(boxes=boxes, scores=scores)
    if not isinstance(max_output, int) or max_output < 0:
        raise ValueError(f"max_output must be a non-negative int, got {max_output!r}")
    if pre_nms_top_n is not None and (not isinstance(pre_nms_top_n, int) or pre_nms_top_n < 0):
        raise ValueError(f"pre_nms_top_n must be None or a non-negative int, got {pre_nms_top_n!r}")
    return torch.ops.tritondet.batched_nms_padded(
        boxes,
        scores,
        float(iou_threshold),
        max_output,
        float(score_threshold),
        bool(class_agnostic),
        pre_nms_top_n,
    )


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "gaussian",
) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017): instead of dropping overlapping boxes, decay their scores.

    Repeatedly select the remaining box with the highest score (the lowest index among ties),
    then multiply every other remaining score by ``exp(-IoU^2 / sigma)`` (``"gaussian"``) or, where
    IoU > ``iou_threshold``, by ``1 - IoU`` (``"linear"``); boxes whose score falls below
    ``score_threshold`` are dropped. NaN scores are never selected.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): initial scores.

    Returns:
        keep (Tensor[K], int64): selected indices in selection order (decreasing new score).
        scores (Tensor[K]): their decayed scores when selected, in scores' dtype.
    """
    _check_nms_inputs(boxes, scores)
    check_choice("method", method, _nms_family.SOFT_NMS_METHODS)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    return torch.ops.tritondet.soft_nms(
        boxes, scores, float(iou_threshold), float(sigma), float(score_threshold), method
    )
