"""Faster R-CNN (Ren, He, Girshick, Sun 2015) on tritondet's ops.

Shapes: B images; after preprocessing a padded batch ``[B, 3, H, W]`` with ``image_sizes [B, 2]``
(h, w before padding); P proposals and D = detections_per_img detections per image.

Pipeline: preprocessing (normalize, resize, pad: torchvision's ``GeneralizedRCNNTransform``, the one
place images are resized; data sets serve them at their file's size) ->
backbone (+FPN) -> RPN (:mod:`.rpn`) -> Fast R-CNN head (:mod:`.roi_heads`). All detection ops are
``tritondet.ops``; torchvision provides the backbone networks and the preprocessing.

Two inference interfaces:

- ``model(images)``: torchvision's - a list of ``[3, H_i, W_i]`` images in, a list of
  ``{"boxes", "scores", "labels"}`` dicts in original image coordinates out (one host sync, to
  learn each image's detection count).
- ``model.forward_padded(images, image_sizes)``: an already resized, zero-padded batch in; padded
  ``boxes [B, D, 4]``, ``scores [B, D]``, ``labels [B, D]``, ``num_valid [B]`` out, with no host sync,
  traceable by ``torch.compile(fullgraph=True)``.

Training: ``model(images, targets)`` returns torchvision's loss dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .. import ops
from ..ops._checks import check_counts
from .backbone import backbone_features, build_backbone, feature_strides
from .config import FasterRCNNConfig, TransformConfig, resnet50_fpn
from .fold import convolution_memory_format
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .targets import GroundTruth, check_targets, pack_targets

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


def check_images(images, channels: int) -> None:
    """Raise ``ValueError`` naming the first image that is not a floating ``[channels, H, W]`` tensor."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of [C, H, W] tensors, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"images[{i}] must be a Tensor, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != channels or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"images[{i}] must have shape [{channels}, H, W] with H, W > 0, got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"images[{i}] must be a floating-point tensor (values in [0, 1]), got {image.dtype}")


def build_transform(config: TransformConfig) -> GeneralizedRCNNTransform:
    """The model's preprocessing: normalize, resize (shorter side ``min_size``, longer at most
    ``max_size``: the only resize images get, in training as in inference), pad to ``size_divisible``."""
    return GeneralizedRCNNTransform(
        config.min_size,
        config.max_size,
        list(config.image_mean),
        list(config.image_std),
        size_divisible=config.size_divisible,
    )


def normalize_padded(images: Tensor, image_sizes: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(images - mean) / std`` with the padding (outside ``image_sizes``) zero, as torchvision
    pads after normalizing, in :func:`convolution_layout`. ``images [B, 3, H, W]``, ``image_sizes [B, 2]``
    (h, w); no host sync."""
    normalized = (images - mean.to(images)[:, None, None]) / std.to(images)[:, None, None]
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    sizes = image_sizes.to(images.device)
    inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
    return convolution_layout(normalized * inside[:, None].to(normalized.dtype))


def convolution_layout(images: Tensor) -> Tensor:
    """``images [B, 3, H, W]`` in :func:`convolution_memory_format` (the convolutions' outputs, and
    so every feature map, keep it)."""
    return images.contiguous(memory_format=convolution_memory_format(images.device))


def check_padded_batch(images, image_sizes) -> None:
    """Raise ``ValueError`` unless ``images`` is a ``Tensor[B, 3, H, W]`` and ``image_sizes`` a ``Tensor[B, 2]``
    of sizes within the padded batch (checked without a host sync: a device-side assert on CUDA)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a Tensor[B, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if not isinstance(image_sizes, Tensor) or image_sizes.shape != (images.shape[0], 2):
        raise ValueError(
            f"image_sizes must be a Tensor[B, 2] = [{images.shape[0]}, 2], got {getattr(image_sizes, 'shape', None)}"
        )
    check_counts("image_sizes[:, 0] (heights)", image_sizes[:, 0], images.shape[-2], lower=1)
    check_counts("image_sizes[:, 1] (widths)", image_sizes[:, 1], images.shape[-1], lower=1)


def rescale_padded_boxes(boxes: Tensor, image_sizes: Tensor, original_image_sizes: Tensor) -> Tensor:
    """``boxes [B, D, 4]`` from images of ``image_sizes [B, 2]`` (h, w) to ``original_image_sizes [B, 2]``."""
    ratio = original_image_sizes.to(boxes) / image_sizes.to(boxes)  # [B, 2] (h, w)
    return boxes * ratio[:, None, [1, 0, 1, 0]]


def split_detections(num_valid: Tensor, **padded: Tensor) -> list[dict[str, Tensor]]:
    """Per image ``b``, the first ``num_valid[b]`` rows of every padded ``[B, D, ...]`` field: the
    list interface's one host sync."""
    counts = num_valid.tolist()
    return [{name: value[i, :n] for name, value in padded.items()} for i, n in enumerate(counts)]


class FasterRCNN(nn.Module):
    """Faster R-CNN with torchvision's interface and state-dict layout.

    Args:
        config (FasterRCNNConfig): defaults in :mod:`tritondet.detector.config`
            (:func:`~tritondet.detector.config.resnet50_fpn` when omitted).
        backbone (nn.Module, optional): replaces the one ``config.backbone`` describes; must return
            an ordered dict of feature maps and have ``out_channels``.
        box_head, box_predictor (nn.Module, optional): replace the two-FC head and the predictor.
    """

    def __init__(
        self,
        config: FasterRCNNConfig | None = None,
        *,
        backbone: nn.Module | None = None,
        box_head: nn.Module | None = None,
        box_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        config = config or resnet50_fpn()
        self.config = config
        transform = config.transform
        self.transform = build_transform(transform)
        if backbone is None:
            if config.backbone is None:
                raise ValueError("config.backbone is None: pass a backbone module")
            backbone = build_backbone(config.backbone)
        self.backbone = backbone
        # Not persistent: the state dict keeps torchvision's keys.
        self.register_buffer("image_mean", torch.tensor(transform.image_mean), persistent=False)
        self.register_buffer("image_std", torch.tensor(transform.image_std), persistent=False)
        self.rpn = RegionProposalNetwork(config.rpn, config.anchors, backbone.out_channels)
        self.roi_heads = RoIHeads(config.roi_heads, backbone.out_channels, box_head, box_predictor)

    @classmethod
    def from_torchvision(cls, model: nn.Module) -> FasterRCNN:
        """See :func:`tritondet.detector.compat.from_torchvision`."""
        from .compat import from_torchvision  # compat builds FasterRCNNs: imported on use

        return from_torchvision(model)

    # -- shared stages ---------------------------------------------------------------------------

    def _anchors(self, features: list[Tensor], strides: list[tuple[int, int]]) -> Tensor:
        return ops.grid_anchors(
            [tuple(f.shape[-2:]) for f in features],
            strides,
            self.config.anchors.sizes,
            self.config.anchors.aspect_ratios,
            device=features[0].device,
        )

    def _proposals(self, padded: Tensor, image_sizes: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Backbone features, and the RPN's (detached) proposals ``[B, P, 4]`` with ``num_valid [B]``."""
        features = backbone_features(self.backbone, padded)
        levels = list(features.values())
        objectness, deltas = self.rpn.head(levels)
        strides = feature_strides(levels, tuple(padded.shape[-2:]))
        proposals, num_valid = self.rpn.proposals(objectness, deltas, image_sizes, strides)
        return features, proposals, num_valid

    def _detect(
        self, padded: Tensor, image_sizes: Tensor, image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        features, proposals, num_valid = self._proposals(padded, image_sizes)
        return self.roi_heads(features, proposals, num_valid, image_sizes, image_shapes)

    def _losses(
        self,
        padded: Tensor,
        image_sizes: Tensor,
        image_shapes,
        targets,
        generator,
        rpn: bool = True,
        roi_heads: bool = True,
        proposer: FasterRCNN | None = None,
    ) -> dict[str, Tensor]:
        gt = self._ground_truth(targets, padded.device)
        features = backbone_features(self.backbone, padded)
        levels = list(features.values())
        strides = feature_strides(levels, tuple(padded.shape[-2:]))
        if rpn or proposer is None:
            objectness, deltas = self.rpn.head(levels)
            anchors = self._anchors(levels, strides)
        if not roi_heads:
            proposals = num_valid = None
        elif proposer is not None:  # alternating training: another (frozen) model's proposals
            with torch.no_grad():
                _, proposals, num_valid = proposer._proposals(padded, image_sizes)
        elif self.config.roi_heads.box_pooling == "crop_pool":  # joint training: box loss reaches RPN boxes
            proposals, num_valid = self.rpn.differentiable_proposals(objectness, deltas, image_sizes, anchors)
        else:
            proposals, num_valid = self.rpn.proposals(objectness, deltas, image_sizes, strides)
        losses = self.rpn.loss(objectness, deltas, anchors, gt, generator) if rpn else {}
        if roi_heads:
            losses.update(self.roi_heads.loss(features, proposals, num_valid, gt, image_shapes, generator))
        return losses

    def _ground_truth(self, targets: list[dict[str, Tensor]], device: torch.device) -> GroundTruth:
        """The (resized) ``targets`` padded into a batch."""
        return pack_targets(targets, device)

    def _prepare(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None):
        """Check and preprocess: ``padded [B, 3, H, W]``, ``image_sizes [B, 2]``, their list
        ``image_shapes``, the resized ``targets`` and the original sizes."""
        check_images(images, len(self.config.transform.image_mean))
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            check_targets(targets, len(images), self.config.roi_heads.num_classes)
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, targets = self.transform(images, targets)
        image_shapes = [tuple(int(v) for v in size) for size in image_list.image_sizes]
        padded = convolution_layout(image_list.tensors)
        image_sizes = torch.tensor(image_shapes, dtype=torch.int64).to(padded.device, non_blocking=True)
        return padded, image_sizes, image_shapes, targets, original_sizes

    def partial_losses(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]],
        generator: torch.Generator | None = None,
        *,
        rpn: bool = True,
        roi_heads: bool = True,
        proposer: FasterRCNN | None = None,
    ) -> dict[str, Tensor]:
        """Some of the training losses, for the 4-step alternating training (Faster R-CNN, Section
        3.2): the RPN's terms (``rpn``), the RoI head's (``roi_heads``), or both (``model(images,
        targets)``). ``proposer``: a model with the same preprocessing whose RPN proposals (computed
        without gradients, in its own train/eval mode) the RoI head trains on instead of this
        model's. This model's backbone runs once; only the chosen terms' parts get gradients."""
        if not (rpn or roi_heads):
            raise ValueError("partial_losses: choose rpn, roi_heads or both")
        if not self.training:
            raise ValueError("partial_losses needs training mode (model.train())")
        padded, image_sizes, image_shapes, targets, _ = self._prepare(images, targets)
        return self._losses(padded, image_sizes, image_shapes, targets, generator, rpn, roi_heads, proposer)

    # -- torchvision's interface -----------------------------------------------------------------

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, generator=None):
        """Training (``targets`` given, ``model.train()``): the loss dict. Inference: a list of
        ``{"boxes" [D_i, 4], "scores" [D_i], "labels" [D_i]}`` in original image coordinates.
        ``generator`` (optional ``torch.Generator``) drives the training samplers."""
        padded, image_sizes, image_shapes, targets, original_sizes = self._prepare(images, targets)
        if self.training:
            return self._losses(padded, image_sizes, image_shapes, targets, generator)
        boxes, scores, labels, num_valid = self._detect(padded, image_sizes, image_shapes)
        detections = split_detections(num_valid, boxes=boxes, scores=scores, labels=labels)
        return self.transform.postprocess(detections, image_shapes, original_sizes)

    # -- sync-free batched inference -------------------------------------------------------------

    def forward_padded(
        self, images: Tensor, image_sizes: Tensor, original_image_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections on an already resized, zero-padded batch, with fixed shapes and no host sync.

        Args:
            images (Tensor[B, 3, H, W]): pixel values in [0, 1] (normalized here); H, W ideally
                multiples of ``size_divisible``.
            image_sizes (Tensor[B, 2]): (h, w) of each image before padding.
            original_image_sizes (Tensor[B, 2], optional): rescale the boxes from ``image_sizes``
                to these sizes (torchvision's postprocessing).

        Returns:
            boxes (Tensor[B, D, 4]) fp32, scores (Tensor[B, D]), labels (Tensor[B, D]) int64 and
            num_valid (Tensor[B]) int64; slots past num_valid hold zeros.

        The RoI level scales are inferred from the padded size (``model(images)`` uses the largest
        image's size, as torchvision); both give the same powers of two unless images are smaller
        than their padding by a factor of about 1.4.
        """
        check_padded_batch(images, image_sizes)
        padded = normalize_padded(images, image_sizes, self.image_mean, self.image_std)
        boxes, scores, labels, num_valid = self._detect(padded, image_sizes, [tuple(images.shape[-2:])])
        if original_image_sizes is not None:
            boxes = rescale_padded_boxes(boxes, image_sizes, original_image_sizes)
        return boxes, scores, labels, num_valid
