"""lukern's own worker threads: the second parallel driver (DESIGN section 2 (b)).

Serial ``nogil`` kernels run one range of bags per call on these threads, so they can be
pinned, given a low priority and stopped between chunks, and two serving threads can
run lookups at once on any numba threading layer (``workqueue`` aborts the process when
two threads launch ``prange`` kernels concurrently).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["PinnedPool", "available_cpus", "pinned_pool", "run_ranges", "split_by_work"]

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _after_fork_in_child():
    # The child has none of the parent's worker threads, but the executor object still
    # counts its idle ones and would queue work for them forever (run_ranges hung in
    # a forked child, e.g. LiveUpdater's sidecar): start a fresh pool on first use.
    global _executor, _executor_lock, _pinned_lock
    _executor = None
    _executor_lock = threading.Lock()
    _pinned.clear()
    _pinned_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=max(1, available_cpus() - 1) * 2,
                                               thread_name_prefix="lukern-worker")
    return _executor


def split_by_work(offsets: np.ndarray, n_parts: int) -> list[tuple[int, int]]:
    """Cut bags [0, n_bags) into at most ``n_parts`` contiguous ranges of about equal
    index count (the cumulative-work curve is ``offsets`` itself)."""
    n_bags = offsets.shape[0] - 1
    n_parts = max(1, min(n_parts, n_bags))
    if n_parts == 1:
        return [(0, n_bags)]
    total = int(offsets[-1])
    targets = (np.arange(1, n_parts) * total) // n_parts
    cuts = np.searchsorted(offsets, targets, side="left")
    bounds = np.unique(np.concatenate(([0], np.clip(cuts, 0, n_bags), [n_bags])))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a] or [(0, n_bags)]


def run_ranges(fn, ranges: list[tuple[int, int]]) -> None:
    """Call ``fn(b0, b1)`` for each range: all but the last on worker threads, the last on
    the calling thread; return when all are done, re-raising the first error."""
    if len(ranges) == 1:
        fn(*ranges[0])
        return
    pool = _pool()
    futures = [pool.submit(fn, b0, b1) for b0, b1 in ranges[:-1]]
    try:
        fn(*ranges[-1])
    finally:
        for f in futures:
            f.result()


class PinnedPool:
    """Worker threads pinned to ``cpus``: each sets its own affinity (``sched_setaffinity``
    on its own thread id) when it starts, so the serial ``nogil`` kernels it runs touch
    memory from those CPUs (one pool per NUMA node for :class:`lukern.ShardedTable`).

    ``pinned`` lists ``(native thread id, affinity read back)`` of every started worker.
    """

    def __init__(self, cpus, n_threads: int):
        self.cpus = frozenset(int(c) for c in cpus)
        if not self.cpus or n_threads < 1:
            raise ValueError(f"`cpus` must be non-empty and `n_threads` >= 1; got {sorted(self.cpus)}, {n_threads}.")
        self.n_threads = int(n_threads)
        self.pinned: list[tuple[int, frozenset]] = []
        self._executor = ThreadPoolExecutor(max_workers=self.n_threads, thread_name_prefix="lukern-pinned",
                                            initializer=self._pin)

    def _pin(self):
        os.sched_setaffinity(0, self.cpus)  # 0: the calling thread only
        self.pinned.append((threading.get_native_id(), frozenset(os.sched_getaffinity(0))))

    def submit(self, fn, *args):
        return self._executor.submit(fn, *args)


_pinned: dict = {}
_pinned_lock = threading.Lock()


def pinned_pool(cpus, n_threads: int) -> PinnedPool:
    """The shared :class:`PinnedPool` of these CPUs and thread count (made on first use)."""
    key = (frozenset(cpus), int(n_threads))
    pool = _pinned.get(key)
    if pool is None:
        with _pinned_lock:
            pool = _pinned.get(key)
            if pool is None:
                pool = _pinned[key] = PinnedPool(*key)
    return pool
