"""``encode_boxes`` / ``decode_boxes`` against torchvision's ``BoxCoder`` under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.box_coder`."""

import pytest

from tritondet.bench.cases import box_coder
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", box_coder.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_box_coder(run_case, case):
    run_case(case)
