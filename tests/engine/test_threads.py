"""The intra-op thread chooser: it keeps the candidate whose timed iterations were fastest, re-times
them after ``recheck_seconds`` (a training run's use of it: tests/engine/test_train.py)."""

import pytest

from tritondet.detector.engine.threads import ThreadChooser, thread_candidates


class FakeMachine:
    """Iteration durations per thread count (changeable, as a machine's load), a settable clock."""

    def __init__(self, seconds_per_threads: dict[int, float]) -> None:
        self.seconds_per_threads = seconds_per_threads
        self.threads_set: list[int] = []
        self.now = 0.0

    def set_threads(self, threads: int) -> None:
        self.threads_set.append(threads)

    def clock(self) -> float:
        return self.now

    def train(self, chooser: ThreadChooser, iterations: int) -> None:
        for _ in range(iterations):
            seconds = self.seconds_per_threads[chooser.threads]
            self.now += seconds
            chooser.observe(seconds)


def make_chooser(machine: FakeMachine, **options) -> ThreadChooser:
    return ThreadChooser((1, 2), set_threads=machine.set_threads, clock=machine.clock, **options)


def test_picks_the_faster_setting():
    machine = FakeMachine({1: 0.15, 2: 1.5})  # a busy loop beside: 2 threads wait for the descheduled one
    chooser = make_chooser(machine, trial_iterations=3)
    assert chooser.threads == 2  # torch's default runs first
    machine.train(chooser, 6)
    assert chooser.trials == 1 and chooser.chosen == 1 and chooser.threads == 1
    assert machine.threads_set == [2, 1, 1]

    idle = FakeMachine({1: 0.2, 2: 0.12})
    chooser = make_chooser(idle, trial_iterations=3)
    idle.train(chooser, 6)
    assert chooser.chosen == 2 and chooser.threads == 2


def test_median_ignores_one_slow_iteration():
    machine = FakeMachine({1: 0.2, 2: 0.1})
    chooser = make_chooser(machine, trial_iterations=3)
    for seconds in (5.0, 0.1, 0.1, 0.2, 0.2, 0.2):  # the first iteration pays for the model's warm-up
        chooser.observe(seconds)
    assert chooser.chosen == 2


def test_retimes_after_recheck_seconds_when_the_load_changes():
    machine = FakeMachine({1: 0.2, 2: 0.1})
    chooser = make_chooser(machine, trial_iterations=2, recheck_seconds=10.0)
    machine.train(chooser, 4)
    assert chooser.chosen == 2
    machine.train(chooser, 10)  # 1 s of training: no new trial yet
    assert chooser.trials == 1 and chooser.threads == 2
    machine.seconds_per_threads = {1: 0.2, 2: 2.0}  # another process started
    machine.train(chooser, 200)
    assert chooser.trials >= 2 and chooser.chosen == 1
    # A trial starts with the current choice: switching happens only to time the other candidate.
    trial_starts = machine.threads_set[3:]
    assert trial_starts[:2] == [2, 1]


def test_single_candidate_and_bad_candidates():
    assert thread_candidates(1) == (1,)
    assert thread_candidates(2) == (1, 2)
    assert thread_candidates(8) == (1, 8)
    machine = FakeMachine({1: 0.1})
    chooser = ThreadChooser((1,), set_threads=machine.set_threads, clock=machine.clock, trial_iterations=2)
    machine.train(chooser, 5)
    assert chooser.chosen == 1 and set(machine.threads_set) == {1}
    with pytest.raises(ValueError, match="candidates"):
        ThreadChooser((0, 2))
    with pytest.raises(ValueError, match="candidates"):
        ThreadChooser(())
