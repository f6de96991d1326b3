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


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel`` on ``grid`` (programs along each axis) with ``args`` and ``meta``
    (constexprs and launch options: ``num_warps``, ``enable_fp_fusion``, which the interpreter ignores).

    A grid with a zero-sized axis launches nothing (Triton would reject it).
    """
    global _launches, _launch_depth
    if min(grid) <= 0:
        return
    _launches += 1
    if os.environ.get(CHECK_SPECS_VARIABLE) == "1":
        _check_declared(kernel, args, meta)
    _launch_depth += 1
    try:
        kernel[grid](*args, **meta)
    finally:
        _launch_depth -= 1


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
# input shape a detector sees in a run.
_TABLE_CACHE_SIZE = 64
_table_cache: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()


def device_table(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(rows, dtype=dtype, device=device)``, cached by content; never written to.

    The first call with a content copies it (on CUDA from pinned memory, without blocking the
    host); later calls, and CUDA-graph captures after a warm-up call, reuse the device copy. A
    copy during a capture would not be replayed correctly, so a miss while capturing raises.
    """
    key = (str(device), dtype, repr(rows))
    table = _table_cache.get(key)
    if table is not None:
        _table_cache.move_to_end(key)
        return table
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "tritondet: a kernel table (level geometry) must first be copied to the GPU, which a CUDA graph "
            "capture cannot record: run the model once with the same input shapes before capturing"
        )
    host = torch.tensor(rows, dtype=dtype)
    table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    _table_cache[key] = table
    if len(_table_cache) > _TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return table
