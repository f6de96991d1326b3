"""patch_torchvision(): torchvision's own ops and mask pasting run on tritondet, with unchanged results."""

import warnings

import pytest
import torch
import torchvision
from torchvision.models.detection import roi_heads, transform

from tests.detector.test_detector import tiny_images
from tests.detector.test_mask_rcnn import assert_same_masks
from tests.tolerances import assert_close
from tritondet import _backend, patch_torchvision, unpatch_torchvision
from tritondet.bench.inputs import assert_same_detections, random_boxes, torchvision_twin
from tritondet.kernels._launch import count_launches
from tritondet.measure.dispatch_audit import measure_costs


@pytest.fixture
def patched_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        patch_torchvision(devices=("CPU",))
    yield
    unpatch_torchvision()


def _ops_calls():
    generator = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(40, generator=generator), torch.rand(40, generator=generator)
    features = torch.rand(2, 3, 13, 17, generator=generator, requires_grad=True)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), random_boxes(3, generator=generator, scale=6.0)], dim=1)
    keep = torchvision.ops.nms(boxes, scores, 0.5)
    aligned = torchvision.ops.roi_align(features, rois, (3, 2), 1.0, 2, True)
    pooled = torchvision.ops.roi_pool(features, rois, (3, 2), 1.0)
    (grad,) = torch.autograd.grad((aligned.sum() + pooled.square().sum()), features)
    return keep, aligned, pooled, grad


def test_torchvision_ops_run_on_tritondet_with_equal_results(monkeypatch):
    expected = _ops_calls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_torchvision(devices=("CPU",))
    try:
        monkeypatch.setenv("TRITONDET_BACKEND", "triton")
        with count_launches() as counter:
            patched = _ops_calls()
        assert counter.launches >= 5  # nms (2), roi_align fwd + bwd, roi_pool: our kernels ran
    finally:
        unpatch_torchvision()
    for ours, theirs in zip(patched, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with count_launches() as counter:
        _ops_calls()
    assert counter.launches == 0  # unpatched: torchvision's own kernels again


def test_torchvision_detector_detections_unchanged(patched_cpu, monkeypatch):
    model = torchvision_twin(roi_heads=dict(score_thresh=0.0)).eval()
    images = tiny_images()
    unpatch_torchvision()
    with torch.no_grad():
        expected = model(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_torchvision(devices=("CPU",))
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    with torch.no_grad():
        assert_same_detections(model(images), expected)


def test_bad_devices_are_rejected():
    with pytest.raises(ValueError, match="devices"):
        patch_torchvision(devices=("TPU",))


def _torchvision_mask_rcnn():
    """torchvision's ``maskrcnn_resnet50_fpn``, random weights, on a 64-pixel short side, keeping
    every detection (score threshold 0) but only a few proposals and detections per image: the
    Triton interpreter pastes each detection's mask program by program."""
    torch.manual_seed(0)
    return torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=5,
        min_size=64,
        max_size=96,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=20,
        box_score_thresh=0.0,
        box_detections_per_img=6,
    ).eval()


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_torchvision_mask_rcnn_outputs_unchanged_and_unpatch_restores_its_paste(backend, monkeypatch):
    model = _torchvision_mask_rcnn()
    images = tiny_images()[:2]
    torchvision_paste = roi_heads.paste_masks_in_image
    assert transform.paste_masks_in_image is torchvision_paste
    with torch.no_grad():
        expected = model(images)
    assert all(len(detection["masks"]) for detection in expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        patch_torchvision(devices=("CPU",))
    try:
        assert transform.paste_masks_in_image is not torchvision_paste  # the binding postprocess calls
        monkeypatch.setenv(_backend.BACKEND_VARIABLE, backend)
        with torch.no_grad(), count_launches() as counter:
            actual = model(images)
    finally:
        unpatch_torchvision()
    assert roi_heads.paste_masks_in_image is torchvision_paste and transform.paste_masks_in_image is torchvision_paste
    assert (counter.launches > 0) == (backend == "triton")
    # Within the detector parity bounds: the patched RoIAlign feeds the mask head too.
    assert_same_detections(actual, expected)
    assert_same_masks(actual, expected)
    assert all(ours["masks"].dtype == theirs["masks"].dtype for ours, theirs in zip(actual, expected, strict=True))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_patched_paste_counts_fewer_syncs_and_launches(backend, monkeypatch):
    """One image's detections pasted by torchvision's loop (host reads of every box) and by ours
    behind its name (one call), counted on the CPU; the figures are printed, not timed."""
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(20, 1, 28, 28, generator=generator)
    boxes = random_boxes(20, scale=40.0, generator=generator)
    with measure_costs() as theirs:
        expected = transform.paste_masks_in_image(masks, boxes, (96, 120))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_torchvision(devices=("CPU",))
    try:
        monkeypatch.setenv(_backend.BACKEND_VARIABLE, backend)
        with measure_costs() as ours:
            actual = transform.paste_masks_in_image(masks, boxes, (96, 120))
    finally:
        unpatch_torchvision()
    assert_close(actual, expected, torch.float32)
    for side, costs in (("torchvision", theirs), (f"ours ({backend})", ours)):
        print(
            f"paste 20 masks, {side}: {costs.net_aten_ops} ATen ops, {costs.device_launches} launches, {costs.syncs} syncs"
        )
    # The fast CPU path reads the counts and boxes on the host once (there is no device to stall).
    assert ours.syncs < theirs.syncs and (backend in ("auto", "cpu") or ours.syncs == 0)
    assert ours.device_launches < theirs.device_launches


def test_paste_of_masks_on_other_devices_stays_torchvision():
    generator = torch.Generator().manual_seed(5)
    masks, boxes = torch.rand(3, 1, 7, 7, generator=generator), random_boxes(3, scale=10.0, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_torchvision(devices=("CUDA",))
    try:
        with measure_costs() as costs:
            transform.paste_masks_in_image(masks, boxes, (24, 30))
    finally:
        unpatch_torchvision()
    assert costs.syncs > 0  # torchvision's loop, reading every box on the host
