"""Region pooling: ``roi_align``/``RoIAlign``, ``MultiScaleRoIAlign``, ``roi_pool``/``RoIPool``,
``crop_pool``, ``ps_roi_align``/``PSRoIAlign`` and ``ps_roi_pool``/``PSRoIPool``; and
``level_scales``, the feature-map scales torchvision infers from feature and image sizes.

Every op takes its boxes as ``Tensor[K, 5]`` rois, ``Tensor[B, P, 4]`` padded per image, or
torchvision's ``List[Tensor[L, 4]]``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError, BoxesShapeError
from ..kernels._common import MAX_LEVELS
from . import _checks
from ._checks import check_bool, check_int, check_real, check_tensor, traced_call


def _check_output_size(value) -> None:
    """An int or a pair of positive ints (torchvision's ``BroadcastingList2[int]``); a float, even a
    whole one, is rejected as torchvision's ops reject it."""
    size = (value, value) if isinstance(value, int) else value
    if not isinstance(size, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise ArgumentTypeError(f"output_size must be an int or a pair of ints, got {value!r}")
    if len(size) != 2 or min(size) <= 0:
        raise ArgumentValueError(f"output_size must be a positive int or a pair of positive ints, got {value!r}")


def _pair_size(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(PH, PW)`` from an output size that :func:`_check_output_size` accepts."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, list):
        return value[0], value[1]
    return value


# Feature maps are at most this many times finer than the box coordinates (detectors use 1/4 to
# 1/64); beyond it, adaptive sample counts (box size times scale) overflow the sampling grids.
MAX_SPATIAL_SCALE = 2.0**16


def _check_spatial_scale(spatial_scale) -> None:
    scale = check_real("spatial_scale", spatial_scale)
    if not (math.isfinite(scale) and abs(scale) <= MAX_SPATIAL_SCALE):
        raise ArgumentValueError(f"spatial_scale must be finite with |spatial_scale| <= 2**16, got {spatial_scale!r}")


def _check_feature_map(name: str, value) -> Tensor:
    check_tensor(name, value)
    if value.dim() != 4:
        raise ArgumentValueError(f"{name} must be [N, C, H, W], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _check_position_sensitive_channels(input: Tensor, output_size) -> None:
    ph, pw = _pair_size(output_size)
    if input.shape[1] % (ph * pw):
        raise ArgumentValueError(f"input must have a multiple of {ph * pw} channels, got {input.shape[1]}")


def _check_boxes(boxes, num_images: int, device: torch.device) -> None:
    """Eager checks of the three box forms :func:`_rois_from_boxes` takes; a wrong shape raises
    :class:`~tritondet.errors.BoxesShapeError` (an ``AssertionError`` too, as torchvision's)."""
    if isinstance(boxes, Tensor):
        check_tensor("boxes", boxes)
        if boxes.dim() == 3 and boxes.shape[2] == 4:
            if boxes.shape[0] > num_images:
                raise ArgumentValueError(
                    f"boxes holds {boxes.shape[0]} images (Tensor[B, P, 4]) but input has {num_images}"
                )
        elif boxes.dim() != 2 or boxes.shape[1] != 5:
            raise BoxesShapeError(
                "boxes must be a Tensor[K, 5], a Tensor[B, P, 4] or a list of Tensor[L, 4], got shape "
                f"{tuple(boxes.shape)}"
            )
        tensors = [boxes]
    elif isinstance(boxes, (list, tuple)) and boxes:
        for i, image_boxes in enumerate(boxes):
            check_tensor(f"boxes[{i}]", image_boxes)
            if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
                raise BoxesShapeError(f"boxes[{i}] must be a Tensor[L, 4], got shape {tuple(image_boxes.shape)}")
        tensors = list(boxes)
    else:
        raise ArgumentTypeError(
            "boxes must be a Tensor[K, 5], a Tensor[B, P, 4] or a non-empty list of Tensor[L, 4], got "
            f"{type(boxes).__name__}"
        )
    for tensor in tensors:
        if tensor.device != device:
            raise ArgumentValueError(f"input and boxes must be on the same device, got {device} and {tensor.device}")


def _rois_from_boxes(boxes: Tensor | list[Tensor], num_images: int, device: torch.device) -> Tensor:
    """``Tensor[K, 5]`` or ``list[Tensor[L, 4]]`` (one per image), whose batch indices are checked
    when validation is on, or ``Tensor[B, P, 4]`` (padded, every row pooled: row ``b * P + p`` is
    ``(b, *boxes[b, p])``, built in one concatenation whatever B) -> ``Tensor[K, 5]``, K = B * P
    for the padded form."""
    if not torch.jit.is_scripting():
        _check_boxes(boxes, num_images, device)
    built_indices = False
    if isinstance(boxes, Tensor):
        if boxes.dim() == 3:
            batch, count = boxes.shape[0], boxes.shape[1]
            index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype)
            rois = torch.cat([index[:, None, None].expand(batch, count, 1), boxes], dim=2).reshape(batch * count, 5)
            built_indices = True
        else:
            rois = boxes
    else:
        # One small tensor per image (a short, fixed loop): the batch-index column.
        ids: list[Tensor] = []
        for i, image_boxes in enumerate(boxes):
            ids.append(torch.full_like(image_boxes[:, :1], i))
        rois = torch.cat([torch.cat(ids), torch.cat(boxes)], dim=1)
    if not rois.is_floating_point():
        rois = rois.float()
    # Nested: TorchScript skips the body of an `is_scripting()` test only when it stands alone.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if not built_indices and _checks.validation_enabled(device):
            _checks.check_roi_batch_indices("boxes", rois, num_images)
    return rois


def _quantized_roi_align(
    input: Tensor, boxes, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """RoI Align of a quantized ``input`` by torchvision's quantized kernel (``torchvision::qroi_align``),
    which tritondet has no kernel for: ``boxes`` must be a quantized ``Tensor[K, 5]``; the result is
    quantized with ``input``'s scale and zero point."""
    if not isinstance(boxes, Tensor) or not boxes.is_quantized:
        raise ArgumentValueError("boxes must be a quantized Tensor[K, 5] when input is quantized")
    _check_output_size(output_size)
    ph, pw = _pair_size(output_size)
    scale, zero_point = input.q_scale(), input.q_zero_point()
    pooled = torch.ops.torchvision.qroi_align(
        input.int_repr(),
        boxes.int_repr(),
        scale,
        zero_point,
        boxes.q_scale(),
        boxes.q_zero_point(),
        float(spatial_scale),
        ph,
        pw,
        sampling_ratio,
        aligned,
    )
    return torch._make_per_tensor_quantized_tensor(pooled, scale=scale, zero_point=zero_point)


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoI Align (Mask R-CNN): average of bilinear samples over each bin of each region.

    Args:
        input (Tensor[N, C, H, W]): feature maps, fp16/bf16/fp32/fp64, NCHW or channels_last
            (read in place), any strides. A quantized input (with quantized ``Tensor[K, 5]`` boxes)
            goes to torchvision's quantized kernel.
        boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)``
            rows; or ``(x1, y1, x2, y2)`` boxes padded to P per image, B <= N, every row pooled
            (K = B * P, row ``b * P + p`` from ``boxes[b, p]``); or one ``(x1, y1, x2, y2)`` tensor
            per image. A batch index that is not an integer in ``[0, N)`` raises ``ValueError`` on
            CPU tensors (and with ``TRITONDET_VALIDATE=1``); otherwise that RoI's output is zero.
        output_size (int or Tuple[int, int]): ``(PH, PW)`` bins.
        spatial_scale (float): factor from box coordinates to input coordinates (finite, at most
            ``MAX_SPATIAL_SCALE`` = 2**16 in magnitude).
        sampling_ratio (int): samples per bin along each axis; ``<= 0``: ``ceil(roi_size / bins)``.
        aligned (bool): shift the boxes by -0.5 pixel (Detectron2); False: legacy, RoIs at least 1x1.

    Returns:
        Tensor[K, C, PH, PW]: contiguous (NCHW) in ``input``'s dtype, whatever ``input``'s layout;
        computed in fp32 (fp64 for fp64 input).
    """
    if not torch.jit.is_scripting():
        traced = traced_call(roi_align, input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        if traced is not None:
            return traced
        if isinstance(input, Tensor) and input.is_quantized:
            return _quantized_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        _check_feature_map("input", input)
        _check_output_size(output_size)
        _check_spatial_scale(spatial_scale)
        check_int("sampling_ratio", sampling_ratio)
        check_bool("aligned", aligned)
    ph, pw = _pair_size(output_size)
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    # The last three: kernels._common.SINGLE_LEVEL_MAPPER, spelled out (TorchScript reads no global).
    return torch.ops.tritondet.roi_align(
        [input], rois, [float(spatial_scale)], ph, pw, sampling_ratio, aligned, 0, 224.0, 4.0
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


def level_scales(features: list[Tensor], image_shapes: list[tuple[int, int]]) -> tuple[list[float], int]:
    """The spatial scale of each feature map and the pyramid level of the first, by torchvision's
    rule: a map's scale is the power of two nearest to its height over the largest image height,
    and the levels count up from ``k_min = -log2(scales[0])``, one per map.

    Args:
        features (List[Tensor[N, C, H_l, W_l]]): the feature maps, finest first.
        image_shapes (List[Tuple[int, int]]): (height, width) of each image before padding.

    Returns:
        (List[float], int): the L scales and ``k_min``; host arithmetic on sizes, no host sync.
    """
    if not torch.jit.is_scripting() and not image_shapes:
        raise ArgumentValueError("image_shapes must not be empty")
    largest_height = 0
    for height, _ in image_shapes:
        largest_height = max(largest_height, height)
    if not torch.jit.is_scripting():
        if largest_height <= 0:
            raise ArgumentValueError(f"image_shapes must hold an image of positive height, got {image_shapes}")
        for level, feature in enumerate(features):
            if feature.shape[-2] == 0:
                raise ArgumentValueError(f"features[{level}] has height 0: a map without rows has no scale")
    # log2 as log / log(2): TorchScript has no math.log2; the rounding absorbs the last-bit error.
    scales: list[float] = []
    for feature in features:
        scales.append(2.0 ** round(math.log(feature.shape[-2] / largest_height) / math.log(2.0)))
    return scales, int(round(-math.log(scales[0]) / math.log(2.0)))  # noqa: RUF046 (a float in TorchScript)


def _check_multiscale_inputs(features: list[Tensor], featmap_names, output_size, sampling_ratio) -> None:
    if not 1 <= len(features) <= MAX_LEVELS:
        raise ArgumentValueError(f"featmap_names must select 1 to {MAX_LEVELS} feature maps of x, got {len(features)}")
    for name, f in zip(featmap_names, features, strict=False):
        _check_feature_map(f"x[{name!r}]", f)
    first = features[0]
    if any(f.shape[:2] != first.shape[:2] or f.device != first.device for f in features):
        raise ArgumentValueError("the feature maps must share batch size, channel count and device")
    _check_output_size(output_size)
    check_int("sampling_ratio", sampling_ratio)


def _multiscale_roi_align(
    x: dict[str, Tensor],
    boxes: Tensor | list[Tensor],
    image_shapes: list[tuple[int, int]],
    featmap_names: list[str],
    output_size: tuple[int, int],
    sampling_ratio: int,
    canonical_scale: int,
    canonical_level: int,
) -> Tensor:
    """:class:`MultiScaleRoIAlign`'s forward, a function so that ``torch.fx`` keeps it one leaf."""
    if not torch.jit.is_scripting():
        traced = traced_call(
            _multiscale_roi_align,
            x,
            boxes,
            image_shapes,
            featmap_names,
            output_size,
            sampling_ratio,
            canonical_scale,
            canonical_level,
        )
        if traced is not None:
            return traced
    features: list[Tensor] = []
    for name, feature in x.items():
        if name in featmap_names:
            features.append(feature)
    if not torch.jit.is_scripting():
        _check_multiscale_inputs(features, featmap_names, output_size, sampling_ratio)
    first = features[0]
    features = [f.to(first.dtype) for f in features]
    scales, k_min = level_scales(features, image_shapes)
    ph, pw = _pair_size(output_size)
    rois = _rois_from_boxes(boxes, first.shape[0], first.device)
    return torch.ops.tritondet.roi_align(
        features,
        rois,
        scales,
        ph,
        pw,
        sampling_ratio,
        False,
        k_min,
        float(canonical_scale),
        float(canonical_level),
    )


class MultiScaleRoIAlign(torch.nn.Module):
    """Multi-scale RoIAlign (FPN): each box is pooled from the level of Eqn. (1) of the FPN paper,
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale))`` clamped to the available
    levels, with torchvision's scales and results. The scales and levels (:func:`level_scales`)
    are inferred from the feature and image sizes of every call (torchvision's module keeps those
    of its first call).

    All levels are pooled in one kernel launch (each RoI picks its level's pointer, shape and scale
    from a small table in the kernel), without per-level gathers or host syncs. At most
    ``MAX_LEVELS`` (5) levels.

    With several levels, a box whose area is negative (inverted on one axis) or NaN is on no
    level: its row is zeros and it passes no gradient. That is torchvision's result on the CPU,
    where its LevelMapper casts ``sqrt(area) = NaN`` to int64 (INT64_MIN on x86), matching no
    level; on CUDA torchvision's cast differs (a GPU converts NaN to 0, which is a level when the
    first map is level 0). Ours is the same on every device and backend. A zero-area box is on
    the first level.

    Args:
        featmap_names (List[str]): the keys of the feature maps to pool from.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        sampling_ratio (int): as in :func:`roi_align` (``aligned=False``, as torchvision).
        canonical_scale (int), canonical_level (int): ``224`` and ``k0 = 4`` of Eqn. (1).

    Forward: ``x`` (dict of Tensor[N, C, H_l, W_l]); ``boxes`` in image coordinates, either
    Tensor[B, P, 4] (padded, B <= N, every row pooled: K = B * P, row ``b * P + p`` from
    ``boxes[b, p]``) or torchvision's List[Tensor[L_i, 4]] (K = sum L_i), or ``Tensor[K, 5]`` rows
    as for :func:`roi_align`; ``image_shapes`` (List[Tuple[int, int]]) -> Tensor[K, C, PH, PW] in
    the first level's dtype.
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
        _check_output_size(output_size)
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(
        self, x: dict[str, Tensor], boxes: Tensor | list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        return _multiscale_roi_align(
            x,
            boxes,
            image_shapes,
            self.featmap_names,
            self.output_size,
            self.sampling_ratio,
            self.canonical_scale,
            self.canonical_level,
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})"
        )


def roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoI Pool (Fast R-CNN): the maximum over each bin of each region.

    Args:
        input (Tensor[N, C, H, W]): feature maps, any dtype of floats, any strides.
        boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]): as in :func:`roi_align`.
        output_size (int or Tuple[int, int]): ``(PH, PW)`` bins.
        spatial_scale (float): factor from box coordinates to input coordinates.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype; empty bins are 0.
    """
    if not torch.jit.is_scripting():
        traced = traced_call(roi_pool, input, boxes, output_size, spatial_scale)
        if traced is not None:
            return traced
        _check_feature_map("input", input)
        _check_output_size(output_size)
        _check_spatial_scale(spatial_scale)
    ph, pw = _pair_size(output_size)
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
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
) -> Tensor:
    """Crop pooling ("Spatial Transformer Networks"): an ``affine_grid`` + ``grid_sample``
    bilinear crop of ``(PH * S) x (PW * S)`` samples from each box (corners included, zeros
    outside the map), max-pooled by ``S x S``; differentiable with respect to ``input`` and the box
    coordinates, so a loss on the crops reaches the boxes. See :mod:`tritondet.kernels.crop_pool`.

    Args:
        input (Tensor[N, C, H, W]): feature maps, any float dtype, any strides.
        boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]): as in :func:`roi_align`.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scale (float): factor from box coordinates to input coordinates.
        sampling_ratio (int): ``S >= 1`` samples per bin along each axis.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype.
    """
    if not torch.jit.is_scripting():
        traced = traced_call(crop_pool, input, boxes, output_size, spatial_scale, sampling_ratio)
        if traced is not None:
            return traced
        _check_feature_map("input", input)
        _check_output_size(output_size)
        _check_spatial_scale(spatial_scale)
        check_int("sampling_ratio", sampling_ratio, minimum=1)
    ph, pw = _pair_size(output_size)
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    return torch.ops.tritondet.crop_pool(input, rois, float(spatial_scale), ph, pw, sampling_ratio)[0]


def ps_roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """Position-sensitive RoI Align (R-FCN): bin ``(ph, pw)`` of output channel ``c`` averages the
    bilinear samples of input channel ``c * PH * PW + ph * PW + pw``; boxes shifted by -0.5 pixel.

    Args:
        input (Tensor[N, C * PH * PW, H, W]), boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]),
        output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype. A bin with no samples (an empty
        box with adaptive sampling) is 0, where torchvision divides 0 by 0 (NaN).
    """
    if not torch.jit.is_scripting():
        traced = traced_call(ps_roi_align, input, boxes, output_size, spatial_scale, sampling_ratio)
        if traced is not None:
            return traced
        _check_feature_map("input", input)
        _check_output_size(output_size)
        _check_spatial_scale(spatial_scale)
        check_int("sampling_ratio", sampling_ratio)
    ph, pw = _pair_size(output_size)
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    if not torch.jit.is_scripting():  # after the boxes' shape, as torchvision checks
        _check_position_sensitive_channels(input, output_size)
    return torch.ops.tritondet.ps_roi_align(input, rois, float(spatial_scale), ph, pw, sampling_ratio)


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
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Position-sensitive RoI Pool (R-FCN): bin ``(ph, pw)`` of output channel ``c`` is the mean of
    input channel ``c * PH * PW + ph * PW + pw`` over the bin's pixels (torchvision's rounding,
    exclusive RoI end, bins clipped to ``[0, H - 1]`` and ``[0, W - 1]`` as torchvision does); an
    empty bin is 0. The gradient is torchvision's, whose backward clips bins to ``[0, H]`` and
    ``[0, W]`` instead (so bins on the last row or column spread their gradient differently from
    the forward's average).

    Args:
        input (Tensor[N, C * PH * PW, H, W]), boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]),
        output_size, spatial_scale: as in :func:`roi_pool`.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype.
    """
    if not torch.jit.is_scripting():
        traced = traced_call(ps_roi_pool, input, boxes, output_size, spatial_scale)
        if traced is not None:
            return traced
        _check_feature_map("input", input)
        _check_output_size(output_size)
        _check_spatial_scale(spatial_scale)
    ph, pw = _pair_size(output_size)
    rois = _rois_from_boxes(boxes, input.shape[0], input.device)
    if not torch.jit.is_scripting():  # after the boxes' shape, as torchvision checks
        _check_position_sensitive_channels(input, output_size)
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
