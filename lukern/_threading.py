"""numba threading-layer detection and the guard that keeps ``prange`` safe on all layers.

lukern never changes numba's global threading config. It only reads it, and when the
layer may be ``workqueue`` (which aborts the process if two threads launch parallel
kernels at once) it serialises lukern's own ``prange`` launches with a lock.
"""

from __future__ import annotations

import contextlib
import threading

import numba

__all__ = ["prange_guard", "threading_layer"]

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


def prange_guard():
    """Context manager around a ``prange`` launch: a no-op on thread-safe layers, a
    process-wide lock when the layer is (or may become) ``workqueue``."""
    if threading_layer() in _SAFE_LAYERS:
        return contextlib.nullcontext()
    return _prange_lock
