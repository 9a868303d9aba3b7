"""Kernels of the co-located trainer's serving-side path (``LiveUpdater.record``): one
pass over a batch, no temporaries, so recording costs inference as little as possible."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._intrinsics import data_address, memory_fence, stream_store_line


@njit(nogil=True, cache=True)
def first_bad_sample(ids, n_rows, labels):
    """Check a batch in one pass.

    ``ids`` (n, T, L) integers, ``n_rows`` (T,) int64, ``labels`` (n,) float64.
    Returns (kind, i, t): kind 0 all good, 1 ``ids[i, t, :]`` holds an id outside
    [0, n_rows[t]), 2 ``labels[i]`` is not finite (labels are reported first).

    The common all-good batch takes one branch-free pass (one unsigned compare per id:
    a negative id wraps to a huge value); only a failing batch is searched again for the
    first bad sample.
    """
    n, T, L = ids.shape
    bad = False
    for i in range(n):
        bad |= not (np.abs(labels[i]) < np.inf)  # NaN and +-Inf
    if bad:
        for i in range(n):
            if not np.isfinite(labels[i]):
                return 2, i, 0
    bad = False
    if L == 1:  # one id per table (the common layout): the loop over tables vectorises
        for i in range(n):
            for t in range(T):
                bad |= np.uint64(ids[i, t, 0]) >= np.uint64(n_rows[t])
    else:
        for i in range(n):
            for t in range(T):
                hi = np.uint64(n_rows[t])
                for k in range(L):
                    bad |= np.uint64(ids[i, t, k]) >= hi
    if bad:
        for i in range(n):
            for t in range(T):
                hi = n_rows[t]
                for k in range(L):
                    v = ids[i, t, k]
                    if v < 0 or v >= hi:
                        return 1, i, t
    return 0, -1, -1


@njit(nogil=True, cache=True)
def fence():
    """A full memory fence callable from Python (about 0.2 us): orders the shared ring's
    slot writes before the count that publishes them, and the reader's loads likewise."""
    memory_fence()


@njit(nogil=True, cache=True)
def spin_while_busy(flight, k, max_iters):
    """Spin (no syscall, no sleep) while ``flight[0] >= k``, at most ``max_iters`` loads.

    The sidecar trainer waits here between its work units: it sees the serving side's
    in-flight counter (shared memory) drop within about a microsecond, instead of a
    sleep's 50-100 us timer slack. The fence in the loop keeps the compiler from
    hoisting the load out of it. Returns True when the counter fell below ``k``."""
    for _ in range(max_iters):
        memory_fence()
        if flight[0] < k:
            return True
    return False


@njit(nogil=True, cache=True)
def gather_pooled(ring, h, ref, stage):
    """The pooled rows of ``n = ref.shape[0]`` ring samples starting at slot ``h``: a
    sample with ``ref[i] = (k, gen, row)``, ``k >= 0``, lies in staging buffer
    ``stage[k, row]`` (``LiveUpdater.out_buffer``); one with ``k < 0`` in
    ``ring[(h + i) % cap]``. Returns a new (n, D) array."""
    n = ref.shape[0]
    cap, D = ring.shape
    out = np.empty((n, D), ring.dtype)
    for i in range(n):
        k = ref[i, 0]
        if k >= 0:
            src = stage[k, ref[i, 2]]
        else:
            src = ring[(h + i) % cap]
        for j in range(D):
            out[i, j] = src[j]
    return out


@njit(nogil=True, cache=True)
def stream_copy(dst, src):
    """``dst[:] = src`` for 1-D uint8 arrays of one length, the 64-byte lines of ``dst``
    written with non-temporal stores (:func:`stream_store_line`); the bytes before the
    first aligned line and after the last are copied plainly. The caller fences before
    publishing the copy."""
    n = src.size
    head = min(n, np.int64((np.uintp(64) - data_address(dst) % np.uintp(64)) % np.uintp(64)))
    for i in range(head):
        dst[i] = src[i]
    i = head
    while i + 64 <= n:
        stream_store_line(dst, i, src, i)
        i += 64
    for k in range(i, n):
        dst[k] = src[k]
