"""Every default of the detector, in one place: dataclasses with the papers' and torchvision's values.

Sources: Ren et al., "Faster R-CNN" (NeurIPS 2015), Sections 3.1-3.3 and 4; Girshick, "Fast R-CNN"
(ICCV 2015); torchvision's ``fasterrcnn_resnet50_fpn`` (whose numbers the FPN presets copy so that
torchvision's weights transfer unchanged).

Presets:

- :func:`resnet50_fpn` - torchvision's ``fasterrcnn_resnet50_fpn`` (800/1333, 5 FPN levels, anchors
  32..512 x 3 ratios, MultiScaleRoIAlign 7x7, two 1024-d FC layers, 91 COCO classes).
- :func:`paper_vgg16` - the paper's single-level network: VGG-16 conv5_3 (stride 16, 512 channels),
  9 anchors (areas 128², 256², 512² x ratios 1:2, 1:1, 2:1), RoI pooling to 7x7, fc6/fc7 of 4096,
  shorter side 600 (longer at most 1000), 21 VOC classes, 128 RoIs per image at 25 % foreground.
- :func:`resnet_c4` - the same single-level head on a ResNet's C4 (``layer3``, stride 16).
- :func:`small_cpu` - a ResNet-18 FPN at a short side of 320 for CPU training.
- :func:`tiny` - a few-channel ResNet-18 FPN on 64-pixel images, for interpreter tests.
- :func:`resnet50_fpn_masks` - torchvision's ``maskrcnn_resnet50_fpn``: :func:`resnet50_fpn` plus the mask
  branch (:class:`MaskHeadConfig`); :func:`with_masks` adds a mask branch to any preset.
- :func:`lite` - ``tritondet train``'s default CPU model: the narrow
  :class:`~tritondet.detector.backbone.LiteBackbone` (trained from scratch) with an FPN at strides
  8..64, at a short side of 192.

:data:`MODEL_PRESETS` names them for ``tritondet train --model``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FPN_LEVELS = ("0", "1", "2", "3")
# The regression clamp of torchvision's BoxCoder (and Detectron): exp(dw) at most 1000/16.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass
class TransformConfig:
    """Preprocessing (torchvision's ``GeneralizedRCNNTransform``): per-channel normalization,
    resize so the shorter side is ``min_size`` unless the longer would exceed ``max_size``, and
    batching into a zero-padded tensor whose sides are multiples of ``size_divisible``."""

    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    size_divisible: int = 32


@dataclass
class BackboneConfig:
    """A torchvision classification network, cut where detection needs it.

    ``name``: ``resnet18/34/50/101/152`` or ``vgg16``. ``fpn``: ResNet ``layer1..4`` (those in
    ``returned_layers``) + a feature pyramid with ``fpn_channels`` and an extra max-pooled level
    (torchvision's ``BackboneWithFPN``); otherwise a single map at stride 16 (ResNet ``layer3`` = C4,
    VGG-16 ``conv5_3`` before the last pooling). ``trainable_layers`` counts ResNet stages from the
    top that are trained (torchvision: 3 with pretrained weights). ``frozen_batchnorm``: batch norm
    with fixed statistics (torchvision's pretrained detectors; also what their state dicts hold).
    """

    name: str = "resnet50"
    fpn: bool = True
    returned_layers: tuple[int, ...] = (1, 2, 3, 4)
    fpn_channels: int = 256
    trainable_layers: int = 3
    frozen_batchnorm: bool = True


@dataclass
class AnchorConfig:
    """Anchors (Section 3.1.1): one tuple of sizes (square roots of the areas, pixels) and one of
    aspect ratios (height / width) per feature level."""

    sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5

    def num_anchors(self) -> int:
        counts = {len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)}
        if len(counts) != 1:
            raise ValueError(f"every level must have the same number of anchors per position, got {counts}")
        return counts.pop()


@dataclass
class RPNConfig:
    """Region Proposal Network (Section 3.1).

    ``objectness``: ``"sigmoid"`` (k logits, torchvision's head, so its weights transfer) or
    ``"softmax"`` (the paper's 2k scores: a background and a foreground logit per anchor; the
    foreground probability is ``sigmoid(fg - bg)``, so both rank proposals the same way).
    ``pre_nms_top_n``/``post_nms_top_n``: (training, testing) per level / per image.
    Training targets (the anchor target layer): IoU >= ``fg_iou_thresh`` foreground, < ``bg_iou_thresh``
    background, plus the best anchor of every ground-truth box; ``batch_size_per_image`` anchors
    sampled at ``positive_fraction`` foreground.
    ``loss``: ``"torchvision"`` - objectness BCE averaged over the sampled anchors, box loss
    smooth-L1 (``beta`` = 1/9) summed over the positives and divided by the number of sampled anchors;
    ``"paper"`` - Eqn. (1): ``1/N_cls sum L_cls + lambda/N_reg sum p* L_reg`` with ``N_cls`` the
    sampled anchors, ``N_reg`` the number of anchor locations (sum of H_l * W_l, ~2400 at 600x1000),
    ``lambda`` = ``paper_lambda`` (10) and smooth-L1 with ``beta`` = ``paper_smooth_l1_beta`` (1,
    Fast R-CNN's definition).
    """

    conv_depth: int = 1
    objectness: str = "sigmoid"
    pre_nms_top_n: tuple[int, int] = (2000, 1000)
    post_nms_top_n: tuple[int, int] = (2000, 1000)
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    loss: str = "torchvision"
    smooth_l1_beta: float = 1.0 / 9
    paper_lambda: float = 10.0
    paper_smooth_l1_beta: float = 1.0


@dataclass
class RoIHeadsConfig:
    """Fast R-CNN detection head (Section 3.2 and Fast R-CNN).

    ``box_pooling``: ``"roi_align"`` (torchvision's ``MultiScaleRoIAlign`` over ``featmap_names``,
    one or several maps), ``"roi_pool"`` (the paper's RoI max pooling,
    single map) or ``"crop_pool"`` (bilinear crops differentiable in the box coordinates, so the
    box-head loss also trains the RPN's boxes: the joint training of Section 3.2 (iii)).
    Map scales are inferred from the feature and image sizes (torchvision's rule), e.g. 1/16 for C4.
    Training targets (the proposal target layer): IoU >= ``fg_iou_thresh`` foreground, background in
    ``[bg_iou_thresh_low, bg_iou_thresh)`` (torchvision 0.0; Fast R-CNN 0.1), ``batch_size_per_image``
    RoIs at ``positive_fraction`` foreground (torchvision 512 / 0.25; the paper 128 / 0.25).
    Loss: cross-entropy averaged over the sampled RoIs plus class-specific smooth-L1
    (``smooth_l1_beta``: torchvision 1/9; Fast R-CNN's definition is beta = 1) summed over the
    foreground and divided by the number of sampled RoIs (Fast R-CNN's lambda = 1).
    Inference: scores > ``score_thresh``, boxes at least ``min_size``, per-class NMS at
    ``nms_thresh``, ``detections_per_img`` best.
    """

    num_classes: int = 91
    featmap_names: tuple[str, ...] = FPN_LEVELS
    box_pooling: str = "roi_align"
    output_size: int = 7
    sampling_ratio: int = 2
    representation_size: int = 1024
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    bg_iou_thresh_low: float = 0.0
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 1.0 / 9
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_size: float = 1e-2


@dataclass
class MaskHeadConfig:
    """Mask R-CNN's mask branch (He, Gkioxari, Dollar, Girshick 2017, Section 3; torchvision's FPN head).

    Each detection (in training: each foreground sampled RoI) is pooled to ``[channels, output_size,
    output_size]`` (``MultiScaleRoIAlign`` over ``featmap_names``), passed through 3x3 convolutions
    with ReLU (``conv_channels``, one per layer), a stride-2 2x2 transposed convolution with ReLU to
    ``2 * output_size`` and a 1x1 convolution giving one mask logit map per class. Loss: per-pixel
    binary cross-entropy on the ground-truth class's map against the ground-truth mask cropped to the
    RoI, averaged over the foreground RoIs. ``mask_threshold``: the padded interface's binarization.
    """

    featmap_names: tuple[str, ...] = FPN_LEVELS
    output_size: int = 14
    sampling_ratio: int = 2
    conv_channels: tuple[int, ...] = (256, 256, 256, 256)
    mask_threshold: float = 0.5

    @property
    def resolution(self) -> int:
        """M: the side of the predicted masks (the transposed convolution doubles the pooled grid)."""
        return 2 * self.output_size


@dataclass
class FasterRCNNConfig:
    """The detector's sections; ``mask`` set (a :class:`MaskHeadConfig`) makes it a Mask R-CNN."""

    transform: TransformConfig = field(default_factory=TransformConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    mask: MaskHeadConfig | None = None

    def replace(self, **sections) -> FasterRCNNConfig:
        """A copy with some fields changed: ``config.replace(rpn=dict(objectness="softmax"))``."""
        changes = {}
        for name, values in sections.items():
            current = getattr(self, name)
            changes[name] = values if dataclasses.is_dataclass(values) else dataclasses.replace(current, **values)
        return dataclasses.replace(self, **changes)


def resnet50_fpn(num_classes: int = 91) -> FasterRCNNConfig:
    """torchvision's ``fasterrcnn_resnet50_fpn``: every default above."""
    return FasterRCNNConfig(roi_heads=RoIHeadsConfig(num_classes=num_classes))


def resnet50_fpn_masks(num_classes: int = 91) -> FasterRCNNConfig:
    """torchvision's ``maskrcnn_resnet50_fpn``: :func:`resnet50_fpn` plus its mask branch (14x14
    RoIAlign, four 256-channel convolutions, 28x28 masks)."""
    return resnet50_fpn(num_classes).replace(mask=MaskHeadConfig())


def with_masks(config: FasterRCNNConfig) -> FasterRCNNConfig:
    """``config`` with a mask branch (``tritondet train --masks``) on its RoI head's feature maps,
    its convolutions as wide as the backbone's FPN: torchvision's head for :func:`resnet50_fpn`."""
    # backbone None is the lite preset's LiteBackbone: 64 FPN channels, a head cheap enough for a CPU.
    width = 64 if config.backbone is None else config.backbone.fpn_channels
    mask = MaskHeadConfig(featmap_names=config.roi_heads.featmap_names, conv_channels=(width,) * 4)
    return config.replace(mask=mask)


def _single_level(backbone: BackboneConfig, num_classes: int, representation_size: int) -> FasterRCNNConfig:
    return FasterRCNNConfig(
        transform=TransformConfig(min_size=600, max_size=1000),
        backbone=backbone,
        anchors=AnchorConfig(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn=RPNConfig(pre_nms_top_n=(12000, 6000), post_nms_top_n=(2000, 300)),
        roi_heads=RoIHeadsConfig(
            num_classes=num_classes,
            featmap_names=("0",),
            box_pooling="roi_pool",
            representation_size=representation_size,
            bg_iou_thresh_low=0.1,
            batch_size_per_image=128,
            score_thresh=0.05,
            nms_thresh=0.3,
        ),
    )


def paper_vgg16(num_classes: int = 21) -> FasterRCNNConfig:
    """The paper's VGG-16 model: conv5_3 at stride 16 (conv3_1 and up trained), 9 anchors, 7x7 RoI
    pooling, fc6/fc7 4096, 600/1000 images, 12000/6000 pre-NMS and 2000/300 post-NMS proposals
    (train/test), 128 RoIs per image, background IoU [0.1, 0.5), test NMS 0.3 (py-faster-rcnn's
    values)."""
    return _single_level(BackboneConfig(name="vgg16", fpn=False, trainable_layers=3), num_classes, 4096)


def resnet_c4(name: str = "resnet50", num_classes: int = 21) -> FasterRCNNConfig:
    """The single-level model on a ResNet's C4 (``layer3``, stride 16) with RoIAlign and a
    1024-d two-FC head (a lean stand-in for the ResNet paper's conv5 head)."""
    config = _single_level(BackboneConfig(name=name, fpn=False), num_classes, 1024)
    return config.replace(roi_heads=dict(box_pooling="roi_align"))


def small_cpu(num_classes: int = 6) -> FasterRCNNConfig:
    """ResNet-18 FPN at a short side of 320 (longer at most 512), for CPU training on the synthetic
    data (5 shapes + background); anchors scaled down with the images (16..256), 512/256
    proposals, 128 RoIs per image."""
    return FasterRCNNConfig(
        transform=TransformConfig(min_size=320, max_size=512),
        backbone=BackboneConfig(name="resnet18", fpn_channels=128, trainable_layers=5, frozen_batchnorm=False),
        anchors=AnchorConfig(sizes=((16,), (32,), (64,), (128,), (256,))),
        rpn=RPNConfig(pre_nms_top_n=(1000, 500), post_nms_top_n=(512, 256)),
        roi_heads=RoIHeadsConfig(num_classes=num_classes, representation_size=256, batch_size_per_image=128),
    )


def tiny(num_classes: int = 4) -> FasterRCNNConfig:
    """A test-sized ResNet-18 FPN (16 FPN channels, 3 levels + pool) on 64-pixel
    images, with small anchors and few proposals and RoIs: fast in the Triton interpreter."""
    return FasterRCNNConfig(
        transform=TransformConfig(min_size=64, max_size=96),
        backbone=BackboneConfig(name="resnet18", returned_layers=(2, 3, 4), fpn_channels=16, trainable_layers=5),
        anchors=AnchorConfig(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4),
        rpn=RPNConfig(pre_nms_top_n=(64, 32), post_nms_top_n=(32, 16), batch_size_per_image=32),
        roi_heads=RoIHeadsConfig(
            num_classes=num_classes,
            featmap_names=("0", "1", "2"),
            representation_size=32,
            batch_size_per_image=16,
        ),
    )


LITE_LEVELS = ("0", "1", "2")


def lite(num_classes: int = 7) -> FasterRCNNConfig:
    """The default CPU training model, ``tritondet train``'s (``backbone=None``: the training code builds
    :class:`~tritondet.detector.backbone.LiteBackbone`; 7 classes: the 6 synthetic shapes + background).

    Images at a short side of 192 (the synthetic objects then span ~19-96 pixels square-root area,
    up to 4:1), anchors 20, 40, 80, 160 x ratios 1:2, 1:1, 2:1 on the levels at strides 8..64, fewer
    proposals (128 per level before NMS, 128/100 after, training/testing), 128 sampled anchors and 32
    RoIs per image: the RPN's and RoI stage's costs shrink with the backbone's.
    """
    return FasterRCNNConfig(
        transform=TransformConfig(min_size=192, max_size=256),
        backbone=None,
        anchors=AnchorConfig(sizes=((20,), (40,), (80,), (160,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4),
        rpn=RPNConfig(pre_nms_top_n=(128, 128), post_nms_top_n=(128, 100), batch_size_per_image=128),
        roi_heads=RoIHeadsConfig(
            num_classes=num_classes, featmap_names=LITE_LEVELS, representation_size=256, batch_size_per_image=32
        ),
    )


# name -> config factory taking num_classes: ``tritondet train --model``'s choices.
MODEL_PRESETS = {
    "lite": lite,
    "small_cpu": small_cpu,
    "tiny": tiny,
    "resnet50_fpn": resnet50_fpn,
    "resnet_c4": lambda num_classes: resnet_c4(num_classes=num_classes),
    "paper_vgg16": paper_vgg16,
}
