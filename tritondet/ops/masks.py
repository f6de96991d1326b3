"""Mask R-CNN's mask ops: ``paste_masks_in_image`` (torchvision's), ``paste_masks_padded`` (a whole
padded batch, thresholded, in one launch), ``mask_targets`` (torchvision's
``project_masks_on_boxes`` for a batch) and ``mask_loss`` (torchvision's ``maskrcnn_loss`` value).

Shapes: B images, P boxes per image (padded; the first ``num_valid[b]`` are real), K RoIs,
C classes, G ground-truth masks per image, M x M masks, H x W images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError
from ._checks import check_counts, check_floating, check_int, check_real, check_same_device, check_tensor


def _check_mask_stack(name: str, value, dims: int) -> Tensor:
    check_floating(name, check_tensor(name, value))
    if value.dim() != dims:
        raise ArgumentValueError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if value.shape[-1] == 0 or value.shape[-2] == 0:
        raise ArgumentValueError(f"{name} must have masks of at least 1 x 1 pixels, got shape {tuple(value.shape)}")
    return value


def _check_boxes(name: str, boxes, shape: tuple[int, ...]) -> Tensor:
    check_floating(name, check_tensor(name, boxes, last_dim=4))
    if tuple(boxes.shape[:-1]) != shape:
        raise ArgumentValueError(f"{name} must have shape {[*shape, 4]}, got shape {tuple(boxes.shape)}")
    return boxes


def _check_size(name: str, value) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ArgumentTypeError(f"{name} must be a pair of ints (height, width), got {value!r}")
    return check_int(f"{name}[0]", value[0], minimum=0), check_int(f"{name}[1]", value[1], minimum=0)


def _check_per_image(name: str, value, batch: int, trailing: tuple[int, ...] = ()) -> Tensor:
    check_tensor(name, value)
    if value.is_floating_point():
        raise ArgumentTypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if tuple(value.shape) != (batch, *trailing):
        raise ArgumentValueError(f"{name} must have shape {[batch, *trailing]}, got shape {tuple(value.shape)}")
    return value


def paste_masks_in_image(masks: Tensor, boxes: Tensor, img_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """Paste each mask into an image at its box, as torchvision's ``paste_masks_in_image``.

    Args:
        masks (Tensor[K, 1, M, M]): mask probabilities, any float dtype, any strides.
        boxes (Tensor[K, 4]): ``(x1, y1, x2, y2)`` in image pixels, floats.
        img_shape (Tuple[int, int]): ``(H, W)`` of the image.
        padding (int): zero pixels added around each mask before it is resized; its box grows
            by ``(M + 2 * padding) / M``.

    Returns:
        Tensor[K, 1, H, W]: in ``masks``' dtype: the padded mask resized bilinearly
        (``align_corners=False``) to its integer box and pasted, 0 elsewhere. Boxes partly outside
        the image are clipped to it; a box entirely outside pastes nothing.
    """
    _check_mask_stack("masks", masks, 4)
    if masks.shape[1] != 1:
        raise ArgumentValueError(f"masks must have shape [K, 1, M, M], got shape {tuple(masks.shape)}")
    _check_boxes("boxes", boxes, (masks.shape[0],))
    check_same_device(masks=masks, boxes=boxes)
    height, width = _check_size("img_shape", img_shape)
    check_int("padding", padding, minimum=0)
    pasted = torch.ops.tritondet.paste_masks(
        masks[None, :, 0], boxes[None], None, None, height, width, padding, None, masks.dtype
    )
    return pasted.view(masks.shape[0], 1, height, width)


def paste_masks_padded(
    masks: Tensor,
    boxes: Tensor,
    num_valid: Tensor,
    image_sizes: Tensor,
    out_hw: tuple[int, int],
    threshold: float | None = 0.5,
    out_dtype: torch.dtype = torch.bool,
) -> Tensor:
    """Every mask of a padded batch pasted into its image in one launch, with no host sync.

    Args:
        masks (Tensor[B, P, M, M]): mask probabilities, any float dtype, any strides.
        boxes (Tensor[B, P, 4]): ``(x1, y1, x2, y2)`` in image pixels, floats.
        num_valid (Tensor[B]): integer count of real boxes per image; later rows are padding.
        image_sizes (Tensor[B, 2]): integer ``(height, width)`` of each image.
        out_hw (Tuple[int, int]): ``(H, W)`` of the output, at least every image's size.
        threshold (float or None): ``value > threshold`` per pixel (the value rounded to
            ``masks``' dtype and compared with the threshold in it, as ``pasted > threshold``
            does); None keeps the values.
        out_dtype (torch.dtype): ``torch.bool`` or ``torch.uint8`` (0/1) when thresholded, a
            float dtype when ``threshold`` is None.

    Returns:
        Tensor[B, P, H, W]: per image, :func:`paste_masks_in_image` (padding 1) at
        ``image_sizes[b]`` then ``> threshold``; zero/False outside the image and in rows past
        ``num_valid``.
    """
    _check_mask_stack("masks", masks, 4)
    batch, slots = masks.shape[:2]
    _check_boxes("boxes", boxes, (batch, slots))
    _check_per_image("num_valid", num_valid, batch)
    _check_per_image("image_sizes", image_sizes, batch, (2,))
    check_same_device(masks=masks, boxes=boxes, num_valid=num_valid, image_sizes=image_sizes)
    height, width = _check_size("out_hw", out_hw)
    if threshold is None:
        if not out_dtype.is_floating_point:
            raise ArgumentValueError(f"out_dtype must be a float dtype when threshold is None, got {out_dtype}")
    else:
        if out_dtype not in (torch.bool, torch.uint8):
            raise ArgumentValueError(f"out_dtype must be torch.bool or torch.uint8 with a threshold, got {out_dtype}")
        threshold = check_real("threshold", threshold)
    check_counts("num_valid", num_valid, slots)
    return torch.ops.tritondet.paste_masks(masks, boxes, num_valid, image_sizes, height, width, 1, threshold, out_dtype)


def _check_mask_pixels(name: str, masks: Tensor) -> None:
    """Masks ``[..., G, H, W]``, if any (G > 0), have at least 1 x 1 pixels: RoIAlign reads a
    pixel of every matched mask."""
    if masks.shape[-3] and not (masks.shape[-2] and masks.shape[-1]):
        raise ArgumentValueError(f"{name} must have masks of at least 1 x 1 pixels, got shape {tuple(masks.shape)}")


def _dense_gt_masks(gt_masks, batch: int, device: torch.device) -> tuple[Tensor, list[int]]:
    """``([B, G, HG, WG] masks, 2B ints: each image's mask height and width)``: a list of
    ``[G_b, H_b, W_b]`` masks is copied into one zero-padded tensor (a loop over images)."""
    if isinstance(gt_masks, Tensor):
        if gt_masks.dim() != 4 or gt_masks.shape[0] != batch:
            raise ArgumentValueError(f"gt_masks must have shape [{batch}, G, H, W], got shape {tuple(gt_masks.shape)}")
        _check_mask_pixels("gt_masks", gt_masks)
        return gt_masks, list(gt_masks.shape[-2:]) * batch
    if not isinstance(gt_masks, (list, tuple)) or not all(isinstance(m, Tensor) for m in gt_masks):
        raise ArgumentTypeError(
            f"gt_masks must be a Tensor[B, G, H, W] or a list of Tensor[G, H, W], got {type(gt_masks).__name__}"
        )
    if len(gt_masks) != batch:
        raise ArgumentValueError(f"gt_masks must hold {batch} images' masks, got {len(gt_masks)}")
    for i, masks in enumerate(gt_masks):
        if masks.dim() != 3:
            raise ArgumentValueError(f"gt_masks[{i}] must have shape [G, H, W], got shape {tuple(masks.shape)}")
        _check_mask_pixels(f"gt_masks[{i}]", masks)
    dtypes = {m.dtype for m in gt_masks}
    if len(dtypes) > 1:
        raise ArgumentTypeError(f"gt_masks must share one dtype, got {sorted(map(str, dtypes))}")
    shape = [max((m.shape[d] for m in gt_masks), default=0) for d in range(3)]
    dense = torch.zeros((batch, *shape), dtype=gt_masks[0].dtype if gt_masks else torch.uint8, device=device)
    for image, masks in enumerate(gt_masks):
        dense[image, : masks.shape[0], : masks.shape[1], : masks.shape[2]] = masks
    return dense, [size for m in gt_masks for size in m.shape[1:]]


def mask_targets(
    gt_masks: Tensor | list[Tensor],
    gt_count: Tensor,
    proposals: Tensor,
    matched_idxs: Tensor,
    num_valid: Tensor,
    M: int,
) -> Tensor:
    """Mask R-CNN's mask targets for a padded batch in one launch: torchvision's
    ``project_masks_on_boxes`` (``roi_align`` of each proposal's matched mask, spatial scale 1,
    adaptive sampling, ``aligned=False``) for every image.

    Args:
        gt_masks (Tensor[B, G, H, W] or List[Tensor[G_b, H_b, W_b]]): ground-truth masks, bool,
            uint8 or float; a list keeps each image's mask size.
        gt_count (Tensor[B]): integer count of real masks per image (the first ``gt_count[b]``).
        proposals (Tensor[B, P, 4]): ``(x1, y1, x2, y2)`` in the masks' pixels, floats.
        matched_idxs (Tensor[B, P]): integer index of each proposal's mask among its image's.
        num_valid (Tensor[B]): integer count of real proposals per image.
        M (int): side of the targets.

    Returns:
        Tensor[B, P, M, M]: fp32; zero in rows past ``num_valid`` and where ``matched_idxs`` is
        outside ``[0, gt_count[b])`` (-1, an image without masks).
    """
    check_floating("proposals", check_tensor("proposals", proposals, last_dim=4))
    if proposals.dim() != 3:
        raise ArgumentValueError(f"proposals must have shape [B, P, 4], got shape {tuple(proposals.shape)}")
    batch, slots = proposals.shape[:2]
    check_int("M", M, minimum=1)
    _check_per_image("gt_count", gt_count, batch)
    _check_per_image("matched_idxs", matched_idxs, batch, (slots,))
    _check_per_image("num_valid", num_valid, batch)
    check_same_device(proposals=proposals, gt_count=gt_count, matched_idxs=matched_idxs, num_valid=num_valid)
    dense, sizes = _dense_gt_masks(gt_masks, batch, proposals.device)
    check_same_device(proposals=proposals, gt_masks=dense)
    if dense.dtype not in (torch.bool, torch.uint8) and not dense.is_floating_point():
        raise ArgumentTypeError(f"gt_masks must hold bool, uint8 or float values, got dtype {dense.dtype}")
    check_counts("gt_count", gt_count, dense.shape[1])
    check_counts("num_valid", num_valid, slots)
    return torch.ops.tritondet.mask_targets(dense, sizes, gt_count, proposals, matched_idxs, num_valid, M)


def _check_labels(labels: Tensor, num_classes: int, weights: Tensor | None) -> None:
    """Every label of a row that counts (weight above 0) lies in ``[0, num_classes)``, checked
    without a host sync (``torch._assert_async``, a ``ValueError`` on the CPU)."""
    counted = (labels >= 0) & (labels < num_classes)
    if weights is not None:
        counted |= weights <= 0
    message = f"labels of rows with a weight above 0 must lie in [0, {num_classes})"
    try:
        torch._assert_async(counted.all(), message)
    except RuntimeError as error:
        raise ArgumentValueError(message) from error


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mask R-CNN's mask loss, torchvision's ``maskrcnn_loss`` value: binary cross-entropy with
    logits of each RoI's labelled channel against its target, averaged over pixels and RoIs.

    Args:
        mask_logits (Tensor[K, C, M, M]): float logits, any strides; differentiable (only the
            labelled channel receives gradient).
        labels (Tensor[K]): integer class of each RoI.
        targets (Tensor[K, M, M]): float targets in [0, 1] (:func:`mask_targets`).
        weights (Tensor[K] or None): per-RoI weights; with them the mean runs over the RoIs whose
            weight is above 0, each RoI's loss scaled by its weight (0/1 weights mask padded rows,
            whose labels are then not read).

    Returns:
        Tensor[]: the loss in ``mask_logits``' dtype; 0 (with a zero gradient) when no RoI counts.
    """
    check_floating("mask_logits", check_tensor("mask_logits", mask_logits))
    if mask_logits.dim() != 4 or mask_logits.shape[-1] != mask_logits.shape[-2]:
        raise ArgumentValueError(f"mask_logits must have shape [K, C, M, M], got shape {tuple(mask_logits.shape)}")
    k, c, m = mask_logits.shape[0], mask_logits.shape[1], mask_logits.shape[-1]
    _check_per_image("labels", labels, k)
    check_floating("targets", check_tensor("targets", targets))
    if tuple(targets.shape) != (k, m, m):
        raise ArgumentValueError(f"targets must have shape {[k, m, m]}, got shape {tuple(targets.shape)}")
    if weights is not None:
        check_tensor("weights", weights)
        if tuple(weights.shape) != (k,):
            raise ArgumentValueError(f"weights must have shape [{k}], got shape {tuple(weights.shape)}")
        check_same_device(mask_logits=mask_logits, weights=weights)
    check_same_device(mask_logits=mask_logits, labels=labels, targets=targets)
    _check_labels(labels, c, weights)
    return torch.ops.tritondet.mask_loss(mask_logits, labels, targets, weights)[0]
