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
from torch import Tensor, nn

from . import _validate
from ._validate import check_choice, check_counts, check_floating, check_same_device, check_tensor
from .kernels import anchors as _anchors_family
from .kernels import box_coder as _box_coder_family
from .kernels import box_iou as _box_iou_family
from .kernels import nms as _nms_family
from .kernels import rpn_proposals as _rpn_family
from .kernels import targets as _targets_family
from .kernels._common import MAX_LEVELS

__all__ = [
    "AnchorGenerator",
    "MultiScaleRoIAlign",
    "PSRoIAlign",
    "PSRoIPool",
    "RoIAlign",
    "RoIPool",
    "anchor_targets",
    "batched_box_iou",
    "batched_nms",
    "batched_nms_padded",
    "box_iou",
    "complete_box_iou",
    "crop_pool",
    "decode_boxes",
    "distance_box_iou",
    "encode_boxes",
    "generalized_box_iou",
    "grid_anchors",
    "match_boxes",
    "nms",
    "postprocess_detections",
    "proposal_targets",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align",
    "roi_pool",
    "rpn_proposals",
    "sample_balanced",
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

    Kernel launches: 5 on the Triton backend (ranking keys, ranked boxes, suppression mask, greedy
    pass, output gather) and two ``torch.sort`` calls, whatever the data and B; no host sync on
    either backend. Scores are compared with ``score_threshold`` in fp32 (fp64 for fp64 scores). The work is static, sized by the shapes: the CPU path costs
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


# ----------------------------------------------------------------------------------------------
# Box coding (Faster R-CNN regression targets), anchors and RPN proposals
# ----------------------------------------------------------------------------------------------


def _box_coder_weights(weights) -> list[float]:
    """Four Python floats from a sequence or a 4-element tensor (a CUDA tensor is read back once)."""
    if isinstance(weights, torch.Tensor):
        if weights.numel() != 4:
            raise ValueError(f"weights must have 4 elements (wx, wy, ww, wh), got shape {tuple(weights.shape)}")
        return [float(w) for w in weights.detach().reshape(4).tolist()]
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as error:
        raise TypeError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}") from error
    if len(values) != 4:
        raise ValueError(f"weights must have 4 elements (wx, wy, ww, wh), got {len(values)}")
    return values


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
        raise ValueError(
            f"reference_boxes and proposals must have the same shape, got {tuple(reference_boxes.shape)} and "
            f"{tuple(proposals.shape)}"
        )
    values = _box_coder_weights(weights)
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
        raise ValueError(f"deltas must have shape [..., 4K], got {tuple(deltas.shape)}")
    if deltas.shape[:-1] != boxes.shape[:-1]:
        raise ValueError(
            f"deltas and boxes must have the same leading dimensions, got {tuple(deltas.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    values = _box_coder_weights(weights)
    if 0.0 in values:
        raise ValueError(f"weights must be non-zero to decode, got {values}")
    shape = deltas.shape
    result = torch.ops.tritondet.decode_boxes(
        deltas.reshape(-1, shape[-1]), boxes.reshape(-1, 4), values, float(bbox_xform_clip)
    )
    return result.to(deltas.dtype).reshape(shape)


def grid_anchors(
    grid_sizes, strides, sizes, aspect_ratios, *, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """The anchors of every position of every feature map, torchvision's values and order.

    Args:
        grid_sizes (list of (H_l, W_l)): feature-map sizes, one pair per level.
        strides (list of (s_h, s_w)): pixels between neighbouring positions, one pair per level.
        sizes, aspect_ratios: as for :class:`AnchorGenerator` (per level, or one size per level and
            shared ratios); aspect ratio = height / width.
        dtype, device: of the result (values are computed in fp32).

    Returns:
        Tensor[sum_l H_l * W_l * A_l, 4]: ``(x1, y1, x2, y2)``, level by level, each in
        (y, x, anchor) order, anchors ratio-major as torchvision's ``cell_anchors``.
    """
    sizes, aspect_ratios = _anchors_family.normalize_config(sizes, aspect_ratios)
    grid_sizes, strides = [tuple(int(v) for v in g) for g in grid_sizes], [tuple(int(v) for v in s) for s in strides]
    if not len(grid_sizes) == len(strides) == len(sizes):
        raise ValueError(
            f"grid_sizes, strides and sizes must have one entry per feature map, got {len(grid_sizes)}, "
            f"{len(strides)} and {len(sizes)}"
        )
    if any(len(g) != 2 or min(g) < 0 for g in grid_sizes):
        raise ValueError(f"grid_sizes must be (height, width) pairs of non-negative sizes, got {grid_sizes}")
    if any(len(s) != 2 or min(s) <= 0 for s in strides):
        raise ValueError(f"strides must be (height, width) pairs of positive strides, got {strides}")
    anchor_sizes, anchor_ratios, counts = _anchors_family.anchor_parameters(sizes, aspect_ratios)
    anchors = torch.ops.tritondet.grid_anchors(
        [v for g in grid_sizes for v in g],
        [v for s in strides for v in s],
        anchor_sizes,
        anchor_ratios,
        counts,
        torch.device(device) if device is not None else torch.device("cpu"),
    )
    return anchors.to(dtype)


class AnchorGenerator(nn.Module):
    """Anchors for a batch of images and their feature maps (torchvision's ``AnchorGenerator``).

    Args:
        sizes (tuple of tuples of int): anchor sizes (square roots of areas) per feature map;
            ``((32,), (64,), (128,), (256,), (512,))`` for FPN, ``((128, 256, 512),)`` for the
            single-level network of the Faster R-CNN paper.
        aspect_ratios (tuple of tuples of float): height / width ratios per feature map, e.g.
            ``((0.5, 1.0, 2.0),) * 5`` (FPN) or ``((0.5, 1.0, 2.0),)`` (the paper: 9 anchors).

    ``forward(image_list, feature_maps)`` returns one ``Tensor[sum_l H_l * W_l * A_l, 4]`` per image
    (the same tensor for every image: anchors depend only on the padded batch size), in the feature
    maps' dtype and device; the stride of level l is the padded image size // ``(H_l, W_l)``.
    Computed in one kernel launch from (level, y, x, anchor); no host sync.
    """

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)) -> None:
        super().__init__()
        self._sizes, self._aspect_ratios = _anchors_family.normalize_config(sizes, aspect_ratios)
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [
            _anchors_family.cell_anchors_reference(s, r) for s, r in zip(self._sizes, self._aspect_ratios, strict=True)
        ]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self._sizes, self._aspect_ratios, strict=True)]

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self._sizes):
            raise ValueError(
                f"feature_maps has {len(feature_maps)} levels but the generator has sizes for {len(self._sizes)}"
            )
        grid_sizes = [tuple(feature_map.shape[-2:]) for feature_map in feature_maps]
        image_height, image_width = image_list.tensors.shape[-2:]
        strides = [(image_height // height, image_width // width) for height, width in grid_sizes]
        anchors = grid_anchors(
            grid_sizes,
            strides,
            self._sizes,
            self._aspect_ratios,
            dtype=feature_maps[0].dtype,
            device=feature_maps[0].device,
        )
        return [anchors] * len(image_list.image_sizes)


def _per_level_strides(strides, num_levels: int) -> list[int]:
    """Flattened (s_h, s_w) per level from ints or pairs."""
    if not isinstance(strides, (list, tuple)) or len(strides) != num_levels:
        raise ValueError(f"strides must have one entry per level ({num_levels}), got {strides!r}")
    flat = []
    for stride in strides:
        pair = (stride, stride) if isinstance(stride, int) else tuple(stride)
        if len(pair) != 2 or any(not isinstance(s, int) or s <= 0 for s in pair):
            raise ValueError(f"strides must be positive ints or (height, width) pairs of them, got {strides!r}")
        flat += pair
    return flat


def rpn_proposals(
    objectness: list[Tensor],
    deltas: list[Tensor],
    image_sizes: Tensor,
    anchor_sizes,
    aspect_ratios,
    strides,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float = 0.7,
    min_size: float = 1e-3,
    score_thresh: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Region proposals from the raw RPN head outputs: torchvision's ``RegionProposalNetwork``
    post-processing (anchors, ``BoxCoder.decode``, ``filter_proposals``) with fixed shapes.

    Per image: the ``pre_nms_top_n`` best anchors of each level, decoded (weights 1, ``dw``/``dh``
    clamped to ``log(1000 / 16)``), clipped to the image, boxes with a side below ``min_size`` and
    sigmoid scores below ``score_thresh`` dropped, NMS at ``nms_thresh`` per level, the best
    ``post_nms_top_n`` kept.

    Args:
        objectness (list of L Tensor[B, A_l, H_l, W_l]): logits, as the head emits them (any strides),
            L <= 5.
        deltas (list of L Tensor[B, 4 A_l, H_l, W_l]): box deltas, as the head emits them.
        image_sizes (Tensor[B, 2]): (height, width) of each image before padding.
        anchor_sizes, aspect_ratios: as for :class:`AnchorGenerator` (one entry per level).
        strides (list of L ints or (s_h, s_w) pairs): pixels per feature-map position
            (torchvision's anchor generator uses padded image size // feature-map size).
        pre_nms_top_n (int): candidates per level and image before NMS (2000 train, 1000 test).
        post_nms_top_n (int): proposals returned per image (2000 train, 1000 test).

    Returns:
        boxes (Tensor[B, post_nms_top_n, 4]) and scores (Tensor[B, post_nms_top_n]) fp32 by
        decreasing score, num_valid (Tensor[B] int64): the slots past num_valid hold zeros.

    No host sync. Kernel launches on the Triton backend: 5 whatever B and L (objectness gather,
    decode, and NMS: suppression mask, greedy pass, output gather), plus one ``torch.topk``, one ``torch.sort`` and a
    fixed number of other ATen ops; the computation is fp32 whatever the head's dtype.
    """
    if not isinstance(objectness, (list, tuple)) or not isinstance(deltas, (list, tuple)):
        raise TypeError("objectness and deltas must be lists of per-level tensors")
    if len(objectness) != len(deltas) or len(objectness) == 0:
        raise ValueError(
            f"objectness and deltas must have the same non-zero number of levels, got {len(objectness)} and "
            f"{len(deltas)}"
        )
    if len(objectness) > MAX_LEVELS:
        raise ValueError(f"rpn_proposals takes at most {MAX_LEVELS} levels, got {len(objectness)}")
    sizes, ratios = _anchors_family.normalize_config(anchor_sizes, aspect_ratios)
    num_levels = len(objectness)
    if len(sizes) != num_levels:
        raise ValueError(f"anchor_sizes has {len(sizes)} levels but objectness has {num_levels}")
    flat_strides = _per_level_strides(strides, num_levels)
    flat_sizes, flat_ratios, counts = _anchors_family.anchor_parameters(sizes, ratios)
    check_tensor("image_sizes", image_sizes)
    if image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must have shape [B, 2] (height, width), got {tuple(image_sizes.shape)}")
    batch = image_sizes.shape[0]
    for level, (logits, codes) in enumerate(zip(objectness, deltas, strict=True)):
        check_tensor(f"objectness[{level}]", logits)
        check_tensor(f"deltas[{level}]", codes)
        expected = (batch, counts[level], *logits.shape[2:])
        if logits.dim() != 4 or tuple(logits.shape) != expected:
            raise ValueError(
                f"objectness[{level}] must have shape [B, A, H, W] = {expected} (B from image_sizes, A = "
                f"{counts[level]} anchors per position), got {tuple(logits.shape)}"
            )
        if tuple(codes.shape) != (batch, 4 * counts[level], *logits.shape[2:]):
            raise ValueError(
                f"deltas[{level}] must have shape [B, 4A, H, W] = {(batch, 4 * counts[level], *logits.shape[2:])}, "
                f"got {tuple(codes.shape)}"
            )
        if logits.dtype not in _rpn_family.HEAD_DTYPES or codes.dtype != logits.dtype:
            raise TypeError(
                f"objectness[{level}] and deltas[{level}] must share one floating dtype of "
                f"{_rpn_family.HEAD_DTYPES}, got {logits.dtype} and {codes.dtype}"
            )
        check_same_device(image_sizes=image_sizes, objectness=logits, deltas=codes)
    if len({o.dtype for o in objectness}) != 1:
        raise TypeError(f"all levels must share one dtype, got {[o.dtype for o in objectness]}")
    for name, value in (("pre_nms_top_n", pre_nms_top_n), ("post_nms_top_n", post_nms_top_n)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    boxes, scores, num_valid = torch.ops.tritondet.rpn_proposals(
        list(objectness),
        list(deltas),
        image_sizes,
        flat_strides,
        flat_sizes,
        flat_ratios,
        counts,
        pre_nms_top_n,
        post_nms_top_n,
        float(nms_thresh),
        float(min_size),
        float(score_thresh),
        _box_coder_family.DEFAULT_XFORM_CLIP,
    )
    return boxes, scores, num_valid


def postprocess_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Tensor,
    num_valid: Tensor,
    image_sizes: Tensor,
    weights=(10.0, 10.0, 5.0, 5.0),
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Final detections from the box head's outputs: torchvision's
    ``RoIHeads.postprocess_detections`` with fixed shapes and no host sync.

    Per image: softmax class scores, every class's box decoded from its proposal (``weights``,
    ``dw``/``dh`` clamped to ``log(1000 / 16)``) and clipped to the image; candidates of the
    foreground classes (label >= 1) with score > ``score_thresh`` and both sides >= ``min_size``
    go through NMS per class at ``nms_thresh``; the best ``detections_per_img`` are kept.

    Args:
        class_logits (Tensor[B * P, C]): box-head class logits, background first, any strides.
        box_regression (Tensor[B * P, 4 C]): class-specific deltas.
        proposals (Tensor[B, P, 4]): the boxes the head saw, padded per image.
        num_valid (Tensor[B], integer): proposals in use per image (rows past it are padding).
        image_sizes (Tensor[B, 2]): (height, width) to clip to.

    Returns:
        boxes (Tensor[B, D, 4]) fp32, scores (Tensor[B, D]) fp32, labels (Tensor[B, D]) int64 and
        num_valid (Tensor[B]) int64, D = detections_per_img, by decreasing score; slots past
        num_valid hold zeros (label 0, the background class, marks them).

    Scores and boxes are computed in fp32 whatever the head's dtype. Kernel launches on the
    Triton backend: 6 (candidates, then :func:`batched_nms_padded`'s 5) and two ``torch.sort``.
    """
    check_tensor("class_logits", class_logits)
    check_floating("class_logits", class_logits)
    check_tensor("box_regression", box_regression)
    check_floating("box_regression", box_regression)
    check_tensor("proposals", proposals, last_dim=4)
    check_floating("proposals", proposals)
    check_tensor("image_sizes", image_sizes)
    check_tensor("num_valid", num_valid)
    if proposals.dim() != 3:
        raise ValueError(f"proposals must have shape [B, P, 4], got {tuple(proposals.shape)}")
    batch, count = proposals.shape[:2]
    if class_logits.dim() != 2 or class_logits.shape[0] != batch * count or class_logits.shape[1] < 1:
        raise ValueError(
            f"class_logits must have shape [B * P, C] = [{batch * count}, C >= 1] for proposals "
            f"{tuple(proposals.shape)}, got {tuple(class_logits.shape)}"
        )
    if tuple(box_regression.shape) != (batch * count, 4 * class_logits.shape[1]):
        raise ValueError(
            f"box_regression must have shape [B * P, 4 C] = {(batch * count, 4 * class_logits.shape[1])}, "
            f"got {tuple(box_regression.shape)}"
        )
    if box_regression.dtype != class_logits.dtype:
        raise TypeError(
            f"class_logits and box_regression must share a dtype, got {class_logits.dtype} and {box_regression.dtype}"
        )
    if tuple(image_sizes.shape) != (batch, 2):
        raise ValueError(f"image_sizes must have shape [B, 2] = {(batch, 2)}, got {tuple(image_sizes.shape)}")
    if tuple(num_valid.shape) != (batch,) or num_valid.is_floating_point():
        raise ValueError(f"num_valid must be an integer tensor of shape [B] = {(batch,)}, got {num_valid.dtype} "
                         f"{tuple(num_valid.shape)}")  # fmt: skip
    check_same_device(
        class_logits=class_logits,
        box_regression=box_regression,
        proposals=proposals,
        num_valid=num_valid,
        image_sizes=image_sizes,
    )
    if not isinstance(detections_per_img, int) or detections_per_img < 0:
        raise ValueError(f"detections_per_img must be a non-negative int, got {detections_per_img!r}")
    return torch.ops.tritondet.postprocess_detections(
        class_logits,
        box_regression,
        proposals,
        num_valid.to(torch.int64),
        image_sizes,
        _box_coder_weights(weights),
        float(score_thresh),
        float(nms_thresh),
        detections_per_img,
        float(min_size),
        _box_coder_family.DEFAULT_XFORM_CLIP,
    )


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
    if not low <= high:
        raise ValueError(f"low must be <= high, got low={low} and high={high}")
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


# ----------------------------------------------------------------------------------------------
# Training targets: balanced sampling, anchor target layer, proposal target layer
# ----------------------------------------------------------------------------------------------


def _check_sampling(batch_size_per_image: int, positive_fraction: float, generator, device: torch.device) -> None:
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) or batch_size_per_image < 0:
        raise ValueError(f"batch_size_per_image must be a non-negative int, got {batch_size_per_image!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
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
        raise ValueError(
            f"matched_idx must be an integer tensor of shape [B, N], got {matched_idx.dtype} {tuple(matched_idx.shape)}"
        )
    _check_sampling(batch_size_per_image, positive_fraction, generator, matched_idx.device)
    return _targets_family.sample_balanced(matched_idx, batch_size_per_image, positive_fraction, generator)


def _check_weights(weights) -> tuple[float, ...]:
    if isinstance(weights, Tensor):
        raise TypeError("weights must be 4 Python numbers (a tensor would be read back from the device)")
    return tuple(_box_coder_weights(weights))


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
    if not bg_iou_thresh <= fg_iou_thresh:
        raise ValueError(f"bg_iou_thresh must be <= fg_iou_thresh, got {bg_iou_thresh} and {fg_iou_thresh}")
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
    original 128 / 0.25) and encodes class-specific regression targets with ``weights``.

    Args:
        proposals (Tensor[B, P, 4]): xyxy proposals, padded; the first ``proposal_count[b]`` are real.
        gt_boxes (Tensor[B, G, 4]), gt_labels (Tensor[B, G] integer classes in [1, num_classes)),
        gt_count (Tensor[B] or sequence of int): padded ground truth.
        num_classes (int): C, background (0) included.
        proposal_count (Tensor[B] or sequence of int, optional): all P when omitted.
        generator (torch.Generator, optional): for the sampler, on the proposals' device.

    Returns:
        ProposalTargets with S = ``batch_size_per_image`` slots per image: proposals ``[B, S, 4]``,
        labels ``[B, S]`` (class, 0 background, -1 padding), regression_targets and
        regression_weights ``[B, S, C, 4]``, matched_idx ``[B, S]``, sampled_idx ``[B, S]``.
    """
    values = _check_weights(weights)
    if not bg_iou_thresh_low <= bg_iou_thresh <= fg_iou_thresh:
        raise ValueError(
            "need bg_iou_thresh_low <= bg_iou_thresh <= fg_iou_thresh, got "
            f"{bg_iou_thresh_low}, {bg_iou_thresh} and {fg_iou_thresh}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    gt_count = _check_gt(gt_boxes, gt_count)
    _check_sampling(batch_size_per_image, positive_fraction, generator, gt_boxes.device)
    check_tensor("proposals", proposals, last_dim=4)
    if proposals.dim() != 3 or proposals.shape[0] != gt_boxes.shape[0]:
        raise ValueError(
            f"proposals must have shape [B, P, 4] with B = {gt_boxes.shape[0]}, got {tuple(proposals.shape)}"
        )
    check_floating("proposals", proposals)
    check_same_device(proposals=proposals, gt_boxes=gt_boxes)
    if proposals.shape[1] + gt_boxes.shape[1] == 0:
        raise ValueError("proposals and gt_boxes are both empty: there is nothing to sample")
    batch, num_gt = gt_boxes.shape[:2]
    check_tensor("gt_labels", gt_labels)
    if gt_labels.is_floating_point() or gt_labels.shape != (batch, num_gt):
        raise ValueError(
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
            raise ValueError(f"proposal_count must have shape [B] = [{batch}], got {tuple(proposal_count.shape)}")
        check_counts("proposal_count", proposal_count, proposals.shape[1])
        proposal_count = proposal_count.to(device=proposals.device, dtype=torch.int64, non_blocking=True)
    return _targets_family.proposal_targets(
        proposals,
        proposal_count,
        gt_boxes.to(proposals.dtype),
        gt_labels.to(proposals.device),
        gt_count,
        num_classes,
        fg_iou_thresh,
        bg_iou_thresh,
        bg_iou_thresh_low,
        batch_size_per_image,
        positive_fraction,
        values,
        generator,
    )


# ----------------------------------------------------------------------------------------------
# RoIAlign family
# ----------------------------------------------------------------------------------------------


def _pair_size(name: str, value) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return size


def _check_feature_map(name: str, value) -> Tensor:
    check_tensor(name, value)
    if value.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _rois_from_boxes(boxes, num_images: int, device: torch.device) -> Tensor:
    """``Tensor[K, 5]`` (checked) or ``list[Tensor[L, 4]]`` (one per image) -> ``Tensor[K, 5]``."""
    if isinstance(boxes, Tensor):
        check_tensor("boxes", boxes)
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got shape {tuple(boxes.shape)}")
        rois = boxes
    elif isinstance(boxes, (list, tuple)) and boxes:
        for i, image_boxes in enumerate(boxes):
            check_tensor(f"boxes[{i}]", image_boxes)
            if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got shape {tuple(image_boxes.shape)}")
        # One small tensor per image (a short, fixed loop): the batch-index column.
        ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)
    else:
        raise TypeError(f"boxes must be a Tensor[K, 5] or a non-empty list of Tensor[L, 4], got {type(boxes).__name__}")
    if rois.device != device:
        raise ValueError(f"input and boxes must be on the same device, got {device} and {rois.device}")
    if not rois.is_floating_point():
        rois = rois.float()
    if _validate.validation_enabled(device):
        _validate.check_roi_batch_indices("boxes", rois, num_images)
    return rois


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoI Align (Mask R-CNN): average of bilinear samples over each bin of each region.

    Args:
        input (Tensor[N, C, H, W]): feature maps, fp16/bf16/fp32/fp64, NCHW or channels_last
            (read in place), any strides.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)`` rows, or one
            ``(x1, y1, x2, y2)`` tensor per image. A batch index that is not an integer in
            ``[0, N)`` raises ``ValueError`` on CPU tensors (and with ``TRITONDET_VALIDATE=1``);
            otherwise that RoI's output is zero.
        output_size (int or Tuple[int, int]): ``(PH, PW)`` bins.
        spatial_scale (float): factor from box coordinates to input coordinates.
        sampling_ratio (int): samples per bin along each axis; ``<= 0``: ``ceil(roi_size / bins)``.
        aligned (bool): shift the boxes by -0.5 pixel (Detectron2); False: legacy, RoIs at least 1x1.

    Returns:
        Tensor[K, C, PH, PW]: contiguous (NCHW) in ``input``'s dtype, whatever ``input``'s layout;
        computed in fp32 (fp64 for fp64 input).
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    return torch.ops.tritondet.roi_align(
        [input], rois, [float(spatial_scale)], ph, pw, int(sampling_ratio), bool(aligned), 0, 224.0, 4.0
    )


class RoIAlign(torch.nn.Module):
    """See :func:`roi_align`."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )


def _level_scale(feature: Tensor, image_size: tuple[int, int]) -> float:
    """The power of two nearest to the feature map's height over the image's (torchvision's rule)."""
    return 2.0 ** round(math.log2(feature.shape[-2] / image_size[0]))


class MultiScaleRoIAlign(torch.nn.Module):
    """Multi-scale RoIAlign (FPN): each box is pooled from the level of Eqn. (1) of the FPN paper,
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale))`` clamped to the available
    levels, with torchvision's scales (inferred from feature and image sizes) and results.

    All levels are pooled in one kernel launch (each RoI picks its level's pointer, shape and scale
    from a small table in the kernel), without per-level gathers or host syncs. At most
    ``MAX_LEVELS`` (5) levels.

    Args:
        featmap_names (List[str]): the keys of the feature maps to pool from.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        sampling_ratio (int): as in :func:`roi_align` (``aligned=False``, as torchvision).
        canonical_scale (int), canonical_level (int): ``224`` and ``k0 = 4`` of Eqn. (1).

    Forward: ``x`` (dict of Tensor[N, C, H_l, W_l]), ``boxes`` (List[Tensor[L_i, 4]] in image
    coordinates), ``image_shapes`` (List[Tuple[int, int]]) -> Tensor[sum L_i, C, PH, PW] in the
    first level's dtype.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int] | list[int],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales: list[float] | None = None
        self.k_min: int | None = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def _setup_scales(self, features: list[Tensor], image_shapes: list[tuple[int, int]]) -> None:
        if not image_shapes:
            raise ValueError("image_shapes must not be empty")
        largest = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        self.scales = [_level_scale(f, largest) for f in features]
        self.k_min = int(-math.log2(self.scales[0]))

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not 1 <= len(features) <= MAX_LEVELS:
            raise ValueError(f"featmap_names must select 1 to {MAX_LEVELS} feature maps of x, got {len(features)}")
        for name, f in zip(self.featmap_names, features, strict=False):
            _check_feature_map(f"x[{name!r}]", f)
        first = features[0]
        if any(f.shape[:2] != first.shape[:2] or f.device != first.device for f in features):
            raise ValueError("the feature maps must share batch size, channel count and device")
        features = [f.to(first.dtype) for f in features]
        if self.scales is None or self.k_min is None:
            self._setup_scales(features, image_shapes)
        ph, pw = _pair_size("output_size", self.output_size)
        rois = _rois_from_boxes(list(boxes), first.shape[0], first.device)
        return torch.ops.tritondet.roi_align(
            features,
            rois,
            self.scales,
            ph,
            pw,
            int(self.sampling_ratio),
            False,
            self.k_min,
            float(self.canonical_scale),
            float(self.canonical_level),
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})"
        )


def roi_pool(
    input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int], spatial_scale: float = 1.0
) -> Tensor:
    """RoI Pool (Fast R-CNN): the maximum over each bin of each region.

    Args:
        input (Tensor[N, C, H, W]): feature maps, any dtype of floats, any strides.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): as in :func:`roi_align`.
        output_size (int or Tuple[int, int]): ``(PH, PW)`` bins.
        spatial_scale (float): factor from box coordinates to input coordinates.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype; empty bins are 0.
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    return torch.ops.tritondet.roi_pool(input, rois, float(spatial_scale), ph, pw)[0]


class RoIPool(torch.nn.Module):
    """See :func:`roi_pool`."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


def crop_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
) -> Tensor:
    """Crop pooling ("Spatial Transformer Networks"): an ``affine_grid`` + ``grid_sample``
    bilinear crop of ``(PH * S) x (PW * S)`` samples from each box (corners included, zeros
    outside the map), max-pooled by ``S x S``; differentiable with respect to ``input`` and the box
    coordinates, so a loss on the crops reaches the boxes. See :mod:`tritondet.kernels.crop_pool`.

    Args:
        input (Tensor[N, C, H, W]): feature maps, any float dtype, any strides.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): as in :func:`roi_align`.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scale (float): factor from box coordinates to input coordinates.
        sampling_ratio (int): ``S >= 1`` samples per bin along each axis.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype.
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int) or sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be a positive int, got {sampling_ratio!r}")
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    return torch.ops.tritondet.crop_pool(input, rois, float(spatial_scale), ph, pw, sampling_ratio)[0]


def ps_roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """Position-sensitive RoI Align (R-FCN): bin ``(ph, pw)`` of output channel ``c`` averages the
    bilinear samples of input channel ``c * PH * PW + ph * PW + pw``; boxes shifted by -0.5 pixel.

    Args:
        input (Tensor[N, C * PH * PW, H, W]), boxes (Tensor[K, 5] or List[Tensor[L, 4]]),
        output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype. A bin with no samples (an empty
        box with adaptive sampling) is 0, where torchvision divides 0 by 0 (NaN).
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    if input.shape[1] % (ph * pw):
        raise ValueError(f"input must have a multiple of {ph * pw} channels, got {input.shape[1]}")
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    return torch.ops.tritondet.ps_roi_align(input, rois, float(spatial_scale), ph, pw, int(sampling_ratio))


class PSRoIAlign(torch.nn.Module):
    """See :func:`ps_roi_align`."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio})"
        )


def ps_roi_pool(
    input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int], spatial_scale: float = 1.0
) -> Tensor:
    """Position-sensitive RoI Pool (R-FCN): bin ``(ph, pw)`` of output channel ``c`` is the mean of
    input channel ``c * PH * PW + ph * PW + pw`` over the bin's pixels (torchvision's rounding,
    exclusive RoI end, bins clipped to ``[0, H - 1]`` and ``[0, W - 1]`` as torchvision does); an
    empty bin is 0. The gradient is torchvision's, whose backward clips bins to ``[0, H]`` and
    ``[0, W]`` instead (so bins on the last row or column spread their gradient differently from
    the forward's average).

    Args:
        input (Tensor[N, C * PH * PW, H, W]), boxes (Tensor[K, 5] or List[Tensor[L, 4]]),
        output_size, spatial_scale: as in :func:`roi_pool`.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype.
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    if input.shape[1] % (ph * pw):
        raise ValueError(f"input must have a multiple of {ph * pw} channels, got {input.shape[1]}")
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    return torch.ops.tritondet.ps_roi_pool(input, rois, float(spatial_scale), ph, pw)


class PSRoIPool(torch.nn.Module):
    """See :func:`ps_roi_pool`."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


# ----------------------------------------------------------------------------------------------
# Everything else torchvision.ops has
# ----------------------------------------------------------------------------------------------


def __getattr__(name: str):
    """torchvision.ops names tritondet has no kernel for (``box_area``, ``box_convert``,
    ``clip_boxes_to_image``, ``deform_conv2d``, ``FeaturePyramidNetwork``, ...) resolve to
    torchvision's own, so ``from tritondet import ops`` replaces ``from torchvision import ops``
    whole."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(torchvision.ops, name)
    except AttributeError:
        raise AttributeError(f"module 'tritondet.ops' has no attribute {name!r}") from None
