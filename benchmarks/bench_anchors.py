"""``AnchorGenerator``: our anchors against torchvision's under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.anchors`."""

import pytest

from tritondet.bench.cases import anchors
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", anchors.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_anchors(run_case, case):
    run_case(case)
