"""Detection post-processing (Faster R-CNN's box head output -> detections), fixed shapes, no host sync.

Shapes: B images, P proposals per image (padded; ``num_valid [B]`` in use), C classes (background
0 included), D = ``detections_per_img``: class_logits ``[B * P, C]``, box_regression ``[B * P, 4 C]``,
proposals ``[B, P, 4]``, image_sizes ``[B, 2]`` (height, width) -> boxes ``[B, D, 4]``, scores
``[B, D]``, labels ``[B, D]``, num_valid ``[B]``.

1. ``_detection_candidates_kernel``: softmax over the classes, every class's box decoded
   (:func:`tritondet.kernels.box_coder.decode_box`), clipped to the image and tested for size; one
   launch for every image.
2. :func:`tritondet.kernels.nms.batched_nms_padded_impl`: score threshold, NMS per class and the
   best ``D`` per image.

All math is fp32 (fp16/bf16 heads are upcast on load).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NUM_WARPS, clip_box, clip_to_images, ieee_div, load_four
from ._launch import launch
from .box_coder import decode_box, decode_cpu, decode_reference
from .nms import batched_nms_padded_impl


@triton.jit
def _detection_candidates_kernel(
    # pointers
    logits_ptr,  # [B * P, C] class logits, any strides
    deltas_ptr,  # [B * P, 4 C] class-specific box deltas, any strides
    proposals_ptr,  # [B, P, 4] proposals, any strides
    num_valid_ptr,  # [B] int64: proposals in use per image
    image_sizes_ptr,  # [B, 2] fp32 contiguous (height, width)
    boxes_ptr,  # [B, P, C, 4] fp32 contiguous
    scores_ptr,  # [B, P, C] fp32 contiguous: softmax score, -inf for class 0 and dropped candidates
    # sizes
    rows,  # B * P
    P,
    C,
    # strides (in elements)
    stride_logits_r,
    stride_logits_c,
    stride_deltas_r,
    stride_deltas_c,
    stride_proposals_b,
    stride_proposals_p,
    stride_proposals_xy,
    # scalars
    wx,
    wy,
    ww,
    wh,
    clip,
    min_size,
    # meta-parameters
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
):
    """Softmax over the classes of each row (torchvision's exp(x - max) / sum), then each class's
    box decoded, clipped to the image and tested for size; three passes over the logits."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    image = row // P
    proposal = row % P
    lanes = tl.arange(0, BLOCK_CLASSES)
    logits = logits_ptr + row[:, None] * stride_logits_r
    largest = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    for first in range(0, C, BLOCK_CLASSES):
        cls = first + lanes
        ok = row_ok[:, None] & (cls < C)[None, :]
        x = tl.load(logits + cls[None, :] * stride_logits_c, mask=ok, other=float("-inf")).to(tl.float32)
        largest = tl.maximum(largest, tl.max(x, 1))
    total = tl.zeros((BLOCK_ROWS,), tl.float32)
    for first in range(0, C, BLOCK_CLASSES):
        cls = first + lanes
        ok = row_ok[:, None] & (cls < C)[None, :]
        x = tl.load(logits + cls[None, :] * stride_logits_c, mask=ok, other=float("-inf")).to(tl.float32)
        total += tl.sum(tl.where(ok, tl.exp(x - largest[:, None]), 0.0), 1)

    pp = proposals_ptr + image * stride_proposals_b + proposal * stride_proposals_p
    px1, py1, px2, py2 = load_four(pp[:, None], stride_proposals_xy, row_ok[:, None], 0, 0, tl.float32)
    height = tl.load(image_sizes_ptr + image * 2, mask=row_ok, other=0)[:, None]
    width = tl.load(image_sizes_ptr + image * 2 + 1, mask=row_ok, other=0)[:, None]
    real = (proposal < tl.load(num_valid_ptr + image, mask=row_ok, other=0))[:, None]
    for first in range(0, C, BLOCK_CLASSES):
        cls = first + lanes
        ok = row_ok[:, None] & (cls < C)[None, :]
        x = tl.load(logits + cls[None, :] * stride_logits_c, mask=ok, other=float("-inf")).to(tl.float32)
        probability = ieee_div(tl.exp(x - largest[:, None]), total[:, None])
        pd = deltas_ptr + row[:, None] * stride_deltas_r + (4 * cls)[None, :] * stride_deltas_c
        dx, dy, dw, dh = load_four(pd, stride_deltas_c, ok, 0, 0, tl.float32)
        x1, y1, x2, y2 = decode_box(px1, py1, px2, py2, dx, dy, dw, dh, wx, wy, ww, wh, clip)
        x1, y1, x2, y2 = clip_box(x1, y1, x2, y2, height, width)
        keep = real & (cls >= 1)[None, :] & ((x2 - x1) >= min_size) & ((y2 - y1) >= min_size)
        out = row[:, None] * C + cls[None, :]
        tl.store(scores_ptr + out, tl.where(keep, probability, float("-inf")), mask=ok)
        tl.store(boxes_ptr + out * 4, x1, mask=ok)
        tl.store(boxes_ptr + out * 4 + 1, y1, mask=ok)
        tl.store(boxes_ptr + out * 4 + 2, x2, mask=ok)
        tl.store(boxes_ptr + out * 4 + 3, y2, mask=ok)


# Detection candidates: 8 rows x 32 classes per program (2 per thread at 4 warps); each element
# holds a proposal, 4 deltas, a box and a score (~20 live fp32 values). 91 COCO classes are 3 chunks.
_CANDIDATE_ROWS = 8
_CANDIDATE_CLASSES = 32


def _candidates_arguments(
    class_logits, box_regression, proposals, num_valid, image_sizes, boxes, scores, weights, min_size, clip
):  # fmt: skip
    """``(args, meta)`` of :func:`_detection_candidates_kernel` for these tensors: what the launcher
    passes and what the ahead-of-time specs are derived from."""
    batch, count = proposals.shape[:2]
    args = (
        class_logits,
        box_regression,
        proposals,
        num_valid,
        image_sizes.to(torch.float32).contiguous(),
        boxes,
        scores,
        batch * count,
        count,
        class_logits.shape[1],
        *class_logits.stride(),
        *box_regression.stride(),
        *proposals.stride(),
        *(float(w) for w in weights),
        float(clip),
        float(min_size),
    )
    meta = {"BLOCK_ROWS": _CANDIDATE_ROWS, "BLOCK_CLASSES": _CANDIDATE_CLASSES, "num_warps": NUM_WARPS}
    return args, meta


def detection_candidates_triton(
    class_logits, box_regression, proposals, num_valid, image_sizes, weights, min_size, clip
):  # fmt: skip
    """``[B * P, C]`` logits, ``[B * P, 4 C]`` deltas, ``[B, P, 4]`` proposals -> ``boxes
    [B, P, C, 4]`` and ``scores [B, P, C]`` fp32 (see :func:`detection_candidates_reference`)."""
    batch, count = proposals.shape[:2]
    num_classes = class_logits.shape[1]
    device = proposals.device
    boxes = torch.empty((batch, count, num_classes, 4), dtype=torch.float32, device=device)
    scores = torch.empty((batch, count, num_classes), dtype=torch.float32, device=device)
    args, meta = _candidates_arguments(
        class_logits, box_regression, proposals, num_valid, image_sizes, boxes, scores, weights, min_size, clip
    )
    launch(_detection_candidates_kernel, (triton.cdiv(batch * count, _CANDIDATE_ROWS),), *args, **meta)
    return boxes, scores


# ----------------------------------------------------------------------------------------------
# Reference (the test oracle) and the fast CPU path: vectorized PyTorch.
# ----------------------------------------------------------------------------------------------


def detection_candidates_reference(
    class_logits, box_regression, proposals, num_valid, image_sizes, weights, min_size, clip
):  # fmt: skip
    """torchvision's ``postprocess_detections`` before NMS, with fixed shapes: softmax scores,
    every class's box decoded and clipped; class 0 (background), boxes with a side below
    ``min_size`` and padding proposals (past ``num_valid``) get the score -inf."""
    batch, count = proposals.shape[:2]
    num_classes = class_logits.shape[1]
    boxes = decode_reference(box_regression.view(batch, count, 4 * num_classes), proposals, weights, clip)
    boxes = boxes.float().view(batch, count, num_classes, 4)
    boxes = clip_to_images(boxes, image_sizes)
    scores = torch.softmax(class_logits.float(), dim=-1).view(batch, count, num_classes)
    large = (boxes[..., 2:] - boxes[..., :2] >= min_size).all(dim=-1)
    real = torch.arange(count, device=proposals.device) < num_valid[:, None]
    foreground = torch.arange(num_classes, device=proposals.device) >= 1
    return boxes, torch.where(large & real[..., None] & foreground, scores, float("-inf"))


def detection_candidates_cpu(
    class_logits, box_regression, proposals, num_valid, image_sizes, weights, min_size, clip
):  # fmt: skip
    """The fast CPU path of :func:`detection_candidates_reference`, bit for bit its result: the
    boxes decoded by :func:`tritondet.kernels.box_coder.decode_cpu` (no interleaving pass after
    the decode), then clipped and the dropped scores set in place (fewer full-size temporaries)."""
    batch, count = proposals.shape[:2]
    num_classes = class_logits.shape[1]
    boxes = decode_cpu(
        box_regression.reshape(batch * count, 4 * num_classes), proposals.reshape(batch * count, 4), weights, clip
    )
    boxes = boxes.float().view(batch, count, num_classes, 4)
    limits = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype).view(batch, 1, 1, 4)  # (w, h, w, h)
    torch.minimum(boxes.clamp_(min=0), limits, out=boxes)
    scores = torch.softmax(class_logits.float(), dim=-1).view(batch, count, num_classes)
    large = (boxes[..., 2:] - boxes[..., :2] >= min_size).all(dim=-1)
    real = torch.arange(count, device=proposals.device) < num_valid[:, None]
    foreground = torch.arange(num_classes, device=proposals.device) >= 1
    return boxes, scores.masked_fill_(~(large & real[..., None] & foreground), float("-inf"))


# ----------------------------------------------------------------------------------------------
# torch.library registration (not differentiable: torchvision's detections carry no gradient)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::postprocess_detections", mutates_args=())
def postprocess_detections_op(
    class_logits: torch.Tensor,
    box_regression: torch.Tensor,
    proposals: torch.Tensor,
    num_valid: torch.Tensor,
    image_sizes: torch.Tensor,
    weights: list[float],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    min_size: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``boxes [B, D, 4]`` fp32, ``scores [B, D]`` fp32, ``labels [B, D]`` int64, ``num_valid [B]``."""
    args = (class_logits, box_regression, proposals, num_valid, image_sizes, weights, min_size, clip)
    if use_triton(proposals.device):
        boxes, scores = detection_candidates_triton(*args)
    elif use_fast_cpu(proposals.device):
        boxes, scores = detection_candidates_cpu(*args)
    else:
        boxes, scores = detection_candidates_reference(*args)
    boxes, scores, labels, _, count = batched_nms_padded_impl(
        boxes, scores, nms_thresh, detections_per_img, score_thresh, False, None
    )
    return boxes, scores, labels, count


@postprocess_detections_op.register_fake
def _(class_logits, box_regression, proposals, num_valid, image_sizes, weights, score_thresh, nms_thresh,
      detections_per_img, *_):  # fmt: skip
    batch = proposals.shape[0]
    return (
        proposals.new_empty((batch, detections_per_img, 4), dtype=torch.float32),
        proposals.new_empty((batch, detections_per_img), dtype=torch.float32),
        proposals.new_empty((batch, detections_per_img), dtype=torch.int64),
        proposals.new_empty((batch,), dtype=torch.int64),
    )


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations: any head dtype, any proposal dtype.
# ----------------------------------------------------------------------------------------------

_SPEC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _aot_specs() -> list[KernelSpec]:
    specs = []
    image_sizes = torch.zeros((1, 2))
    outputs = (torch.empty((1, 1, 1, 4)), torch.empty((1, 1, 1)))
    num_valid = torch.zeros(1, dtype=torch.int64)
    for head_dtype in _SPEC_DTYPES:
        logits, deltas = torch.empty((1, 1), dtype=head_dtype), torch.empty((1, 4), dtype=head_dtype)
        for proposals_dtype in _SPEC_DTYPES:
            proposals = torch.empty((1, 1, 4), dtype=proposals_dtype)
            args, meta = _candidates_arguments(
                logits, deltas, proposals, num_valid, image_sizes, *outputs, (1.0,) * 4, 0.0, 1.0
            )
            label = (
                f"head {str(head_dtype).removeprefix('torch.')},proposals {str(proposals_dtype).removeprefix('torch.')}"
            )
            specs.append(KernelSpec.from_example(_detection_candidates_kernel, args, meta, label))
    return specs


# None: the softmax takes exps and decoding an exp (approximate on a GPU; see CONTRIBUTING).
EXACT_KERNELS: frozenset = frozenset()
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("postprocess_detections",)
