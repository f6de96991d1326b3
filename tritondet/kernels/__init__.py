"""Triton kernels, one module per op family: kernel(s), launcher, reference, registration, AOT specs.

Every module in :data:`FAMILIES` defines ``AOT_SPECS`` (the specializations its launchers use) and
``PUBLIC_OPS`` (the names in :mod:`tritondet.ops` it serves).
"""

from . import box_iou, crop_pool, roi_align, roi_pool

FAMILIES = {
    "box_iou": box_iou,
    "roi_align": roi_align,
    "roi_pool": roi_pool,
    "crop_pool": crop_pool,
}
