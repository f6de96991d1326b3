"""The intra-op thread chooser: after a warm-up it keeps the candidate whose timed iterations were fastest,
re-times them after ``recheck_seconds`` (a training run's use of it: tests/engine/test_train.py)."""

import pytest

from tritondet.detector.engine.threads import CLEAR_WIN, ThreadChooser, thread_candidates


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
    options = {"trial_iterations": 3, "warmup_iterations": 0, **options}
    return ThreadChooser((1, 2), set_threads=machine.set_threads, clock=machine.clock, **options)


def turn(trial_iterations: int, order: tuple[int, ...]) -> int:
    """Iterations one turn of a trial runs: one untimed and the timed ones per candidate."""
    return (1 + trial_iterations) * len(order)


def test_a_clear_winner_is_kept_after_one_turn():
    machine = FakeMachine({1: 0.15, 2: 1.5})  # a busy loop beside: 2 threads wait for the descheduled one
    chooser = make_chooser(machine)
    assert chooser.threads == 1  # the fewest threads first
    machine.train(chooser, turn(3, (1, 2)))
    assert chooser.trials == 1 and chooser.chosen == 1 and chooser.threads == 1
    assert machine.threads_set == [1, 2, 1]

    idle = FakeMachine({1: 0.2, 2: 0.12})
    chooser = make_chooser(idle)
    idle.train(chooser, turn(3, (1, 2)))
    assert chooser.trials == 1 and chooser.chosen == 2 and chooser.threads == 2


def test_a_close_race_gets_a_second_turn_in_reverse_order():
    machine = FakeMachine({1: 0.12, 2: 0.1})
    assert CLEAR_WIN * 0.1 > 0.12  # not a clear win
    chooser = make_chooser(machine)
    machine.train(chooser, turn(3, (1, 2)))
    assert chooser.trials == 0 and chooser.threads == 2  # the second turn starts with the last candidate
    machine.train(chooser, turn(3, (1, 2)))
    assert chooser.trials == 1 and chooser.chosen == 2
    assert machine.threads_set == [1, 2, 1, 2]


def test_warmup_and_the_untimed_first_iteration_after_a_change_are_not_charged():
    machine = FakeMachine({1: 0.2, 2: 0.1})
    chooser = make_chooser(machine, warmup_iterations=2)
    # Warm-up (5 s: building the model's kernels, decoding images), then each candidate's first
    # iteration after a change of thread count is slow and untimed.
    for seconds in (5.0, 5.0, 0.3, 0.2, 0.2, 0.2, 2.0, 0.1, 0.1, 0.1):
        chooser.observe(seconds)
    assert chooser.trials == 1 and chooser.chosen == 2


def test_median_ignores_one_slow_iteration():
    chooser = make_chooser(FakeMachine({}))
    for seconds in (0.2, 0.2, 0.2, 0.2, 0.1, 5.0, 0.1, 0.1):  # one of 2 threads' iterations had a big image
        chooser.observe(seconds)
    assert chooser.chosen == 2


def test_retimes_after_recheck_seconds_when_the_load_changes():
    machine = FakeMachine({1: 0.2, 2: 0.1})
    chooser = make_chooser(machine, trial_iterations=2, recheck_seconds=10.0)
    machine.train(chooser, turn(2, (1, 2)))
    assert chooser.chosen == 2
    machine.train(chooser, 10)  # 1 s of training: no new trial yet
    assert chooser.trials == 1 and chooser.threads == 2
    machine.seconds_per_threads = {1: 0.2, 2: 2.0}  # another process started
    machine.train(chooser, 200)
    assert chooser.trials >= 2 and chooser.chosen == 1
    # Trial 1 starts with 1 thread and switches to time 2, which it keeps; trial 2 starts with the
    # current choice, 2 (no change), and switches only to time 1, which it keeps.
    assert machine.threads_set[:3] == [1, 2, 1]


def test_single_candidate_and_bad_candidates():
    assert thread_candidates(1) == (1,)
    assert thread_candidates(2) == (1, 2)
    assert thread_candidates(8) == (1, 8)
    machine = FakeMachine({1: 0.1})
    chooser = ThreadChooser((1,), set_threads=machine.set_threads, clock=machine.clock, trial_iterations=2)
    machine.train(chooser, 30)
    assert chooser.chosen == 1 and machine.threads_set == [1]
    with pytest.raises(ValueError, match="candidates"):
        ThreadChooser((0, 2))
    with pytest.raises(ValueError, match="candidates"):
        ThreadChooser(())
