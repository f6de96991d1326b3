"""The harness every ``bench_<family>.py`` shares: our op against torchvision's, same inputs, same process.

A family file defines ``cases(device, sizes) -> list[Case]`` and one pytest test that calls
:func:`run_benchmark` per case. For every case the harness

- checks that our result equals torchvision's (the comparison is only worth making then);
- times both sides: on CUDA with ``triton.testing.do_bench`` (warm-up, then the median and the
  20th/80th percentiles), with the achieved GB/s against the device's peak DRAM bandwidth and the
  peak memory of one call; on the CPU our CPU path against torchvision's CPU op, the median of a
  few calls within a short time budget;
- counts per call, on both sides, Triton launches, the ATen ops that launch a device kernel, host
  syncs and all ATen ops (:class:`tritondet.measure.dispatch_audit.DispatchCounter`): exact figures, not
  timings;
- appends a :class:`tritondet.bench.Row` to one CSV.

A :class:`CountCase` (e.g. one stage of the detector, ``bench_post_processing.py``) is counted
only, with :func:`tritondet.measure.dispatch_audit.measure_costs`, and never timed: its row has no times and
its ratio is torchvision's ATen ops over ours.

Sizes (``TRITONDET_BENCH_SIZES``): ``tiny`` (the default: the CI smoke run, ``pytest benchmarks/``
with pytest's default ``--benchmark-disable`` runs each case once and times nothing), ``quick``
(``tritondet bench --quick``) and ``full`` (the sizes a detector really uses, named in each op's
issue): ``TRITONDET_BENCH_SIZES=full pytest benchmarks/ --benchmark-only`` (one process, see
benchmarks/conftest.py) or ``tritondet bench``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tritondet import _backend
from tritondet.bench import Row, append_csv
from tritondet.measure.dispatch_audit import Costs, DispatchCounter, launches_kernel

SIZES_VARIABLE = "TRITONDET_BENCH_SIZES"
SIZE_SETS = ("tiny", "quick", "full")
CSV_VARIABLE = "TRITONDET_BENCH_CSV"
DEFAULT_CSV = Path("bench") / "results.csv"

# CPU timing: at most this many timed calls, stopping once they have taken this long (the CPU
# figures are for orientation, and the machines are shared).
CPU_REPEATS = 5
CPU_BUDGET_S = 2.0
# CPU threads for both sides (TRITONDET_BENCH_THREADS, default 1): on a shared machine two OpenMP
# threads contend with other processes and a 1 ms op can take 60 ms; one thread times stably.
THREADS_VARIABLE = "TRITONDET_BENCH_THREADS"
QUANTILES = (0.5, 0.2, 0.8)


def bench_sizes() -> str:
    sizes = os.environ.get(SIZES_VARIABLE, "tiny").strip().lower() or "tiny"
    if sizes not in SIZE_SETS:
        raise ValueError(f"{SIZES_VARIABLE}={sizes!r} is not one of {SIZE_SETS}")
    return sizes


def cpu_threads() -> int:
    return int(os.environ.get(THREADS_VARIABLE, "1"))


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass
class Case:
    """One benchmark, built by a family file: both sides called on the same inputs.

    ``inputs()`` builds the inputs when the case runs (and they are freed after it), so that
    collecting many full-size cases costs no memory; ``ours(*inputs)`` and
    ``torchvision(*inputs)`` are the calls compared. Inputs that require grad have their
    ``.grad`` reset between timed calls (forward+backward cases).
    """

    op: str
    size: str  # a label such as "12000x100"
    dtype: torch.dtype
    device: torch.device
    inputs: Callable[[], tuple]
    ours: Callable[..., Any]
    torchvision: Callable[..., Any]
    min_bytes: int  # bytes the op must read and write at least (inputs once, outputs once)
    check: Callable[[Any, Any], None] | None = None  # raises if our result differs from torchvision's

    @property
    def id(self) -> str:
        return f"{self.op}-{self.size}-{str(self.dtype).removeprefix('torch.')}-{self.device.type}"


@dataclasses.dataclass
class CountCase:
    """A case that is counted, never timed: ``costs()`` returns (ours, torchvision)
    :class:`~tritondet.measure.dispatch_audit.Costs` of the same work on the same inputs (e.g. one stage
    of the detector, which a plain call of each side could not isolate). Its row has no times;
    its ratio is torchvision's ATen ops over ours, and ours are counted net of the Triton
    interpreter's argument copies (what a GPU would dispatch)."""

    op: str
    size: str
    dtype: torch.dtype
    device: torch.device
    costs: Callable[[], tuple[Costs, Costs]]

    @property
    def id(self) -> str:
        return f"{self.op}-{self.size}-{str(self.dtype).removeprefix('torch.')}-{self.device.type}"


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------


class KernelCounter(DispatchCounter):
    """:class:`DispatchCounter` that also counts the ATen ops launching a device kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func._schema.name.startswith("tritondet::") and launches_kernel(func):
            self.kernel_ops += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    @property
    def device_launches(self) -> int:
        return self.launches + self.kernel_ops


def _reset_grads(leaves) -> None:
    for leaf in leaves:
        leaf.grad = None


@dataclasses.dataclass
class Counts:
    launches: int
    syncs: int
    aten_ops: int


def count(fn: Callable[[], Any], leaves: tuple[torch.Tensor, ...] = ()) -> Counts:
    """Launches, host syncs and ATen ops of one call of ``fn`` (with the ``.grad`` of ``leaves`` reset)."""
    _reset_grads(leaves)
    with KernelCounter() as counter:
        fn()
    return Counts(counter.device_launches, counter.syncs, counter.aten_ops)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    peak_mem: int | None = None


def _time_cuda(fn: Callable[[], Any], grad_to_none) -> Timing:
    import triton.testing

    median, q20, q80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES), grad_to_none=list(grad_to_none) or None)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return Timing(median, q20, q80, torch.cuda.max_memory_allocated() - before)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _time_cpu(fn: Callable[[], Any], grad_to_none) -> Timing:
    """The calls :func:`measure` makes before timing (the check and the count) are the warm-up."""
    with _threads(cpu_threads()):
        return _time_cpu_samples(fn, grad_to_none)


def _time_cpu_samples(fn: Callable[[], Any], grad_to_none) -> Timing:
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < CPU_REPEATS and (not samples or time.perf_counter() - started < CPU_BUDGET_S):
        _reset_grads(grad_to_none)
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0])
    cuts = statistics.quantiles(samples, n=5, method="inclusive")  # the 20th, 40th, 60th, 80th percentiles
    return Timing(statistics.median(samples), cuts[0], cuts[-1])


def time_call(fn: Callable[[], Any], device: torch.device, grad_to_none=()) -> Timing:
    return _time_cuda(fn, grad_to_none) if device.type == "cuda" else _time_cpu(fn, grad_to_none)


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    """Peak DRAM bandwidth in GB/s: 2 transfers per memory clock (DDR) x bus width in bytes."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * (props.memory_bus_width / 8) / 1e9


# ----------------------------------------------------------------------------------------------
# One case -> one row
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Bound:
    """A case with its inputs built: zero-argument calls for timing and counting."""

    ours: Callable[[], Any]
    torchvision: Callable[[], Any]
    leaves: tuple[torch.Tensor, ...]


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in ``value``, looking into tuples, lists and dict values."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _bind(case: Case) -> _Bound:
    inputs = case.inputs()
    leaves = tuple(t for t in _tensors(inputs) if t.requires_grad)
    return _Bound(lambda: case.ours(*inputs), lambda: case.torchvision(*inputs), leaves)


def _check(case: Case, bound: _Bound) -> None:
    """Our result against torchvision's on the same inputs (a benchmark of different work is void)."""
    _reset_grads(bound.leaves)
    ours = bound.ours()
    _reset_grads(bound.leaves)
    theirs = bound.torchvision()
    if case.check is not None:
        case.check(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs)


def _count_row(case: CountCase) -> Row:
    ours, theirs = case.costs()
    return Row(
        op=case.op,
        size=case.size,
        dtype=str(case.dtype).removeprefix("torch."),
        device=case.device.type,
        ours_backend=_backend.backend_name(case.device),
        ours_ms=None,
        ours_ms_q20=None,
        ours_ms_q80=None,
        torchvision_ms=None,
        torchvision_ms_q20=None,
        torchvision_ms_q80=None,
        ratio=theirs.net_aten_ops / ours.net_aten_ops,
        ours_launches=ours.device_launches,
        torchvision_launches=theirs.device_launches,
        ours_syncs=ours.syncs,
        torchvision_syncs=theirs.syncs,
        ours_aten_ops=ours.net_aten_ops,
        torchvision_aten_ops=theirs.net_aten_ops,
        min_bytes=0,  # not a bandwidth-bound op: nothing is timed
        device_name=torch.cuda.get_device_name(case.device) if case.device.type == "cuda" else "cpu",
    )


def measure(case: Case | CountCase) -> Row:
    if isinstance(case, CountCase):
        return _count_row(case)
    bound = _bind(case)
    _check(case, bound)
    ours_counts, torchvision_counts = count(bound.ours, bound.leaves), count(bound.torchvision, bound.leaves)
    ours = time_call(bound.ours, case.device, bound.leaves)
    theirs = time_call(bound.torchvision, case.device, bound.leaves)
    peak = peak_bandwidth_gbps(case.device)
    cuda = case.device.type == "cuda"
    return Row(
        op=case.op,
        size=case.size,
        dtype=str(case.dtype).removeprefix("torch."),
        device=case.device.type,
        ours_backend=_backend.backend_name(case.device),
        ours_ms=ours.median_ms,
        ours_ms_q20=ours.q20_ms,
        ours_ms_q80=ours.q80_ms,
        torchvision_ms=theirs.median_ms,
        torchvision_ms_q20=theirs.q20_ms,
        torchvision_ms_q80=theirs.q80_ms,
        ratio=theirs.median_ms / ours.median_ms,
        ours_launches=ours_counts.launches,
        torchvision_launches=torchvision_counts.launches,
        ours_syncs=ours_counts.syncs,
        torchvision_syncs=torchvision_counts.syncs,
        ours_aten_ops=ours_counts.aten_ops,
        torchvision_aten_ops=torchvision_counts.aten_ops,
        min_bytes=case.min_bytes,
        ours_gbps=case.min_bytes / ours.median_ms / 1e6 if cuda else None,
        torchvision_gbps=case.min_bytes / theirs.median_ms / 1e6 if cuda else None,
        peak_gbps=peak,
        ours_peak_mem=ours.peak_mem,
        torchvision_peak_mem=theirs.peak_mem,
        device_name=torch.cuda.get_device_name(case.device) if cuda else "cpu",
    )


def csv_path() -> Path:
    return Path(os.environ.get(CSV_VARIABLE, DEFAULT_CSV))


# ----------------------------------------------------------------------------------------------
# pytest-benchmark glue
# ----------------------------------------------------------------------------------------------


def _synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def run_benchmark(benchmark, case: Case) -> None:
    """The body of every benchmark test.

    With ``--benchmark-disable`` (the default) a smoke test: both sides run once on the same
    inputs, their results are compared and the counters run; nothing is timed. Otherwise the full
    row is measured and appended to the CSV (``TRITONDET_BENCH_CSV``, default
    ``bench/results.csv``), and pytest-benchmark times our op too (its table, grouped per op,
    carries the row as extra info).
    """
    if benchmark.disabled:
        bound = _bind(case)
        _check(case, bound)
        count(bound.ours, bound.leaves)
        count(bound.torchvision, bound.leaves)
        benchmark(bound.ours)
        return
    row = measure(case)
    append_csv([row], csv_path())
    benchmark.group = f"{case.op} {case.device.type}"
    benchmark.extra_info.update(
        {key: value for key, value in dataclasses.asdict(row).items() if value is not None and key != "op"}
    )
    bound = _bind(case)
    threads = _threads(cpu_threads()) if case.device.type == "cpu" else contextlib.nullcontext()
    with threads:  # the same CPU threads as the row's timings
        benchmark.pedantic(
            _synchronized(bound.ours, case.device),
            setup=lambda: _reset_grads(bound.leaves),
            rounds=3,
            iterations=1,
            warmup_rounds=1,
        )
