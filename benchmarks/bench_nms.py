"""``nms``, ``batched_nms`` and ``batched_nms_padded`` under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.nms`."""

import pytest

from tritondet.bench.cases import nms
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", nms.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_nms(run_case, case):
    run_case(case)
