"""The one place every Triton kernel is launched from, so launches can be counted exactly.

Benchmarks and the no-sync tests read :func:`count_launches`; the count is the same on every
machine because it counts calls, not time.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator

import torch

from ._aot import specialization_key

_launches = 0
# Launches under way: the Triton interpreter copies a kernel's arguments with ATen ops that a GPU
# launch does not make, so the dispatch counters leave out the ops made while this is non-zero.
_launch_depth = 0
# With TRITONDET_CHECK_SPECS=1 (the test suite sets it) a launch whose full signature (every
# argument's Triton type, constexprs, warps, stages, FMA contraction: _aot.specialization_key) no
# module declares in AOT_SPECS raises, so the ahead-of-time compile gate covers all that runs.
CHECK_SPECS_VARIABLE = "TRITONDET_CHECK_SPECS"
# CUDA's largest grid (programs per axis): gridDim.x < 2**31, gridDim.y and gridDim.z <= 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel`` on ``grid`` (programs along each axis) with ``args`` and ``meta``
    (constexprs and launch options: ``num_warps``, ``enable_fp_fusion``, which the interpreter ignores).

    The launch runs on the device of its first CUDA tensor argument (under that device's guard,
    so on its current stream), whatever device is current. A grid with a zero-sized axis launches
    nothing (Triton would reject it); one beyond :data:`GRID_LIMITS` raises ``ValueError``.
    """
    global _launches, _launch_depth
    if min(grid) <= 0:
        return
    check_grid(kernel.__name__, grid)
    _launches += 1
    if os.environ.get(CHECK_SPECS_VARIABLE) == "1":
        _check_declared(kernel, args, meta)
    index = launch_device_index(args)
    _launch_depth += 1
    try:
        with contextlib.nullcontext() if index is None else torch.cuda.device(index):
            kernel[grid](*args, **meta)
    finally:
        _launch_depth -= 1


def check_grid(name: str, grid: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming kernel ``name`` and ``grid`` when CUDA cannot launch the grid."""
    if len(grid) > len(GRID_LIMITS) or any(n > limit for n, limit in zip(grid, GRID_LIMITS, strict=False)):
        raise ValueError(
            f"tritondet: kernel {name} cannot launch grid {tuple(grid)}: CUDA allows at most {GRID_LIMITS} "
            "programs along (x, y, z)"
        )


def launch_device_index(args) -> int | None:
    """The CUDA device index of the first CUDA tensor among ``args``, None when there is none."""
    for arg in args:
        device = getattr(arg, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            return device_key(device)[1]
    return None


def launching() -> bool:
    """Whether a kernel launch is under way (ATen ops now are the interpreter's, not the op's)."""
    return _launch_depth > 0


def _check_declared(kernel, args, meta) -> None:
    from . import FAMILIES

    key = specialization_key(kernel, args, meta)
    declared = {spec.key for module in FAMILIES.values() for spec in module.AOT_SPECS}
    if key not in declared:
        raise AssertionError(f"launched specialization is not declared in any AOT_SPECS: {key}")


def launch_total() -> int:
    """Kernel launches made by this process so far."""
    return _launches


class LaunchCount:
    """The number of Triton kernel launches made inside a :func:`count_launches` block."""

    def __init__(self) -> None:
        self.start = _launches
        self.stop: int | None = None  # set when the block ends

    @property
    def launches(self) -> int:
        return (_launches if self.stop is None else self.stop) - self.start


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCount]:
    counter = LaunchCount()
    try:
        yield counter
    finally:
        counter.stop = _launches


# Small per-configuration tables (level geometry, scales: a few hundred bytes each) kept on their
# device by content, so that a repeated call makes no copy and no ATen op; 64 entries cover every
# input shape a detector sees in a run. An entry used during a CUDA-graph capture is pinned
# instead (never evicted: the graph replays with its address); a capture only reuses entries, so
# the pinned ones are those of the captured shapes, a few per graph.
_TABLE_CACHE_SIZE = 64
_table_cache: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
_pinned_tables: dict[tuple, torch.Tensor] = {}
_table_misses = 0


def device_key(device: torch.device | str) -> tuple[str, int | None]:
    """(type, index) of ``device``; a CUDA device without an index is the current one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return device.type, torch.cuda.current_device()
    return device.type, device.index


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_table(rows: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(rows, dtype=dtype, device=device)``, cached by content; never written to.

    The first call with a content copies it (on CUDA from pinned memory, without blocking the
    host); later calls, and CUDA-graph captures after a warm-up call, reuse the device copy. A
    copy during a capture would not be replayed correctly, so a miss while capturing raises.
    """
    global _table_misses
    device = torch.device(device)
    key = (device_key(device), dtype, repr(rows))
    table = _pinned_tables.get(key)
    if table is not None:
        return table
    table = _table_cache.get(key)
    if table is not None:
        _table_cache.move_to_end(key)
        if _capturing(device):
            _pinned_tables[key] = _table_cache.pop(key)
        return table
    if _capturing(device):
        raise RuntimeError(
            "tritondet: a kernel table (level geometry) must first be copied to the GPU, which a CUDA graph "
            "capture cannot record: run the model once with the same input shapes before capturing"
        )
    _table_misses += 1
    host = torch.tensor(rows, dtype=dtype)
    table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    _table_cache[key] = table
    if len(_table_cache) > _TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return table


def table_misses() -> int:
    """Tables :func:`device_table` has copied to a device so far in this process (its cache misses)."""
    return _table_misses
