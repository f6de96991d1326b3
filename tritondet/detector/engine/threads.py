"""Choosing torch's intra-op thread count by timing training iterations, again and again while a run trains.

On a CPU shared with other processes, more intra-op threads can be much slower than fewer: every parallel
region waits for its slowest thread, and a thread the OS has descheduled for another process holds all
the others up. Measured on the 2-core machine with a one-core busy loop beside the ``lite`` model's
training: 1 thread ~13 images/s, 2 threads ~1-2 images/s; on idle cores 2 threads are the faster. The
load changes during a run, so :class:`ThreadChooser` times every candidate on a few real training
iterations (none is wasted: they train as any other), keeps the fastest, and re-times them every
``recheck_seconds``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

# Iterations timed per candidate: the median of 3 ignores one iteration slowed by a larger image or by
# the thread pool's start after a change of thread count.
TRIAL_ITERATIONS = 3
# Seconds of training between two trials: a trial of a slow candidate costs a few of its iterations
# (~1.5 s each with 2 threads beside a busy loop), ~5 % of two minutes, while the load of a shared
# machine changes over minutes.
RECHECK_SECONDS = 120.0


def thread_candidates(available: int) -> tuple[int, ...]:
    """The thread counts worth timing with ``available`` threads (torch's default): 1 and ``available``."""
    return (1,) if available <= 1 else (1, available)


class ThreadChooser:
    """Sets the intra-op thread count to the fastest of ``candidates``, timed on the training itself.

    Call :meth:`observe` with each training iteration's duration. A trial runs ``trial_iterations``
    iterations with each candidate in turn, then keeps the one with the smallest median duration until
    ``recheck_seconds`` of ``clock`` have passed, when the next trial starts. ``set_threads`` (default
    ``torch.set_num_threads``) and ``clock`` (default ``time.monotonic``) are replaceable for tests.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        trial_iterations: int = TRIAL_ITERATIONS,
        recheck_seconds: float = RECHECK_SECONDS,
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
        self.chosen = self.candidates[-1]
        self.trials = 0  # trials finished
        self._start_trial()

    @property
    def threads(self) -> int:
        """The thread count the next iteration runs with."""
        return self._current

    def observe(self, seconds: float) -> None:
        """Record one training iteration of ``seconds`` (run with :attr:`threads`); move the trial on."""
        if self._timings is None:
            if self._clock() - self._chosen_at >= self.recheck_seconds:
                self._start_trial()
            return
        timings = self._timings.setdefault(self._current, [])
        timings.append(seconds)
        if len(timings) < self.trial_iterations:
            return
        untimed = [n for n in self._order if n not in self._timings]
        if untimed:
            self._use(untimed[0])
            return
        self.chosen = min(self.candidates, key=lambda n: statistics.median(self._timings[n]))
        self.trials += 1
        self._timings = None
        self._chosen_at = self._clock()
        self._use(self.chosen)

    def _start_trial(self) -> None:
        # The current choice first: no thread-count change when the trial starts.
        self._timings = {}
        self._order = (self.chosen, *(n for n in self.candidates if n != self.chosen))
        self._use(self.chosen)

    def _use(self, threads: int) -> None:
        self._current = threads
        self._set_threads(threads)
