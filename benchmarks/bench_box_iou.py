"""``box_iou`` and ``generalized_box_iou`` under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.box_iou`."""

import pytest

from tritondet.bench.cases import box_iou
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", box_iou.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_box_iou(run_case, case):
    run_case(case)
