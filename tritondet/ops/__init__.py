"""The public op namespace: ``from tritondet import ops`` replaces ``from torchvision import ops``.

Every op that torchvision.ops has keeps torchvision's name, signature, defaults, dtypes and
results. The ops only validate arguments (:mod:`._checks`) and dispatch to the ``torch.library``
ops registered in :mod:`tritondet.kernels`, where each op's kernel, launcher and reference live.
One module per family:

- :mod:`.boxes`: the IoU family, ``encode_boxes``, ``decode_boxes``
- :mod:`.nms`: ``nms``, ``batched_nms``, ``batched_nms_padded``, ``soft_nms``
- :mod:`.proposals`: ``grid_anchors``, ``AnchorGenerator``, ``rpn_proposals``, ``postprocess_detections``
- :mod:`.targets`: ``match_boxes``, ``sample_balanced``, ``anchor_targets``, ``proposal_targets``
- :mod:`.pooling`: ``roi_align``, ``MultiScaleRoIAlign``, ``roi_pool``, ``crop_pool``, ``ps_roi_align``,
  ``ps_roi_pool`` and their modules

The function ``nms`` imported below replaces the submodule of the same name as the package's
attribute ``nms``; the submodule stays importable as ``tritondet.ops.nms`` through ``sys.modules``.
"""

from __future__ import annotations

import torchvision

from .boxes import (
    batched_box_iou,
    box_iou,
    complete_box_iou,
    decode_boxes,
    distance_box_iou,
    encode_boxes,
    generalized_box_iou,
)

# Importable, not yet in __all__: the temporary plain-PyTorch mask ops.
from .masks import mask_loss, mask_targets, paste_masks_in_image, paste_masks_padded  # noqa: F401
from .nms import batched_nms, batched_nms_padded, nms, soft_nms
from .pooling import (
    MultiScaleRoIAlign,
    PSRoIAlign,
    PSRoIPool,
    RoIAlign,
    RoIPool,
    crop_pool,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
    roi_pool,
)
from .proposals import AnchorGenerator, grid_anchors, postprocess_detections, rpn_proposals
from .targets import anchor_targets, match_boxes, proposal_targets, sample_balanced

__all__ = [
    "AnchorGenerator",
    "MultiScaleRoIAlign",
    "PSRoIAlign",
    "PSRoIPool",
    "RoIAlign",
    "RoIPool",
    "anchor_targets",
    "batched_box_iou",
    "batched_nms",
    "batched_nms_padded",
    "box_iou",
    "complete_box_iou",
    "crop_pool",
    "decode_boxes",
    "distance_box_iou",
    "encode_boxes",
    "generalized_box_iou",
    "grid_anchors",
    "match_boxes",
    "nms",
    "postprocess_detections",
    "proposal_targets",
    "ps_roi_align",
    "ps_roi_pool",
    "roi_align",
    "roi_pool",
    "rpn_proposals",
    "sample_balanced",
    "soft_nms",
]


def __getattr__(name: str):
    """torchvision.ops names tritondet has no kernel for (``box_area``, ``box_convert``,
    ``clip_boxes_to_image``, ``deform_conv2d``, ``FeaturePyramidNetwork``, ...) resolve to
    torchvision's own, so ``from tritondet import ops`` replaces ``from torchvision import ops``
    whole."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(torchvision.ops, name)
    except AttributeError:
        raise AttributeError(f"module 'tritondet.ops' has no attribute {name!r}") from None
