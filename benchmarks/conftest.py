"""pytest-benchmark entry points: ``run_case(case)`` measures one case with :func:`tritondet.bench.harness.measure`.

pyproject's addopts run the suite with ``-n auto --benchmark-disable`` (the CI smoke run: each
benchmark once, tiny sizes, nothing timed). Asking for ``--benchmark-only`` turns benchmarking back
on and runs in one process: pytest-benchmark switches itself off under xdist, and timings taken
beside other workers would be worth little anyway. Full sizes: ``TRITONDET_BENCH_SIZES=full``.
"""

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from tritondet.bench.harness import Case, bind, measure, timing_threads
from tritondet.bench.report import append_csv

# Timed rows are appended to this CSV (the same schema as ``tritondet bench``'s results.csv).
CSV_VARIABLE = "TRITONDET_BENCH_CSV"
DEFAULT_CSV = Path("bench") / "results.csv"


def pytest_configure(config):
    # Runs before xdist's and pytest-benchmark's own pytest_configure (both trylast).
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True
        config.option.numprocesses = None
        config.option.dist = "no"


def _synchronized(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


@pytest.fixture
def run_case(benchmark):
    """The body of every benchmark test: ``run_case(case)``.

    With ``--benchmark-disable`` (the default) a smoke test: both sides run on the same inputs,
    their results are compared and counted; nothing is timed. Otherwise the full row is measured
    and appended to the CSV (``TRITONDET_BENCH_CSV``, default ``bench/results.csv``), and
    pytest-benchmark times our op too (its table, grouped per op, carries the row as extra info).
    """

    def run(case: Case) -> None:
        if benchmark.disabled:
            benchmark(measure, case, timed=False)  # a disabled benchmark calls it once
            return
        row = measure(case)
        append_csv([row], Path(os.environ.get(CSV_VARIABLE, DEFAULT_CSV)))
        benchmark.group = f"{case.op} {case.device.type}"
        benchmark.extra_info.update(
            {key: value for key, value in dataclasses.asdict(row).items() if value is not None and key != "op"}
        )
        bound = bind(case)
        with timing_threads(case.device):  # the same CPU threads as the row's timings
            benchmark.pedantic(
                _synchronized(bound.ours, case.device),
                setup=bound.reset_grads,
                rounds=3,
                iterations=1,
                warmup_rounds=1,
            )

    return run
