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

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NUM_WARPS, compute_dtype_of, ieee_div, load_four
from ._launch import device_table, launch

DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@triton.jit
def decode_box(x1, y1, x2, y2, dx, dy, dw, dh, wx, wy, ww, wh, clip):
    """Decode one set of deltas against the box (x1, y1, x2, y2): torchvision's order of operations.

    Coordinates, deltas, the weights and ``clip`` are in the compute dtype (an fp32 scalar argument
    in an fp64 computation would round ``clip``, ``log(1000 / 16)``, and weights such as 0.1).
    """
    width = x2 - x1
    height = y2 - y1
    ctr_x = x1 + 0.5 * width
    ctr_y = y1 + 0.5 * height
    dx = ieee_div(dx, wx)
    dy = ieee_div(dy, wy)
    # NaN propagates (a NaN delta or clip decodes to NaN), as torch.clamp.
    dw = tl.minimum(ieee_div(dw, ww), clip, propagate_nan=tl.PropagateNan.ALL)
    dh = tl.minimum(ieee_div(dh, wh), clip, propagate_nan=tl.PropagateNan.ALL)
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
    coder_ptr,  # [5] (wx, wy, ww, wh, unused clip) in the compute dtype: :func:`box_coder_table`
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    wx = tl.load(coder_ptr)
    wy = tl.load(coder_ptr + 1)
    ww = tl.load(coder_ptr + 2)
    wh = tl.load(coder_ptr + 3)
    pr = reference_ptr + rows * stride_ref_n
    pp = proposals_ptr + rows * stride_prop_n
    # Masked-off lanes read unit boxes: no division by a zero width there.
    gx1, gy1, gx2, gy2 = load_four(pr, stride_ref_c, ok, 0, 1, compute_dtype)
    px1, py1, px2, py2 = load_four(pp, stride_prop_c, ok, 0, 1, compute_dtype)

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
    coder_ptr,  # [5] (wx, wy, ww, wh, clip) in the compute dtype: :func:`box_coder_table`
    # meta-parameters
    COMPUTE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = pairs < tl.cast(N, tl.int64) * K
    rows = pairs // K
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    wx = tl.load(coder_ptr)
    wy = tl.load(coder_ptr + 1)
    ww = tl.load(coder_ptr + 2)
    wh = tl.load(coder_ptr + 3)
    clip = tl.load(coder_ptr + 4)
    pb = boxes_ptr + rows * stride_boxes_n
    x1, y1, x2, y2 = load_four(pb, stride_boxes_c, ok, 0, 0, compute_dtype)
    pd = deltas_ptr + rows * stride_deltas_n + (pairs - rows * K) * 4 * stride_deltas_c
    dx, dy, dw, dh = load_four(pd, stride_deltas_c, ok, 0, 0, compute_dtype)
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


def _block_size(compute_dtype: torch.dtype) -> int:
    """Boxes per program: 256 fp32 (2 per thread at 4 warps, ~20 live values each) or 128 fp64.

    Elementwise and memory bound; two boxes per thread give each thread two independent loads in
    flight without spilling (`tritondet compile-report`).
    """
    return 128 if compute_dtype == torch.float64 else 256


def box_coder_table(weights, clip: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[5]`` ``(wx, wy, ww, wh, clip)`` in ``dtype`` on ``device``, cached (``_launch.device_table``).

    Triton types a Python float argument as fp32, so the encode and decode kernels, computing in
    fp64 for fp64 boxes, read their weights (and clip) from this table instead; in fp32 the
    loaded values are those fp32 arguments would be.
    """
    return device_table([*(float(w) for w in weights), float(clip)], dtype, device)


def _encode_arguments(reference_boxes, proposals, out, weights) -> tuple[tuple, dict]:
    """``(args, meta)`` of :func:`_encode_kernel`: what the launcher passes and what the
    ahead-of-time specs are derived from."""
    args = (
        reference_boxes,
        proposals,
        out,
        reference_boxes.shape[0],
        *reference_boxes.stride(),
        *proposals.stride(),
        # Encoding clips nothing: the table's clip entry is never read.
        box_coder_table(weights, math.inf, out.dtype, out.device),
    )
    meta = {"COMPUTE_FP64": out.dtype == torch.float64, "BLOCK": _block_size(out.dtype), "num_warps": NUM_WARPS}
    return args, meta


def encode_triton(reference_boxes: torch.Tensor, proposals: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``[N, 4] x [N, 4] -> [N, 4]`` deltas in the compute dtype, one launch."""
    n = reference_boxes.shape[0]
    compute_dtype = compute_dtype_of(reference_boxes.dtype)
    out = torch.empty((n, 4), dtype=compute_dtype, device=reference_boxes.device)
    args, meta = _encode_arguments(reference_boxes, proposals, out, weights)
    launch(_encode_kernel, (triton.cdiv(n, meta["BLOCK"]),), *args, **meta)
    return out


def _decode_arguments(deltas, boxes, out, weights, clip) -> tuple[tuple, dict]:
    """``(args, meta)`` of :func:`_decode_kernel` (see :func:`_encode_arguments`)."""
    args = (
        deltas,
        boxes,
        out,
        deltas.shape[0],
        deltas.shape[1] // 4,
        *deltas.stride(),
        *boxes.stride(),
        box_coder_table(weights, clip, out.dtype, out.device),
    )
    meta = {"COMPUTE_FP64": out.dtype == torch.float64, "BLOCK": _block_size(out.dtype), "num_warps": NUM_WARPS}
    return args, meta


def decode_triton(deltas: torch.Tensor, boxes: torch.Tensor, weights: list[float], clip: float) -> torch.Tensor:
    """``[N, 4K] x [N, 4] -> [N, 4K]`` boxes in the compute dtype, one launch."""
    n, k = deltas.shape[0], deltas.shape[1] // 4
    compute_dtype = compute_dtype_of(deltas.dtype)
    out = torch.empty((n, 4 * k), dtype=compute_dtype, device=deltas.device)
    args, meta = _decode_arguments(deltas, boxes, out, weights, clip)
    launch(_decode_kernel, (triton.cdiv(n * k, meta["BLOCK"]),), *args, **meta)
    return out


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


def _scale_(values: torch.Tensor, factor: float) -> torch.Tensor:
    """``values * factor`` in place; a factor of 1 is skipped (``x * 1`` is ``x`` to the bit)."""
    return values if factor == 1.0 else values.mul_(factor)


def _centre_size_cpu(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_centre_size` of ``[N, 4]`` boxes, each a new ``[N]`` tensor, in fewer passes."""
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    return width.mul(0.5).add_(boxes[:, 0]), height.mul(0.5).add_(boxes[:, 1]), width, height


def encode_cpu(reference_boxes: torch.Tensor, proposals: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The fast CPU path of :func:`encode_reference`, ``[N, 4] x [N, 4] -> [N, 4]`` contiguous:
    the same formulas in the same order, updated in place and written into the result's columns
    (half the passes over memory), bit for bit the same values. Each pass runs over contiguous
    coordinate planes, so it stays vectorized at the RPN's 558,558 anchors: a layout pairing x
    with y makes fewer small ops but ran at 0.37x torchvision's speed there (paired bench)."""
    compute_dtype = compute_dtype_of(reference_boxes.dtype)
    wx, wy, ww, wh = weights
    ex_ctr_x, ex_ctr_y, ex_w, ex_h = _centre_size_cpu(proposals.to(compute_dtype))
    gt_ctr_x, gt_ctr_y, gt_w, gt_h = _centre_size_cpu(reference_boxes.to(compute_dtype))
    out = torch.empty((ex_w.shape[0], 4), dtype=compute_dtype, device=ex_w.device)
    torch.div(_scale_(gt_ctr_x.sub_(ex_ctr_x), wx), ex_w, out=out[:, 0])
    torch.div(_scale_(gt_ctr_y.sub_(ex_ctr_y), wy), ex_h, out=out[:, 1])
    _scale_(torch.log(gt_w.div_(ex_w), out=out[:, 2]), ww)
    _scale_(torch.log(gt_h.div_(ex_h), out=out[:, 3]), wh)
    return out


def _unweighted(codes: torch.Tensor, weight: float) -> torch.Tensor:
    """``codes / weight`` as a new tensor; a weight of 1 is skipped (``x / 1`` is ``x`` to the
    bit): then ``codes`` itself, which the caller must not update in place."""
    return codes / weight if weight != 1.0 else codes


def decode_cpu(deltas: torch.Tensor, boxes: torch.Tensor, weights: list[float], clip: float) -> torch.Tensor:
    """The fast CPU path of :func:`decode_reference`, ``[N, 4K] x [N, 4] -> [N, 4K]`` contiguous:
    the same formulas in the same order, updated in place and written into the result's columns
    (half the passes over memory), bit for bit the same values."""
    compute_dtype = compute_dtype_of(deltas.dtype)
    wx, wy, ww, wh = weights
    codes = deltas.to(compute_dtype).unflatten(-1, (-1, 4))  # [N, K, 4]
    ctr_x, ctr_y, width, height = (t[:, None] for t in _centre_size_cpu(boxes.to(compute_dtype)))
    pred_ctr_x = torch.mul(_unweighted(codes[..., 0], wx), width).add_(ctr_x)
    pred_ctr_y = torch.mul(_unweighted(codes[..., 1], wy), height).add_(ctr_y)
    half_w = torch.clamp(_unweighted(codes[..., 2], ww), max=clip).exp_().mul_(width).mul_(0.5)
    half_h = torch.clamp(_unweighted(codes[..., 3], wh), max=clip).exp_().mul_(height).mul_(0.5)
    out = torch.empty(codes.shape, dtype=compute_dtype, device=codes.device)
    torch.sub(pred_ctr_x, half_w, out=out[..., 0])
    torch.sub(pred_ctr_y, half_h, out=out[..., 1])
    torch.add(pred_ctr_x, half_w, out=out[..., 2])
    torch.add(pred_ctr_y, half_h, out=out[..., 3])
    return out.flatten(-2)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::encode_boxes", mutates_args=())
def encode_boxes_op(reference_boxes: torch.Tensor, proposals: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``[N, 4] x [N, 4] -> [N, 4]`` (fp32, or fp64 for fp64 boxes)."""
    if use_triton(reference_boxes.device):
        return encode_triton(reference_boxes, proposals, weights)
    if use_fast_cpu(reference_boxes.device):
        return encode_cpu(reference_boxes, proposals, weights)
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
    if use_fast_cpu(deltas.device):
        return decode_cpu(deltas, boxes, weights, clip)
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


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations: every input dtype (and reference-box dtype) the launchers take.
# ----------------------------------------------------------------------------------------------

_SPEC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _aot_specs() -> list[KernelSpec]:
    specs = []
    weights = (1.0,) * 4
    for dtype in _SPEC_DTYPES:
        boxes, out = torch.empty((1, 4), dtype=dtype), torch.empty((1, 4), dtype=compute_dtype_of(dtype))
        label = str(dtype).removeprefix("torch.")
        specs.append(KernelSpec.from_example(_encode_kernel, *_encode_arguments(boxes, boxes, out, weights), label))
        # Decode: deltas and reference boxes may differ in dtype (fp16 head, fp32 anchors).
        for boxes_dtype in _SPEC_DTYPES:
            reference = torch.empty((1, 4), dtype=boxes_dtype)
            args, meta = _decode_arguments(boxes, reference, out, weights, 1.0)
            boxes_label = str(boxes_dtype).removeprefix("torch.")
            specs.append(KernelSpec.from_example(_decode_kernel, args, meta, f"deltas {label},boxes {boxes_label}"))
    return specs


# None: encoding takes a log, decoding an exp (both approximate on a GPU; see CONTRIBUTING).
EXACT_KERNELS: frozenset = frozenset()
AOT_SPECS = _aot_specs()
PUBLIC_OPS = ("encode_boxes", "decode_boxes")
