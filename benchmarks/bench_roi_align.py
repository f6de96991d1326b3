"""``roi_align`` and the multi-scale pooler under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.roi_align`."""

import pytest

from tritondet.bench.cases import roi_align
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", roi_align.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_roi_align(run_case, case):
    run_case(case)
