"""Load signals: how busy inference is right now (DESIGN section 5).

The serving stack says it directly, cheaply: ``with load.request():`` around each request
(in-flight count and latency) or ``load.report_latency(seconds)`` after the fact. When it
says nothing (no report for ``stale_after`` seconds) the kernel is asked instead:

- ``/proc/pressure/cpu`` (PSI): the ``some ... total=`` counter is the microseconds during
  which at least one runnable task waited for a CPU; its growth per second of wall time
  is a host-wide "someone is queued" fraction.
- ``/proc/<pid>/task/<tid>/schedstat``: the second field is the nanoseconds the thread
  spent runnable but waiting on a run queue. Summed over the process's threads other
  than the trainer's, its growth says the *inference* threads are being delayed.

PSI's ``avg10`` is a 10 s average, far too slow for a 1 ms guard, hence the raw totals.

Examples
--------
>>> load = ServingLoad()
>>> with load.request():
...     pass
>>> load.in_flight, load.n_latencies
(0, 1)
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["ServingLoad", "read_psi_cpu", "read_runqueue_wait"]

#: 64-bit words of the serving CPU mask (CPUs 0..1023)
_MASK_WORDS = 16


def read_psi_cpu(proc_root="/proc") -> dict | None:
    """``{"some": total_us, "full": total_us}`` from ``<proc_root>/pressure/cpu``, or None
    when the kernel has no PSI (``CONFIG_PSI`` off, or ``psi=0`` on the command line)."""
    try:
        text = (Path(proc_root) / "pressure" / "cpu").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for field in rest.split():
            if field.startswith("total="):
                out[kind] = int(field[6:])
    return out or None


def read_runqueue_wait(proc_root="/proc", pid="self", exclude=()) -> tuple[int, int] | None:
    """(total run-queue wait in ns, number of threads) over ``<proc_root>/<pid>/task/*``
    except the thread ids in ``exclude``; None when schedstat is unavailable."""
    task_dir = Path(proc_root) / str(pid) / "task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return None
    excl = {str(t) for t in exclude}
    total = n = 0
    for tid in tids:
        if tid in excl:
            continue
        try:
            fields = (task_dir / tid / "schedstat").read_text().split()
        except OSError:  # the thread exited between listdir and open
            continue
        if len(fields) >= 2:
            total += int(fields[1])
            n += 1
    return (total, n) if n else None


class ServingLoad:
    """In-flight requests and recent latencies reported by the serving stack, with
    kernel-counter fallbacks.

    Parameters
    ----------
    window : int
        How many recent latencies are kept (a ring) for :meth:`percentile`.
    stale_after : float
        Seconds without any serving report after which :meth:`busy` falls back to PSI and
        run-queue wait.
    wait_fraction : float
        Fallback threshold: other threads waiting on a run queue for more than this share
        of wall time (or PSI ``some`` growing faster) counts as busy.
    poll_interval : float
        The fallback reads /proc at most this often (reading every task's schedstat on
        every 1 ms chunk would itself be load).
    proc_root, pid : str
        Where to read /proc from (tests point this at a fake tree).
    clock : callable
        Monotonic seconds (injectable for tests).

    Examples
    --------
    >>> load = ServingLoad(window=8)
    >>> for s in (0.001, 0.002, 0.003):
    ...     load.report_latency(s)
    >>> round(load.percentile(50), 4)
    0.002
    """

    def __init__(self, window: int = 2048, *, stale_after: float = 1.0, wait_fraction: float = 0.05,
                 poll_interval: float = 0.005, proc_root="/proc", pid="self", clock=time.perf_counter):
        if int(window) < 1:
            raise ValueError(f"`window` must be >= 1; got {window!r}.")
        self._lat = np.zeros(int(window), np.float64)
        self._n = 0  # latencies ever reported
        # [0] in-flight count, [1] generation of the serving CPU mask, [2:] the mask (bit c
        # of word c // 64: CPU c); share() moves it all to shared memory
        self._shm = np.zeros(2 + _MASK_WORDS, np.int64)
        self._flight = self._shm[:1]
        self._seen = threading.local()  # per serving thread: its CPUs are in the mask
        self._lock = threading.Lock()
        self.stale_after = float(stale_after)
        self.wait_fraction = float(wait_fraction)
        self.poll_interval = float(poll_interval)
        self.proc_root, self.pid = proc_root, pid
        self.clock = clock
        self._last_report = None
        self.exclude_tids: set[int] = set()  # the trainer registers its own threads here
        self._fb_time = None
        self._fb_psi = None
        self._fb_wait = None
        self._fb_busy = False

    # -- the serving side ------------------------------------------------------------------

    @contextmanager
    def request(self):
        """Context manager around one inference request: counts it in flight and records
        its latency when it ends (also when it raises)."""
        t0 = self.clock()
        if not getattr(self._seen, "done", False):
            self._note_serving_cpus()
        with self._lock:
            self._flight[0] += 1
            self._last_report = t0
        try:
            yield
        finally:
            t1 = self.clock()
            with self._lock:
                self._flight[0] -= 1
                self._push(t1 - t0, t1)

    def report_latency(self, seconds: float) -> None:
        """Record one request latency measured by the serving stack itself."""
        s = float(seconds)
        if not s >= 0:  # also rejects NaN
            raise ValueError(f"`seconds` must be a finite latency >= 0; got {seconds!r}.")
        with self._lock:
            self._push(s, self.clock())

    def _push(self, s, now):
        self._lat[self._n % self._lat.shape[0]] = s
        self._n += 1
        self._last_report = now

    def _note_serving_cpus(self):
        """Add the calling (serving) thread's CPUs to the serving CPU mask, once per thread."""
        self._seen.done = True
        cpus = [c for c in os.sched_getaffinity(0) if c < 64 * _MASK_WORDS] if hasattr(os, "sched_getaffinity") else []
        with self._lock:
            mask = self._shm[2:]
            changed = False
            for c in cpus:
                bit = np.int64(1) << np.int64(c % 64)
                if not mask[c // 64] & bit:
                    mask[c // 64] |= bit
                    changed = True
            if changed:
                self._shm[1] += 1

    def share(self) -> np.ndarray:
        """Move the in-flight counter (and the serving CPU mask) into memory shared with
        forked children (the sidecar trainer reads them there) and return the in-flight
        counter, a one-element int64 array."""
        import mmap
        with self._lock:
            if not isinstance(self._shm.base, mmap.mmap):
                buf = np.frombuffer(mmap.mmap(-1, self._shm.nbytes), np.int64)
                buf[:] = self._shm
                self._shm = buf
                self._flight = buf[:1]
        return self._flight

    @property
    def serving_cpus_generation(self) -> int:
        """Moves whenever a serving thread adds CPUs to :meth:`serving_cpus`."""
        return int(self._shm[1])

    def serving_cpus(self) -> set[int]:
        """The CPUs the threads that called :meth:`request` may run on (empty: no request
        yet). The trainer follows them when they are pinned (see ``LiveUpdater``)."""
        mask = self._shm[2:]
        return {64 * w + b for w in range(mask.shape[0]) if mask[w] for b in range(64) if (int(mask[w]) >> b) & 1}

    # -- the trainer side ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return int(self._flight[0])

    @property
    def n_latencies(self) -> int:
        """Latencies ever reported (the ring keeps the last ``window``)."""
        return self._n

    def latencies(self) -> np.ndarray:
        """A copy of the recent latencies, oldest first."""
        with self._lock:
            n, w = self._n, self._lat.shape[0]
            if n <= w:
                return self._lat[:n].copy()
            i = n % w
            return np.concatenate([self._lat[i:], self._lat[:i]])

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) of the recent latencies in seconds, None if none."""
        lat = self.latencies()
        return float(np.percentile(lat, q)) if lat.size else None

    def p50(self):
        return self.percentile(50)

    def p99(self):
        return self.percentile(99)

    def reporting(self) -> bool:
        """True while the serving stack has reported within ``stale_after`` seconds."""
        last = self._last_report
        return int(self._flight[0]) > 0 or (last is not None and self.clock() - last <= self.stale_after)

    def busy(self) -> bool:
        """Should the trainer step aside right now? Requests in flight when the serving
        stack reports; otherwise the PSI / run-queue fallback."""
        if self.reporting():
            return int(self._flight[0]) > 0
        return self.fallback_busy()

    def fallback_busy(self) -> bool:
        """Busy according to the kernel counters: since the previous poll, did other
        threads of this process (or, without schedstat, any task: PSI) wait for a CPU
        longer than ``wait_fraction`` of the elapsed time? Polled at most every
        ``poll_interval`` seconds; the previous answer is reused in between."""
        now = self.clock()
        if self._fb_time is not None and now - self._fb_time < self.poll_interval:
            return self._fb_busy
        wait = read_runqueue_wait(self.proc_root, self.pid, self.exclude_tids)
        psi = read_psi_cpu(self.proc_root) if wait is None else None
        busy = False
        if self._fb_time is not None:
            dt = now - self._fb_time
            if dt > 0:
                if wait is not None and self._fb_wait is not None:
                    busy = (wait[0] - self._fb_wait[0]) * 1e-9 > self.wait_fraction * dt
                elif psi is not None and self._fb_psi is not None:
                    busy = (psi.get("some", 0) - self._fb_psi.get("some", 0)) * 1e-6 > self.wait_fraction * dt
        self._fb_time, self._fb_wait, self._fb_psi, self._fb_busy = now, wait, psi, busy
        return busy

    def snapshot(self) -> dict:
        """In-flight count, reported latencies and P50/P99 (seconds) as a dict."""
        return {"in_flight": int(self._flight[0]), "n_latencies": self._n, "p50": self.p50(), "p99": self.p99(),
                "reporting": self.reporting()}
