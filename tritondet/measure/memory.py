"""Peak memory of one call: the most bytes allocated at once above what was allocated before it.

On CUDA the caching allocator's peak statistic; on the CPU, which keeps no such statistic, the
running sum of the allocation and free events that ``torch.profiler`` records with
``profile_memory=True`` (every tensor allocation through PyTorch's CPU allocator, temporaries
inside ATen kernels included).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler's C++ backend (kineto) writes a line to stderr
    at every start and stop, which would interleave with a benchmark's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:  # frees are negative
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_allocated_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes: the peak of what ``fn()`` holds allocated on ``device`` at once (its inputs excluded,
    its outputs included while they live)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)
