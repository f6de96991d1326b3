"""Non-maximum suppression: ``nms``, ``batched_nms``, the fixed-shape ``batched_nms_padded`` and ``soft_nms``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import nms as _nms_family
from ._checks import check_choice, check_floating, check_same_device, check_tensor


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
    the Triton and reference backends. Scores are compared with ``score_threshold`` in fp32 (fp64 for fp64 scores). The reference's work is static, sized by the shapes:
    ``B * segments * L^2 / 2`` box pairs (0.3-0.7 s per image at N = 1000, C = 91 on one core),
    so bound L with ``pre_nms_top_n`` where the pool is large. The fast CPU path (the default on
    CPU tensors) reads the candidate counts on the host and runs NMS only on the candidates.
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
    ``score_threshold`` are dropped. NaN scores are never selected, a NaN IoU (a zero-area or
    infinite box) is no overlap, and a score that becomes NaN (infinite times zero) is dropped.

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
