"""The lean Faster R-CNN on tritondet's ops (``faster_rcnn.py``, ``rpn.py``, ``roi_heads.py``,
``targets.py``, ``backbone.py``; defaults in ``config.py``; torchvision weights via ``compat.py``),
and its data, training and evaluation (``data.py``, ``train.py``, ``evaluate.py``)."""

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
