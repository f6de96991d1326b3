"""The benchmark harness's CPU timing: ours and torchvision's in paired rounds, the ratio the median
of the rounds' ratios (tritondet.bench.harness.time_paired_cpu)."""

import time

import pytest

from tritondet.bench import harness


class FakeMachine:
    """A shared machine on a fake clock: every call costs its side's base time times the load of
    its round (which changes from round to round, as other processes come and go); torchvision's
    side is also hit, alone, by a long stall in some rounds. Rounds count from -1 (the warm-up)."""

    def __init__(self, ours_ms: float, theirs_ms: float, stall_ms: float, stalled_rounds: set[int]):
        self.now = 0.0
        self.calls: list[tuple[str, int]] = []
        self.ours_ms, self.theirs_ms, self.stall_ms, self.stalled_rounds = ours_ms, theirs_ms, stall_ms, stalled_rounds

    def clock(self) -> float:
        return self.now

    def _round(self, side: str) -> int:
        return sum(1 for called, _ in self.calls if called == side) - 1

    @staticmethod
    def load(round_index: int) -> float:
        return 1.0 + max(round_index, 0) % 5  # 1x to 5x

    def ours(self):
        round_index = self._round("ours") + 1
        self.calls.append(("ours", round_index))
        self.now += self.ours_ms * self.load(round_index) / 1e3

    def torchvision(self):
        round_index = self._round("torchvision") + 1
        self.calls.append(("torchvision", round_index))
        stall = self.stall_ms if round_index in self.stalled_rounds else 0.0
        self.now += (self.theirs_ms * self.load(round_index) + stall) / 1e3


def _paired(machine: FakeMachine, monkeypatch, **limits) -> harness.PairedTiming:
    monkeypatch.setattr(time, "perf_counter", machine.clock)
    monkeypatch.setattr(harness, "peak_allocated_bytes", lambda fn, device: 0)  # profiled, not timed
    return harness.time_paired_cpu(machine.ours, machine.torchvision, **limits)


def test_the_ratio_is_the_median_of_the_rounds_ratios_despite_load_and_a_noisy_side(monkeypatch):
    """Torchvision's op costs twice ours in every round; the load swings 1x-5x between rounds and
    8 of 21 rounds stall torchvision's call alone: the paired ratio is exactly 2, where the ratio
    of the two sides' medians (the unpaired estimate) is far off."""
    machine = FakeMachine(ours_ms=1.0, theirs_ms=2.0, stall_ms=50.0, stalled_rounds={1, 3, 5, 8, 10, 13, 16, 19})
    timing = _paired(machine, monkeypatch, budget_s=0.0, min_rounds=21, max_rounds=21)
    assert timing.rounds == 21
    assert timing.ratio == pytest.approx(2.0)
    assert timing.ours.median_ms == pytest.approx(3.0)  # the median load
    assert timing.ours.q20_ms <= timing.ours.median_ms <= timing.ours.q80_ms
    assert timing.torchvision.median_ms / timing.ours.median_ms > 2.5  # what pairing corrects


def test_one_warm_up_call_of_each_then_rounds_in_alternating_order(monkeypatch):
    machine = FakeMachine(ours_ms=1.0, theirs_ms=1.0, stall_ms=0.0, stalled_rounds=set())
    _paired(machine, monkeypatch, budget_s=0.0, min_rounds=4, max_rounds=4)
    assert machine.calls == [
        ("ours", 0), ("torchvision", 0),  # warm-up
        ("ours", 1), ("torchvision", 1),
        ("torchvision", 2), ("ours", 2),
        ("ours", 3), ("torchvision", 3),
        ("torchvision", 4), ("ours", 4),
    ]  # fmt: skip


def test_rounds_go_on_for_the_budget_between_the_minimum_and_the_maximum(monkeypatch):
    # Each round costs 2 ms x load (1-5x, 6 ms on average): a 0.1 s budget buys ~17 rounds.
    machine = FakeMachine(ours_ms=1.0, theirs_ms=1.0, stall_ms=0.0, stalled_rounds=set())
    assert 10 < _paired(machine, monkeypatch, budget_s=0.1, min_rounds=3, max_rounds=200).rounds < 25
    machine = FakeMachine(ours_ms=1.0, theirs_ms=1.0, stall_ms=0.0, stalled_rounds=set())
    assert _paired(machine, monkeypatch, budget_s=0.1, min_rounds=3, max_rounds=8).rounds == 8
    machine = FakeMachine(ours_ms=1.0, theirs_ms=1.0, stall_ms=0.0, stalled_rounds=set())
    assert _paired(machine, monkeypatch, budget_s=0.0, min_rounds=5, max_rounds=200).rounds == 5
