"""Region pooling: ``roi_align``/``RoIAlign``, ``MultiScaleRoIAlign``, ``roi_pool``/``RoIPool``,
``crop_pool``, ``ps_roi_align``/``PSRoIAlign`` and ``ps_roi_pool``/``PSRoIPool``; and
``level_scales``, the feature-map scales torchvision infers from feature and image sizes.

Every op takes its boxes as ``Tensor[K, 5]`` rois, ``Tensor[B, P, 4]`` padded per image, or
torchvision's ``List[Tensor[L, 4]]``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError
from ..kernels._common import MAX_LEVELS
from . import _checks
from ._checks import check_tensor


def _pair_size(name: str, value) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ArgumentValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return size


def _check_feature_map(name: str, value) -> Tensor:
    check_tensor(name, value)
    if value.dim() != 4:
        raise ArgumentValueError(f"{name} must be [N, C, H, W], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _rois_from_padded(boxes: Tensor, num_images: int) -> Tensor:
    """``Tensor[B, P, 4]`` -> ``Tensor[B * P, 5]``: row ``b * P + p`` is ``(b, *boxes[b, p])``, built
    in one concatenation whatever B."""
    batch, count = boxes.shape[:2]
    if batch > num_images:
        raise ArgumentValueError(f"boxes holds {batch} images (Tensor[B, P, 4]) but input has {num_images}")
    index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype)
    return torch.cat([index[:, None, None].expand(batch, count, 1), boxes], dim=2).reshape(batch * count, 5)


def _rois_from_boxes(boxes, num_images: int, device: torch.device) -> Tensor:
    """``Tensor[K, 5]`` or ``list[Tensor[L, 4]]`` (one per image), whose batch indices are checked
    when validation is on, or ``Tensor[B, P, 4]`` (padded, every row pooled, indices built here)
    -> ``Tensor[K, 5]``, K = B * P for the padded form."""
    if isinstance(boxes, Tensor) and boxes.dim() == 3:
        check_tensor("boxes", boxes, last_dim=4)
        rois = _rois_from_padded(boxes, num_images)
    elif isinstance(boxes, Tensor):
        check_tensor("boxes", boxes)
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ArgumentValueError(
                "boxes must be a Tensor[K, 5], a Tensor[B, P, 4] or a list of Tensor[L, 4], got shape "
                f"{tuple(boxes.shape)}"
            )
        rois = boxes
    elif isinstance(boxes, (list, tuple)) and boxes:
        for i, image_boxes in enumerate(boxes):
            check_tensor(f"boxes[{i}]", image_boxes)
            if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
                raise ArgumentValueError(f"boxes[{i}] must be a Tensor[L, 4], got shape {tuple(image_boxes.shape)}")
        # One small tensor per image (a short, fixed loop): the batch-index column.
        ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)
    else:
        raise ArgumentTypeError(
            "boxes must be a Tensor[K, 5], a Tensor[B, P, 4] or a non-empty list of Tensor[L, 4], got "
            f"{type(boxes).__name__}"
        )
    if rois.device != device:
        raise ArgumentValueError(f"input and boxes must be on the same device, got {device} and {rois.device}")
    if not rois.is_floating_point():
        rois = rois.float()
    built_indices = isinstance(boxes, Tensor) and boxes.dim() == 3
    if not built_indices and _checks.validation_enabled(device):
        _checks.check_roi_batch_indices("boxes", rois, num_images)
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
        boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]): ``(batch_index, x1, y1, x2, y2)``
            rows; or ``(x1, y1, x2, y2)`` boxes padded to P per image, B <= N, every row pooled
            (K = B * P, row ``b * P + p`` from ``boxes[b, p]``); or one ``(x1, y1, x2, y2)`` tensor
            per image. A batch index that is not an integer in ``[0, N)`` raises ``ValueError`` on
            CPU tensors (and with ``TRITONDET_VALIDATE=1``); otherwise that RoI's output is zero.
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
    if not image_shapes:
        raise ArgumentValueError("image_shapes must not be empty")
    largest_height = max(height for height, _ in image_shapes)
    scales = [2.0 ** round(math.log2(feature.shape[-2] / largest_height)) for feature in features]
    return scales, int(-math.log2(scales[0]))


class MultiScaleRoIAlign(torch.nn.Module):
    """Multi-scale RoIAlign (FPN): each box is pooled from the level of Eqn. (1) of the FPN paper,
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale))`` clamped to the available
    levels, with torchvision's scales and results. The scales and levels (:func:`level_scales`)
    are inferred from the feature and image sizes of every call (torchvision's module keeps those
    of its first call).

    All levels are pooled in one kernel launch (each RoI picks its level's pointer, shape and scale
    from a small table in the kernel), without per-level gathers or host syncs. At most
    ``MAX_LEVELS`` (5) levels.

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
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not 1 <= len(features) <= MAX_LEVELS:
            raise ArgumentValueError(
                f"featmap_names must select 1 to {MAX_LEVELS} feature maps of x, got {len(features)}"
            )
        for name, f in zip(self.featmap_names, features, strict=False):
            _check_feature_map(f"x[{name!r}]", f)
        first = features[0]
        if any(f.shape[:2] != first.shape[:2] or f.device != first.device for f in features):
            raise ArgumentValueError("the feature maps must share batch size, channel count and device")
        features = [f.to(first.dtype) for f in features]
        scales, k_min = level_scales(features, image_shapes)
        ph, pw = _pair_size("output_size", self.output_size)
        rois = _rois_from_boxes(boxes, first.shape[0], first.device)
        return torch.ops.tritondet.roi_align(
            features,
            rois,
            scales,
            ph,
            pw,
            int(self.sampling_ratio),
            False,
            k_min,
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
        boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]): as in :func:`roi_align`.
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
        boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]): as in :func:`roi_align`.
        output_size (int or Tuple[int, int]): ``(PH, PW)``.
        spatial_scale (float): factor from box coordinates to input coordinates.
        sampling_ratio (int): ``S >= 1`` samples per bin along each axis.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype.
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int) or sampling_ratio < 1:
        raise ArgumentValueError(f"sampling_ratio must be a positive int, got {sampling_ratio!r}")
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
        input (Tensor[N, C * PH * PW, H, W]), boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]),
        output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype. A bin with no samples (an empty
        box with adaptive sampling) is 0, where torchvision divides 0 by 0 (NaN).
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    if input.shape[1] % (ph * pw):
        raise ArgumentValueError(f"input must have a multiple of {ph * pw} channels, got {input.shape[1]}")
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
        input (Tensor[N, C * PH * PW, H, W]), boxes (Tensor[K, 5], Tensor[B, P, 4] or List[Tensor[L, 4]]),
        output_size, spatial_scale: as in :func:`roi_pool`.

    Returns:
        Tensor[K, C, PH, PW]: contiguous, in ``input``'s dtype.
    """
    _check_feature_map("input", input)
    ph, pw = _pair_size("output_size", output_size)
    if input.shape[1] % (ph * pw):
        raise ArgumentValueError(f"input must have a multiple of {ph * pw} channels, got {input.shape[1]}")
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
