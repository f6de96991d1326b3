"""Mask R-CNN (He, Gkioxari, Dollar, Girshick 2017) on tritondet's ops: Faster R-CNN plus a mask branch.

Shapes: B images, G ground-truth slots per image, S sampled RoIs per image in training, F = at most
``int(S * positive_fraction)`` foreground RoIs per image, D = detections_per_img, C classes
(background 0 included), M = 28 the mask resolution, H x W image size.

The mask branch (torchvision's ``maskrcnn_resnet50_fpn``): each RoI pooled to ``[channels, 14, 14]``
(``ops.MultiScaleRoIAlign``), four 3x3 convolutions with ReLU, a 2x2 stride-2 transposed convolution
with ReLU and a 1x1 convolution: ``[C, M, M]`` mask logits, one map per class.

- Training: the foreground sampled RoIs (moved to the first F slots, fixed shapes) get
  ``ops.mask_targets`` (the matched ground-truth mask cropped to the RoI, resized to M x M) and
  ``loss_mask`` = ``ops.mask_loss`` (per-pixel binary cross-entropy of the ground-truth class's map,
  averaged over the foreground RoIs), besides Faster R-CNN's four losses.
- Inference: the label's map of each detection through a sigmoid; ``model(images)`` pastes them into
  the original images (``ops.paste_masks_in_image``: ``masks [D_i, 1, H, W]`` probabilities, as
  torchvision), ``forward_padded`` into a padded ``[B, D, H, W]`` batch (``ops.paste_masks_padded``,
  thresholded, no host sync).

Targets carry ``masks`` (``[G, H, W]`` uint8 or bool, the image's size) besides ``boxes`` and ``labels``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from .config import FasterRCNNConfig, MaskHeadConfig, RoIHeadsConfig, resnet50_fpn_masks
from .faster_rcnn import (
    LOSS_NAMES,
    FasterRCNN,
    check_padded_batch,
    normalize_padded,
    rescale_padded_boxes,
    split_detections,
)
from .roi_heads import RoIHeads
from .targets import GroundTruth, pack_targets, proposal_target_layer

MASK_LOSS_NAMES = (*LOSS_NAMES, "loss_mask")


class MaskGroundTruth(NamedTuple):
    """:class:`~.targets.GroundTruth` plus ``masks``: per image a ``[G_b, H_b, W_b]`` tensor at the
    resized image's size."""

    boxes: Tensor
    labels: Tensor
    count: Tensor
    masks: list[Tensor]


def _init_relu_conv(module: nn.Module) -> None:
    """He initialization (fan out) of every convolution's weight, zero biases: torchvision's."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class MaskRCNNHeads(nn.Sequential):
    """3x3 convolutions with ReLU, one per entry of ``layers`` (torchvision's ``MaskRCNNHeads``
    without normalization; its state-dict keys ``<i>.0.weight``)."""

    def __init__(self, in_channels: int, layers: tuple[int, ...]) -> None:
        blocks, previous = [], in_channels
        for channels in layers:
            blocks.append(nn.Sequential(nn.Conv2d(previous, channels, 3, padding=1), nn.ReLU(inplace=True)))
            previous = channels
        super().__init__(*blocks)
        _init_relu_conv(self)


class MaskRCNNPredictor(nn.Sequential):
    """``[K, in_channels, R, R]`` -> mask logits ``[K, C, 2R, 2R]``: a 2x2 stride-2 transposed
    convolution, ReLU, a 1x1 convolution (torchvision's ``MaskRCNNPredictor`` and keys)."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__(
            OrderedDict(
                conv5_mask=nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0),
                relu=nn.ReLU(inplace=True),
                mask_fcn_logits=nn.Conv2d(dim_reduced, num_classes, 1, 1, 0),
            )
        )
        _init_relu_conv(self)


class MaskRoIHeads(RoIHeads):
    """:class:`~.roi_heads.RoIHeads` plus the mask branch (``mask_roi_pool``, ``mask_head``,
    ``mask_predictor``: torchvision's ``RoIHeads`` attribute names, so state dicts transfer).

    ``mask_head``/``mask_predictor`` default to :class:`MaskRCNNHeads` / :class:`MaskRCNNPredictor`."""

    def __init__(
        self,
        config: RoIHeadsConfig,
        mask_config: MaskHeadConfig,
        in_channels: int,
        box_head: nn.Module | None = None,
        box_predictor: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__(config, in_channels, box_head, box_predictor)
        self.mask_config = mask_config
        self.mask_roi_pool = ops.MultiScaleRoIAlign(
            list(mask_config.featmap_names), mask_config.output_size, mask_config.sampling_ratio
        )
        self.mask_head = mask_head or MaskRCNNHeads(in_channels, mask_config.conv_channels)
        self.mask_predictor = mask_predictor or MaskRCNNPredictor(
            mask_config.conv_channels[-1], mask_config.conv_channels[-1], config.num_classes
        )

    def mask_logits(self, features: dict[str, Tensor], boxes: Tensor, image_shapes: list[tuple[int, int]]) -> Tensor:
        """``boxes [B, R, 4]`` (image coordinates, padded) -> mask logits ``[B * R, C, M, M]``."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def mask_probabilities(
        self, features: dict[str, Tensor], boxes: Tensor, labels: Tensor, image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Detections ``boxes [B, D, 4]`` with ``labels [B, D]`` -> the sigmoid of each one's label
        map, ``[B, D, M, M]`` fp32 (padding rows: label 0, the background's map, masked later)."""
        batch, slots = labels.shape
        logits = self.mask_logits(features, boxes, image_shapes)
        picked = logits.float().gather(1, labels.reshape(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:]))
        return picked.sigmoid().view(batch, slots, *logits.shape[-2:])

    def loss(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        num_valid: Tensor,
        gt: MaskGroundTruth,
        image_shapes: list[tuple[int, int]],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """:meth:`RoIHeads.loss` plus ``loss_mask`` on the same sampled RoIs' foreground."""
        targets = proposal_target_layer(proposals.detach(), num_valid, gt, self.config, generator)
        losses = self.box_loss(features, proposals, targets, gt, image_shapes)
        losses["loss_mask"] = self.mask_loss(features, targets, gt, image_shapes)
        return losses

    def mask_loss(
        self,
        features: dict[str, Tensor],
        targets: ops.ProposalTargets,
        gt: MaskGroundTruth,
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """``loss_mask`` on the foreground of the proposal target layer's ``targets`` (labels ``[B, S]``):
        a stable sort moves each image's foreground RoIs to its first F slots (the sampler takes at
        most ``int(S * positive_fraction)``), so the mask branch pools F, not S, RoIs per image."""
        config = self.config
        labels = targets.labels
        slots = min(int(config.batch_size_per_image * config.positive_fraction), labels.shape[1])
        foreground = labels > 0
        order = torch.sort((~foreground).to(torch.uint8), dim=1, stable=True).indices[:, :slots]  # [B, F]
        boxes = targets.proposals.gather(1, order[..., None].expand(-1, -1, 4))
        matched = targets.matched_idx.gather(1, order)
        resolution = self.mask_config.resolution
        mask_targets = ops.mask_targets(
            gt.masks, gt.count, boxes, matched, foreground.sum(dim=1).clamp(max=slots), resolution
        )
        logits = self.mask_logits(features, boxes, image_shapes)
        return ops.mask_loss(
            logits,
            labels.gather(1, order).clamp(min=0).reshape(-1),
            mask_targets.reshape(-1, resolution, resolution),
            foreground.gather(1, order).reshape(-1).to(torch.float32),
        )


def check_mask_targets(images: list[Tensor], targets) -> None:
    """Raise ``ValueError`` naming the first target whose ``masks`` is missing or is not a
    ``[G, H, W]`` (G its box count, H x W its image's size) uint8 or bool tensor. Targets that are not
    dicts of tensors are left to :func:`~.targets.check_targets`."""
    if not isinstance(targets, (list, tuple)):
        return
    for i, (image, target) in enumerate(zip(images, targets, strict=False)):
        if not isinstance(target, dict) or not isinstance(target.get("boxes"), Tensor):
            continue
        if "masks" not in target:
            raise ValueError(f"targets[{i}] is missing the field 'masks' (Mask R-CNN trains on instance masks)")
        masks = target["masks"]
        expected = (target["boxes"].shape[0], *image.shape[-2:])
        if not isinstance(masks, Tensor) or masks.dtype not in (torch.uint8, torch.bool) or masks.shape != expected:
            raise ValueError(
                f"targets[{i}]['masks'] must be a uint8 or bool Tensor[G, H, W] = {list(expected)}, got "
                f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}"
            )


class MaskRCNN(FasterRCNN):
    """Mask R-CNN with torchvision's interface and state-dict layout: :class:`FasterRCNN` whose
    ``roi_heads`` is a :class:`MaskRoIHeads`.

    Args:
        config (FasterRCNNConfig): with ``mask`` set (:func:`~.config.resnet50_fpn_masks` when omitted).
        backbone, box_head, box_predictor: as :class:`FasterRCNN`'s.
        mask_head, mask_predictor (nn.Module, optional): replace the mask convolutions and predictor.
    """

    def __init__(
        self,
        config: FasterRCNNConfig | None = None,
        *,
        backbone: nn.Module | None = None,
        box_head: nn.Module | None = None,
        box_predictor: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        config = config or resnet50_fpn_masks()
        if config.mask is None:
            raise ValueError("config.mask is None: a Mask R-CNN needs a MaskHeadConfig (see config.with_masks)")
        super().__init__(config, backbone=backbone, box_head=box_head, box_predictor=box_predictor)
        boxes = self.roi_heads
        self.roi_heads = MaskRoIHeads(
            config.roi_heads,
            config.mask,
            self.backbone.out_channels,
            boxes.box_head,
            boxes.box_predictor,
            mask_head,
            mask_predictor,
        )

    @classmethod
    def from_torchvision(cls, model: nn.Module) -> MaskRCNN:
        """See :func:`tritondet.detector.compat.from_torchvision`; ``model`` must have a mask head."""
        if not getattr(model.roi_heads, "has_mask", lambda: False)():
            raise ValueError("MaskRCNN.from_torchvision needs a torchvision MaskRCNN (a model with a mask head)")
        return super().from_torchvision(model)

    def _ground_truth(self, targets: list[dict[str, Tensor]], device: torch.device) -> MaskGroundTruth:
        gt: GroundTruth = pack_targets(targets, device)
        return MaskGroundTruth(*gt, masks=[target["masks"].to(device) for target in targets])

    def _prepare(self, images, targets):
        if self.training and targets is not None:
            check_mask_targets(images, targets)
        return super()._prepare(images, targets)

    def _detect_masks(
        self, padded: Tensor, image_sizes: Tensor, image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Padded detections (see :meth:`RoIHeads.postprocess`) and their mask probabilities ``[B, D, M, M]``."""
        features, proposals, num_valid = self._proposals(padded, image_sizes)
        boxes, scores, labels, num_valid = self.roi_heads(features, proposals, num_valid, image_sizes, image_shapes)
        return (
            boxes,
            scores,
            labels,
            num_valid,
            self.roi_heads.mask_probabilities(features, boxes, labels, image_shapes),
        )

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, generator=None):
        """Training (``targets`` with ``boxes``, ``labels`` and ``masks``): the loss dict, ``loss_mask``
        included. Inference: a list of ``{"boxes" [D_i, 4], "scores" [D_i], "labels" [D_i], "masks"
        [D_i, 1, H_i, W_i]}`` (mask probabilities) in original image coordinates."""
        if self.training:
            return super().forward(images, targets, generator)
        padded, image_sizes, image_shapes, _, original_sizes = self._prepare(images, None)
        boxes, scores, labels, num_valid, masks = self._detect_masks(padded, image_sizes, image_shapes)
        detections = split_detections(num_valid, boxes=boxes, scores=scores, labels=labels, masks=masks)
        probabilities = [detection.pop("masks") for detection in detections]
        detections = self.transform.postprocess(detections, image_shapes, original_sizes)
        for detection, mask, size in zip(detections, probabilities, original_sizes, strict=True):
            detection["masks"] = ops.paste_masks_in_image(mask[:, None], detection["boxes"], size)
        return detections

    def forward_padded(
        self,
        images: Tensor,
        image_sizes: Tensor,
        original_image_sizes: Tensor | None = None,
        mask_size: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`FasterRCNN.forward_padded`'s detections and their masks, fixed shapes, no host sync.

        Args:
            images, image_sizes, original_image_sizes: as :meth:`FasterRCNN.forward_padded`.
            mask_size ((H, W), optional): the masks' canvas; default the padded batch's size
                (required with ``original_image_sizes``: at least the largest original size).

        Returns:
            boxes, scores, labels, num_valid as :meth:`FasterRCNN.forward_padded`, and masks
            (Tensor[B, D, H, W] bool): each detection's mask probability > ``mask_threshold``, in the
            coordinates of the boxes; false past num_valid and outside each image.
        """
        check_padded_batch(images, image_sizes)
        if original_image_sizes is not None and mask_size is None:
            raise ValueError("mask_size (H, W) must be given with original_image_sizes")
        padded = normalize_padded(images, image_sizes, self.image_mean, self.image_std)
        boxes, scores, labels, num_valid, masks = self._detect_masks(padded, image_sizes, [tuple(images.shape[-2:])])
        sizes = image_sizes
        if original_image_sizes is not None:
            boxes = rescale_padded_boxes(boxes, image_sizes, original_image_sizes)
            sizes = original_image_sizes
        pasted = self.paste_padded(masks, boxes, num_valid, sizes, tuple(mask_size or images.shape[-2:]))
        return boxes, scores, labels, num_valid, pasted

    def paste_padded(
        self, masks: Tensor, boxes: Tensor, num_valid: Tensor, image_sizes: Tensor, out_hw: tuple[int, int]
    ) -> Tensor:
        """Mask probabilities ``masks [B, D, M, M]`` of the detections ``boxes [B, D, 4]`` -> ``[B, D, H, W]``
        bool (``out_hw``): each probability > ``mask_threshold`` pasted at its box in one launch; false past
        ``num_valid`` and outside ``image_sizes [B, 2]``."""
        return ops.paste_masks_padded(
            masks, boxes, num_valid, image_sizes, out_hw, threshold=self.config.mask.mask_threshold
        )
