"""``rpn_proposals`` against torchvision's RPN post-processing under pytest-benchmark: the cases of :mod:`tritondet.bench.cases.rpn_proposals`."""

import pytest

from tritondet.bench.cases import rpn_proposals
from tritondet.bench.harness import bench_device, bench_sizes


@pytest.mark.parametrize("case", rpn_proposals.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_rpn_proposals(run_case, case):
    run_case(case)
