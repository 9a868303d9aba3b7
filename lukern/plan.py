"""Which threads, chunk size and parallel driver a kernel call uses, and why.

Resolution order (DESIGN section 6): explicit argument, else the scheduler's current
limit (:func:`thread_limit`), else the tuned profile, else a built-in heuristic.
Resolution is O(1): a dict lookup and a few comparisons.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from . import _config
from ._pool import available_cpus
from ._threading import prange_usable

__all__ = ["DRIVERS", "Plan", "resolve_plan", "thread_limit"]

#: "serial": one call on the calling thread; "threads": serial nogil kernels on
#: lukern's worker threads; "prange": numba's own thread pool.
DRIVERS = ("serial", "threads", "prange")

#: below this many looked-up ids one thread wins (thread hand-off costs ~20 us).
_PARALLEL_MIN_WORK = 16384
_DEFAULT_CHUNK = 64

_limit = threading.local()


@dataclass(frozen=True)
class Plan:
    n_threads: int
    chunk_size: int
    driver: str
    source: str

    def __str__(self) -> str:
        return f"Plan(threads={self.n_threads}, chunk={self.chunk_size}, driver={self.driver}; from {self.source})"


@contextlib.contextmanager
def thread_limit(n_threads: int):
    """Cap the threads lukern kernels use on this thread (the scheduler's lever)."""
    previous = getattr(_limit, "value", None)
    _limit.value = max(1, int(n_threads))
    try:
        yield
    finally:
        _limit.value = previous


def current_thread_limit() -> int | None:
    return getattr(_limit, "value", None)


# Filled by lukern's profile reader (see ``lukern.plan`` extension by the tuner issue):
# a callable (op, bucket) -> (n_threads, chunk_size, driver, source) or None.
profile_lookup = None


def resolve_plan(op: str, n_work: int, *, n_threads=None, chunk_size=None, driver=None, bucket=None,
                 n_items: int | None = None, chunks_per_thread: int = 4) -> Plan:
    """Resolve the plan for one call of ``op`` over ``n_work`` looked-up ids in ``n_items``
    bags (or other units that ``chunk_size`` counts); the heuristic chunk gives each
    thread ``chunks_per_thread`` chunks.

    In a process forked after GNU OpenMP's pool started (a sidecar trainer), a
    ``prange`` plan, even an explicitly requested one, becomes ``threads``: libgomp
    kills such a child on its first parallel region."""
    cpus = available_cpus()
    if _config.NUM_THREADS is not None:
        cpus = min(cpus, _config.NUM_THREADS)
    source = []
    prof = None
    if (n_threads is None or chunk_size is None or driver is None) and profile_lookup is not None:
        prof = profile_lookup(op, bucket)
    if n_threads is not None:
        source.append("threads: argument")
    elif current_thread_limit() is not None:
        n_threads = current_thread_limit()
        source.append("threads: thread_limit")
    elif prof is not None:
        n_threads = prof[0]
        source.append(f"threads: {prof[3]}")
    else:
        n_threads = 1 if n_work < _PARALLEL_MIN_WORK else cpus
        source.append("threads: heuristic")
    n_threads = max(1, min(int(n_threads), max(cpus, 1)))
    if chunk_size is None:
        if prof is not None:
            chunk_size = prof[1]
        elif n_items is not None:
            # a few chunks per thread: enough to balance, few enough that per-chunk costs
            # (refcounts shared by the threads) vanish; 64-bag chunks of 1-id bags ran 2.7x
            # slower than 1024-bag chunks on 2 threads
            chunk_size = max(16, -(-n_items // (chunks_per_thread * n_threads)))
        else:
            chunk_size = _DEFAULT_CHUNK
    if driver is None:
        if prof is not None and n_threads > 1:
            driver = prof[2]
        elif _config.DRIVER is not None:
            driver = _config.DRIVER
        else:
            # numba's pool hands work over in ~10 us against ~100 us for Python worker
            # threads (2 threads, 4M x 64 table: 0.34 vs 0.47 ms per batch); prange is
            # safe on every layer behind lukern._threading.prange_guard
            driver = "prange" if n_threads > 1 else "serial"
    elif driver not in DRIVERS:
        raise ValueError(f"`driver` must be one of {DRIVERS}; got {driver!r}.")
    if n_threads == 1 and driver != "serial":
        driver = "serial"
    if driver == "prange" and not prange_usable():
        driver = "threads"
        source.append("driver: threads (prange would kill this process, forked after GNU OpenMP started)")
    return Plan(n_threads, int(chunk_size), driver, "; ".join(source))
