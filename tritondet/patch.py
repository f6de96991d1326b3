"""``patch_torchvision()``: tritondet's kernels as the implementations of torchvision's own ops.

After the patch, ``torchvision::nms``, ``roi_align``, ``_roi_align_backward``, ``roi_pool`` and
``_roi_pool_backward`` dispatch to tritondet for tensors on the patched devices, so every
torchvision detector and any code calling ``torchvision.ops`` runs on our kernels unchanged.
torchvision's autograd and autocast wrappers stay in front of our kernels. Mask R-CNN's mask
pasting, a Python function rather than an op, is rebound instead: ``paste_masks_in_image`` in
``torchvision.models.detection.roi_heads``, where it is defined, and in
``torchvision.models.detection.transform``, which imports it by name and calls it from
``GeneralizedRCNNTransform.postprocess`` (the only caller), runs :func:`tritondet.ops.paste_masks_in_image`
for masks on the patched devices: one call for all of an image's detections instead of a Python loop
with host reads per mask. ``unpatch_torchvision()`` restores torchvision's own kernels and functions.

The patched kernels check their arguments as :mod:`tritondet.ops` does (errors from
:mod:`tritondet.errors`, which ``except RuntimeError`` catches as it catches torchvision's), and
return torchvision's dtypes (``roi_pool``'s argmax is int32).
"""

from __future__ import annotations

import torch
import torchvision  # registers the torchvision:: ops being overridden
from torchvision.models.detection import roi_heads, transform

from . import _backend
from .kernels._common import SINGLE_LEVEL_MAPPER
from .ops import _checks
from .ops.masks import paste_masks_in_image
from .ops.nms import check_nms_inputs

_library: torch.library.Library | None = None
# torchvision's modules holding a binding of its mask pasting, each rebound while patched.
PASTE_MODULES = (roi_heads, transform)
# While patched: torchvision's own paste_masks_in_image and the patched device types ("cuda", "cpu").
_torchvision_paste = None
_paste_devices: tuple[str, ...] = ()


def _nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    check_nms_inputs(dets, scores, iou_threshold, same_dtype=True)
    return torch.ops.tritondet.nms(dets, scores, iou_threshold)


def _check_roi_batch_indices(input: torch.Tensor, rois: torch.Tensor) -> None:
    """Raise, as :func:`tritondet.ops.roi_align` does, on a RoI whose batch index is out of range
    (where validation is on: CPU tensors, or ``TRITONDET_VALIDATE=1``)."""
    if _checks.validation_enabled(input.device):
        _checks.check_roi_batch_indices("rois", rois, input.shape[0])


def _roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check_roi_batch_indices(input, rois)
    return torch.ops.tritondet.roi_align(
        [input], rois, [spatial_scale], pooled_height, pooled_width, sampling_ratio, aligned, *SINGLE_LEVEL_MAPPER
    )


def _roi_align_backward(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio, aligned
):
    # Only the input's shape is needed: an uninitialized stand-in carries it.
    like_input = grad.new_empty((batch_size, channels, height, width))
    (grad_input,) = torch.ops.tritondet.roi_align_backward(
        grad,
        [like_input],
        rois,
        [spatial_scale],
        pooled_height,
        pooled_width,
        sampling_ratio,
        aligned,
        *SINGLE_LEVEL_MAPPER,
    )
    return grad_input


def _roi_pool(input, rois, spatial_scale, pooled_height, pooled_width):
    _check_roi_batch_indices(input, rois)
    return torch.ops.tritondet.roi_pool(input, rois, spatial_scale, pooled_height, pooled_width)


def _roi_pool_backward(
    grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width
):
    from .kernels.roi_pool import roi_pool_backward

    return roi_pool_backward(grad, argmax, rois, (batch_size, channels, height, width))


def _paste_masks_in_image(masks, boxes, img_shape, padding=1):
    """torchvision's ``paste_masks_in_image`` signature and result: ours for masks on a patched
    device, torchvision's own otherwise and while tracing (its ONNX export path)."""
    if masks.device.type not in _paste_devices or torchvision._is_tracing():
        return _torchvision_paste(masks, boxes, img_shape, padding=padding)
    return paste_masks_in_image(masks, boxes, tuple(img_shape), padding)


PATCHED_OPS = {
    "nms": _nms,
    "roi_align": _roi_align,
    "_roi_align_backward": _roi_align_backward,
    "roi_pool": _roi_pool,
    "_roi_pool_backward": _roi_pool_backward,
}


def patch_torchvision(devices: tuple[str, ...] = ("CUDA",)) -> None:
    """Register tritondet's kernels for torchvision's ops on ``devices`` (``"CUDA"``, ``"CPU"``),
    and our mask pasting for torchvision's on masks on those devices.

    On CPU tensors tritondet runs its backend's CPU path (see ``TRITONDET_BACKEND``), the reference
    where that would be the fast CPU path (which calls torchvision's CPU kernels, now ours). Calling
    it again first undoes the previous patch.
    """
    global _library, _torchvision_paste, _paste_devices
    unknown = [device for device in devices if device not in ("CUDA", "CPU")]
    if unknown or not devices:
        raise ValueError(f"devices must be a non-empty subset of ('CUDA', 'CPU'), got {devices!r}")
    unpatch_torchvision()
    library = torch.library.Library("torchvision", "IMPL")
    for device in devices:
        for name, kernel in PATCHED_OPS.items():
            library.impl(name, kernel, device)
    _library = library
    _backend.torchvision_cpu_patched = "CPU" in devices
    _torchvision_paste = roi_heads.paste_masks_in_image
    _paste_devices = tuple(device.lower() for device in devices)
    for module in PASTE_MODULES:
        module.paste_masks_in_image = _paste_masks_in_image


def unpatch_torchvision() -> None:
    """Restore torchvision's own kernels and mask pasting (a no-op when nothing is patched)."""
    global _library, _torchvision_paste, _paste_devices
    if _library is not None:
        _library._destroy()
        _library = None
        _backend.torchvision_cpu_patched = False
        for module in PASTE_MODULES:
            module.paste_masks_in_image = _torchvision_paste
        _torchvision_paste, _paste_devices = None, ()


def torchvision_patched() -> bool:
    return _library is not None
