"""The one launch point: the device guard of its tensors, CUDA's grid limits, the device-table cache."""

import contextlib
import types

import pytest
import torch

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
