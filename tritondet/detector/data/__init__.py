"""Detection data, one concern per module: COCO-format datasets and what every dataset shares (``coco.py``),
Pascal VOC (``voc.py``), the training flip and box rescaling (``transforms.py``; the model resizes images), batching
(``loader.py``), the built-in synthetic shapes set (``synthetic.py``), and :class:`InputError`, the error for bad
input (``errors.py``). Samples are described in :mod:`.coco`."""

from .coco import BAD_DATA_CHOICES, CocoDetection, DetectionDataset, read_image
from .errors import InputError
from .loader import collate_detection, make_data_loader
from .synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_VERSION,
    SyntheticConfig,
    SyntheticPaths,
    default_cache_dir,
    ensure_synthetic_dataset,
    generate_synthetic_split,
)
from .transforms import DetectionTransform, resize_boxes
from .voc import VOC_CLASSES, VOCDetection

__all__ = [
    "BAD_DATA_CHOICES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_VERSION",
    "VOC_CLASSES",
    "CocoDetection",
    "DetectionDataset",
    "DetectionTransform",
    "InputError",
    "SyntheticConfig",
    "SyntheticPaths",
    "VOCDetection",
    "collate_detection",
    "default_cache_dir",
    "ensure_synthetic_dataset",
    "generate_synthetic_split",
    "make_data_loader",
    "read_image",
    "resize_boxes",
]
