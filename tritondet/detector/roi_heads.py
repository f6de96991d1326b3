"""The Fast R-CNN detection head on RPN proposals (Faster R-CNN, Section 3.2; Fast R-CNN).

Shapes: B images, P proposals per image (padded), S sampled RoIs per image in training, K = B * P
(or B * S) pooled RoIs, C classes (background 0 included), D = detections_per_img.

Each proposal is pooled to a fixed ``[channels, 7, 7]`` grid (``ops.MultiScaleRoIAlign``, or on a
single map ``ops.roi_pool`` / ``ops.crop_pool``), passed through two FC layers, then a classifier
(C scores) and a class-specific box regressor (4C deltas, weights 10, 10, 5, 5). Inference
(``ops.postprocess_detections``) decodes every class's box, clips, and keeps the best D per image
with per-class NMS; fixed shapes, no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.pooling import level_scales
from .config import RoIHeadsConfig
from .targets import GroundTruth, proposal_target_layer

POOLINGS = ("roi_align", "roi_pool", "crop_pool")


class TwoMLPHead(nn.Module):
    """fc6 and fc7 with ReLU (torchvision's ``TwoMLPHead``; its state-dict keys)."""

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


class FastRCNNPredictor(nn.Module):
    """Class logits ``[K, C]`` and class-specific deltas ``[K, 4C]`` (torchvision's keys)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box pooling, box head, predictor; losses in training, padded detections in inference.

    ``box_head``/``box_predictor`` default to :class:`TwoMLPHead` / :class:`FastRCNNPredictor`; any
    modules with the same interface can be given (e.g. torchvision's ``FastRCNNConvFCHead``).
    """

    def __init__(
        self,
        config: RoIHeadsConfig,
        in_channels: int,
        box_head: nn.Module | None = None,
        box_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if config.box_pooling not in POOLINGS:
            raise ValueError(f"box_pooling must be one of {POOLINGS}, got {config.box_pooling!r}")
        if config.box_pooling != "roi_align" and len(config.featmap_names) != 1:
            raise ValueError(
                f"box_pooling={config.box_pooling!r} pools from one feature map; got {config.featmap_names}"
            )
        self.config = config
        if config.box_pooling == "roi_align":
            self.box_roi_pool = ops.MultiScaleRoIAlign(
                list(config.featmap_names), config.output_size, config.sampling_ratio
            )
        resolution = config.output_size
        self.box_head = box_head or TwoMLPHead(in_channels * resolution**2, config.representation_size)
        self.box_predictor = box_predictor or FastRCNNPredictor(config.representation_size, config.num_classes)

    def pool(self, features: dict[str, Tensor], boxes: Tensor, image_shapes: list[tuple[int, int]]) -> Tensor:
        """``boxes [B, R, 4]`` (image coordinates, padded; every row pooled, handed to the op as is)
        -> ``[B * R, channels, 7, 7]``. ``image_shapes``: the images' (h, w) from which the level
        scales are inferred (torchvision's rule)."""
        config = self.config
        if config.box_pooling == "roi_align":
            return self.box_roi_pool(features, boxes, image_shapes)
        feature = features[config.featmap_names[0]]
        (scale,), _ = level_scales([feature], image_shapes)
        if config.box_pooling == "roi_pool":
            return ops.roi_pool(feature, boxes, config.output_size, scale)
        return ops.crop_pool(feature, boxes, config.output_size, scale, config.sampling_ratio)

    def predict(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        return self.box_predictor(self.box_head(pooled))

    def postprocess(
        self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor, num_valid: Tensor, image_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections ``boxes [B, D, 4]`` fp32, ``scores [B, D]``, ``labels [B, D]`` int64 (0 in
        padding), ``num_valid [B]``: torchvision's ``postprocess_detections`` with fixed shapes."""
        config = self.config
        return ops.postprocess_detections(
            class_logits,
            box_regression,
            proposals,
            num_valid,
            image_sizes,
            config.bbox_reg_weights,
            score_thresh=config.score_thresh,
            nms_thresh=config.nms_thresh,
            detections_per_img=config.detections_per_img,
            min_size=config.min_size,
        )

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        num_valid: Tensor,
        image_sizes: Tensor,
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inference on padded ``proposals [B, P, 4]``: see :meth:`postprocess`."""
        class_logits, box_regression = self.predict(self.pool(features, proposals, image_shapes))
        return self.postprocess(class_logits, box_regression, proposals, num_valid, image_sizes)

    def loss(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        num_valid: Tensor,
        gt: GroundTruth,
        image_shapes: list[tuple[int, int]],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """``loss_classifier`` and ``loss_box_reg`` on sampled proposals (the proposal target
        layer). If ``proposals`` carry gradients (``crop_pool`` joint training), the pooled boxes
        keep them; the targets are computed on detached boxes."""
        targets = proposal_target_layer(proposals.detach(), num_valid, gt, self.config, generator)
        return self.box_loss(features, proposals, targets, gt, image_shapes)

    def box_loss(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        targets: ops.ProposalTargets,
        gt: GroundTruth,
        image_shapes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """:meth:`loss` on the proposal target layer's ``targets`` for ``proposals [B, P, 4]``."""
        config = self.config
        rois = targets.proposals
        if proposals.requires_grad:
            candidates = torch.cat([proposals, gt.boxes.to(proposals.dtype)], dim=1)
            index = targets.sampled_idx.clamp(min=0)
            rois = candidates.gather(1, index[..., None].expand(-1, -1, 4)) * (targets.sampled_idx >= 0)[..., None]
        class_logits, box_regression = self.predict(self.pool(features, rois, image_shapes))
        batch, slots = targets.labels.shape
        sampled = (targets.labels >= 0).to(torch.float32).view(-1)
        num_sampled = sampled.sum().clamp(min=1.0)
        ce = F.cross_entropy(class_logits.float(), targets.labels.clamp(min=0).view(-1), reduction="none")
        # The class-specific regressor's loss counts only each foreground slot's label row (its
        # targets and weights are zero elsewhere): gather that row's deltas, as torchvision's fastrcnn_loss.
        label_rows = targets.labels.clamp(min=0)[..., None, None].expand(batch, slots, 1, 4)
        label_deltas = box_regression.view(batch, slots, -1, 4).gather(2, label_rows).squeeze(2)  # [B, S, 4]
        box = F.smooth_l1_loss(
            label_deltas.float(), targets.regression_targets.float(), beta=config.smooth_l1_beta, reduction="none"
        )
        foreground = (targets.labels > 0)[..., None]
        return {
            "loss_classifier": (ce * sampled).sum() / num_sampled,
            "loss_box_reg": torch.where(foreground, box, 0).sum() / num_sampled,
        }
