"""patch_torchvision(): torchvision's own ops run on tritondet, with unchanged results."""

import warnings

import pytest
import torch
import torchvision

from tests.detector.test_detector import tiny_images
from tritondet import patch_torchvision, unpatch_torchvision
from tritondet.bench.inputs import assert_same_detections, random_boxes, torchvision_twin
from tritondet.kernels._launch import count_launches


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
