"""The lean Faster R-CNN on tritondet's ops (``backbone.py``, ``rpn.py``, ``targets.py``, ``roi_heads.py``,
``faster_rcnn.py``; Mask R-CNN's mask branch in ``mask_rcnn.py``; defaults in ``config.py``; torchvision weights via ``compat.py``), its data
(``data/``), training (``engine/``), evaluation (``evaluate.py``) and pictures (``visualize.py``)."""

from .config import (
    AnchorConfig,
    BackboneConfig,
    FasterRCNNConfig,
    MaskHeadConfig,
    RoIHeadsConfig,
    RPNConfig,
    TransformConfig,
    lite,
    paper_vgg16,
    resnet50_fpn,
    resnet50_fpn_masks,
    resnet_c4,
    small_cpu,
    tiny,
    with_masks,
)
from .faster_rcnn import LOSS_NAMES, FasterRCNN
from .mask_rcnn import MASK_LOSS_NAMES, MaskRCNN

__all__ = [
    "LOSS_NAMES",
    "MASK_LOSS_NAMES",
    "AnchorConfig",
    "BackboneConfig",
    "FasterRCNN",
    "FasterRCNNConfig",
    "MaskHeadConfig",
    "MaskRCNN",
    "RPNConfig",
    "RoIHeadsConfig",
    "TransformConfig",
    "lite",
    "paper_vgg16",
    "resnet50_fpn",
    "resnet50_fpn_masks",
    "resnet_c4",
    "small_cpu",
    "tiny",
    "with_masks",
]
