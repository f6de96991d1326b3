"""CUDA-graph capture safety on the Triton kernels: after one warm-up call with the same shapes,
an op copies no host data to the device and copies no kernel table (a capture records neither),
counted on the CPU by :class:`HostCopyCounter`."""

from collections import OrderedDict

import pytest
import torch

from tests.detector.test_detector import _padded_batch
from tests.kernels import test_postprocess_detections as postprocess_cases
from tests.kernels import test_rpn_proposals as rpn_cases
from tritondet import ops
from tritondet.bench.inputs import random_boxes
from tritondet.detector import FasterRCNN, tiny
from tritondet.measure.dispatch_audit import HostCopyCounter


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    # RoIAlign's batch-index check reads values back on CPU tensors only (off by default on CUDA).
    monkeypatch.setenv("TRITONDET_VALIDATE", "0")


def assert_capture_safe(call) -> None:
    call()  # the warm-up call: copies the kernel tables of these shapes
    with HostCopyCounter() as counter:
        call()
    assert counter.copies == 0, counter.copy_ops
    assert counter.table_misses == 0


def test_host_copy_counter_sees_host_data_and_tables():
    with HostCopyCounter() as counter:
        torch.tensor([1.0, 2.0])
        torch.zeros(2).new_tensor([3.0])
        torch.full((1,), 0.5)  # a fill, no host data
    assert counter.copies == 2 and counter.table_misses == 0
    rois = torch.tensor([[0.0, 0, 0, 1, 1]])
    with HostCopyCounter() as counter:  # a shape and scale no other test uses: two new tables
        ops.roi_align(torch.zeros(1, 1, 3, 37), rois, 1, spatial_scale=0.123)
    assert counter.table_misses == 2


def pooling_inputs():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 12, 14, generator=generator)
    boxes = random_boxes(5, generator=generator, scale=40.0)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0]]), boxes], 1)
    return x, rois


@pytest.mark.parametrize(
    "op",
    [
        lambda x, rois: ops.roi_align(x, rois, 3, 0.25, 2),
        lambda x, rois: ops.roi_pool(x, rois, 3, 0.25),
        lambda x, rois: ops.crop_pool(x, rois, 3, 0.25, 2),
        lambda x, rois: ops.ps_roi_align(x, rois, 2, 0.25, 2),
    ],
    ids=["roi_align", "roi_pool", "crop_pool", "ps_roi_align"],
)
def test_pooling(op):
    x, rois = pooling_inputs()
    assert_capture_safe(lambda: op(x, rois))


def test_multiscale_roi_align():
    generator = torch.Generator().manual_seed(4)
    names = ["p2", "p3"]
    features = OrderedDict(
        (name, torch.randn(2, 2, 16 // 2**i, 20 // 2**i, generator=generator)) for i, name in enumerate(names)
    )
    boxes = random_boxes(6, generator=generator, scale=50.0, batch=(2,))
    pool = ops.MultiScaleRoIAlign(names, 3, 2)
    assert_capture_safe(lambda: pool(features, boxes, [(64, 80), (60, 70)]))


def test_match_boxes_and_targets():
    generator = torch.Generator().manual_seed(5)
    anchors = random_boxes(300, generator=generator)
    gt_boxes = random_boxes(4, generator=generator, batch=(2,))
    gt_count = torch.tensor([4, 2])
    gt_labels = torch.tensor([[1, 2, 3, 1], [2, 2, 0, 0]])
    assert_capture_safe(lambda: ops.match_boxes(anchors, gt_boxes, gt_count, 0.7, 0.3, True))
    assert_capture_safe(
        lambda: ops.anchor_targets(anchors, gt_boxes, gt_count, generator=torch.Generator().manual_seed(0))
    )
    proposals = anchors[:100].expand(2, 100, 4)
    assert_capture_safe(
        lambda: ops.proposal_targets(
            proposals, gt_boxes, gt_labels, gt_count, 4, generator=torch.Generator().manual_seed(0)
        )
    )


def test_rpn_proposals():
    config = rpn_cases.FPN
    objectness, deltas = rpn_cases.head_outputs(config, (64, 96), 2, seed=1)
    sizes = torch.tensor([[64, 96], [60, 80]])
    assert_capture_safe(lambda: ops.rpn_proposals(objectness, deltas, sizes, *config, 50, 20))


def test_postprocess_detections():
    logits, deltas, proposals, sizes = postprocess_cases.head_outputs(2, 30, 4, seed=2)
    proposals = proposals.view(2, 30, 4)
    num_valid = torch.tensor([30, 21])
    assert_capture_safe(lambda: ops.postprocess_detections(logits, deltas, proposals, num_valid, sizes))


def test_forward_padded():
    torch.manual_seed(0)
    model = FasterRCNN(tiny()).eval()
    images, sizes = _padded_batch()
    with torch.no_grad():
        assert_capture_safe(lambda: model.forward_padded(images, sizes))
