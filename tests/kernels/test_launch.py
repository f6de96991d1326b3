"""The one launch point: the device guard of its tensors, CUDA's grid limits, the device-table cache."""

import contextlib
import importlib
import types

import pytest
import torch

from tritondet import ops
from tritondet.kernels import _launch


def fake_tensor(device: str) -> types.SimpleNamespace:
    """Something with a ``device``, as the guard selection reads it (no CUDA needed)."""
    return types.SimpleNamespace(device=torch.device(device))


class RecordingKernel:
    """Stands for a JIT kernel: records the grid of each launch instead of running."""

    __name__ = "_recording_kernel"

    def __init__(self) -> None:
        self.grids: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.grids.append(grid)


@pytest.fixture
def recorded_guards(monkeypatch):
    """The device indices ``torch.cuda.device`` is entered with, in order."""
    entered: list[int] = []

    @contextlib.contextmanager
    def guard(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "device", guard)
    monkeypatch.delenv(_launch.CHECK_SPECS_VARIABLE, raising=False)
    return entered


def test_guard_is_the_device_of_the_first_cuda_tensor():
    assert _launch.launch_device_index((3, fake_tensor("cpu"), fake_tensor("cuda:1"), fake_tensor("cuda:0"))) == 1
    assert _launch.launch_device_index((fake_tensor("cpu"), 2.5, None)) is None
    assert _launch.launch_device_index(()) is None


def test_launch_runs_under_the_guard_of_its_tensors(recorded_guards):
    kernel = RecordingKernel()
    _launch.launch(kernel, (3,), fake_tensor("cuda:1"), fake_tensor("cuda:0"), 7)
    assert recorded_guards == [1] and kernel.grids == [(3,)]
    _launch.launch(kernel, (2, 1), torch.zeros(2), 7)  # no CUDA tensor: no guard
    assert recorded_guards == [1] and kernel.grids == [(3,), (2, 1)]


@pytest.mark.parametrize("grid", [(2**31,), (1, 65536), (1, 1, 65536), (1, 1, 1, 1)])
def test_grid_beyond_cuda_limits_names_kernel_and_grid(recorded_guards, grid):
    kernel = RecordingKernel()
    with pytest.raises(ValueError, match=r"_recording_kernel cannot launch grid \(") as error:
        _launch.launch(kernel, grid, torch.zeros(1))
    assert str(tuple(grid)) in str(error.value)
    assert kernel.grids == []


def test_grid_at_cuda_limits_launches(recorded_guards):
    kernel = RecordingKernel()
    _launch.launch(kernel, (2**31 - 1, 65535, 65535), torch.zeros(1))
    assert kernel.grids == [(2**31 - 1, 65535, 65535)]


def test_table_key_names_the_device_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _launch.device_key(torch.device("cuda")) == ("cuda", 1)
    assert _launch.device_key("cuda:0") == ("cuda", 0)
    assert _launch.device_key("cpu") == ("cpu", None)


def test_tables_used_while_capturing_are_never_evicted(monkeypatch):
    capturing = False
    monkeypatch.setattr(_launch, "_capturing", lambda device: capturing)
    monkeypatch.setattr(_launch, "_table_cache", type(_launch._table_cache)())
    monkeypatch.setattr(_launch, "_pinned_tables", {})
    rows = [[7, 8, 9]]
    table = _launch.device_table(rows, torch.int64, "cpu")  # the warm-up call
    capturing = True
    misses = _launch.table_misses()
    assert _launch.device_table(rows, torch.int64, "cpu") is table
    with pytest.raises(RuntimeError, match="before capturing"):
        _launch.device_table([[1]], torch.int64, "cpu")
    capturing = False
    for i in range(_launch._TABLE_CACHE_SIZE + 1):
        _launch.device_table([[i]], torch.int64, "cpu")
    assert _launch.device_table(rows, torch.int64, "cpu") is table
    assert _launch.table_misses() == misses + _launch._TABLE_CACHE_SIZE + 1


# 70 images x 1000 classes, or 70,000 images, pass CUDA's 65535 programs on grid axes y and z.
PAST_AXIS_Y = 70_000


def _padded_nms_call():
    from tests.kernels.test_nms import sparse_class_inputs

    boxes, scores = sparse_class_inputs(70, 1000, seed=0, device="cpu")
    ops.batched_nms_padded(boxes, scores, 0.5, 4, score_threshold=0.5)


def _matcher_call():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).expand(PAST_AXIS_Y, 3, 4)
    gt_boxes = torch.tensor([[1.0, 1.0, 9.0, 9.0]]).expand(PAST_AXIS_Y, 1, 4)
    ops.match_boxes(anchors, gt_boxes, torch.ones(PAST_AXIS_Y, dtype=torch.int64), 0.7, 0.3, True)


def _rpn_call():
    objectness = [torch.zeros(PAST_AXIS_Y, 3, 1, 1)]
    deltas = [torch.zeros(PAST_AXIS_Y, 12, 1, 1)]
    sizes = torch.tensor([[16, 16]]).expand(PAST_AXIS_Y, 2)
    ops.rpn_proposals(objectness, deltas, sizes, ((128, 256, 512),), ((1.0,),), [16], 3, 3)


@pytest.mark.parametrize(
    "modules,call",
    [(("nms",), _padded_nms_call), (("matcher",), _matcher_call), (("rpn_proposals", "nms"), _rpn_call)],
    ids=["batched_nms_padded", "match_boxes", "rpn_proposals"],
)
def test_images_and_segments_go_on_grid_axis_x(monkeypatch, modules, call):
    """Every launch (kernels recorded, not run) fits CUDA's grid: images and segments past 65535
    share axis x with their tiles."""
    grids = []

    def record(kernel, grid, *args, **meta):
        _launch.check_grid(kernel.__name__, grid)
        grids.append(grid)

    monkeypatch.setenv("TRITONDET_BACKEND", "triton")
    for name in modules:
        monkeypatch.setattr(importlib.import_module(f"tritondet.kernels.{name}"), "launch", record)
    call()
    assert grids and max(grid[0] for grid in grids) >= PAST_AXIS_Y
