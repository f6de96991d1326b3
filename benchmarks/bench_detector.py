"""our Faster R-CNN against torchvision's (inference and one training step) under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.detector`."""

import pytest

from tritondet.bench.cases import detector
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", detector.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_detector(run_case, case):
    run_case(case)
