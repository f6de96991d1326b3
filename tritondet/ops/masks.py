"""Instance-mask ops (temporary plain-PyTorch bodies until the mask kernel family is merged).

Shapes: B images, P boxes per image (padded; the first ``num_valid[b]`` real), G ground-truth
masks per image, M mask resolution, K = B * P, C classes, H x W image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor


def paste_masks_in_image(masks: Tensor, boxes: Tensor, img_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """``masks [K, 1, M, M]`` pasted into an image of ``img_shape`` (H, W) at ``boxes [K, 4]``:
    ``[K, 1, H, W]`` (torchvision's ``paste_masks_in_image``)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image as reference

    return reference(masks, boxes, tuple(int(v) for v in img_shape), padding)


def paste_masks_padded(
    masks: Tensor,
    boxes: Tensor,
    num_valid: Tensor,
    image_sizes: Tensor,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
    out_dtype: torch.dtype = torch.bool,
) -> Tensor:
    """``masks [B, P, M, M]`` probabilities pasted at ``boxes [B, P, 4]`` into ``[B, P, H, W]``
    (``out_hw``), thresholded at ``threshold`` for a bool ``out_dtype``; zero past ``num_valid`` and
    outside ``image_sizes [B, 2]``. Fixed shapes, no host sync."""
    batch, slots, size = masks.shape[0], masks.shape[1], masks.shape[-1]
    height, width = out_hw
    scale = (size + 2.0) / size  # torchvision pads the mask by one pixel and grows the box with it
    boxes = boxes.float()
    centre = (boxes[..., 2:] + boxes[..., :2]) * 0.5
    half = (boxes[..., 2:] - boxes[..., :2]) * 0.5 * scale
    grown = torch.cat([centre - half, centre + half], dim=-1).to(torch.int64)  # torchvision truncates
    origin = grown[..., :2].float()  # [B, P, 2] (x, y)
    extent = (grown[..., 2:] - grown[..., :2] + 1).clamp(min=1).float()
    padded = F.pad(masks.float().reshape(batch * slots, 1, size, size), (1, 1, 1, 1))
    xs = torch.arange(width, device=masks.device, dtype=torch.float32)
    ys = torch.arange(height, device=masks.device, dtype=torch.float32)
    # Output pixel -> normalized coordinate in the padded mask (align_corners=False, as F.interpolate).
    gx = ((xs - origin[..., 0, None]) + 0.5) / extent[..., 0, None] * 2 - 1  # [B, P, W]
    gy = ((ys - origin[..., 1, None]) + 0.5) / extent[..., 1, None] * 2 - 1  # [B, P, H]
    grid = torch.stack(
        [gx[:, :, None, :].expand(-1, -1, height, -1), gy[:, :, :, None].expand(-1, -1, -1, width)], dim=-1
    )
    pasted = F.grid_sample(
        padded, grid.reshape(batch * slots, height, width, 2), mode="bilinear", padding_mode="border",
        align_corners=False,
    ).reshape(batch, slots, height, width)  # fmt: skip
    inside_x = (xs >= origin[..., 0, None]) & (xs < origin[..., 0, None] + extent[..., 0, None])
    inside_y = (ys >= origin[..., 1, None]) & (ys < origin[..., 1, None] + extent[..., 1, None])
    sizes = image_sizes.to(masks.device)
    inside_x = inside_x & (xs < sizes[:, None, 1, None])
    inside_y = inside_y & (ys < sizes[:, None, 0, None])
    valid = torch.arange(slots, device=masks.device) < num_valid.to(masks.device)[:, None]
    keep = inside_y[..., :, None] & inside_x[..., None, :] & valid[..., None, None]
    pasted = torch.where(keep, pasted, 0.0)
    if out_dtype == torch.bool:
        return pasted > threshold
    return pasted.to(out_dtype)


def mask_targets(
    gt_masks, gt_count: Tensor, proposals: Tensor, matched_idxs: Tensor, num_valid: Tensor, M: int
) -> Tensor:
    """Ground-truth masks cropped to ``proposals [B, P, 4]`` and resized to ``[B, P, M, M]``
    (torchvision's ``project_masks_on_boxes`` per image); zero where ``matched_idxs`` is -1 or past
    ``num_valid``. ``gt_masks``: ``[B, G, H, W]`` or a list of ``[G_b, H_b, W_b]``."""
    batch, slots = proposals.shape[:2]
    targets = proposals.new_zeros((batch, slots, M, M), dtype=torch.float32)
    for b in range(batch):
        masks = gt_masks[b][: int(gt_count[b])]
        if masks.shape[0] == 0:
            continue
        index = matched_idxs[b].clamp(min=0)
        rois = torch.cat([index[:, None].to(proposals.dtype), proposals[b]], dim=1).float()
        cropped = torchvision.ops.roi_align(masks[:, None].float(), rois, (M, M), 1.0)[:, 0]
        keep = (matched_idxs[b] >= 0) & (torch.arange(slots, device=proposals.device) < num_valid[b])
        targets[b] = torch.where(keep[:, None, None], cropped, 0.0)
    return targets


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of each RoI's ``labels`` channel of ``mask_logits [K, C, M, M]`` against
    ``targets [K, M, M]``, averaged over pixels, then over RoIs weighted by ``weights [K]`` (all 1
    when None; torchvision's ``maskrcnn_loss`` with 0/1 weights selecting the positives)."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels.clamp(min=0)]
    per_roi = F.binary_cross_entropy_with_logits(picked.float(), targets.float(), reduction="none").mean(dim=(1, 2))
    if weights is None:
        return per_roi.mean()
    weights = weights.to(per_roi)
    return (per_roi * weights).sum() / weights.sum().clamp(min=1.0)
