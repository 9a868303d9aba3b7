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

__all__ = ["available_cpus", "run_ranges", "split_by_work"]

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _after_fork_in_child():
    # The child has none of the parent's worker threads, but the executor object still
    # counts its idle ones and would queue work for them forever (run_ranges hung in
    # a forked child, e.g. LiveUpdater's sidecar): start a fresh pool on first use.
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


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
