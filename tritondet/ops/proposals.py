"""Anchors and proposals: ``grid_anchors``, ``AnchorGenerator``, the RPN's ``rpn_proposals`` and the
box head's ``postprocess_detections`` (decode, clip, per-class NMS; fixed shapes)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ArgumentTypeError, ArgumentValueError
from ..kernels import anchors as _anchors_family
from ..kernels import box_coder as _box_coder_family
from ..kernels import rpn_proposals as _rpn_family
from ..kernels._common import MAX_LEVELS
from ._checks import (
    box_coder_weights,
    check_counts,
    check_floating,
    check_int,
    check_real,
    check_same_device,
    check_tensor,
)


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
        raise ArgumentValueError(
            f"grid_sizes, strides and sizes must have one entry per feature map, got {len(grid_sizes)}, "
            f"{len(strides)} and {len(sizes)}"
        )
    if any(len(g) != 2 or min(g) < 0 for g in grid_sizes):
        raise ArgumentValueError(f"grid_sizes must be (height, width) pairs of non-negative sizes, got {grid_sizes}")
    if any(len(s) != 2 or min(s) <= 0 for s in strides):
        raise ArgumentValueError(f"strides must be (height, width) pairs of positive strides, got {strides}")
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
            raise ArgumentValueError(
                f"feature_maps has {len(feature_maps)} levels but the generator has sizes for {len(self._sizes)}"
            )
        grid_sizes = [tuple(feature_map.shape[-2:]) for feature_map in feature_maps]
        for level, (height, width) in enumerate(grid_sizes):
            if height == 0 or width == 0:
                raise ArgumentValueError(
                    f"feature_maps[{level}] has an empty map {height}x{width}: no stride to place anchors at"
                )
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
        raise ArgumentValueError(f"strides must have one entry per level ({num_levels}), got {strides!r}")
    flat = []
    for stride in strides:
        pair = (stride, stride) if not isinstance(stride, (list, tuple)) else tuple(stride)
        if len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in pair):
            raise ArgumentTypeError(f"strides must be ints or (height, width) pairs of ints, got {strides!r}")
        if min(pair) <= 0:
            raise ArgumentValueError(f"strides must be positive, got {strides!r}")
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
        raise ArgumentTypeError("objectness and deltas must be lists of per-level tensors")
    if len(objectness) != len(deltas) or len(objectness) == 0:
        raise ArgumentValueError(
            f"objectness and deltas must have the same non-zero number of levels, got {len(objectness)} and "
            f"{len(deltas)}"
        )
    if len(objectness) > MAX_LEVELS:
        raise ArgumentValueError(f"rpn_proposals takes at most {MAX_LEVELS} levels, got {len(objectness)}")
    sizes, ratios = _anchors_family.normalize_config(anchor_sizes, aspect_ratios)
    num_levels = len(objectness)
    if len(sizes) != num_levels:
        raise ArgumentValueError(f"anchor_sizes has {len(sizes)} levels but objectness has {num_levels}")
    flat_strides = _per_level_strides(strides, num_levels)
    flat_sizes, flat_ratios, counts = _anchors_family.anchor_parameters(sizes, ratios)
    check_tensor("image_sizes", image_sizes)
    if image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
        raise ArgumentValueError(f"image_sizes must have shape [B, 2] (height, width), got {tuple(image_sizes.shape)}")
    batch = image_sizes.shape[0]
    for level, (logits, codes) in enumerate(zip(objectness, deltas, strict=True)):
        check_tensor(f"objectness[{level}]", logits)
        check_tensor(f"deltas[{level}]", codes)
        expected = (batch, counts[level], *logits.shape[2:])
        if logits.dim() != 4 or tuple(logits.shape) != expected:
            raise ArgumentValueError(
                f"objectness[{level}] must have shape [B, A, H, W] = {expected} (B from image_sizes, A = "
                f"{counts[level]} anchors per position), got {tuple(logits.shape)}"
            )
        if tuple(codes.shape) != (batch, 4 * counts[level], *logits.shape[2:]):
            raise ArgumentValueError(
                f"deltas[{level}] must have shape [B, 4A, H, W] = {(batch, 4 * counts[level], *logits.shape[2:])}, "
                f"got {tuple(codes.shape)}"
            )
        if logits.dtype not in _rpn_family.HEAD_DTYPES or codes.dtype != logits.dtype:
            raise ArgumentTypeError(
                f"objectness[{level}] and deltas[{level}] must share one floating dtype of "
                f"{_rpn_family.HEAD_DTYPES}, got {logits.dtype} and {codes.dtype}"
            )
        check_same_device(image_sizes=image_sizes, objectness=logits, deltas=codes)
    if len({o.dtype for o in objectness}) != 1:
        raise ArgumentTypeError(f"all levels must share one dtype, got {[o.dtype for o in objectness]}")
    check_int("pre_nms_top_n", pre_nms_top_n, minimum=0)
    check_int("post_nms_top_n", post_nms_top_n, minimum=0)
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
        check_real("nms_thresh", nms_thresh),
        check_real("min_size", min_size),
        check_real("score_thresh", score_thresh),
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
        raise ArgumentValueError(f"proposals must have shape [B, P, 4], got {tuple(proposals.shape)}")
    batch, count = proposals.shape[:2]
    if class_logits.dim() != 2 or class_logits.shape[0] != batch * count or class_logits.shape[1] < 1:
        raise ArgumentValueError(
            f"class_logits must have shape [B * P, C] = [{batch * count}, C >= 1] for proposals "
            f"{tuple(proposals.shape)}, got {tuple(class_logits.shape)}"
        )
    if tuple(box_regression.shape) != (batch * count, 4 * class_logits.shape[1]):
        raise ArgumentValueError(
            f"box_regression must have shape [B * P, 4 C] = {(batch * count, 4 * class_logits.shape[1])}, "
            f"got {tuple(box_regression.shape)}"
        )
    if box_regression.dtype != class_logits.dtype:
        raise ArgumentTypeError(
            f"class_logits and box_regression must share a dtype, got {class_logits.dtype} and {box_regression.dtype}"
        )
    if tuple(image_sizes.shape) != (batch, 2):
        raise ArgumentValueError(f"image_sizes must have shape [B, 2] = {(batch, 2)}, got {tuple(image_sizes.shape)}")
    if tuple(num_valid.shape) != (batch,) or num_valid.is_floating_point():
        raise ArgumentValueError(f"num_valid must be an integer tensor of shape [B] = {(batch,)}, got {num_valid.dtype} "
                         f"{tuple(num_valid.shape)}")  # fmt: skip
    check_same_device(
        class_logits=class_logits,
        box_regression=box_regression,
        proposals=proposals,
        num_valid=num_valid,
        image_sizes=image_sizes,
    )
    check_counts("num_valid", num_valid, count)
    check_int("detections_per_img", detections_per_img, minimum=0)
    return torch.ops.tritondet.postprocess_detections(
        class_logits,
        box_regression,
        proposals,
        num_valid.to(torch.int64),
        image_sizes,
        box_coder_weights(weights),
        check_real("score_thresh", score_thresh),
        check_real("nms_thresh", nms_thresh),
        detections_per_img,
        check_real("min_size", min_size),
        _box_coder_family.DEFAULT_XFORM_CLIP,
    )
