"""What several op families share: the compute dtype, the warp count, IEEE division, clipping to
the image and the FPN levels (the per-level pointer arguments and the level rule).

Shapes: B images; boxes ``[B, ..., 4]`` (x1, y1, x2, y2); image_sizes ``[B, 2]`` (height, width);
rois ``[K, 5]`` (batch index, x1, y1, x2, y2).

Every Triton helper here has its PyTorch twin beside it (the reference path and test oracle use
the twin), so the two forms of a rule are read and changed together.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Every kernel runs 4 warps (128 threads): its tile sizes are chosen for that thread count (each
# family's block-size helper states the values per thread), and 4 warps let an SM keep several
# programs resident without the register pressure that 8 warps of these tiles would need.
NUM_WARPS = 4

# Launch option of the kernels whose results are compared exactly or rounded: Triton otherwise
# contracts a * b + c into one FMA, rounded once where torch (CPU) rounds twice (the IoU's union
# ``area_a + area_b - inter``, RoIAlign's sample positions).
NO_FP_FUSION = {"enable_fp_fusion": False}

# FPN uses levels P2..P5 (torchvision: 4 maps) or P2..P6; five per-level pointers cover both (the
# RoIAlign maps, the RPN head outputs).
MAX_LEVELS = 5
# The level boundaries a RoI's area is compared with (see roi_level).
_LEVEL_BOUNDARIES = tl.constexpr(MAX_LEVELS - 1)
# The level index of a RoI on no level (see roi_level): it matches no map, so it pools to zeros.
NO_LEVEL = tl.constexpr(-1)
# torchvision's LevelMapper epsilon.
LEVEL_EPS = 1e-6
# The level mapper (k_min, canonical_scale, canonical_level) of a single-level RoIAlign: one map,
# so no level is assigned (the scale and level are torchvision's LevelMapper defaults, never read).
SINGLE_LEVEL_MAPPER = (0, 224.0, 4.0)


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels and references compute in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def split_program(tiles):
    """(group (int64), tile) of this program in a 1-D grid of ``tiles`` programs per group.

    Images, classes and RoIs go on grid axis x, which takes 2**31 - 1 programs: axes y and z
    take at most 65535, which images x classes of a detector pass (LVIS: 1203 classes x 55)."""
    program = tl.program_id(0)
    return (program // tiles).to(tl.int64), program % tiles


def scaled_rois(rois: torch.Tensor, spatial_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``[K, 5]`` rois in ``dtype`` with the corners multiplied by ``spatial_scale`` rounded to
    ``dtype`` (fp64 boxes by the fp64 scale, as torchvision); the scale is an op scalar, not host
    data copied to the device, so a CUDA-graph capture can record it."""
    rois = rois.to(dtype)
    return torch.cat([rois[:, :1], rois[:, 1:] * spatial_scale], 1)


# ----------------------------------------------------------------------------------------------
# IEEE division: Triton compiles fp32 ``/`` to div.full.f32, which can be an ulp off where PyTorch
# rounds to nearest (fp64 division is IEEE; fp32 square roots take tl.sqrt_rn likewise)
# ----------------------------------------------------------------------------------------------


@triton.jit
def ieee_div(x, y):
    """``x / y`` rounded to nearest as torch divides; ``x`` is a float tensor, ``y`` any number tensor."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, tl.cast(y, tl.float32))


@triton.jit
def load_four(ptr, stride, mask, other_first, other_last, compute_dtype: tl.constexpr):
    """The four values ``stride`` elements apart from ``ptr`` (any shape): a box's (x1, y1, x2,
    y2) or its deltas (dx, dy, dw, dh), upcast on load (no arithmetic in half precision: the
    Triton interpreter has no bf16 math). Masked-off lanes read ``other_first`` for the first two
    and ``other_last`` for the last two."""
    v0 = tl.load(ptr, mask=mask, other=other_first).to(compute_dtype)
    v1 = tl.load(ptr + stride, mask=mask, other=other_first).to(compute_dtype)
    v2 = tl.load(ptr + 2 * stride, mask=mask, other=other_last).to(compute_dtype)
    v3 = tl.load(ptr + 3 * stride, mask=mask, other=other_last).to(compute_dtype)
    return v0, v1, v2, v3


@triton.jit
def load_box_and_area(ptr, stride, mask, compute_dtype: tl.constexpr):
    """:func:`load_four` of xyxy boxes (0 on masked-off lanes) and their areas (torchvision's
    formula)."""
    x1, y1, x2, y2 = load_four(ptr, stride, mask, 0, 0, compute_dtype)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


# ----------------------------------------------------------------------------------------------
# Clipping boxes to their image: torchvision's clip_boxes_to_image, clamp(min=0, max=size)
# ----------------------------------------------------------------------------------------------


# torch.minimum, torch.maximum and torch.clamp propagate NaN; Triton's default minimum and
# maximum return the other operand. Kernels that mirror those torch ops pass this.
PROPAGATE_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def clip_box(x1, y1, x2, y2, height, width):
    """(x1, y1, x2, y2) clamped to ``[0, width] x [0, height]``; NaN stays NaN, as through
    ``torch.clamp``."""
    x1 = tl.minimum(tl.maximum(x1, 0.0, propagate_nan=PROPAGATE_NAN), width, propagate_nan=PROPAGATE_NAN)
    y1 = tl.minimum(tl.maximum(y1, 0.0, propagate_nan=PROPAGATE_NAN), height, propagate_nan=PROPAGATE_NAN)
    x2 = tl.minimum(tl.maximum(x2, 0.0, propagate_nan=PROPAGATE_NAN), width, propagate_nan=PROPAGATE_NAN)
    y2 = tl.minimum(tl.maximum(y2, 0.0, propagate_nan=PROPAGATE_NAN), height, propagate_nan=PROPAGATE_NAN)
    return x1, y1, x2, y2


def no_pixels(*maps: torch.Tensor) -> bool:
    """True when no map has an element (a zero batch, channel, height or width): pooling then
    reads no pixel, so every output is 0 (argmax -1) and every gradient 0, without a launch."""
    return all(m.numel() == 0 for m in maps)


def clip_to_images(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """``boxes [B, ..., 4]`` clamped to ``[0, w] x [0, h]`` of each image (``image_sizes [B, 2]``);
    differentiable, no host sync, a handful of ATen ops whatever B."""
    limits = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)  # [B, 4]: (w, h, w, h)
    return torch.minimum(boxes.clamp(min=0), limits.view(limits.shape[0], *[1] * (boxes.dim() - 2), 4))


# ----------------------------------------------------------------------------------------------
# FPN levels: per-level pointer arguments and the level of a RoI (FPN Eqn. (1))
# ----------------------------------------------------------------------------------------------


def level_pointers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pointer arguments for the per-level kernels: ``tensors``, then level 0 repeated up to ``MAX_LEVELS``."""
    return [*tensors, *[tensors[0]] * (MAX_LEVELS - len(tensors))]


@triton.jit
def pick_level(level, p0, p1, p2, p3, p4):
    """The pointer of ``level`` among the (at most five) per-level pointers."""
    p = tl.where(level == 1, p1, p0)
    p = tl.where(level == 2, p2, p)
    p = tl.where(level == 3, p3, p)
    return tl.where(level == 4, p4, p)


@triton.jit
def roi_level(x1, y1, x2, y2, level_areas_ptr, num_levels):
    """FPN Eqn. (1) as torchvision's LevelMapper: the level index (0 = k_min) of a RoI, or
    ``NO_LEVEL`` when there are several levels and its fp32 area is negative or NaN.

    ``level_areas_ptr`` holds :func:`level_area_thresholds` (fp32 ``[MAX_LEVELS - 1]``): the level
    is the number of thresholds the fp32 area reaches, bit for bit torchvision's fp32
    ``floor(k0 + log2(sqrt(area) / s0) + eps)`` without a transcendental on the GPU. Where
    ``sqrt(area)`` is NaN, torchvision's CPU LevelMapper casts NaN to int64 (INT64_MIN on x86), a
    level no map has, and the RoI pools to zeros; so does this one on every device. The area is
    tested as a float and never converted to an int (a GPU turns NaN into 0).
    """
    area = (x2.to(tl.float32) - x1.to(tl.float32)) * (y2.to(tl.float32) - y1.to(tl.float32))
    level = tl.zeros_like(area).to(tl.int32)
    for boundary in tl.static_range(_LEVEL_BOUNDARIES):
        level += (area >= tl.load(level_areas_ptr + boundary)).to(tl.int32)
    on_a_level = (area >= 0.0) | (num_levels == 1)  # false for NaN; -0.0 is on level 0
    return tl.where(on_a_level, level, NO_LEVEL)


def _torchvision_levels(areas: torch.Tensor, canonical_scale: float, canonical_level: float) -> torch.Tensor:
    """torchvision's LevelMapper target level of fp32 ``areas`` before clamping, in its fp32 order."""
    target = canonical_level + torch.log2(areas.sqrt() / canonical_scale)
    return torch.floor(target + torch.tensor(LEVEL_EPS, dtype=areas.dtype))


@functools.lru_cache(maxsize=64)
def level_area_thresholds(
    num_levels: int, k_min: int, canonical_scale: float, canonical_level: float
) -> tuple[float, ...]:
    """``MAX_LEVELS - 1`` fp32 areas: entry ``i`` is the smallest area torchvision puts on level
    ``k_min + i + 1`` or above (``inf`` past the last of ``num_levels`` levels).

    Found by bisection over the fp32 bit patterns of torchvision's own fp32 rule, which only grows
    with the area, so comparing an area with these is exact, at the level boundaries too.
    """
    thresholds = []
    for level in range(k_min + 1, k_min + num_levels):
        low, high = 0, 0x7F800000  # bit patterns of 0 and inf: fp32 order is integer order
        while low < high:
            middle = (low + high) // 2
            area = torch.tensor([middle], dtype=torch.int32).view(torch.float32)
            if _torchvision_levels(area, canonical_scale, canonical_level).item() >= level:
                high = middle
            else:
                low = middle + 1
        thresholds.append(torch.tensor([low], dtype=torch.int32).view(torch.float32).item())
    return (*thresholds, *[float("inf")] * (MAX_LEVELS - num_levels))


def roi_levels_reference(
    rois: torch.Tensor, num_levels: int, k_min: int, canonical_scale: float, canonical_level: float
) -> torch.Tensor:
    """``[K, 5] -> [K]`` int64 level index (0 for a single level): torchvision's LevelMapper in fp32;
    ``NO_LEVEL`` where its ``sqrt(area)`` is NaN (a negative or NaN area), as :func:`roi_level`."""
    if num_levels == 1:
        return torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    boxes = rois[:, 1:].to(torch.float32)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    target = _torchvision_levels(areas, canonical_scale, canonical_level).nan_to_num(nan=k_min)
    level = (target.clamp(k_min, k_min + num_levels - 1) - k_min).to(torch.int64)
    return level.where(areas >= 0, NO_LEVEL.value)
