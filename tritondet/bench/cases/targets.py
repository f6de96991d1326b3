"""Training targets: matching, balanced sampling and target encoding against torchvision's
Matcher + BalancedPositiveNegativeSampler + BoxCoder, in the same run.

Sizes: B = 2 and 8 images; 250000 anchors (every anchor of an 800x1333 FPN image,
~242k, rounded up) against 20 and 100 ground-truth boxes per image for the matcher and the anchor
target layer; 2000 post-NMS proposals (training) per image for the proposal target layer
(512 / 0.25). The CPU runs smaller sizes.

The sampler draws different random subsets on the two sides, so the checks compare what is
deterministic: the matches (exactly) and the sampled counts.
"""

from __future__ import annotations

import torch
import torchvision
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from ... import ops
from ..harness import Case
from ..inputs import IMAGE_SCALE, random_boxes

# (images, anchors, ground truth per image); proposal cases use _PROPOSALS proposals per image.
_SIZES = {
    "tiny": {"cpu": [(2, 1000, 5)], "cuda": [(2, 1000, 5)]},
    "quick": {"cpu": [(2, 20000, 20)], "cuda": [(2, 250000, 20), (8, 250000, 100)]},
    "full": {
        "cpu": [(2, 50000, 20), (2, 50000, 100)],
        "cuda": [(b, 250000, g) for b in (2, 8) for g in (20, 100)],
    },
}
_PROPOSALS = {"tiny": 300, "quick": 2000, "full": 2000}
_INT64_BYTES = 8


def _inputs(batch: int, num_boxes: int, num_gt: int, device: torch.device, per_image: bool):
    def inputs():
        generator = torch.Generator().manual_seed(batch * num_boxes + num_gt)
        boxes = random_boxes(num_boxes, scale=IMAGE_SCALE, generator=generator, batch=(batch,) if per_image else ())
        gt_boxes = random_boxes(num_gt, scale=IMAGE_SCALE, generator=generator, batch=(batch,))
        # Ground truth near some boxes, so that there are foreground matches to sample.
        gt_boxes[:, : num_gt // 2] = boxes.reshape(-1, 4)[: num_gt // 2] + 2.0
        gt_labels = torch.randint(1, 91, (batch, num_gt), generator=generator)
        gt_count = torch.full((batch,), num_gt)
        return boxes.to(device), gt_boxes.to(device), gt_labels.to(device), gt_count.to(device)

    return inputs


def _torchvision_match(anchors, gt_boxes, gt_labels, gt_count):
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    return torch.stack([matcher(torchvision.ops.box_iou(gt, anchors)) for gt in gt_boxes])


def _check_matches(ours, theirs) -> None:
    assert torch.equal(ours, theirs)


def _torchvision_anchor_targets(anchors, gt_boxes, gt_labels, gt_count):
    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {}, {}, 0.7)
    anchor_list = [anchors] * gt_boxes.shape[0]
    labels, matched_gt = rpn.assign_targets_to_anchors(anchor_list, [{"boxes": gt} for gt in gt_boxes])
    pos, neg = rpn.fg_bg_sampler(labels)
    return labels, pos, neg, rpn.box_coder.encode(matched_gt, anchor_list)


def _check_anchor_targets(ours, theirs) -> None:
    labels, pos, neg, _ = theirs
    matched = ours.matched_idx
    assert torch.equal(torch.where(matched >= 0, 1.0, torch.where(matched == -1, 0.0, -1.0)), torch.stack(labels))
    assert (ours.labels == 1).sum(1).tolist() == [int(p.sum()) for p in pos]
    assert (ours.labels == 0).sum(1).tolist() == [int(n.sum()) for n in neg]


def _torchvision_proposal_targets(proposals, gt_boxes, gt_labels, gt_count):
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    targets = [{"boxes": boxes, "labels": labels} for boxes, labels in zip(gt_boxes, gt_labels, strict=True)]
    return heads.select_training_samples(list(proposals), targets)


def _check_proposal_targets(ours, theirs) -> None:
    _, _, labels, _ = theirs
    assert (ours.labels > 0).sum(1).tolist() == [int((label > 0).sum()) for label in labels]
    assert (ours.labels >= 0).sum(1).tolist() == [label.numel() for label in labels]


def cases(device: torch.device, sizes: str) -> list[Case]:
    result = []
    for batch, num_anchors, num_gt in _SIZES[sizes][device.type]:
        size = f"{batch}x{num_anchors}x{num_gt}"
        anchors_in = _inputs(batch, num_anchors, num_gt, device, per_image=False)
        # Anchors and ground truth read once, matched indices written once.
        match_bytes = num_anchors * 16 + batch * (num_gt * 16 + num_anchors * _INT64_BYTES)
        result.append(
            Case(
                op="match_boxes",
                size=size,
                dtype=torch.float32,
                device=device,
                inputs=anchors_in,
                ours=lambda a, g, labels, c: ops.match_boxes(a, g, c, 0.7, 0.3, True),
                torchvision=_torchvision_match,
                min_bytes=match_bytes,
                check=_check_matches,
            )
        )
        result.append(
            Case(
                op="anchor_targets",
                size=size,
                dtype=torch.float32,
                device=device,
                inputs=anchors_in,
                ours=lambda a, g, labels, c: ops.anchor_targets(a, g, c),
                torchvision=_torchvision_anchor_targets,
                # Plus labels (int64) and regression targets (4 fp32) per anchor.
                min_bytes=match_bytes + batch * num_anchors * (_INT64_BYTES + 16),
                check=_check_anchor_targets,
            )
        )
        num_proposals = _PROPOSALS[sizes]
        result.append(
            Case(
                op="proposal_targets",
                size=f"{batch}x{num_proposals}x{num_gt}",
                dtype=torch.float32,
                device=device,
                inputs=_inputs(batch, num_proposals, num_gt, device, per_image=True),
                ours=lambda p, g, labels, c: ops.proposal_targets(p, g, labels, c, 91),
                torchvision=_torchvision_proposal_targets,
                # Proposals and ground truth read once; 512 sampled boxes, labels and targets written.
                min_bytes=batch * ((num_proposals + num_gt) * 16 + 512 * (16 + _INT64_BYTES + 16)),
                check=_check_proposal_targets,
            )
        )
    return result
