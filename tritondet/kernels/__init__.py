"""Triton kernels, one module per op family: kernel(s), launcher, reference, registration, AOT specs.

Every module in :data:`FAMILIES` defines ``AOT_SPECS`` (the specializations its launchers use),
``EXACT_KERNELS`` (those of its kernels the compile gate lints for inexact PTX instructions) and
``PUBLIC_OPS`` (the names in :mod:`tritondet.ops` it serves); a family without a kernel of its own
(``targets``) declares an empty ``AOT_SPECS``.
"""

from . import (
    anchors,
    box_coder,
    box_iou,
    crop_pool,
    masks,
    matcher,
    nms,
    postprocess,
    roi_align,
    roi_pool,
    rpn_proposals,
    targets,
)

FAMILIES = {
    "box_iou": box_iou,
    "nms": nms,
    "box_coder": box_coder,
    "postprocess": postprocess,
    "anchors": anchors,
    "rpn_proposals": rpn_proposals,
    "matcher": matcher,
    "targets": targets,
    "roi_align": roi_align,
    "roi_pool": roi_pool,
    "crop_pool": crop_pool,
    "masks": masks,
}
