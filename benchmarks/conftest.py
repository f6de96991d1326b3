"""``pytest benchmarks/ --benchmark-only`` measures, as a user expects.

pyproject's addopts run the suite with ``-n auto --benchmark-disable`` (the CI smoke run: each
benchmark once, tiny sizes). Asking for ``--benchmark-only`` turns benchmarking back on and runs in
one process: pytest-benchmark switches itself off under xdist, and timings taken beside other
workers would be worth little anyway. Full sizes: ``TRITONDET_BENCH_SIZES=full``.
"""


def pytest_configure(config):
    # Runs before xdist's and pytest-benchmark's own pytest_configure (both trylast).
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True
        config.option.numprocesses = None
        config.option.dist = "no"
