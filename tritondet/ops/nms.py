"""Non-maximum suppression: ``nms``, ``batched_nms``, the fixed-shape ``batched_nms_padded`` and ``soft_nms``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError
from ..kernels import nms as _nms_family
from ._checks import check_choice, check_floating, check_int, check_real, check_same_device, check_tensor, traced_call


def check_nms_inputs(
    boxes: Tensor, scores: Tensor, iou_threshold, *, same_dtype: bool = False, **extra: Tensor
) -> None:
    """The checks of torchvision's ``nms``, with errors naming the argument: ``boxes`` a floating
    ``Tensor[N, 4]``, ``scores`` (and every ``extra`` tensor) ``Tensor[N]``, one device, a real
    ``iou_threshold``; with ``same_dtype``, boxes and scores of one dtype (torchvision's kernel
    requires it; tritondet's ops compare in fp32 whatever the two dtypes)."""
    check_tensor("boxes", boxes)
    check_floating("boxes", boxes)
    check_tensor("scores", scores)
    check_floating("scores", scores)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ArgumentValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ArgumentValueError(
            f"scores must have shape [N] = [{boxes.shape[0]}] like boxes, got {tuple(scores.shape)}"
        )
    for name, value in extra.items():
        check_tensor(name, value)
        if value.dim() != 1 or value.shape[0] != boxes.shape[0]:
            raise ArgumentValueError(
                f"{name} must have shape [N] = [{boxes.shape[0]}] like boxes, got {tuple(value.shape)}"
            )
    check_same_device(boxes=boxes, scores=scores, **extra)
    if same_dtype and boxes.dtype != scores.dtype:
        raise ArgumentTypeError(f"boxes and scores must have the same dtype, got {boxes.dtype} and {scores.dtype}")
    check_real("iou_threshold", iou_threshold)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: drop every box whose IoU with a higher-scoring kept box is
    greater than ``iou_threshold``.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes (floating point); IoU in fp32 (fp64 for fp64).
            Quantized boxes and scores go to torchvision's quantized kernel.
        scores (Tensor[N]): one score per box. Equal scores keep their input order; NaN scores
            count as lower than every other score (never kept ahead of a finite score).
        iou_threshold (float): suppress when IoU > iou_threshold (strictly).

    Returns:
        Tensor[K]: int64 indices of the kept boxes, by decreasing score. On the GPU the greedy pass
        runs on the device; the only host sync is learning K.
    """
    if not torch.jit.is_scripting():
        traced = traced_call(nms, boxes, scores, iou_threshold)
        if traced is not None:
            return traced
        if isinstance(boxes, Tensor) and boxes.is_quantized:
            return torch.ops.torchvision.qnms(
                boxes.int_repr(), scores.int_repr(), check_real("iou_threshold", iou_threshold)
            )
        check_nms_inputs(boxes, scores, iou_threshold)
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
        size, then K); no Python loop over categories. Like torchvision, empty ``boxes`` (any
        shape) return an empty result before any other argument is looked at.
    """
    if not torch.jit.is_scripting():
        traced = traced_call(batched_nms, boxes, scores, idxs, iou_threshold)
        if traced is not None:
            return traced
        check_tensor("boxes", boxes)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if not torch.jit.is_scripting():
        check_nms_inputs(boxes, scores, iou_threshold, idxs=idxs)
        if idxs.is_floating_point():
            raise ArgumentTypeError(f"idxs must be an integer tensor, got dtype {idxs.dtype}")
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
        raise ArgumentValueError(f"scores must have shape [B, N] or [B, N, C], got {tuple(scores.shape)}")
    if tuple(boxes.shape[:2]) != tuple(scores.shape[:2]) or boxes.dim() not in (3, 4):
        raise ArgumentValueError(
            f"boxes must have shape [B, N, 4] or [B, N, C, 4] with scores' B, N, got {tuple(boxes.shape)} "
            f"for scores {tuple(scores.shape)}"
        )
    if boxes.dim() == 4 and (scores.dim() != 3 or boxes.shape[2] != scores.shape[2]):
        raise ArgumentValueError(
            f"class-specific boxes {tuple(boxes.shape)} need scores of shape [B, N, C] with the same C, "
            f"got {tuple(scores.shape)}"
        )
    check_same_device(boxes=boxes, scores=scores)
    check_real("iou_threshold", iou_threshold)
    check_real("score_threshold", score_threshold)
    check_int("max_output", max_output, minimum=0)
    if pre_nms_top_n is not None:
        check_int("pre_nms_top_n", pre_nms_top_n, minimum=0)
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
    check_nms_inputs(boxes, scores, iou_threshold)
    check_choice("method", method, _nms_family.SOFT_NMS_METHODS)
    check_real("score_threshold", score_threshold)
    if not check_real("sigma", sigma) > 0:
        raise ArgumentValueError(f"sigma must be positive, got {sigma!r}")
    return torch.ops.tritondet.soft_nms(
        boxes, scores, float(iou_threshold), float(sigma), float(score_threshold), method
    )
