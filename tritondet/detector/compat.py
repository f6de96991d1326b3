"""torchvision compatibility: take a torchvision Faster R-CNN (or its state dict) and run it on
tritondet's ops.

- :func:`from_torchvision` reads a ``torchvision.models.detection.FasterRCNN``'s configuration
  (preprocessing, anchors, RPN and RoI-head settings), copies its backbone (and any non-standard box
  head, e.g. ``fasterrcnn_resnet50_fpn_v2``'s conv-FC head) and loads its RPN head, two-FC head and
  predictor weights; a ``MaskRCNN`` becomes a :class:`~.mask_rcnn.MaskRCNN` (mask head and predictor
  loaded, or copied when normalized). The detections (and masks) are torchvision's (see the parity tests).
- :func:`to_torchvision`: the reverse, torchvision's ``FasterRCNN`` configured as a
  :class:`~tritondet.detector.config.FasterRCNNConfig` around a given backbone (benchmarks train
  both side by side from the same weights: ``theirs.load_state_dict(ours.state_dict())``).
- :func:`load_torchvision_state_dict` loads a ``fasterrcnn_resnet50_fpn`` (or ``maskrcnn_resnet50_fpn``)
  state dict (e.g. the COCO weights users already have) into
  :func:`~tritondet.detector.config.resnet50_fpn` (:func:`~tritondet.detector.config.resnet50_fpn_masks`):
  the keys are the same; old RPN-head keys (``rpn.head.conv.weight``) are renamed as torchvision does.
"""

from __future__ import annotations

import copy

import torchvision
from torch import nn
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead as TorchvisionRPNHead

from .config import (
    AnchorConfig,
    FasterRCNNConfig,
    MaskHeadConfig,
    RoIHeadsConfig,
    RPNConfig,
    TransformConfig,
    resnet50_fpn,
    resnet50_fpn_masks,
)
from .faster_rcnn import FasterRCNN
from .mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from .roi_heads import FastRCNNPredictor, TwoMLPHead


def _single(value, name: str):
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(set(values)) != 1:
        raise ValueError(f"{name} = {value!r}: only one value is supported")
    return values[0]


def config_from_torchvision(model: nn.Module) -> FasterRCNNConfig:
    """The :class:`FasterRCNNConfig` of a torchvision ``FasterRCNN`` (``backbone`` left None: the
    module is copied, not described)."""
    transform, rpn, heads = model.transform, model.rpn, model.roi_heads
    if getattr(transform, "fixed_size", None) is not None:
        raise ValueError("torchvision transforms with fixed_size are not supported")
    pool = heads.box_roi_pool
    pools = (pool, heads.mask_roi_pool) if heads.has_mask() else (pool,)
    for roi_pool in pools:
        if (getattr(roi_pool, "canonical_scale", 224), getattr(roi_pool, "canonical_level", 4)) != (224, 4):
            raise ValueError("only MultiScaleRoIAlign with canonical_scale 224 and canonical_level 4 is supported")
    predictor = heads.box_predictor
    mask = None
    if heads.has_mask():
        mask_pool = heads.mask_roi_pool
        mask = MaskHeadConfig(
            featmap_names=tuple(mask_pool.featmap_names),
            output_size=int(_single(mask_pool.output_size, "mask_roi_pool.output_size")),
            sampling_ratio=int(mask_pool.sampling_ratio),
            conv_channels=tuple(m.out_channels for m in heads.mask_head.modules() if isinstance(m, nn.Conv2d)),
        )
    return FasterRCNNConfig(
        transform=TransformConfig(
            min_size=int(_single(transform.min_size, "transform.min_size")),
            max_size=int(transform.max_size),
            image_mean=tuple(float(v) for v in transform.image_mean),
            image_std=tuple(float(v) for v in transform.image_std),
            size_divisible=int(transform.size_divisible),
        ),
        backbone=None,
        anchors=AnchorConfig(
            sizes=tuple(tuple(s) for s in rpn.anchor_generator.sizes),
            aspect_ratios=tuple(tuple(r) for r in rpn.anchor_generator.aspect_ratios),
        ),
        rpn=RPNConfig(
            conv_depth=len(rpn.head.conv),
            pre_nms_top_n=(rpn._pre_nms_top_n["training"], rpn._pre_nms_top_n["testing"]),
            post_nms_top_n=(rpn._post_nms_top_n["training"], rpn._post_nms_top_n["testing"]),
            nms_thresh=float(rpn.nms_thresh),
            min_size=float(rpn.min_size),
            score_thresh=float(rpn.score_thresh),
            fg_iou_thresh=float(rpn.proposal_matcher.high_threshold),
            bg_iou_thresh=float(rpn.proposal_matcher.low_threshold),
            batch_size_per_image=int(rpn.fg_bg_sampler.batch_size_per_image),
            positive_fraction=float(rpn.fg_bg_sampler.positive_fraction),
        ),
        roi_heads=RoIHeadsConfig(
            num_classes=predictor.cls_score.out_features,
            featmap_names=tuple(pool.featmap_names),
            output_size=int(_single(pool.output_size, "box_roi_pool.output_size")),
            sampling_ratio=int(pool.sampling_ratio),
            representation_size=predictor.cls_score.in_features,
            fg_iou_thresh=float(heads.proposal_matcher.high_threshold),
            bg_iou_thresh=float(heads.proposal_matcher.low_threshold),
            batch_size_per_image=int(heads.fg_bg_sampler.batch_size_per_image),
            positive_fraction=float(heads.fg_bg_sampler.positive_fraction),
            bbox_reg_weights=tuple(float(w) for w in heads.box_coder.weights),
            score_thresh=float(heads.score_thresh),
            nms_thresh=float(heads.nms_thresh),
            detections_per_img=int(heads.detections_per_img),
        ),
        mask=mask,
    )


def from_torchvision(model: nn.Module) -> FasterRCNN:
    """A :class:`FasterRCNN` (a :class:`~.mask_rcnn.MaskRCNN` for a torchvision ``MaskRCNN``)
    computing what the torchvision ``model`` computes, on tritondet's ops. The backbone (and a
    non-``TwoMLPHead`` box head, a mask head with normalization) is deep-copied; the other weights
    are loaded. The result is in ``model``'s training mode, on its device."""
    if not isinstance(model, tv_faster_rcnn.FasterRCNN):
        raise TypeError(f"expected a torchvision FasterRCNN, got {type(model).__name__}")
    if model.roi_heads.has_keypoint():
        raise ValueError("Keypoint heads are not supported")
    config = config_from_torchvision(model)
    tv_head = model.roi_heads.box_head
    box_head = None if isinstance(tv_head, tv_faster_rcnn.TwoMLPHead) else copy.deepcopy(tv_head)
    if box_head is None:
        box_head = TwoMLPHead(tv_head.fc6.in_features, tv_head.fc6.out_features)
        box_head.load_state_dict(tv_head.state_dict())
    predictor = FastRCNNPredictor(config.roi_heads.representation_size, config.roi_heads.num_classes)
    predictor.load_state_dict(model.roi_heads.box_predictor.state_dict())
    parts = dict(backbone=copy.deepcopy(model.backbone), box_head=box_head, box_predictor=predictor)
    if config.mask is None:
        ours = FasterRCNN(config, **parts)
    else:
        ours = MaskRCNN(config, **parts, **_mask_parts(model.roi_heads, config))
    ours.rpn.head.load_state_dict(model.rpn.head.state_dict())
    device = next(model.parameters()).device
    return ours.to(device).train(model.training)


def _mask_parts(heads: nn.Module, config: FasterRCNNConfig) -> dict[str, nn.Module]:
    """Our mask head and predictor with torchvision's ``heads``' weights: loaded into
    :class:`~.mask_rcnn.MaskRCNNHeads` / :class:`~.mask_rcnn.MaskRCNNPredictor` when they have that
    layout, else deep copies."""
    in_channels = next(m for m in heads.mask_head.modules() if isinstance(m, nn.Conv2d)).in_channels
    mask_head = MaskRCNNHeads(in_channels, config.mask.conv_channels)
    try:
        mask_head.load_state_dict(heads.mask_head.state_dict())
    except (RuntimeError, KeyError):  # normalized convolutions (maskrcnn_resnet50_fpn_v2): used as they are
        mask_head = copy.deepcopy(heads.mask_head)
    tv_predictor = heads.mask_predictor
    conv5 = tv_predictor.conv5_mask
    mask_predictor = MaskRCNNPredictor(conv5.in_channels, conv5.out_channels, config.roi_heads.num_classes)
    mask_predictor.load_state_dict(tv_predictor.state_dict())
    return {"mask_head": mask_head, "mask_predictor": mask_predictor}


def to_torchvision(config: FasterRCNNConfig, backbone: nn.Module) -> tv_faster_rcnn.FasterRCNN:
    """torchvision's ``FasterRCNN`` (``MaskRCNN`` when ``config.mask`` is set) around ``backbone`` (used as is, not copied) configured as ``config``,
    with torchvision's default initialization; our :class:`FasterRCNN` with the same config and backbone
    has the same state-dict keys. Settings torchvision cannot express raise ``ValueError``: the paper's
    RPN loss or softmax objectness, RoI pooling other than ``roi_align``, a low background IoU bound,
    smooth-L1 betas other than torchvision's fixed 1/9, minimum box sizes other than its fixed ones."""
    rpn, heads, transform = config.rpn, config.roi_heads, config.transform
    unsupported = {
        "rpn.loss": rpn.loss != "torchvision",
        "rpn.objectness": rpn.objectness != "sigmoid",
        "rpn.smooth_l1_beta": rpn.smooth_l1_beta != 1.0 / 9,
        "roi_heads.box_pooling": heads.box_pooling != "roi_align",
        "roi_heads.bg_iou_thresh_low": heads.bg_iou_thresh_low != 0.0,
        "roi_heads.smooth_l1_beta": heads.smooth_l1_beta != 1.0 / 9,
        "rpn.min_size": rpn.min_size != 1e-3,  # torchvision's fixed box-size floors
        "roi_heads.min_size": heads.min_size != 1e-2,
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{name}: torchvision's FasterRCNN has no such setting")
    num_anchors = config.anchors.num_anchors()
    mask_branch = {}
    if config.mask is not None:
        mask = config.mask
        mask_branch = dict(
            mask_roi_pool=torchvision.ops.MultiScaleRoIAlign(
                list(mask.featmap_names), mask.output_size, mask.sampling_ratio
            ),
            mask_head=tv_mask_rcnn.MaskRCNNHeads(backbone.out_channels, list(mask.conv_channels), 1),
            mask_predictor=tv_mask_rcnn.MaskRCNNPredictor(
                mask.conv_channels[-1], mask.conv_channels[-1], heads.num_classes
            ),
        )
    detector = tv_faster_rcnn.FasterRCNN if config.mask is None else tv_mask_rcnn.MaskRCNN
    return detector(
        backbone,
        min_size=transform.min_size,
        max_size=transform.max_size,
        image_mean=list(transform.image_mean),
        image_std=list(transform.image_std),
        size_divisible=transform.size_divisible,
        rpn_anchor_generator=AnchorGenerator(config.anchors.sizes, config.anchors.aspect_ratios),
        rpn_head=TorchvisionRPNHead(backbone.out_channels, num_anchors, conv_depth=rpn.conv_depth),
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n[0],
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n[1],
        rpn_post_nms_top_n_train=rpn.post_nms_top_n[0],
        rpn_post_nms_top_n_test=rpn.post_nms_top_n[1],
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.fg_iou_thresh,
        rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        box_roi_pool=torchvision.ops.MultiScaleRoIAlign(
            list(heads.featmap_names), heads.output_size, heads.sampling_ratio
        ),
        box_head=tv_faster_rcnn.TwoMLPHead(backbone.out_channels * heads.output_size**2, heads.representation_size),
        box_predictor=tv_faster_rcnn.FastRCNNPredictor(heads.representation_size, heads.num_classes),
        box_score_thresh=heads.score_thresh,
        box_nms_thresh=heads.nms_thresh,
        box_detections_per_img=heads.detections_per_img,
        box_fg_iou_thresh=heads.fg_iou_thresh,
        box_bg_iou_thresh=heads.bg_iou_thresh,
        box_batch_size_per_image=heads.batch_size_per_image,
        box_positive_fraction=heads.positive_fraction,
        bbox_reg_weights=heads.bbox_reg_weights,
        **mask_branch,
    )


def load_torchvision_state_dict(model: FasterRCNN, state_dict: dict) -> FasterRCNN:
    """Load a torchvision ``fasterrcnn_resnet50_fpn`` state dict into ``model`` (strict)."""
    state_dict = dict(state_dict)
    for kind in ("weight", "bias"):  # torchvision's RPNHead version-1 keys
        old = f"rpn.head.conv.{kind}"
        if old in state_dict:
            state_dict[f"rpn.head.conv.0.0.{kind}"] = state_dict.pop(old)
    model.load_state_dict(state_dict)
    return model


def fasterrcnn_resnet50_fpn(state_dict: dict | None = None, num_classes: int | None = None) -> FasterRCNN:
    """torchvision's ``fasterrcnn_resnet50_fpn`` architecture on tritondet's ops; with
    ``state_dict`` (torchvision's, e.g. its COCO weights loaded with ``torch.load``) its weights.
    ``num_classes`` defaults to the state dict's (91 without one)."""
    if num_classes is None:
        num_classes = state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0] if state_dict else 91
    model = FasterRCNN(resnet50_fpn(num_classes))
    if state_dict is not None:
        load_torchvision_state_dict(model, state_dict)
    return model


def maskrcnn_resnet50_fpn(state_dict: dict | None = None, num_classes: int | None = None) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` architecture on tritondet's ops; with ``state_dict``
    (torchvision's) its weights. ``num_classes`` defaults to the state dict's (91 without one)."""
    if num_classes is None:
        num_classes = state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0] if state_dict else 91
    model = MaskRCNN(resnet50_fpn_masks(num_classes))
    if state_dict is not None:
        load_torchvision_state_dict(model, state_dict)
    return model
