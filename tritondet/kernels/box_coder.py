"""Box coding: regression deltas relative to reference boxes, and back (Faster R-CNN, eq. 2).

Shapes: encode ``reference_boxes [N, 4], proposals [N, 4] -> deltas [N, 4]``; decode
``deltas [N, 4K], boxes [N, 4] -> boxes [N, 4K]`` (K boxes per reference box, e.g. one per class).

With ``w = x2 - x1``, ``cx = x1 + w / 2`` (likewise y, h) for a proposal (anchor) and a reference
(ground-truth) box, and weights ``(wx, wy, ww, wh)``:
``dx = wx (gt_cx - cx) / w``, ``dy = wy (gt_cy - cy) / h``, ``dw = ww log(gt_w / w)``,
``dh = wh log(gt_h / h)``. Decoding inverts it; ``dw / ww`` and ``dh / wh`` are clamped to
``bbox_xform_clip`` (default ``log(1000 / 16)``) before ``exp`` so no box grows more than 62.5x.
The RPN uses weights ``(1, 1, 1, 1)``, the box head ``(10, 10, 5, 5)``.

Numerics: torchvision's formulas in torchvision's order. fp16/bf16 inputs are upcast on load and
all math is fp32 (fp64 stays fp64); the result is rounded to the input dtype at the end, where
torchvision computes in half precision throughout (our fp16/bf16 results are the more accurate).

Order of this file: ``@triton.jit`` helpers (shared with the fused proposal kernels) -> kernels ->
host launchers -> pure-PyTorch reference -> ``torch.library`` registration -> AOT specializations.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import use_triton
from ._aot import KernelSpec
from ._common import NUM_WARPS, clip_box, clip_to_images, compute_dtype_of
from ._launch import launch, triton_pointer_type
from .nms import batched_nms_padded_impl

DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@triton.jit
def ieee_div(x, y):
    """x / y rounded to nearest like torch's division (Triton's fp32 ``/`` is approximate on GPUs)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def decode_box(x1, y1, x2, y2, dx, dy, dw, dh, wx, wy, ww, wh, clip):
    """Decode one set of deltas against the box (x1, y1, x2, y2): torchvision's order of operations.

    Coordinates and deltas are in the compute dtype; the weights and ``clip`` are fp32 scalars.
    """
    width = x2 - x1
    height = y2 - y1
    ctr_x = x1 + 0.5 * width
    ctr_y = y1 + 0.5 * height
    dx = ieee_div(dx, wx)
    dy = ieee_div(dy, wy)
    dw = tl.minimum(ieee_div(dw, ww), clip)
    dh = tl.minimum(ieee_div(dh, wh), clip)
    pred_ctr_x = dx * width + ctr_x
    pred_ctr_y = dy * height + ctr_y
    half_w = 0.5 * (tl.exp(dw) * width)
    half_h = 0.5 * (tl.exp(dh) * height)
    return pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h


@triton.jit
def _encode_kernel(
    # pointers
    reference_ptr,  # [N, 4] ground-truth boxes, any strides
    proposals_ptr,  # [N, 4] anchors / proposals, any strides
    out_ptr,  # [N, 4] contiguous deltas in the compute dtype
    # sizes
    N,
    # strides (in elements)
    stride_ref_n,
    stride_ref_c,
    stride_prop_n,
    stride_prop_c,
    # scalars
    wx,
    wy,
    ww,
    wh,
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    pr = reference_ptr + rows * stride_ref_n
    pp = proposals_ptr + rows * stride_prop_n
    # Upcast on load: no arithmetic in half precision (the Triton interpreter has no bf16 math).
    gx1 = tl.load(pr, mask=ok, other=0).to(compute_dtype)
    gy1 = tl.load(pr + stride_ref_c, mask=ok, other=0).to(compute_dtype)
    gx2 = tl.load(pr + 2 * stride_ref_c, mask=ok, other=1).to(compute_dtype)
    gy2 = tl.load(pr + 3 * stride_ref_c, mask=ok, other=1).to(compute_dtype)
    px1 = tl.load(pp, mask=ok, other=0).to(compute_dtype)
    py1 = tl.load(pp + stride_prop_c, mask=ok, other=0).to(compute_dtype)
    px2 = tl.load(pp + 2 * stride_prop_c, mask=ok, other=1).to(compute_dtype)
    py2 = tl.load(pp + 3 * stride_prop_c, mask=ok, other=1).to(compute_dtype)

    ex_w = px2 - px1
    ex_h = py2 - py1
    ex_ctr_x = px1 + 0.5 * ex_w
    ex_ctr_y = py1 + 0.5 * ex_h
    gt_w = gx2 - gx1
    gt_h = gy2 - gy1
    gt_ctr_x = gx1 + 0.5 * gt_w
    gt_ctr_y = gy1 + 0.5 * gt_h
    dx = ieee_div(wx * (gt_ctr_x - ex_ctr_x), ex_w)
    dy = ieee_div(wy * (gt_ctr_y - ex_ctr_y), ex_h)
    dw = ww * tl.log(ieee_div(gt_w, ex_w))
    dh = wh * tl.log(ieee_div(gt_h, ex_h))

    po = out_ptr + rows * 4
    tl.store(po, dx, mask=ok)
    tl.store(po + 1, dy, mask=ok)
    tl.store(po + 2, dw, mask=ok)
    tl.store(po + 3, dh, mask=ok)


@triton.jit
def _decode_kernel(
    # pointers
    deltas_ptr,  # [N, 4K], any strides
    boxes_ptr,  # [N, 4] reference boxes, any strides
    out_ptr,  # [N, 4K] contiguous boxes in the compute dtype
    # sizes
    N,
    K,  # boxes decoded per reference box
    # strides (in elements)
    stride_deltas_n,
    stride_deltas_c,
    stride_boxes_n,
    stride_boxes_c,
    # scalars
    wx,
    wy,
    ww,
    wh,
    clip,
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = pairs < N * K
    rows = pairs // K
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    pb = boxes_ptr + rows * stride_boxes_n
    x1 = tl.load(pb, mask=ok, other=0).to(compute_dtype)
    y1 = tl.load(pb + stride_boxes_c, mask=ok, other=0).to(compute_dtype)
    x2 = tl.load(pb + 2 * stride_boxes_c, mask=ok, other=0).to(compute_dtype)
    y2 = tl.load(pb + 3 * stride_boxes_c, mask=ok, other=0).to(compute_dtype)
    pd = deltas_ptr + rows * stride_deltas_n + (pairs - rows * K) * 4 * stride_deltas_c
    dx = tl.load(pd, mask=ok, other=0).to(compute_dtype)
    dy = tl.load(pd + stride_deltas_c, mask=ok, other=0).to(compute_dtype)
    dw = tl.load(pd + 2 * stride_deltas_c, mask=ok, other=0).to(compute_dtype)
    dh = tl.load(pd + 3 * stride_deltas_c, mask=ok, other=0).to(compute_dtype)
    bx1, by1, bx2, by2 = decode_box(
        x1,
        y1,
        x2,
        y2,
        dx,
        dy,
        dw,
        dh,
        wx,
        wy,
        ww,
        wh,
        clip,
    )
    po = out_ptr + pairs * 4
    tl.store(po, bx1, mask=ok)
    tl.store(po + 1, by1, mask=ok)
    tl.store(po + 2, bx2, mask=ok)
    tl.store(po + 3, by2, mask=ok)


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
    px1 = tl.load(pp, mask=row_ok, other=0).to(tl.float32)[:, None]
    py1 = tl.load(pp + stride_proposals_xy, mask=row_ok, other=0).to(tl.float32)[:, None]
    px2 = tl.load(pp + 2 * stride_proposals_xy, mask=row_ok, other=0).to(tl.float32)[:, None]
    py2 = tl.load(pp + 3 * stride_proposals_xy, mask=row_ok, other=0).to(tl.float32)[:, None]
    height = tl.load(image_sizes_ptr + image * 2, mask=row_ok, other=0)[:, None]
    width = tl.load(image_sizes_ptr + image * 2 + 1, mask=row_ok, other=0)[:, None]
    real = (proposal < tl.load(num_valid_ptr + image, mask=row_ok, other=0))[:, None]
    for first in range(0, C, BLOCK_CLASSES):
        cls = first + lanes
        ok = row_ok[:, None] & (cls < C)[None, :]
        x = tl.load(logits + cls[None, :] * stride_logits_c, mask=ok, other=float("-inf")).to(tl.float32)
        probability = tl.exp(x - largest[:, None]) / total[:, None]
        pd = deltas_ptr + row[:, None] * stride_deltas_r + (4 * cls)[None, :] * stride_deltas_c
        dx = tl.load(pd, mask=ok, other=0).to(tl.float32)
        dy = tl.load(pd + stride_deltas_c, mask=ok, other=0).to(tl.float32)
        dw = tl.load(pd + 2 * stride_deltas_c, mask=ok, other=0).to(tl.float32)
        dh = tl.load(pd + 3 * stride_deltas_c, mask=ok, other=0).to(tl.float32)
        x1, y1, x2, y2 = decode_box(px1, py1, px2, py2, dx, dy, dw, dh, wx, wy, ww, wh, clip)
        x1, y1, x2, y2 = clip_box(x1, y1, x2, y2, height, width)
        keep = real & (cls >= 1)[None, :] & ((x2 - x1) >= min_size) & ((y2 - y1) >= min_size)
        out = row[:, None] * C + cls[None, :]
        tl.store(scores_ptr + out, tl.where(keep, probability, float("-inf")), mask=ok)
        tl.store(boxes_ptr + out * 4, x1, mask=ok)
        tl.store(boxes_ptr + out * 4 + 1, y1, mask=ok)
        tl.store(boxes_ptr + out * 4 + 2, x2, mask=ok)
        tl.store(boxes_ptr + out * 4 + 3, y2, mask=ok)


def _block_size(compute_dtype: torch.dtype) -> int:
    """Boxes per program: 256 fp32 (2 per thread at 4 warps, ~20 live values each) or 128 fp64.

    Elementwise and memory bound; two boxes per thread give each thread two independent loads in
    flight without spilling (`tritondet compile-report`).
    """
    return 128 if compute_dtype == torch.float64 else 256


def encode_triton(reference_boxes: torch.Tensor, proposals: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``[N, 4] x [N, 4] -> [N, 4]`` deltas in the compute dtype, one launch."""
    n = reference_boxes.shape[0]
    compute_dtype = compute_dtype_of(reference_boxes.dtype)
    out = torch.empty((n, 4), dtype=compute_dtype, device=reference_boxes.device)
    block = _block_size(compute_dtype)
    launch(
        _encode_kernel,
        (triton.cdiv(n, block),),
        reference_boxes,
        proposals,
        out,
        n,
        *reference_boxes.stride(),
        *proposals.stride(),
        *[float(w) for w in weights],
        COMPUTE_FP64=compute_dtype == torch.float64,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    return out


def decode_triton(deltas: torch.Tensor, boxes: torch.Tensor, weights: list[float], clip: float) -> torch.Tensor:
    """``[N, 4K] x [N, 4] -> [N, 4K]`` boxes in the compute dtype, one launch."""
    n, k = deltas.shape[0], deltas.shape[1] // 4
    compute_dtype = compute_dtype_of(deltas.dtype)
    out = torch.empty((n, 4 * k), dtype=compute_dtype, device=deltas.device)
    block = _block_size(compute_dtype)
    launch(
        _decode_kernel,
        (triton.cdiv(n * k, block),),
        deltas,
        boxes,
        out,
        n,
        k,
        *deltas.stride(),
        *boxes.stride(),
        *[float(w) for w in weights],
        float(clip),
        COMPUTE_FP64=compute_dtype == torch.float64,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    return out


# Detection candidates: 8 rows x 32 classes per program (2 per thread at 4 warps); each element
# holds a proposal, 4 deltas, a box and a score (~20 live fp32 values). 91 COCO classes are 3 chunks.
_CANDIDATE_ROWS = 8
_CANDIDATE_CLASSES = 32


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
    launch(
        _detection_candidates_kernel,
        (triton.cdiv(batch * count, _CANDIDATE_ROWS),),
        class_logits,
        box_regression,
        proposals,
        num_valid,
        image_sizes.to(torch.float32).contiguous(),
        boxes,
        scores,
        batch * count,
        count,
        num_classes,
        *class_logits.stride(),
        *box_regression.stride(),
        *proposals.stride(),
        *(float(w) for w in weights),
        float(clip),
        float(min_size),
        BLOCK_ROWS=_CANDIDATE_ROWS,
        BLOCK_CLASSES=_CANDIDATE_CLASSES,
        num_warps=NUM_WARPS,
    )
    return boxes, scores


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch, the test oracle and the CPU path.
# ----------------------------------------------------------------------------------------------


def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * width, boxes[..., 1] + 0.5 * height, width, height


def encode_reference(reference_boxes: torch.Tensor, proposals: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``[N, 4] x [N, 4] -> [N, 4]`` in the compute dtype (fp32, fp64 for fp64 boxes)."""
    compute_dtype = compute_dtype_of(reference_boxes.dtype)
    wx, wy, ww, wh = weights
    ex_ctr_x, ex_ctr_y, ex_w, ex_h = _centre_size(proposals.to(compute_dtype))
    gt_ctr_x, gt_ctr_y, gt_w, gt_h = _centre_size(reference_boxes.to(compute_dtype))
    dx = wx * (gt_ctr_x - ex_ctr_x) / ex_w
    dy = wy * (gt_ctr_y - ex_ctr_y) / ex_h
    dw = ww * torch.log(gt_w / ex_w)
    dh = wh * torch.log(gt_h / ex_h)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def decode_reference(deltas: torch.Tensor, boxes: torch.Tensor, weights: list[float], clip: float) -> torch.Tensor:
    """``[..., N, 4K] x [..., N, 4] -> [..., N, 4K]`` in the compute dtype."""
    compute_dtype = compute_dtype_of(deltas.dtype)
    wx, wy, ww, wh = weights
    codes = deltas.to(compute_dtype).unflatten(-1, (-1, 4))
    ctr_x, ctr_y, width, height = (t[..., None] for t in _centre_size(boxes.to(compute_dtype)))
    dx = codes[..., 0] / wx
    dy = codes[..., 1] / wy
    dw = torch.clamp(codes[..., 2] / ww, max=clip)
    dh = torch.clamp(codes[..., 3] / wh, max=clip)
    pred_ctr_x = dx * width + ctr_x
    pred_ctr_y = dy * height + ctr_y
    half_w = 0.5 * (torch.exp(dw) * width)
    half_h = 0.5 * (torch.exp(dh) * height)
    decoded = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), -1)
    return decoded.flatten(-2)


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


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::encode_boxes", mutates_args=())
def encode_boxes_op(reference_boxes: torch.Tensor, proposals: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``[N, 4] x [N, 4] -> [N, 4]`` (fp32, or fp64 for fp64 boxes)."""
    if use_triton(reference_boxes.device):
        return encode_triton(reference_boxes, proposals, weights)
    return encode_reference(reference_boxes, proposals, weights).contiguous()


@encode_boxes_op.register_fake
def _(reference_boxes, proposals, weights):
    return reference_boxes.new_empty((reference_boxes.shape[0], 4), dtype=compute_dtype_of(reference_boxes.dtype))


def _encode_setup(ctx, inputs, output):
    reference_boxes, proposals, weights = inputs
    ctx.save_for_backward(reference_boxes, proposals)
    ctx.weights = weights


def _encode_backward(ctx, grad):
    """Vector-Jacobian product of the reference (the kernel's exact formulas)."""
    reference_boxes, proposals = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda r, p: encode_reference(r, p, ctx.weights), reference_boxes, proposals)
    grad_reference, grad_proposals = vjp(grad)
    return grad_reference, grad_proposals, None


encode_boxes_op.register_autograd(_encode_backward, setup_context=_encode_setup)


@torch.library.custom_op("tritondet::decode_boxes", mutates_args=())
def decode_boxes_op(deltas: torch.Tensor, boxes: torch.Tensor, weights: list[float], clip: float) -> torch.Tensor:
    """``[N, 4K] x [N, 4] -> [N, 4K]`` (fp32, or fp64 for fp64 deltas)."""
    if use_triton(deltas.device):
        return decode_triton(deltas, boxes, weights, clip)
    return decode_reference(deltas, boxes, weights, clip).contiguous()


@decode_boxes_op.register_fake
def _(deltas, boxes, weights, clip):
    return deltas.new_empty(deltas.shape, dtype=compute_dtype_of(deltas.dtype))


def _decode_setup(ctx, inputs, output):
    deltas, boxes, weights, clip = inputs
    ctx.save_for_backward(deltas, boxes)
    ctx.weights, ctx.clip = weights, clip


def _decode_backward(ctx, grad):
    deltas, boxes = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda d, b: decode_reference(d, b, ctx.weights, ctx.clip), deltas, boxes)
    grad_deltas, grad_boxes = vjp(grad)
    return grad_deltas, grad_boxes, None, None


decode_boxes_op.register_autograd(_decode_backward, setup_context=_decode_setup)


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
# Ahead-of-time specializations: every (input dtype) the launchers can produce.
# ----------------------------------------------------------------------------------------------

_SPEC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _aot_specs() -> list[KernelSpec]:
    specs = []
    weights = dict.fromkeys(("wx", "wy", "ww", "wh"), "fp32")
    for dtype in _SPEC_DTYPES:
        compute = compute_dtype_of(dtype)
        constexprs = {"COMPUTE_FP64": compute == torch.float64, "BLOCK": _block_size(compute)}
        meta = dict.fromkeys(constexprs, "constexpr")
        box_type, out_type = triton_pointer_type(dtype), triton_pointer_type(compute)
        label = str(dtype).removeprefix("torch.")
        encode_signature = {
            "reference_ptr": box_type,
            "proposals_ptr": box_type,
            "out_ptr": out_type,
            "N": "i32",
            **dict.fromkeys(("stride_ref_n", "stride_ref_c", "stride_prop_n", "stride_prop_c"), "i32"),
            **weights,
            **meta,
        }
        specs.append(KernelSpec(_encode_kernel, encode_signature, constexprs, label, num_warps=NUM_WARPS))
        # Decode: deltas and reference boxes may differ in dtype (fp16 head, fp32 anchors).
        for boxes_dtype in _SPEC_DTYPES:
            decode_signature = {
                "deltas_ptr": box_type,
                "boxes_ptr": triton_pointer_type(boxes_dtype),
                "out_ptr": out_type,
                "N": "i32",
                "K": "i32",
                **dict.fromkeys(("stride_deltas_n", "stride_deltas_c", "stride_boxes_n", "stride_boxes_c"), "i32"),
                **weights,
                "clip": "fp32",
                **meta,
            }
            boxes_label = str(boxes_dtype).removeprefix("torch.")
            specs.append(
                KernelSpec(
                    _decode_kernel,
                    decode_signature,
                    constexprs,
                    f"deltas {label},boxes {boxes_label}",
                    num_warps=NUM_WARPS,
                )
            )
        # Detection candidates: any head dtype, any proposal dtype.
        for proposals_dtype in _SPEC_DTYPES:
            signature = {
                "logits_ptr": box_type,
                "deltas_ptr": box_type,
                "proposals_ptr": triton_pointer_type(proposals_dtype),
                "num_valid_ptr": "*i64",
                "image_sizes_ptr": "*fp32",
                "boxes_ptr": "*fp32",
                "scores_ptr": "*fp32",
                **dict.fromkeys(("rows", "P", "C"), "i32"),
                **dict.fromkeys(("stride_logits_r", "stride_logits_c", "stride_deltas_r", "stride_deltas_c"), "i32"),
                **dict.fromkeys(("stride_proposals_b", "stride_proposals_p", "stride_proposals_xy"), "i32"),
                **weights,
                "clip": "fp32",
                "min_size": "fp32",
                **dict.fromkeys(("BLOCK_ROWS", "BLOCK_CLASSES"), "constexpr"),
            }
            candidate_meta = {"BLOCK_ROWS": _CANDIDATE_ROWS, "BLOCK_CLASSES": _CANDIDATE_CLASSES}
            proposals_label = str(proposals_dtype).removeprefix("torch.")
            specs.append(
                KernelSpec(
                    _detection_candidates_kernel,
                    signature,
                    candidate_meta,
                    f"head {label},proposals {proposals_label}",
                    num_warps=NUM_WARPS,
                )
            )
    return specs


AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("encode_boxes", "decode_boxes", "postprocess_detections")
