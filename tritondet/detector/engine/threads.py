"""Choosing torch's intra-op thread count by timing training iterations, again and again while a run trains.

On a CPU shared with other processes, more intra-op threads can be much slower than fewer: every parallel
region waits for its slowest thread, and a thread the OS has descheduled for another process holds all
the others up. Measured on the 2-core machine with a one-core busy loop beside the ``lite`` model's
training: 1 thread ~28 images/s, 2 threads ~9; on idle cores 2 threads ran ~36 images/s and 1 thread ~28.
The load changes during a run, so :class:`ThreadChooser` times every candidate on real training
iterations (none is wasted: they train as any other), keeps the fastest, and re-times them every
``recheck_seconds``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

# Iterations timed per candidate and turn: the median of 3 ignores one iteration slowed by a larger image.
TRIAL_ITERATIONS = 3
# Iterations before the first trial, run with the fewest threads: the first iterations pay for decoding
# images into the cache and for building oneDNN's kernels, which a trial must not charge to one candidate.
WARMUP_ITERATIONS = 10
# A first turn whose medians differ by this factor decides the trial (a busy loop beside 2 threads makes
# them 3x slower); closer results get a second turn in the reverse order, so that a drift of the load
# or of the image sizes during the trial is charged to both candidates.
CLEAR_WIN = 1.5
# Seconds of training between two trials: a trial of a slow candidate costs a few of its iterations
# (~0.2 s each with 2 threads beside a busy loop), a few percent of two minutes, while the load of a
# shared machine changes over minutes.
RECHECK_SECONDS = 120.0


def thread_candidates(available: int) -> tuple[int, ...]:
    """The thread counts worth timing with ``available`` threads (torch's default): 1 and ``available``."""
    return (1,) if available <= 1 else (1, available)


class ThreadChooser:
    """Sets the intra-op thread count to the fastest of ``candidates``, timed on the training itself.

    Call :meth:`observe` with each training iteration's duration. The first ``warmup_iterations`` run
    with the fewest threads, untimed. A trial then runs each candidate in turn for one untimed
    iteration (the thread pool settles after a change of size) and ``trial_iterations`` timed ones;
    unless one candidate's median is ``CLEAR_WIN`` times another's, a second turn follows in the reverse
    order. The candidate with the smallest median over the trial is kept until ``recheck_seconds`` of
    ``clock`` have passed, when the next trial starts. ``set_threads`` (default ``torch.set_num_threads``)
    and ``clock`` (default ``time.monotonic``) are replaceable for tests.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        trial_iterations: int = TRIAL_ITERATIONS,
        recheck_seconds: float = RECHECK_SECONDS,
        warmup_iterations: int = WARMUP_ITERATIONS,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not candidates or min(candidates) < 1:
            raise ValueError(f"candidates must be positive thread counts, got {tuple(candidates)}")
        self.candidates = tuple(candidates)
        self.trial_iterations = trial_iterations
        self.recheck_seconds = recheck_seconds
        self._set_threads = set_threads
        self._clock = clock
        self.chosen = min(self.candidates)
        self.trials = 0  # trials finished
        self._warmup_left = warmup_iterations
        self._plan: list[tuple[int, bool]] = []  # the trial's coming iterations: (threads, timed)
        self._turns = 0
        self._timings: dict[int, list[float]] | None = None
        self._chosen_at = self._clock()
        self._current: int | None = None
        self._use(self.chosen)
        if warmup_iterations == 0:
            self._start_trial()

    @property
    def threads(self) -> int:
        """The thread count the next iteration runs with."""
        return self._current

    def observe(self, seconds: float) -> None:
        """Record one training iteration of ``seconds`` (run with :attr:`threads`); move the trial on."""
        if self._timings is None:
            if self._warmup_left > 0:
                self._warmup_left -= 1
                if self._warmup_left == 0:
                    self._start_trial()
            elif self._clock() - self._chosen_at >= self.recheck_seconds:
                self._start_trial()
            return
        threads, timed = self._plan.pop(0)
        if timed:
            self._timings.setdefault(threads, []).append(seconds)
        if not self._plan:
            medians = {n: statistics.median(t) for n, t in self._timings.items()}
            if self._turns == 1 and max(medians.values()) < CLEAR_WIN * min(medians.values()):
                self._plan_turn(self._order[::-1])
            else:
                self.chosen = min(medians, key=medians.get)
                self.trials += 1
                self._timings = None
                self._chosen_at = self._clock()
        self._use(self._plan[0][0] if self._plan else self.chosen)

    def _start_trial(self) -> None:
        if len(self.candidates) == 1:
            return
        # The current choice first: no thread-count change when the trial starts.
        self._order = (self.chosen, *(n for n in self.candidates if n != self.chosen))
        self._timings, self._turns = {}, 0
        self._plan_turn(self._order)
        self._use(self._plan[0][0])

    def _plan_turn(self, order: Sequence[int]) -> None:
        self._turns += 1
        self._plan = [step for n in order for step in [(n, False)] + [(n, True)] * self.trial_iterations]

    def _use(self, threads: int) -> None:
        if threads != self._current:
            self._current = threads
            self._set_threads(threads)
