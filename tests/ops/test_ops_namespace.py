"""``from tritondet import ops`` can replace ``from torchvision import ops`` as a whole."""

import importlib
import inspect
import pkgutil

import pytest
import torchvision

from tritondet import ops


def test_every_torchvision_op_name_resolves():
    missing = [name for name in torchvision.ops.__all__ if not hasattr(ops, name)]
    assert not missing


@pytest.mark.parametrize("name", [name for name in ops.__all__ if name in torchvision.ops.__all__])
def test_our_ops_keep_torchvision_signatures(name):
    ours, theirs = getattr(ops, name), getattr(torchvision.ops, name)
    assert ours is not theirs, f"{name} should be tritondet's own"
    if inspect.isclass(ours):
        ours, theirs = ours.__init__, theirs.__init__
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)
    for parameter in inspect.signature(theirs).parameters.values():
        assert inspect.signature(ours).parameters[parameter.name].default == parameter.default, parameter.name


def test_unknown_names_still_raise():
    with pytest.raises(AttributeError, match="no attribute 'not_an_op'"):
        ops.not_an_op  # noqa: B018


PUBLIC_NAMES = [
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
    "mask_loss",
    "mask_targets",
    "match_boxes",
    "nms",
    "paste_masks_in_image",
    "paste_masks_padded",
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


def test_namespace_names_are_the_public_ops_of_the_family_modules():
    assert sorted(ops.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        value = getattr(ops, name)
        assert callable(value) and not inspect.ismodule(value), name  # the function nms, not the module
        family = importlib.import_module(value.__module__)
        assert family.__name__.startswith("tritondet.ops.") and getattr(family, name) is value, name


@pytest.mark.parametrize("module", [info.name for info in pkgutil.iter_modules(ops.__path__)])
def test_every_module_of_the_package_imports(module):
    assert importlib.import_module(f"tritondet.ops.{module}").__name__ == f"tritondet.ops.{module}"
