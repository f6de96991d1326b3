"""The sync detector and the counters the no-sync tests and benchmarks rely on can fail."""

import pytest
import torch
import torchvision

from tritondet import ops
from tritondet.bench.inputs import random_boxes
from tritondet.measure.dispatch_audit import DispatchCounter, HostSyncError, NoHostSync, measure_costs


@pytest.mark.parametrize(
    "syncing",
    [
        lambda x: x.nonzero(),
        lambda x: x[x > 0],
        lambda x: x.masked_select(x > 0),
        lambda x: x.sum().item(),
        lambda x: torch.unique(x),
        lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
        lambda x: bool(x.sum() > 0),
        lambda x: torchvision.ops.nms(random_boxes(4), torch.rand(4), 0.5),
    ],
)
def test_no_host_sync_catches_syncing_ops(syncing):
    with pytest.raises(HostSyncError), NoHostSync():
        syncing(torch.randn(8))


def test_no_host_sync_allows_fixed_size_work():
    x = torch.randn(8)
    with NoHostSync() as mode:
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        x.topk(3).values.sort()
        torch.where(x > 0, x, 0)
    assert mode.syncs == 0 and mode.aten_ops > 0


def test_counter_sees_inside_tritondet_custom_ops(backend):
    boxes = random_boxes(9)
    with DispatchCounter() as counter:
        ops.box_iou(boxes, boxes)
    assert counter.aten_ops > 1  # the ops inside tritondet::pairwise_box_iou, not just the op itself
    assert counter.syncs == 0
    assert counter.launches == (1 if backend == "triton" else 0)


def test_measure_costs_counts_kernel_ops_syncs_launches_and_interpreter_copies_apart(backend):
    boxes = random_boxes(9)
    with measure_costs() as costs:
        ops.box_iou(boxes, boxes)
    assert costs.launches == (1 if backend == "triton" else 0)
    # The interpreter copies each tensor argument to host storage and back; a GPU launch does not.
    interpreted = backend == "triton" and boxes.device.type == "cpu"
    assert (costs.interpreter_ops > 0) == interpreted
    assert costs.net_aten_ops == costs.aten_ops - costs.interpreter_ops > 0
    assert costs.device_launches == costs.launches + costs.kernel_ops
    x = torch.randn(8)
    with measure_costs() as costs:
        x.view(2, 4).t()  # views: ATen ops, no kernel
        x.nonzero()
    assert (costs.aten_ops, costs.kernel_ops, costs.syncs, costs.sync_ops) == (3, 1, 1, ["aten.nonzero.default"])
