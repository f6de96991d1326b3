"""Mask R-CNN's mask ops at the sizes a COCO model uses, ours against torchvision's roi_heads functions.

Test time: 100 detections per image, 28x28 masks pasted into the 800x1333 image
(``paste_masks_in_image``, torchvision's loop over masks), and a batch of two images pasted and
thresholded at 0.5 in one call (``paste_masks_padded``; torchvision's side pastes per image and
thresholds). Training: 20 ground-truth masks per image, 128 positive RoIs per image (a quarter of
512 sampled), 28x28 targets (``mask_targets`` against ``project_masks_on_boxes`` per image) and
the loss over 91 classes, forward and backward (``mask_loss`` against ``maskrcnn_loss``'s
``binary_cross_entropy_with_logits`` of the labelled channel). fp32, as the mask head runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads

from ... import ops
from ..harness import Case

MASK_SIZE = 28
CLASSES = 91
# sizes -> (image height, width, detections per image, ground-truth masks and positive RoIs per image)
_SHAPES = {"tiny": (64, 96, 8, 3, 6), "quick": (800, 1333, 100, 20, 128), "full": (800, 1333, 100, 20, 128)}
IMAGES = 2


def _boxes(count: int, height: int, width: int, generator) -> torch.Tensor:
    """``[count, 4]`` boxes of 8 to ~40% of the image inside it, as detections and proposals are."""
    extent = torch.tensor([width, height], dtype=torch.float32)
    size = (0.01 + 0.4 * torch.rand(count, 2, generator=generator) ** 2) * extent
    corner = torch.rand(count, 2, generator=generator) * (extent - size)
    return torch.cat([corner, corner + size], 1)


def _check(ours, theirs) -> None:
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)


def _check_thresholded(ours, theirs) -> None:
    # fp32 values within an ulp of 0.5 may fall on either side of it.
    assert (ours != theirs).float().mean() < 1e-6


def _paste_cases(sizes: str, device: torch.device) -> list[Case]:
    height, width, detections, _, _ = _SHAPES[sizes]
    label = f"{detections}x{MASK_SIZE}x{MASK_SIZE} {height}x{width}"

    def inputs():
        generator = torch.Generator().manual_seed(0)
        masks = torch.rand(IMAGES, detections, MASK_SIZE, MASK_SIZE, generator=generator).to(device)
        boxes = torch.stack([_boxes(detections, height, width, generator) for _ in range(IMAGES)]).to(device)
        num_valid = torch.full((IMAGES,), detections, device=device)
        image_sizes = torch.tensor([(height, width)] * IMAGES, device=device)
        return masks, boxes, num_valid, image_sizes

    def one_image_inputs():
        masks, boxes, _, _ = inputs()
        return masks[0, :, None], boxes[0]

    def theirs_padded(masks, boxes, num_valid, image_sizes):
        pasted = [
            roi_heads.paste_masks_in_image(m[:, None], b, (height, width)) for m, b in zip(masks, boxes, strict=True)
        ]
        return torch.stack(pasted)[:, :, 0] > 0.5

    mask_bytes = detections * MASK_SIZE * MASK_SIZE * 4
    return [
        Case(
            op="paste_masks_in_image",
            size=label,
            dtype=torch.float32,
            device=device,
            inputs=one_image_inputs,
            ours=lambda m, b: ops.paste_masks_in_image(m, b, (height, width)),
            torchvision=lambda m, b: roi_heads.paste_masks_in_image(m, b, (height, width)),
            # Read the masks once, write the fp32 [K, 1, H, W] images once.
            min_bytes=mask_bytes + detections * height * width * 4,
            check=_check,
        ),
        Case(
            op="paste_masks_padded",
            size=f"{IMAGES}x{label}",
            dtype=torch.float32,
            device=device,
            inputs=inputs,
            ours=lambda m, b, n, s: ops.paste_masks_padded(m, b, n, s, (height, width)),
            torchvision=theirs_padded,
            # Read the masks once, write the bool [B, P, H, W] masks once.
            min_bytes=IMAGES * (mask_bytes + detections * height * width),
            check=_check_thresholded,
        ),
    ]


def _targets_case(sizes: str, device: torch.device) -> Case:
    height, width, _, gt_count, positives = _SHAPES[sizes]

    def inputs():
        generator = torch.Generator().manual_seed(1)
        gt_masks = (torch.rand(IMAGES, gt_count, height, width, generator=generator) > 0.5).to(device)
        proposals = torch.stack([_boxes(positives, height, width, generator) for _ in range(IMAGES)]).to(device)
        matched = torch.randint(gt_count, (IMAGES, positives), generator=generator).to(device)
        return gt_masks, proposals, matched

    counts = torch.tensor([gt_count] * IMAGES, device=device)
    valid = torch.tensor([positives] * IMAGES, device=device)

    def theirs(gt_masks, proposals, matched):
        targets = [
            roi_heads.project_masks_on_boxes(g, p, i, MASK_SIZE)
            for g, p, i in zip(gt_masks, proposals, matched, strict=True)
        ]
        return torch.stack(targets)

    return Case(
        op="mask_targets",
        size=f"{IMAGES}x{positives} of {gt_count} {height}x{width}",
        dtype=torch.float32,
        device=device,
        inputs=inputs,
        ours=lambda g, p, i: ops.mask_targets(g, counts, p, i, valid, MASK_SIZE),
        torchvision=theirs,
        # Write the fp32 targets once, read the boxes and indices (the masks read depend on the boxes).
        min_bytes=IMAGES * positives * (MASK_SIZE * MASK_SIZE * 4 + 4 * 4 + 8),
        check=_check,
    )


def _loss_case(sizes: str, device: torch.device) -> Case:
    _, _, _, _, positives = _SHAPES[sizes]
    rois = IMAGES * positives

    def inputs():
        generator = torch.Generator().manual_seed(2)
        logits = (torch.randn(rois, CLASSES, MASK_SIZE, MASK_SIZE, generator=generator) * 3).to(device)
        labels = torch.randint(1, CLASSES, (rois,), generator=generator).to(device)
        targets = (torch.rand(rois, MASK_SIZE, MASK_SIZE, generator=generator) > 0.5).float().to(device)
        return logits.requires_grad_(), labels, targets

    def run(loss, logits, labels, targets):
        loss(logits, labels, targets).backward()
        return logits.grad

    def theirs(logits, labels, targets):
        picked = logits[torch.arange(rois, device=labels.device), labels]
        return F.binary_cross_entropy_with_logits(picked, targets)

    pixels = rois * MASK_SIZE * MASK_SIZE
    return Case(
        op="mask_loss_fwd_bwd",
        size=f"{rois}x{CLASSES}cls",
        dtype=torch.float32,
        device=device,
        inputs=inputs,
        ours=lambda *a: run(ops.mask_loss, *a),
        torchvision=lambda *a: run(theirs, *a),
        # Read the labelled channel and the targets, write the whole [K, C, M, M] gradient.
        min_bytes=2 * pixels * 4 + pixels * CLASSES * 4,
        check=_check,
    )


def cases(device: torch.device, sizes: str) -> list[Case]:
    return [*_paste_cases(sizes, device), _targets_case(sizes, device), _loss_case(sizes, device)]
