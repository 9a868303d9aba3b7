"""Yielding: the fast guard between ~1 ms chunks and the slow controller (DESIGN section 5).

Both take an injectable clock and wait function, so the tests drive them without real
time.

Examples
--------
>>> t = [0.0]
>>> busy = iter([True, True, False])
>>> g = FastGuard(lambda: next(busy), clock=lambda: t[0], wait=lambda s: t.__setitem__(0, t[0] + s) or False)
>>> g.check()  # paused 0.5 ms, then 1 ms (back-off doubles), then resumed
0.0015
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["FastGuard", "Knobs", "SlowController"]


class FastGuard:
    """Called at every chunk boundary: while ``busy()`` is true, wait, doubling the wait
    from ``min_backoff`` up to ``max_backoff`` (exponential back-off: a trainer that keeps
    finding inference busy polls ever less often, so it costs inference nothing).

    Parameters
    ----------
    busy : callable () -> bool
        The load signal (e.g. :meth:`ServingLoad.busy`).
    min_backoff, max_backoff : float
        Seconds.
    clock : callable
        Monotonic seconds.
    wait : callable (seconds) -> bool
        Sleeps; returns True when it was woken to stop (default: waits on an Event that
        :meth:`wake` sets).
    enabled : bool
        False: never pause (the misbehaving setting used to show the damage).
    """

    def __init__(self, busy, *, min_backoff: float = 0.5e-3, max_backoff: float = 20e-3, clock=time.perf_counter,
                 wait=None, enabled: bool = True):
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(f"need 0 < min_backoff <= max_backoff; got {min_backoff!r}, {max_backoff!r}.")
        self.busy = busy
        self.min_backoff, self.max_backoff = float(min_backoff), float(max_backoff)
        self.clock = clock
        self._stop = threading.Event()
        self.wait = wait if wait is not None else self._stop.wait
        self.enabled = enabled
        self.paused_time = 0.0
        self.pauses = 0

    def wake(self):
        """Make a waiting :meth:`check` return now (used by stop())."""
        self._stop.set()

    def reset(self):
        self._stop.clear()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def check(self) -> float:
        """Pause while inference is busy; returns the seconds spent paused."""
        if not self.enabled or self._stop.is_set() or not self.busy():
            return 0.0
        t0 = self.clock()
        self.pauses += 1
        b = self.min_backoff
        while True:
            if self.wait(b) or self._stop.is_set():
                break
            if not self.busy():
                break
            b = min(2 * b, self.max_backoff)
        dt = self.clock() - t0
        self.paused_time += dt
        return dt


@dataclass
class Knobs:
    """What the slow controller sets: trainer threads, seconds of work per chunk (the
    trainer converts it to rows from the measured cost per row), steps per second
    (``None``: unlimited)."""

    n_threads: int
    chunk_s: float
    max_rate: float | None


class SlowController:
    """Every ``period`` seconds, compare the recent P99 with the user's ``target_p99``
    and move the knobs with hysteresis:

    - slack = (target - p99) / target below ``low`` (default 0.1): back off at once
      (halve the step rate, halve the chunk time, drop a thread);
    - slack above ``high`` (default 0.3) for ``patience`` consecutive periods: grow by one
      notch (rate x 1.25, chunk x 1.25, one thread more);
    - in between: hold. The dead band plus the patience keeps the knobs from flapping.

    Without a target (or without latency reports) the knobs stay where they are.

    Examples
    --------
    >>> c = SlowController(target_p99=0.010, period=0.5, clock=lambda: 0.0)
    >>> c.update(p99=0.0095, now=1.0).max_rate   # slack 5 % < 10 %: back off
    50.0
    """

    def __init__(self, target_p99: float | None = None, *, period: float = 0.25, low: float = 0.1, high: float = 0.3,
                 patience: int = 3, n_threads: int = 1, max_threads: int = 1, chunk_s: float = 1e-3,
                 min_chunk: float = 0.25e-3, max_chunk: float = 4e-3, max_rate: float | None = None,
                 min_rate: float = 1.0,
                 start_rate: float = 100.0, clock=time.perf_counter):
        if target_p99 is not None and not target_p99 > 0:
            raise ValueError(f"`target_p99` must be a latency in seconds > 0; got {target_p99!r}.")
        if not 0.1e-3 <= period <= 10:
            raise ValueError(f"`period` must be in [1e-4, 10] seconds; got {period!r}.")
        if not low < high:
            raise ValueError(f"need low < high for the hysteresis band; got {low!r}, {high!r}.")
        self.target_p99 = target_p99
        self.period, self.low, self.high, self.patience = float(period), float(low), float(high), int(patience)
        self.max_threads, self.min_chunk, self.max_chunk = int(max_threads), float(min_chunk), float(max_chunk)
        self.min_rate, self.start_rate = float(min_rate), float(start_rate)
        self.knobs = Knobs(int(n_threads), float(chunk_s), max_rate)
        self.clock = clock
        self._last = clock()
        self._good = 0
        self.backoffs = self.growths = 0
        self.last_slack = None

    def due(self, now=None) -> bool:
        now = self.clock() if now is None else now
        return now - self._last >= self.period

    def update(self, p99: float | None, now=None) -> Knobs:
        """Feed the current P99 (seconds, or None when unknown); returns the knobs."""
        now = self.clock() if now is None else now
        if now - self._last < self.period:
            return self.knobs
        self._last = now
        if self.target_p99 is None or p99 is None:
            return self.knobs
        slack = (self.target_p99 - p99) / self.target_p99
        self.last_slack = slack
        k = self.knobs
        if slack < self.low:
            self._good = 0
            self.backoffs += 1
            rate = k.max_rate if k.max_rate is not None else self.start_rate
            self.knobs = Knobs(max(1, k.n_threads - 1), max(self.min_chunk, k.chunk_s / 2),
                               max(self.min_rate, rate / 2))
        elif slack > self.high:
            self._good += 1
            if self._good >= self.patience:
                self._good = 0
                self.growths += 1
                rate = None if k.max_rate is None else k.max_rate * 1.25
                self.knobs = Knobs(min(self.max_threads, k.n_threads + 1),
                                   min(self.max_chunk, k.chunk_s * 1.25), rate)
        else:
            self._good = 0
        return self.knobs
