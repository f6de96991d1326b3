"""The detector's post-processing stages, counted (never timed): the cases of
:mod:`tritondet.bench.cases.post_processing`. ``pytest benchmarks/ --benchmark-only`` skips them
(they use no timer); ``tritondet bench`` prints their rows."""

import pytest

from tritondet.bench.cases import post_processing
from tritondet.bench.harness import bench_device, bench_sizes, measure


@pytest.mark.parametrize("case", post_processing.cases(bench_device(), bench_sizes()), ids=lambda case: case.id)
def test_post_processing(case):
    row = measure(case)
    if row.ours_backend != "cpu":  # the fast CPU path reads counts on the host: no device to stall
        assert row.ours_syncs == 0  # our device paths never wait for the device
    assert row.torchvision_syncs > 0  # torchvision's filters and NMS size their outputs from data
