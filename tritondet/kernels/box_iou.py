"""Pairwise box overlap: IoU, generalized, distance and complete IoU, for batches of box sets.

Shapes: boxes1 ``[B, N, 4]``, boxes2 ``[B, M, 4]`` -> ``[B, N, M]``.

Order of this file: Triton kernel -> host launcher -> pure-PyTorch reference (test oracle and CPU
path) -> ``torch.library`` registration (dispatch, fake kernel, autograd) -> AOT specializations.

Numerics: boxes are upcast to the compute dtype as they are loaded (fp16/bf16/integers -> fp32,
fp64 stays fp64) and every operation follows torchvision's formulas in torchvision's order, so fp32
and fp64 results equal torchvision's and NaN appears exactly where torchvision's does (0/0 for two
empty boxes). Two sets of different dtypes are not promoted first: as torchvision, each set's
per-box terms (corners of the xywh and cxcywh formats, areas, centers, aspect angles) are computed
in its own compute dtype, and the pairwise terms in the promoted one (fp32 boxes beside fp64 boxes:
fp32 areas added to fp64 areas), bit for bit torchvision's. torchvision forms the corner extents of fp16/bf16 boxes in half precision before
upcasting; we do not, so there our results are the more accurate ones and differ from
torchvision's by at most that rounding (the fp16/bf16 rows of the tests' tolerance table).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import use_fast_cpu, use_triton
from ._aot import KernelSpec
from ._common import NO_FP_FUSION, NUM_WARPS, PROPAGATE_NAN, compute_dtype_of, ieee_div, load_four, split_program
from ._launch import launch

KINDS = ("iou", "giou", "diou", "ciou")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
_KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}
_FORMAT_CODE = {fmt: code for code, fmt in enumerate(BOX_FORMATS)}
# 4 / pi^2, the aspect-ratio consistency factor of CIoU (Zheng et al. 2020).
CIOU_FACTOR = tl.constexpr(4.0 / (math.pi**2))


@triton.jit
def _corners(raw0, raw1, raw2, raw3, FMT: tl.constexpr):
    """(x1, y1, x2, y2) in the input dtype from a box stored in format FMT."""
    if FMT == 0:  # xyxy
        return raw0, raw1, raw2, raw3
    elif FMT == 1:  # xywh
        return raw0, raw1, raw0 + raw2, raw1 + raw3
    else:  # cxcywh
        half_w = raw2 * 0.5
        half_h = raw3 * 0.5
        return raw0 - half_w, raw1 - half_h, raw0 + half_w, raw1 + half_h


@triton.jit
def _box_terms(raw0, raw1, raw2, raw3, FMT: tl.constexpr, compute_dtype: tl.constexpr):
    """(x1, y1, x2, y2, area, center x, center y) of boxes stored in format FMT, computed in the
    dtype of the loaded values (the set's own compute dtype, as torchvision), then converted to
    the pair's ``compute_dtype``."""
    x1, y1, x2, y2 = _corners(raw0, raw1, raw2, raw3, FMT)
    area = (x2 - x1) * (y2 - y1) if FMT == 0 else raw2 * raw3
    center_x = (x1 + x2) * 0.5
    center_y = (y1 + y2) * 0.5
    return (
        x1.to(compute_dtype), y1.to(compute_dtype), x2.to(compute_dtype), y2.to(compute_dtype),
        area.to(compute_dtype), center_x.to(compute_dtype), center_y.to(compute_dtype),
    )  # fmt: skip


@triton.jit
def _torch_maximum(a, b):
    """``torch.maximum(a, b)`` exactly: NaN from either side, and ``a`` on a tie, so ``max(+0, -0)``
    is +0 and ``max(-0, +0)`` is -0 (a hardware or NumPy maximum picks either zero, and the sign of
    a zero extent decides the sign of an infinite GIoU)."""
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def _torch_minimum(a, b):
    """``torch.minimum(a, b)`` exactly: NaN from either side, and ``a`` on a tie."""
    return tl.where((b < a) | (b != b), b, a)


@triton.jit
def _clamp_min_zero(x):
    """``x.clamp(min=0)`` exactly: -0 and NaN pass unchanged."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def intersection_union(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b):
    """Intersection and union areas of box pairs (torchvision's formulas and order); the first box's
    corners and area broadcast against the second's. Shared with the NMS kernels.

    NaN propagates through the minima, maxima and clamps as through torch's: a NaN corner makes
    the intersection NaN even where the area, from a width and a height, is finite."""
    inter_w = tl.minimum(ax2, bx2, propagate_nan=PROPAGATE_NAN) - tl.maximum(ax1, bx1, propagate_nan=PROPAGATE_NAN)
    inter_h = tl.minimum(ay2, by2, propagate_nan=PROPAGATE_NAN) - tl.maximum(ay1, by1, propagate_nan=PROPAGATE_NAN)
    width = tl.maximum(inter_w, 0.0, propagate_nan=PROPAGATE_NAN)
    inter = width * tl.maximum(inter_h, 0.0, propagate_nan=PROPAGATE_NAN)
    return inter, area_a + area_b - inter


@triton.jit
def pairwise_iou_tile(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b):
    """IoU and union ``[N, M]`` of corner vectors ``[N]`` x ``[M]`` (torchvision's formula and order).

    Shared with the matcher (``matcher.py``), whose two passes must see bit-identical IoUs.
    """
    inter, union = intersection_union(
        ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None], area_a[:, None],
        bx1[None, :], by1[None, :], bx2[None, :], by2[None, :], area_b[None, :],
    )  # fmt: skip
    return ieee_div(inter, union), union


@triton.jit
def _pairwise_iou_kernel(
    # pointers
    boxes1_ptr,  # [B, N, 4], any strides
    boxes2_ptr,  # [B, M, 4], any strides
    aspect1_ptr,  # [B, N] contiguous atan(w / h), read only for CIoU
    aspect2_ptr,  # [B, M] contiguous atan(w / h), read only for CIoU
    out_ptr,  # [B, N, M] contiguous
    # sizes
    N,
    M,
    # strides (in elements)
    stride1_b,
    stride1_n,
    stride1_c,
    stride2_b,
    stride2_m,
    stride2_c,
    # scalars
    eps,
    # meta-parameters
    KIND: tl.constexpr,  # 0 iou, 1 giou, 2 diou, 3 ciou
    FMT: tl.constexpr,  # 0 xyxy, 1 xywh, 2 cxcywh (only for KIND 0, as torchvision)
    COMPUTE_FP64: tl.constexpr,  # the pairs' compute dtype; each set's own is its pointer's
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    tiles_m = tl.cdiv(M, BLOCK_M)
    batch, tile = split_program(tl.cdiv(N, BLOCK_N) * tiles_m)
    pid_n = tile // tiles_m
    pid_m = tile % tiles_m
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    compute_dtype = tl.float64 if COMPUTE_FP64 else tl.float32
    # Each set's per-box terms in its own compute dtype (fp64 boxes beside fp32 ones, see the launcher).
    dtype1 = tl.float64 if boxes1_ptr.dtype.element_ty == tl.float64 else tl.float32
    dtype2 = tl.float64 if boxes2_ptr.dtype.element_ty == tl.float64 else tl.float32

    p1 = boxes1_ptr + batch * stride1_b + rows.to(tl.int64) * stride1_n
    p2 = boxes2_ptr + batch * stride2_b + cols.to(tl.int64) * stride2_m
    r0, r1, r2, r3 = load_four(p1, stride1_c, row_ok, 0, 0, dtype1)
    c0, c1, c2, c3 = load_four(p2, stride2_c, col_ok, 0, 0, dtype2)

    ax1, ay1, ax2, ay2, area_a, center_ax, center_ay = _box_terms(r0, r1, r2, r3, FMT, compute_dtype)
    bx1, by1, bx2, by2, area_b, center_bx, center_by = _box_terms(c0, c1, c2, c3, FMT, compute_dtype)

    iou, union = pairwise_iou_tile(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b)

    if KIND == 0:
        result = iou
    else:
        hull_w = _clamp_min_zero(
            _torch_maximum(ax2[:, None], bx2[None, :]) - _torch_minimum(ax1[:, None], bx1[None, :])
        )
        hull_h = _clamp_min_zero(
            _torch_maximum(ay2[:, None], by2[None, :]) - _torch_minimum(ay1[:, None], by1[None, :])
        )
        if KIND == 1:
            hull_area = hull_w * hull_h
            result = iou - ieee_div(hull_area - union, hull_area)
        else:
            diagonal_sq = hull_w * hull_w + hull_h * hull_h + eps
            dx = center_ax[:, None] - center_bx[None, :]
            dy = center_ay[:, None] - center_by[None, :]
            result = iou - ieee_div(dx * dx + dy * dy, diagonal_sq)
            if KIND == 3:
                aspect_a = tl.load(aspect1_ptr + batch * N + rows, mask=row_ok, other=0)
                aspect_b = tl.load(aspect2_ptr + batch * M + cols, mask=col_ok, other=0)
                aspect_gap = aspect_a[:, None] - aspect_b[None, :]
                v = CIOU_FACTOR * (aspect_gap * aspect_gap)
                alpha = ieee_div(v, 1 - iou + v + eps)
                result = result - alpha * v

    out_offsets = (batch * N + rows.to(tl.int64))[:, None] * M + cols[None, :]
    tl.store(out_ptr + out_offsets, result, mask=row_ok[:, None] & col_ok[None, :])


def _tile_shape(compute_dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M) output tile per program.

    64 columns: a row segment of 64 fp32 outputs is 256 contiguous bytes, so each warp's stores
    fill whole 128-byte lines. Rows: 16 (fp32) or 8 (fp64) keep 8 resp. 4 outputs per thread at
    4 warps; CIoU holds ~12 live values per output, and larger tiles spill on sm_80/sm_90
    (`tritondet compile-report` checks every specialization for zero spills).
    """
    return (8, 64) if compute_dtype == torch.float64 else (16, 64)


def _aspect_angles(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., K, 4]`` xyxy boxes -> ``[..., K]`` atan(w / h), CIoU's per-box aspect term, in the
    boxes' own compute dtype."""
    boxes = _upcast(boxes)
    return torch.atan((boxes[..., 2] - boxes[..., 0]) / (boxes[..., 3] - boxes[..., 1]))


def _iou_arguments(boxes1, boxes2, aspect1, aspect2, out, kind: str, fmt: str, eps: float) -> tuple[tuple, dict]:
    """``(args, meta)`` of :func:`_pairwise_iou_kernel`: what the launcher passes and what the
    ahead-of-time specs are derived from."""
    args = (
        boxes1,
        boxes2,
        aspect1,
        aspect2,
        out,
        boxes1.shape[1],
        boxes2.shape[1],
        *boxes1.stride(),
        *boxes2.stride(),
        eps,
    )
    block_n, block_m = _tile_shape(out.dtype)
    meta = {
        "KIND": _KIND_CODE[kind],
        "FMT": _FORMAT_CODE[fmt],
        "COMPUTE_FP64": out.dtype == torch.float64,
        "BLOCK_N": block_n,
        "BLOCK_M": block_m,
        "num_warps": NUM_WARPS,
        **NO_FP_FUSION,
    }
    return args, meta


def pairwise_iou_triton(
    boxes1: torch.Tensor, boxes2: torch.Tensor, kind: str, fmt: str = "xyxy", eps: float = 1e-7
) -> torch.Tensor:
    """``[B, N, 4] x [B, M, 4] -> [B, N, M]`` on the Triton kernel; one launch (two more for CIoU).

    Boxes of one float dtype are read as stored; integer boxes, and two sets of different dtypes,
    are read from copies in their own compute dtype (fp32 or fp64: every value kept), so the
    kernel's specializations are one dtype for both sets, or fp32 beside fp64."""
    batch, n, m = boxes1.shape[0], boxes1.shape[1], boxes2.shape[1]
    compute_dtype = iou_dtype(boxes1.dtype, boxes2.dtype)
    if boxes1.dtype != boxes2.dtype or not boxes1.is_floating_point():
        boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    out = torch.empty((batch, n, m), dtype=compute_dtype, device=boxes1.device)
    if kind == "ciou":
        aspect1 = _aspect_angles(boxes1).to(compute_dtype).contiguous()
        aspect2 = _aspect_angles(boxes2).to(compute_dtype).contiguous()
    else:
        aspect1 = aspect2 = out  # never read: KIND is a constexpr
    args, meta = _iou_arguments(boxes1, boxes2, aspect1, aspect2, out, kind, fmt, eps)
    grid = (batch * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)
    launch(_pairwise_iou_kernel, grid, *args, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# Reference: vectorized PyTorch, the test oracle and the CPU path.
# ----------------------------------------------------------------------------------------------


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Boxes in their compute dtype: fp64 stays fp64, everything else becomes fp32."""
    return t.to(compute_dtype_of(t.dtype))


def iou_dtype(dtype1: torch.dtype, dtype2: torch.dtype) -> torch.dtype:
    """The dtype of the IoUs of boxes of ``dtype1`` and ``dtype2``: fp64 if either is fp64, else fp32."""
    return compute_dtype_of(torch.promote_types(dtype1, dtype2))


def _to_corners(boxes: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "xyxy":
        return boxes
    if fmt == "xywh":
        return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def _area(boxes: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "xyxy":
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return boxes[..., 2] * boxes[..., 3]


def iou_and_union(boxes1: torch.Tensor, boxes2: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    corners1, corners2 = _to_corners(boxes1, fmt), _to_corners(boxes2, fmt)
    top_left = torch.max(corners1[..., :, None, :2], corners2[..., None, :, :2])
    bottom_right = torch.min(corners1[..., :, None, 2:], corners2[..., None, :, 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    inter = extent[..., 0] * extent[..., 1]
    union = _area(boxes1, fmt)[..., :, None] + _area(boxes2, fmt)[..., None, :] - inter
    return inter / union, union


def _hull_extent(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """``[..., N, M, 2]``: width and height of the smallest box enclosing each pair."""
    top_left = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    return (bottom_right - top_left).clamp(min=0)


def pairwise_iou_reference(
    boxes1: torch.Tensor, boxes2: torch.Tensor, kind: str, fmt: str = "xyxy", eps: float = 1e-7
) -> torch.Tensor:
    """``[..., N, 4] x [..., M, 4] -> [..., N, M]``: ``kind`` in iou/giou/diou/ciou, torchvision's math.

    Each set is upcast to its own compute dtype (see the module docstring), integers to fp32; the
    pairwise terms promote.
    """
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    iou, union = iou_and_union(boxes1, boxes2, fmt)
    if kind == "iou":
        return iou
    hull = _hull_extent(boxes1, boxes2)
    if kind == "giou":
        hull_area = hull[..., 0] * hull[..., 1]
        return iou - (hull_area - union) / hull_area
    diagonal_sq = hull[..., 0] ** 2 + hull[..., 1] ** 2 + eps
    centers1 = (boxes1[..., :2] + boxes1[..., 2:]) / 2
    centers2 = (boxes2[..., :2] + boxes2[..., 2:]) / 2
    offset = centers1[..., :, None, :] - centers2[..., None, :, :]
    diou = iou - (offset[..., 0] ** 2 + offset[..., 1] ** 2) / diagonal_sq
    if kind == "diou":
        return diou
    aspect_gap = _aspect_angles(boxes1)[..., :, None] - _aspect_angles(boxes2)[..., None, :]
    v = CIOU_FACTOR.value * aspect_gap**2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou - alpha * v


def pairwise_iou_cpu(boxes1: torch.Tensor, boxes2: torch.Tensor, kind: str, fmt: str) -> torch.Tensor:
    """The fast CPU path of the plain and the generalized IoU (``kind`` "iou" or "giou"),
    ``[..., N, 4] x [..., M, 4] -> [..., N, M]``: the reference's formulas in the reference's order
    on ``[..., N, M]`` temporaries updated in place (half the passes over memory), from contiguous
    coordinate planes (the broadcast operands of every pass contiguous, so vectorized: 3 to 6 times
    faster than from the strided columns of the boxes), bit for bit the same values."""
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    ax1, ay1, ax2, ay2 = (c.unsqueeze(-1) for c in _to_corners(boxes1, fmt).movedim(-1, 0).contiguous())
    bx1, by1, bx2, by2 = (c.unsqueeze(-2) for c in _to_corners(boxes2, fmt).movedim(-1, 0).contiguous())
    width = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    inter = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0).mul_(width)
    union = (_area(boxes1, fmt).unsqueeze(-1) + _area(boxes2, fmt).unsqueeze(-2)).sub_(inter)
    iou = inter.div_(union)
    if kind == "iou":
        return iou
    # iou - (hull_area - union) / hull_area, the hull of the corners (the boxes themselves: the
    # generalized IoU takes xyxy boxes only).
    hull_area = torch.maximum(ax2, bx2).sub_(torch.minimum(ax1, bx1)).clamp_(min=0)
    hull_area.mul_(torch.maximum(ay2, by2).sub_(torch.minimum(ay1, by1)).clamp_(min=0))
    return iou.sub_(torch.sub(hull_area, union, out=union).div_(hull_area))


# ----------------------------------------------------------------------------------------------
# torch.library registration: one op for the whole family, dispatching per backend.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tritondet::pairwise_box_iou", mutates_args=())
def pairwise_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, kind: str, fmt: str, eps: float) -> torch.Tensor:
    """``[B, N, 4] x [B, M, 4] -> [B, N, M]`` (fp32, or fp64 when either set is fp64)."""
    if use_triton(boxes1.device):
        return pairwise_iou_triton(boxes1, boxes2, kind, fmt, eps)
    if kind in ("iou", "giou") and use_fast_cpu(boxes1.device):
        return pairwise_iou_cpu(boxes1, boxes2, kind, fmt)
    return pairwise_iou_reference(boxes1, boxes2, kind, fmt, eps).contiguous()


@pairwise_box_iou.register_fake
def _(boxes1, boxes2, kind, fmt, eps):
    dtype = iou_dtype(boxes1.dtype, boxes2.dtype)
    return boxes1.new_empty((boxes1.shape[0], boxes1.shape[1], boxes2.shape[1]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    boxes1, boxes2, kind, fmt, eps = inputs
    ctx.save_for_backward(boxes1, boxes2)
    ctx.kind, ctx.fmt, ctx.eps = kind, fmt, eps


def _backward(ctx, grad):
    """Vector-Jacobian product of the reference (the forward kernel's exact formulas)."""
    boxes1, boxes2 = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda a, b: pairwise_iou_reference(a, b, ctx.kind, ctx.fmt, ctx.eps), boxes1, boxes2)
    grad1, grad2 = vjp(grad)
    return grad1, grad2, None, None, None


pairwise_box_iou.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time specializations: every (dtypes, kind, format) the launcher can produce.
# ----------------------------------------------------------------------------------------------


def _aot_specs() -> list[KernelSpec]:
    specs = []
    # One dtype for both sets, or fp32 beside fp64 (the launcher's copies of mixed dtypes).
    same = [(dtype, dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    for dtype1, dtype2 in [*same, (torch.float32, torch.float64), (torch.float64, torch.float32)]:
        boxes1, boxes2 = torch.empty((1, 1, 4), dtype=dtype1), torch.empty((1, 1, 4), dtype=dtype2)
        out = torch.empty((1, 1, 1), dtype=iou_dtype(dtype1, dtype2))
        names = [str(dtype).removeprefix("torch.") for dtype in dict.fromkeys((dtype1, dtype2))]
        for kind in KINDS:
            for fmt in BOX_FORMATS if kind == "iou" else ("xyxy",):
                args, meta = _iou_arguments(boxes1, boxes2, out, out, out, kind, fmt, 1e-7)
                label = f"{'/'.join(names)},{kind},{fmt}"
                specs.append(KernelSpec.from_example(_pairwise_iou_kernel, args, meta, label))
    return specs


# Kernels whose results are compared exactly with torchvision or rounded (to pixels, levels,
# keep/drop decisions): IEEE division and square root only, no contracted multiply-add (the
# compile gate's PTX lint, `tritondet compile-report`).
EXACT_KERNELS = frozenset({_pairwise_iou_kernel})
AOT_SPECS = _aot_specs()
PUBLIC_OPS = (
    "box_iou",
    "generalized_box_iou",
    "distance_box_iou",
    "complete_box_iou",
    "batched_box_iou",
)
