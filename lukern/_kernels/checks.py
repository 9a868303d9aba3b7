"""Validation helpers compiled with numba: one pass, no temporaries.

Used only by the public wrappers' validation step (never inside a lookup kernel).
"""

from __future__ import annotations

from numba import njit


@njit(nogil=True, cache=True)
def first_decrease(offsets):
    """Index i of the first ``offsets[i] > offsets[i + 1]``, or -1."""
    bad = False
    for i in range(offsets.shape[0] - 1):  # branch-free pass; locate only on failure
        bad |= offsets[i] > offsets[i + 1]
    if not bad:
        return -1
    for i in range(offsets.shape[0] - 1):
        if offsets[i] > offsets[i + 1]:
            return i
    return -1


@njit(nogil=True, cache=True)
def min_max(x):
    """(min, max) of a non-empty 1-D integer array in one pass."""
    lo = x[0]
    hi = x[0]
    for i in range(1, x.shape[0]):  # branch-free so that it vectorises
        lo = min(lo, x[i])
        hi = max(hi, x[i])
    return lo, hi


@njit(nogil=True, cache=True)
def first_out_of_range_batched(indices, offsets, n_rows, n_bags):
    """For table-major batched indices (table t owns bags [t*n_bags, (t+1)*n_bags)),
    the (position, table) of the first id outside [0, n_rows[t]), or (-1, -1)."""
    for t in range(n_rows.shape[0]):
        s = offsets[t * n_bags]
        e = offsets[(t + 1) * n_bags]
        if e <= s:
            continue
        lo, hi = min_max(indices[s:e])  # branch-free pass; locate only on failure
        if lo < 0 or hi >= n_rows[t]:
            for j in range(s, e):
                if indices[j] < 0 or indices[j] >= n_rows[t]:
                    return j, t
    return -1, -1


@njit(nogil=True, cache=True)
def first_non_finite(x):
    """Flat index of the first NaN or Inf in ``x`` (any shape, contiguous), or -1."""
    flat = x.ravel()
    for i in range(flat.shape[0]):
        v = flat[i]
        if not (v - v == 0):
            return i
    return -1
