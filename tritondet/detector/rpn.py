"""Region Proposal Network (Faster R-CNN, Section 3.1).

Shapes: B images, L levels, A anchors per position, H_l x W_l positions on level l,
N_A = sum_l H_l * W_l * A anchors in all, P = post_nms_top_n proposals per image.

A 3x3 convolution + ReLU slides over every level, then two sibling 1x1 convolutions give the
objectness (k logits, or the paper's 2k softmax scores) and 4k box deltas per position. Proposals:
:func:`tritondet.ops.rpn_proposals` straight from the head's outputs (anchors implicit, decode, clip,
filter, NMS per level, top P) with fixed shapes and no host sync; :meth:`RegionProposalNetwork.proposal_stages`
composes the same stage from the PyTorch pieces of :mod:`tritondet.kernels.rpn_proposals`, keeping the
gradient to the deltas (joint training) and the candidates before NMS. Training: the anchor target layer
(:func:`tritondet.ops.anchor_targets`) and the loss of Eqn. (1), normalized as torchvision does or as
the paper does (see :class:`~tritondet.detector.config.RPNConfig`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..kernels import rpn_proposals
from ..kernels.box_coder import DEFAULT_XFORM_CLIP
from .config import AnchorConfig, RPNConfig
from .fold import convolve_siblings, run_layers
from .targets import GroundTruth, anchor_target_layer


class RPNHead(nn.Module):
    """``conv_depth`` 3x3 conv + ReLU, then 1x1 objectness and 1x1 box-delta convolutions, shared
    by every level. State-dict keys are torchvision's ``RPNHead``'s (``conv.0.0.weight``, ...).

    ``objectness="sigmoid"``: A logits per position. ``"softmax"``: 2A logits per position,
    background for all anchors then foreground (py-faster-rcnn's layout); the head still returns
    one logit per anchor, ``fg - bg``, whose sigmoid is the softmax foreground probability.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1, objectness: str = "sigmoid") -> None:
        super().__init__()
        if objectness not in ("sigmoid", "softmax"):
            raise ValueError(f"objectness must be 'sigmoid' or 'softmax', got {objectness!r}")
        self.objectness = objectness
        self.num_anchors = num_anchors
        self.conv = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))
                for _ in range(conv_depth)
            )
        )
        scores_per_anchor = 1 if objectness == "sigmoid" else 2
        self.cls_logits = nn.Conv2d(in_channels, scores_per_anchor * num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, kernel_size=1)
        for layer in self.modules():  # the paper's initialization: N(0, 0.01^2), zero bias
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``features`` (L x ``[B, C, H_l, W_l]``) -> objectness logits (L x ``[B, A, H_l, W_l]``)
        and deltas (L x ``[B, 4A, H_l, W_l]``)."""
        objectness, deltas = [], []
        for feature in features:
            hidden = run_layers(self.conv, feature)
            logits, level_deltas = convolve_siblings([self.cls_logits, self.bbox_pred], hidden)
            if self.objectness == "softmax":
                logits = logits[:, self.num_anchors :] - logits[:, : self.num_anchors]
            objectness.append(logits)
            deltas.append(level_deltas)
        return objectness, deltas


def flatten_head_outputs(objectness: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head outputs -> ``[B, N_A]`` logits and ``[B, N_A, 4]`` deltas in anchor order
    (level, y, x, anchor), the order of :func:`tritondet.ops.grid_anchors`."""
    flat_objectness, flat_deltas = [], []
    for logits, level_deltas in zip(objectness, deltas, strict=True):
        batch, anchors, height, width = logits.shape
        flat_objectness.append(logits.permute(0, 2, 3, 1).reshape(batch, -1))
        level_deltas = level_deltas.view(batch, anchors, 4, height, width).permute(0, 3, 4, 1, 2)
        flat_deltas.append(level_deltas.reshape(batch, -1, 4))
    return torch.cat(flat_objectness, dim=1), torch.cat(flat_deltas, dim=1)


class ProposalStages(NamedTuple):
    """The RPN's proposals before and after NMS (B images, L levels, K candidates per level)."""

    before_nms: Tensor  # [B, L K, 4] candidates by decreasing score: decoded, clipped
    num_before_nms: Tensor  # [B] candidates passing the size and score tests (the first ones)
    after_nms: Tensor  # [B, P, 4] proposals, zeros past num_after_nms
    num_after_nms: Tensor  # [B]


class RegionProposalNetwork(nn.Module):
    """The RPN: head, proposals and (in training) the anchor target layer and loss."""

    def __init__(self, config: RPNConfig, anchors: AnchorConfig, in_channels: int) -> None:
        super().__init__()
        if config.loss not in ("torchvision", "paper"):
            raise ValueError(f"RPN loss must be 'torchvision' or 'paper', got {config.loss!r}")
        self.config = config
        self.anchors = anchors
        self.head = RPNHead(in_channels, anchors.num_anchors(), config.conv_depth, config.objectness)

    def _top_n(self, values: tuple[int, int]) -> int:
        return values[0] if self.training else values[1]

    def proposals(
        self, objectness: list[Tensor], deltas: list[Tensor], image_sizes: Tensor, strides: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Fixed-shape proposals: ``boxes [B, P, 4]`` fp32 (detached) and ``num_valid [B]``."""
        config = self.config
        with torch.no_grad():  # proposals carry no gradient (torchvision detaches them too)
            boxes, _scores, num_valid = ops.rpn_proposals(
                objectness,
                deltas,
                image_sizes,
                self.anchors.sizes,
                self.anchors.aspect_ratios,
                strides,
                self._top_n(config.pre_nms_top_n),
                self._top_n(config.post_nms_top_n),
                nms_thresh=config.nms_thresh,
                min_size=config.min_size,
                score_thresh=config.score_thresh,
            )
        return boxes, num_valid

    def _candidates(
        self, objectness: list[Tensor], deltas: list[Tensor], image_sizes: Tensor, anchors: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The kernels' candidates before NMS in PyTorch: ``boxes [B, L, K, 4]`` (with their
        gradient to ``deltas``) and ranking ``keys [B, L, K]``."""
        config = self.config
        return rpn_proposals.candidates_from_anchors(
            objectness, deltas, anchors, image_sizes, self._top_n(config.pre_nms_top_n), config.min_size,
            config.score_thresh, DEFAULT_XFORM_CLIP,
        )  # fmt: skip

    def _after_nms(self, boxes: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """The kernels' NMS selection of the candidates, gathering the kept boxes (and their
        gradient): ``proposals [B, P, 4]`` (zeros past ``num_valid``) and ``num_valid [B]``."""
        config = self.config
        _, _, level, rank, num_valid = rpn_proposals.select_proposals(
            boxes.detach(), keys, config.nms_thresh, self._top_n(config.post_nms_top_n), with_index=True
        )
        kept = (level * boxes.shape[2] + rank).clamp(min=0)
        proposals = boxes.flatten(1, 2).gather(1, kept[..., None].expand(-1, -1, 4)) * (rank >= 0)[..., None]
        return proposals, num_valid

    def proposal_stages(
        self, objectness: list[Tensor], deltas: list[Tensor], image_sizes: Tensor, anchors: Tensor
    ) -> ProposalStages:
        """The proposals before and after NMS (for drawing the pipeline): the stage of
        :meth:`proposals` composed of the same pieces in PyTorch
        (:func:`tritondet.kernels.rpn_proposals.candidates_from_anchors`, then
        :func:`~tritondet.kernels.rpn_proposals.select_proposals`). ``anchors [N_A, 4]`` in the
        order of :func:`flatten_head_outputs`. No host sync."""
        boxes, keys = self._candidates(objectness, deltas, image_sizes, anchors)
        proposals, num_valid = self._after_nms(boxes, keys)
        order = keys.flatten(1).argsort(dim=1, stable=True)  # by decreasing score, dropped last
        before = boxes.flatten(1, 2).gather(1, order[..., None].expand(-1, -1, 4))
        return ProposalStages(before, (keys < float("inf")).flatten(1).sum(1), proposals, num_valid)

    def differentiable_proposals(
        self,
        objectness: list[Tensor],
        deltas: list[Tensor],
        image_sizes: Tensor,
        anchors: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The same proposals as :meth:`proposals`, whose
        boxes keep their gradient to the RPN's deltas (for ``crop_pool`` joint training): the
        ``after_nms`` stage of :meth:`proposal_stages`, without sorting the candidates."""
        return self._after_nms(*self._candidates(objectness, deltas, image_sizes, anchors))

    def loss(
        self,
        objectness: list[Tensor],
        deltas: list[Tensor],
        anchors: Tensor,
        gt: GroundTruth,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """``loss_objectness`` and ``loss_rpn_box_reg`` (see :class:`RPNConfig` for the two
        normalizations). ``anchors [N_A, 4]`` in the order of :func:`flatten_head_outputs`."""
        config = self.config
        targets = anchor_target_layer(anchors, gt, config, generator)
        logits, pred_deltas = flatten_head_outputs(objectness, deltas)
        sampled = (targets.labels >= 0).to(torch.float32)
        positive = (targets.labels == 1).to(torch.float32)
        num_sampled = sampled.sum().clamp(min=1.0)
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), targets.labels.clamp(min=0).to(torch.float32), reduction="none"
        )
        loss_objectness = (bce * sampled).sum() / num_sampled
        paper = config.loss == "paper"
        beta = config.paper_smooth_l1_beta if paper else config.smooth_l1_beta
        box = F.smooth_l1_loss(
            pred_deltas.float(), targets.regression_targets.float(), beta=beta, reduction="none"
        ).sum(-1)
        box_sum = (box * positive).sum()
        if paper:  # lambda / N_reg, N_reg = anchor locations of the batch
            locations = sum(o.shape[-2] * o.shape[-1] for o in objectness) * logits.shape[0]
            loss_box = config.paper_lambda * box_sum / locations
        else:
            loss_box = box_sum / num_sampled
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
