"""numba threading-layer detection and the guard that keeps ``prange`` safe on all layers.

lukern never changes numba's global threading config. It only reads it, and when the
layer may be ``workqueue`` (which aborts the process if two threads launch parallel
kernels at once) it serialises lukern's own ``prange`` launches with a lock.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import numba

__all__ = ["prange_guard", "prange_usable", "threading_layer"]

_prange_lock = threading.Lock()
_SAFE_LAYERS = ("tbb", "omp")


_active_layer: str | None = None


def threading_layer() -> str:
    """The active numba threading layer, or the configured one when no parallel kernel
    has run yet (``numba.threading_layer()`` raises until then)."""
    global _active_layer
    if _active_layer is not None:
        return _active_layer
    try:
        _active_layer = numba.threading_layer()  # fixed for the life of the process
        return _active_layer
    except ValueError:
        return str(numba.config.THREADING_LAYER)


def _numba_pool_started() -> bool:
    """True once a parallel kernel has run in this process (numba's pool exists)."""
    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


# Set in a child forked after GNU OpenMP's pool started: libgomp refuses to run there
# ("fork() called from a process already using GNU OpenMP, this is unsafe") and the child
# is killed with SIGTERM on its first parallel region. LiveUpdater's sidecar trainer is
# such a child. Intel OpenMP, TBB and workqueue survive a fork.
_prange_broken_by_fork = False


def prange_usable() -> bool:
    """False in a process forked after GNU OpenMP's thread pool started (a ``prange``
    launch there kills the process); :func:`lukern.plan.resolve_plan` then uses lukern's
    own worker threads instead."""
    return not _prange_broken_by_fork


def _after_fork_in_child():
    global _prange_lock, _prange_broken_by_fork
    # a lock held by another thread at fork time would stay held forever in the child
    _prange_lock = threading.Lock()
    if _active_layer == "omp" or (_numba_pool_started() and numba.threading_layer() == "omp"):
        omppool = sys.modules.get("numba.np.ufunc.omppool")
        if getattr(omppool, "openmp_vendor", "GNU") != "Intel":
            _prange_broken_by_fork = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def prange_guard():
    """Context manager around a ``prange`` launch: a no-op on thread-safe layers, a
    process-wide lock when the layer is (or may become) ``workqueue``."""
    if threading_layer() in _SAFE_LAYERS:
        return contextlib.nullcontext()
    return _prange_lock
