"""tritondet: Triton GPU kernels for two-stage object detection, drop-in for torchvision.ops."""

from . import errors, ops
from .patch import patch_torchvision, unpatch_torchvision

__version__ = "0.1.0"
__all__ = ["errors", "ops", "patch_torchvision", "unpatch_torchvision"]
