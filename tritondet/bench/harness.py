"""The one runner: our op against torchvision's, same inputs, same process, measured into a :class:`Row`.

A case family (:mod:`tritondet.bench.cases`) defines ``cases(device, sizes) -> list[Case]``;
:func:`measure` turns one case into one row, for ``tritondet bench`` (:mod:`tritondet.bench.suite`)
and for the pytest-benchmark entry points in ``benchmarks/`` alike. For every case it

- checks that our result equals torchvision's (the comparison is only worth making then);
- counts per call, on both sides, device launches (Triton launches plus the ATen ops that launch
  a device kernel), host syncs and all ATen ops, net of the Triton interpreter's argument copies
  (:func:`tritondet.measure.dispatch_audit.measure_costs`): exact figures, not timings;
- times both sides (unless ``timed=False``): on CUDA with ``triton.testing.do_bench`` per side
  (warm-up, then the median and the 20th/80th percentiles), with the achieved GB/s against the
  device's peak DRAM bandwidth, the ratio being torchvision's median over ours; on the CPU our CPU
  path against torchvision's CPU op in paired rounds (:func:`time_paired_cpu`: after one warm-up
  call of each, every round calls ours once and torchvision's once, in alternating order, until a
  time budget is spent and at least a minimum number of rounds is done), each side's median and
  percentiles over its calls, the ratio being the median of the rounds' ratios (torchvision's
  call over ours in the same round), so that a load swing on a shared machine, which hits both
  calls of a round alike, cancels out of the ratio; on both, the peak memory of one call
  (:func:`tritondet.measure.memory.peak_allocated_bytes`).

A :class:`CountCase` (e.g. one stage of the detector, :mod:`tritondet.bench.cases.post_processing`)
is counted only and never timed, like every case measured with ``timed=False``: its row has no
times and its ratio is torchvision's ATen ops over ours.

Sizes (``TRITONDET_BENCH_SIZES``): ``tiny`` (the default: the CI smoke run, ``pytest benchmarks/``
with pytest's default ``--benchmark-disable`` runs each case once and times nothing), ``quick``
(``tritondet bench --quick``) and ``full`` (the sizes a detector really uses):
``TRITONDET_BENCH_SIZES=full pytest benchmarks/ --benchmark-only`` (one process, see
benchmarks/conftest.py) or ``tritondet bench``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import _backend
from ..measure.dispatch_audit import Costs, measure_costs
from ..measure.memory import peak_allocated_bytes

SIZES_VARIABLE = "TRITONDET_BENCH_SIZES"
SIZE_SETS = ("tiny", "quick", "full")

# CPU timing in paired rounds (time_paired_cpu). Rounds go on until both sides together have
# taken this long: a few seconds per case keeps `tritondet bench --quick` within minutes.
CPU_BUDGET_S = 3.0
# ... but at least this many rounds, however long they take: the median of 7 per-round ratios
# stays put when one or two rounds are hit by another process on a shared machine (and 7 rounds
# of the slowest full-size case, ~1 s a call, are ~15 s).
CPU_MIN_ROUNDS = 7
# ... and at most this many: past it the median ratio of a microsecond op no longer moves, and the
# budget would otherwise buy hundreds of thousands of rounds.
CPU_MAX_ROUNDS = 200
# CPU threads for both sides (TRITONDET_BENCH_THREADS, default 1): on a shared machine two OpenMP
# threads contend with other processes and a 1 ms op can take 60 ms; one thread times stably.
THREADS_VARIABLE = "TRITONDET_BENCH_THREADS"
QUANTILES = (0.5, 0.2, 0.8)


@dataclasses.dataclass
class Row:
    """One benchmark case: our op against torchvision's on the same inputs. Times in ms."""

    op: str
    size: str
    dtype: str
    device: str
    ours_backend: str  # what ran for us: "triton", "triton-interpreter", "cpu" or "reference"
    ours_ms: float | None  # None: counted, not timed
    ours_ms_q20: float | None
    ours_ms_q80: float | None
    torchvision_ms: float | None
    torchvision_ms_q20: float | None
    torchvision_ms_q80: float | None
    # Timed: torchvision's time over ours (CPU: the median of the paired rounds' ratios; CUDA: the
    # ratio of the medians); without times torchvision_aten_ops / ours_aten_ops.
    ratio: float
    ours_launches: int
    torchvision_launches: int
    ours_syncs: int
    torchvision_syncs: int
    ours_aten_ops: int
    torchvision_aten_ops: int
    min_bytes: int  # the bytes the op must read and write at least
    ours_gbps: float | None = None  # min_bytes / ours_ms (CUDA only)
    torchvision_gbps: float | None = None
    peak_gbps: float | None = None  # the device's peak DRAM bandwidth
    ours_peak_mem: int | None = None  # peak bytes allocated during one call (timed rows)
    torchvision_peak_mem: int | None = None
    device_name: str = ""
    timed_rounds: int | None = None  # CPU: the paired rounds behind the times and the ratio


def bench_sizes() -> str:
    sizes = os.environ.get(SIZES_VARIABLE, "tiny").strip().lower() or "tiny"
    if sizes not in SIZE_SETS:
        raise ValueError(f"{SIZES_VARIABLE}={sizes!r} is not one of {SIZE_SETS}")
    return sizes


def cpu_threads() -> int:
    return int(os.environ.get(THREADS_VARIABLE, "1"))


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case_id(case: Case | CountCase) -> str:
    """``op-size-dtype-device``: the pytest id and the failure line of a case."""
    return f"{case.op}-{case.size}-{str(case.dtype).removeprefix('torch.')}-{case.device.type}"


@dataclasses.dataclass
class Case:
    """One benchmark, built by a case module (:mod:`tritondet.bench.cases`): both sides called on the same inputs.

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
        return _case_id(self)


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
        return _case_id(self)


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------


def _reset_grads(leaves) -> None:
    for leaf in leaves:
        leaf.grad = None


@dataclasses.dataclass
class Counts:
    """One call's figures as a row shows them."""

    launches: int  # Triton launches plus the ATen ops that launch a device kernel
    syncs: int
    aten_ops: int  # net of the Triton interpreter's argument copies

    @classmethod
    def of(cls, costs: Costs) -> Counts:
        return cls(costs.device_launches, costs.syncs, costs.net_aten_ops)


def count(fn: Callable[[], Any], leaves: tuple[torch.Tensor, ...] = ()) -> Counts:
    """Launches, host syncs and ATen ops of one call of ``fn`` (with the ``.grad`` of ``leaves`` reset)."""
    _reset_grads(leaves)
    with measure_costs() as costs:
        fn()
    return Counts.of(costs)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    peak_mem: int | None = None


@dataclasses.dataclass
class PairedTiming:
    """Both sides' timings and their ratio (torchvision over ours: above 1 ours is faster)."""

    ours: Timing
    torchvision: Timing
    ratio: float  # CPU: the median of the rounds' ratios; CUDA: the ratio of the medians
    rounds: int | None = None  # CPU: the paired rounds timed


def _time_cuda(fn: Callable[[], Any], grad_to_none) -> Timing:
    import triton.testing

    median, q20, q80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES), grad_to_none=list(grad_to_none) or None)
    _reset_grads(grad_to_none)
    return Timing(median, q20, q80, peak_allocated_bytes(fn, torch.device("cuda", torch.cuda.current_device())))


@contextlib.contextmanager
def timing_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, both sides run with :func:`cpu_threads` torch threads while timed."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _timing(samples: list[float]) -> Timing:
    """The median and the 20th and 80th percentiles of ``samples`` (ms)."""
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0])
    cuts = statistics.quantiles(samples, n=5, method="inclusive")  # the 20th, 40th, 60th, 80th percentiles
    return Timing(statistics.median(samples), cuts[0], cuts[-1])


def _timed_ms(fn: Callable[[], Any], grad_to_none) -> float:
    _reset_grads(grad_to_none)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_paired_cpu(
    ours: Callable[[], Any],
    torchvision: Callable[[], Any],
    grad_to_none=(),
    *,
    budget_s: float = CPU_BUDGET_S,
    min_rounds: int = CPU_MIN_ROUNDS,
    max_rounds: int = CPU_MAX_ROUNDS,
) -> PairedTiming:
    """Both sides timed in paired rounds on the CPU: one warm-up call of each, then rounds of one
    call of each (ours first in even rounds, torchvision's first in odd ones, so neither side
    always runs on the other's warm caches) until ``budget_s`` has passed and at least
    ``min_rounds`` are done (at most ``max_rounds``). Each side's median and percentiles are over
    its own calls; the ratio is the median over the rounds of torchvision's time over ours, so a
    slowdown that hits both calls of a round (another process on a shared machine) cancels out.
    One more call of each after the rounds measures its peak memory (profiled, so never timed)."""
    with timing_threads(torch.device("cpu")):
        _timed_ms(ours, grad_to_none)
        _timed_ms(torchvision, grad_to_none)
        ours_ms: list[float] = []
        theirs_ms: list[float] = []
        started = time.perf_counter()
        while len(ours_ms) < max_rounds and (len(ours_ms) < min_rounds or time.perf_counter() - started < budget_s):
            if len(ours_ms) % 2 == 0:
                ours_ms.append(_timed_ms(ours, grad_to_none))
                theirs_ms.append(_timed_ms(torchvision, grad_to_none))
            else:
                theirs_ms.append(_timed_ms(torchvision, grad_to_none))
                ours_ms.append(_timed_ms(ours, grad_to_none))
        ratio = statistics.median(theirs / mine for mine, theirs in zip(ours_ms, theirs_ms, strict=True))
        ours_timing, theirs_timing = _timing(ours_ms), _timing(theirs_ms)
        _reset_grads(grad_to_none)
        ours_timing.peak_mem = peak_allocated_bytes(ours, torch.device("cpu"))
        _reset_grads(grad_to_none)
        theirs_timing.peak_mem = peak_allocated_bytes(torchvision, torch.device("cpu"))
    return PairedTiming(ours_timing, theirs_timing, ratio, len(ours_ms))


def time_pair(
    ours: Callable[[], Any], torchvision: Callable[[], Any], device: torch.device, grad_to_none=()
) -> PairedTiming:
    """Both sides timed: on CUDA each with ``do_bench``, the ratio that of the medians; on the CPU
    in paired rounds (:func:`time_paired_cpu`)."""
    if device.type != "cuda":
        return time_paired_cpu(ours, torchvision, grad_to_none)
    ours_timing, theirs_timing = _time_cuda(ours, grad_to_none), _time_cuda(torchvision, grad_to_none)
    return PairedTiming(ours_timing, theirs_timing, theirs_timing.median_ms / ours_timing.median_ms)


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
class Bound:
    """A case with its inputs built: zero-argument calls for timing and counting."""

    ours: Callable[[], Any]
    torchvision: Callable[[], Any]
    leaves: tuple[torch.Tensor, ...]  # the inputs that require grad

    def reset_grads(self) -> None:
        _reset_grads(self.leaves)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in ``value``, looking into tuples, lists and dict values."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def bind(case: Case) -> Bound:
    """Build ``case``'s inputs and close both sides over them."""
    inputs = case.inputs()
    leaves = tuple(t for t in _tensors(inputs) if t.requires_grad)
    return Bound(lambda: case.ours(*inputs), lambda: case.torchvision(*inputs), leaves)


def _check(case: Case, bound: Bound) -> None:
    """Our result against torchvision's on the same inputs (a benchmark of different work is void)."""
    bound.reset_grads()
    ours = bound.ours()
    bound.reset_grads()
    theirs = bound.torchvision()
    if case.check is not None:
        case.check(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs)


def _row(case: Case | CountCase, ours: Counts, theirs: Counts, timing: PairedTiming | None) -> Row:
    """The row of ``case``: timed if ``timing`` is given, else counted only (the ATen-op ratio)."""
    cuda = case.device.type == "cuda"
    timed = timing is not None
    ours_time = timing and timing.ours
    theirs_time = timing and timing.torchvision
    min_bytes = case.min_bytes if isinstance(case, Case) else 0  # a CountCase moves no bytes of its own
    gbps = lambda timing: min_bytes / timing.median_ms / 1e6 if timed and cuda else None
    return Row(
        op=case.op,
        size=case.size,
        dtype=str(case.dtype).removeprefix("torch."),
        device=case.device.type,
        ours_backend=_backend.backend_name(case.device),
        ours_ms=ours_time and ours_time.median_ms,
        ours_ms_q20=ours_time and ours_time.q20_ms,
        ours_ms_q80=ours_time and ours_time.q80_ms,
        torchvision_ms=theirs_time and theirs_time.median_ms,
        torchvision_ms_q20=theirs_time and theirs_time.q20_ms,
        torchvision_ms_q80=theirs_time and theirs_time.q80_ms,
        ratio=timing.ratio if timed else theirs.aten_ops / ours.aten_ops,
        ours_launches=ours.launches,
        torchvision_launches=theirs.launches,
        ours_syncs=ours.syncs,
        torchvision_syncs=theirs.syncs,
        ours_aten_ops=ours.aten_ops,
        torchvision_aten_ops=theirs.aten_ops,
        min_bytes=min_bytes,
        ours_gbps=gbps(ours_time),
        torchvision_gbps=gbps(theirs_time),
        peak_gbps=peak_bandwidth_gbps(case.device) if timed else None,
        ours_peak_mem=ours_time and ours_time.peak_mem,
        torchvision_peak_mem=theirs_time and theirs_time.peak_mem,
        device_name=torch.cuda.get_device_name(case.device) if cuda else "cpu",
        timed_rounds=timing and timing.rounds,
    )


def measure(case: Case | CountCase, *, timed: bool = True) -> Row:
    """One case, one row: our result checked against torchvision's, both sides counted, then timed
    (unless ``timed`` is false or the case is a :class:`CountCase`). Raises if the results differ."""
    if isinstance(case, CountCase):
        ours, theirs = case.costs()
        return _row(case, Counts.of(ours), Counts.of(theirs), None)
    bound = bind(case)
    _check(case, bound)
    ours, theirs = count(bound.ours, bound.leaves), count(bound.torchvision, bound.leaves)
    if not timed:
        return _row(case, ours, theirs, None)
    return _row(case, ours, theirs, time_pair(bound.ours, bound.torchvision, case.device, bound.leaves))
