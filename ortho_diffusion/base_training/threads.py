"""Adaptive intra-op thread count for training on a small shared CPU.

On 2 cores, a 2-thread PyTorch process runs ~1.7x faster than 1 thread when alone, but 2-4x
*slower* as soon as another process takes a core (each parallel region waits for the
descheduled thread; measured here: VAE step 0.53 s alone, 6-8 s with 2 threads next to a test
run, 2.9 s with 1 thread in the same situation). The governor re-measures both settings every
few dozen steps and keeps the faster one.
"""

from __future__ import annotations

import os
import time

import torch


class ThreadGovernor:
    """Call :meth:`step_done` after every training step; it switches ``torch`` threads.

    Cycle: ``probe_steps`` steps at 1 thread, ``probe_steps`` at ``max_threads`` (the first
    step after a switch is not timed), then ``hold_steps`` at the faster setting.
    """

    def __init__(self, max_threads: int | None = None, probe_steps: int = 4, hold_steps: int = 60,
                 enabled: bool = True):
        self.max_threads = max_threads or os.cpu_count() or 1
        self.enabled = enabled and self.max_threads > 1
        self.probe_steps, self.hold_steps = probe_steps, hold_steps
        self.plan: list[int] = []
        self.times: dict[int, list[float]] = {}
        self.chosen = self.max_threads
        self._last = time.perf_counter()
        self._current = torch.get_num_threads()
        self.history: list[tuple[int, float, float]] = []  # (chosen, t1, tmax)

    def _set(self, n: int) -> None:
        if n != self._current:
            torch.set_num_threads(n)
            self._current = n

    def start(self) -> None:
        self._last = time.perf_counter()
        if self.enabled:
            self._new_cycle()
        else:
            self._set(self.max_threads)

    def _new_cycle(self) -> None:
        self.times = {1: [], self.max_threads: []}
        self.plan = [1] * (self.probe_steps + 1) + [self.max_threads] * (self.probe_steps + 1)
        self._first = True
        self._set(self.plan[0])

    def step_done(self) -> None:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        if not self.enabled:
            return
        if self.plan:
            n = self.plan.pop(0)
            if not self._first:
                self.times[n].append(dt)
            nxt = self.plan[0] if self.plan else None
            self._first = nxt is not None and nxt != n
            if nxt is not None:
                self._set(nxt)
                return
            t1 = sorted(self.times[1])[len(self.times[1]) // 2]
            tm = sorted(self.times[self.max_threads])[len(self.times[self.max_threads]) // 2]
            self.chosen = 1 if t1 < tm else self.max_threads
            self.history.append((self.chosen, round(t1, 3), round(tm, 3)))
            self._set(self.chosen)
            self._hold = self.hold_steps
            return
        self._hold -= 1
        if self._hold <= 0:
            self._new_cycle()
