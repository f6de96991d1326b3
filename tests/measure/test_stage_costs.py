"""Mask R-CNN's mask branch in the stage costs (tritondet/measure/stage_costs.py) and its bench rows:
ours against torchvision's on the same weights and images, counted exactly."""

import pytest
import torch

from tests.detector.test_mask_rcnn import mask_twin
from tritondet.bench.cases import post_processing
from tritondet.bench.harness import measure
from tritondet.bench.inputs import torchvision_twin
from tritondet.detector import FasterRCNN, MaskRCNN
from tritondet.measure.stage_costs import post_processing_costs, torchvision_post_processing_costs


def _images(batch: int) -> list[torch.Tensor]:
    """``batch`` 64x96 images (the tiny transform's size: no resize, no padding)."""
    generator = torch.Generator().manual_seed(4)
    return [torch.rand((3, 64, 96), generator=generator) for _ in range(batch)]


def _summary(costs) -> str:
    return f"{costs.net_aten_ops} ATen ops, {costs.device_launches} device launches ({costs.launches} Triton), {costs.syncs} syncs"


def _counts(costs) -> tuple[int, ...]:
    return costs.aten_ops, costs.net_aten_ops, costs.launches, costs.kernel_ops, costs.syncs


def test_mask_branch_costs_ours_fixed_torchvision_per_detection(backend):
    if backend == "cpu":
        pytest.skip("fixed, sync-free costs are a GPU property: the fast CPU path's work follows the data")
    # Every image keeps its 12 best detections: the Triton interpreter pastes mask by mask.
    theirs = mask_twin(roi_heads=dict(score_thresh=0.0, detections_per_img=12)).eval()
    ours = MaskRCNN.from_torchvision(theirs).eval()
    post_processing_costs(ours, _images(1))  # the first call copies the level tables
    counts = {}
    for batch in (1, 8):
        mine, their = (
            post_processing_costs(ours, _images(batch)),
            torchvision_post_processing_costs(theirs, _images(batch)),
        )
        for side, costs in ((f"ours [{backend}]", mine.mask), ("torchvision", their.mask)):
            print(f"B={batch} mask branch, {side}: {_summary(costs)}")
        counts[batch] = _counts(mine.mask)
        # torchvision's pasting loops over the detections, reading every box on the host.
        detections = batch * ours.config.roi_heads.detections_per_img
        assert their.mask.launches == 0 and their.mask.syncs >= detections
        if backend == "triton":
            assert mine.mask.syncs == 0 and mine.mask.launches > 0
            assert (mine.mask.net_aten_ops + mine.mask.launches) * 10 <= their.mask.net_aten_ops
    assert counts[1] == counts[8]  # ours: the same ops whatever the batch


def test_detectors_without_masks_have_no_mask_stage():
    theirs = torchvision_twin().eval()
    ours = FasterRCNN.from_torchvision(theirs).eval()
    assert post_processing_costs(ours, _images(1)).mask is None
    assert torchvision_post_processing_costs(theirs, _images(1)).mask is None


def test_bench_counts_the_mask_branch_at_both_batches():
    cases = [case for case in post_processing.cases(torch.device("cpu"), "tiny") if case.op.startswith("MaskRCNN")]
    assert [(case.op.split(" (")[0], case.size) for case in cases] == [
        ("MaskRCNN[tiny] mask branch", "B=1 64x96"),
        ("MaskRCNN[tiny] mask branch", "B=8 64x96"),
    ]
    row = measure(cases[0])
    assert row.ours_ms is None and row.torchvision_syncs > row.ours_syncs
    assert row.ratio == row.torchvision_aten_ops / row.ours_aten_ops > 1
