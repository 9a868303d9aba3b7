"""Validation helpers compiled with numba: one pass, no temporaries.

Used only by the public wrappers' validation step (never inside a lookup kernel).
"""

from __future__ import annotations

from numba import njit


@njit(nogil=True, cache=True)
def first_decrease(offsets):
    """Index i of the first ``offsets[i] > offsets[i + 1]``, or -1."""
    for i in range(offsets.shape[0] - 1):
        if offsets[i] > offsets[i + 1]:
            return i
    return -1


@njit(nogil=True, cache=True)
def first_out_of_range_batched(indices, offsets, n_rows, n_bags):
    """For table-major batched indices (table t owns bags [t*n_bags, (t+1)*n_bags)),
    the (position, table) of the first id outside [0, n_rows[t]), or (-1, -1)."""
    for t in range(n_rows.shape[0]):
        hi = n_rows[t]
        for j in range(offsets[t * n_bags], offsets[(t + 1) * n_bags]):
            v = indices[j]
            if v < 0 or v >= hi:
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
