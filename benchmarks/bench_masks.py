"""The mask ops under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.masks`."""

import pytest

from tritondet.bench.cases import masks
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", masks.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_masks(run_case, case):
    run_case(case)
