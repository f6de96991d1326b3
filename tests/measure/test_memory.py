"""Peak memory of one call on the CPU, from the profiler's allocation events."""

import torch

from tritondet.measure.memory import peak_allocated_bytes

MIB = 2**20


def _two_then_one():
    """Holds two 4 MiB tensors at once, then frees one and allocates a third: peak 8 MiB."""
    a = torch.ones(MIB)  # 4 MiB of fp32
    b = a * 2
    del a
    c = b + 1
    del b
    return c


def test_peak_is_the_most_held_at_once_not_the_total_allocated():
    peak = peak_allocated_bytes(_two_then_one, torch.device("cpu"))
    assert 8 * MIB <= peak < 9 * MIB  # not 12 MiB: the first tensor is freed before the third


def test_inputs_allocated_before_the_call_do_not_count():
    held = torch.ones(4 * MIB)
    peak = peak_allocated_bytes(lambda: held.add_(1), torch.device("cpu"))
    assert peak < MIB


def test_profiler_lines_do_not_reach_stderr(capfd):
    peak_allocated_bytes(_two_then_one, torch.device("cpu"))
    assert capfd.readouterr().err == ""
