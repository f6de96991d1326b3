"""the matcher and the anchor / proposal target layers under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.targets`."""

import pytest

from tritondet.bench.cases import targets
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", targets.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_targets(run_case, case):
    run_case(case)
