"""The lean Faster R-CNN on tritondet's ops (``backbone.py``, ``rpn.py``, ``targets.py``, ``roi_heads.py``,
``faster_rcnn.py``; defaults in ``config.py``; torchvision weights via ``compat.py``), its data
(``data/``), training (``engine/``), evaluation (``evaluate.py``) and pictures (``visualize.py``)."""

from .config import (
    AnchorConfig,
    BackboneConfig,
    FasterRCNNConfig,
    RoIHeadsConfig,
    RPNConfig,
    TransformConfig,
    lite,
    paper_vgg16,
    resnet50_fpn,
    resnet_c4,
    small_cpu,
    tiny,
)
from .faster_rcnn import LOSS_NAMES, FasterRCNN

__all__ = [
    "LOSS_NAMES",
    "AnchorConfig",
    "BackboneConfig",
    "FasterRCNN",
    "FasterRCNNConfig",
    "RPNConfig",
    "RoIHeadsConfig",
    "TransformConfig",
    "lite",
    "paper_vgg16",
    "resnet50_fpn",
    "resnet_c4",
    "small_cpu",
    "tiny",
]
