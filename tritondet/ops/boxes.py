"""Box overlap and box coding: the IoU family (``box_iou``, generalized, distance and complete IoU,
``batched_box_iou``) and Faster R-CNN's regression targets (``encode_boxes``, ``decode_boxes``)."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

from ..errors import ArgumentValueError
from ..kernels import box_coder as _box_coder_family
from ..kernels import box_iou as _box_iou_family
from ._checks import (
    box_coder_weights,
    check_choice,
    check_floating,
    check_real,
    check_same_device,
    check_tensor,
    traced_call,
)

_ROTATED_FORMATS = ("cxcywhr", "xywhr", "xyxyxyxy")
# torchvision's own function, bound at import: the rotated formats stay torchvision's even where
# torchvision.ops.boxes.box_iou is rebound to this module's box_iou.
_torchvision_box_iou = torchvision.ops.boxes.box_iou


def _check_pairwise(boxes1, boxes2) -> None:
    check_tensor("boxes1", boxes1, min_dim=2, last_dim=4)
    check_tensor("boxes2", boxes2, min_dim=2, last_dim=4)
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    try:
        torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError as error:
        raise ArgumentValueError(
            f"boxes1 and boxes2 leading dimensions do not broadcast: {tuple(boxes1.shape[:-2])} and "
            f"{tuple(boxes2.shape[:-2])}"
        ) from error


def _pairwise(boxes1: Tensor, boxes2: Tensor, kind: str, fmt: str = "xyxy", eps: float = 1e-7) -> Tensor:
    """``[..., N, 4] x [..., M, 4] -> [..., N, M]`` with broadcast leading dimensions."""
    if not torch.jit.is_scripting():
        _check_pairwise(boxes1, boxes2)
    n, m = boxes1.shape[-2], boxes2.shape[-2]
    batch_shape = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    batch = 1
    for size in batch_shape:
        batch *= size
    # Concatenated lists, not starred ones: TorchScript has no starred expressions.
    flat1 = boxes1.expand(list(batch_shape) + [n, 4]).reshape(batch, n, 4)  # noqa: RUF005
    flat2 = boxes2.expand(list(batch_shape) + [m, 4]).reshape(batch, m, 4)  # noqa: RUF005
    result = torch.ops.tritondet.pairwise_box_iou(flat1, flat2, kind, fmt, float(eps))
    return result.reshape(list(batch_shape) + [n, m])  # noqa: RUF005


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Intersection over union of every pair of boxes.

    Args:
        boxes1 (Tensor[..., N, 4]): first set of boxes in format ``fmt``.
        boxes2 (Tensor[..., M, 4]): second set; leading dimensions broadcast with boxes1's.
        fmt (str): ``"xyxy"`` (default), ``"xywh"`` or ``"cxcywh"``; the rotated formats
            ``"cxcywhr"``, ``"xywhr"`` and ``"xyxyxyxy"`` are passed to torchvision's rotated op.

    Returns:
        Tensor[..., N, M]: fp32 (fp64 if either set is fp64), NaN where the union is zero. Sets of
        different dtypes are not promoted first: as torchvision, each set's areas (and the other
        per-box terms of the IoU family) are computed in its own dtype, the pairwise terms in the
        promoted one.
    """
    if not torch.jit.is_scripting():
        traced = traced_call(box_iou, boxes1, boxes2, fmt)
        if traced is not None:
            return traced
        if fmt in _ROTATED_FORMATS:
            return _torchvision_box_iou(boxes1, boxes2, fmt=fmt)
        check_choice("fmt", fmt, _box_iou_family.BOX_FORMATS + _ROTATED_FORMATS)
    return _pairwise(boxes1, boxes2, "iou", fmt)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of every pair of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes1 (Tensor[..., N, 4]), boxes2 (Tensor[..., M, 4]).

    Returns:
        Tensor[..., N, M]: fp32 (fp64 if either set is fp64).
    """
    if not torch.jit.is_scripting():
        traced = traced_call(generalized_box_iou, boxes1, boxes2)
        if traced is not None:
            return traced
    return _pairwise(boxes1, boxes2, "giou")


def distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Distance IoU (Zheng et al. 2020) of every pair of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes1 (Tensor[..., N, 4]), boxes2 (Tensor[..., M, 4]).
        eps (float): added to the squared hull diagonal against division by zero.

    Returns:
        Tensor[..., N, M]: fp32 (fp64 if either set is fp64).
    """
    if not torch.jit.is_scripting():
        traced = traced_call(distance_box_iou, boxes1, boxes2, eps)
        if traced is not None:
            return traced
        check_real("eps", eps)
    return _pairwise(boxes1, boxes2, "diou", eps=eps)


def complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU (Zheng et al. 2020) of every pair of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes1 (Tensor[..., N, 4]), boxes2 (Tensor[..., M, 4]).
        eps (float): added to denominators against division by zero.

    Returns:
        Tensor[..., N, M]: fp32 (fp64 if either set is fp64).
    """
    if not torch.jit.is_scripting():
        traced = traced_call(complete_box_iou, boxes1, boxes2, eps)
        if traced is not None:
            return traced
        check_real("eps", eps)
    return _pairwise(boxes1, boxes2, "ciou", eps=eps)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair within each image of a batch, in one kernel launch.

    Args:
        boxes1 (Tensor[B, N, 4]), boxes2 (Tensor[B, M, 4]): ``(x1, y1, x2, y2)`` boxes.

    Returns:
        Tensor[B, N, M]: fp32 (fp64 if either set is fp64).
    """
    check_tensor("boxes1", boxes1, last_dim=4)
    check_tensor("boxes2", boxes2, last_dim=4)
    if boxes1.dim() != 3 or boxes2.dim() != 3:
        raise ArgumentValueError(
            f"boxes1 and boxes2 must be [B, N, 4] and [B, M, 4], got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if boxes1.shape[0] != boxes2.shape[0]:
        raise ArgumentValueError(
            f"boxes1 and boxes2 must have the same batch size, got {boxes1.shape[0]} and {boxes2.shape[0]}"
        )
    return _pairwise(boxes1, boxes2, "iou")


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights) -> Tensor:
    """Regression targets of ``reference_boxes`` relative to ``proposals`` (torchvision's ``encode_boxes``).

    Args:
        reference_boxes (Tensor[..., 4]): ``(x1, y1, x2, y2)`` boxes to encode (ground truth).
        proposals (Tensor[..., 4]): the boxes they are encoded against (anchors, proposals); same shape.
        weights (Tensor[4] or 4 floats): ``(wx, wy, ww, wh)``; ``(1, 1, 1, 1)`` for the RPN,
            ``(10, 10, 5, 5)`` for the box head.

    Returns:
        Tensor[..., 4]: ``(dx, dy, dw, dh)`` in the boxes' dtype, computed in fp32 (fp64 for fp64).
        Differentiable in both box arguments.
    """
    check_tensor("reference_boxes", reference_boxes, min_dim=1, last_dim=4)
    check_tensor("proposals", proposals, min_dim=1, last_dim=4)
    check_floating("reference_boxes", reference_boxes)
    check_floating("proposals", proposals)
    check_same_device(reference_boxes=reference_boxes, proposals=proposals)
    if reference_boxes.shape != proposals.shape:
        raise ArgumentValueError(
            f"reference_boxes and proposals must have the same shape, got {tuple(reference_boxes.shape)} and "
            f"{tuple(proposals.shape)}"
        )
    values = box_coder_weights(weights)
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    shape = reference_boxes.shape
    result = torch.ops.tritondet.encode_boxes(
        reference_boxes.to(dtype).reshape(-1, 4), proposals.to(dtype).reshape(-1, 4), values
    )
    return result.to(dtype).reshape(shape)


def decode_boxes(
    deltas: Tensor, boxes: Tensor, weights, bbox_xform_clip: float = _box_coder_family.DEFAULT_XFORM_CLIP
) -> Tensor:
    """Boxes from regression deltas relative to ``boxes`` (torchvision's ``BoxCoder.decode_single``).

    Args:
        deltas (Tensor[..., 4K]): ``(dx, dy, dw, dh)`` for K boxes per reference box (e.g. per class).
        boxes (Tensor[..., 4]): ``(x1, y1, x2, y2)`` reference boxes (anchors, proposals); the same
            leading dimensions as ``deltas``.
        weights (Tensor[4] or 4 floats): ``(wx, wy, ww, wh)``, as for :func:`encode_boxes`.
        bbox_xform_clip (float): ``dw / ww`` and ``dh / wh`` are clamped to it before ``exp``.

    Returns:
        Tensor[..., 4K]: ``(x1, y1, x2, y2)`` boxes in ``deltas``' dtype, computed in fp32 (fp64 for
        fp64). Differentiable in ``deltas`` and ``boxes``.
    """
    check_tensor("deltas", deltas, min_dim=1)
    check_tensor("boxes", boxes, min_dim=1, last_dim=4)
    check_floating("deltas", deltas)
    check_floating("boxes", boxes)
    check_same_device(deltas=deltas, boxes=boxes)
    if deltas.shape[-1] % 4 != 0:
        raise ArgumentValueError(f"deltas must have shape [..., 4K], got {tuple(deltas.shape)}")
    if deltas.shape[:-1] != boxes.shape[:-1]:
        raise ArgumentValueError(
            f"deltas and boxes must have the same leading dimensions, got {tuple(deltas.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    values = box_coder_weights(weights)
    if 0.0 in values:
        raise ArgumentValueError(f"weights must be non-zero to decode, got {values}")
    shape = deltas.shape
    result = torch.ops.tritondet.decode_boxes(
        deltas.reshape(-1, shape[-1]), boxes.reshape(-1, 4), values, check_real("bbox_xform_clip", bbox_xform_clip)
    )
    return result.to(deltas.dtype).reshape(shape)
