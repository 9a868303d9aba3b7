"""Row-sparse LoRA kernels: the id -> slot hash, backward scatter, optimizers, fold.

Contract (the wrappers in :mod:`lukern.lora` check it):

- the hash is open addressing with linear probing over ``keys`` (int64, -1 = empty) and
  ``vals`` (int64 slot), ``mask = len(keys) - 1`` (a power of two minus one), load <= 1/2;
- ``bitmap`` (uint64, one bit per table row) has the bit of every key in the hash set,
  so the common "row not active" case costs one load that usually hits L2;
- ``A`` (capacity, r), ``B`` (r, d); ``slot_row[slot]`` is the row of a slot or -1;
- ids are in [0, n_rows). Nothing here validates.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._intrinsics import prefetch_elem

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(nogil=True, inline="always", cache=True)
def _home(row, mask):
    # Fibonacci hashing: the high bits of row * golden ratio, so sequential ids spread
    return np.int64((np.uint64(row) * _GOLDEN) >> np.uint64(32)) & mask


@njit(nogil=True, inline="always", cache=True)
def is_active(bitmap, row):
    return (bitmap[np.uint64(row) >> np.uint64(6)] >> (np.uint64(row) & np.uint64(63))) & np.uint64(1)


@njit(nogil=True, inline="always", cache=True)
def prefetch_probe(keys, vals, mask, row):
    """Prefetch the hash lines where the probe for ``row`` starts."""
    h = _home(row, mask)
    prefetch_elem(keys, h)
    prefetch_elem(vals, h)


@njit(nogil=True, inline="always", cache=True)
def find_slot(keys, vals, mask, row):
    """Slot of ``row``, or -1."""
    h = _home(row, mask)
    while True:
        k = keys[h]
        if k == row:
            return vals[h]
        if k < 0:
            return -1
        h = (h + 1) & mask


@njit(nogil=True, cache=True)
def insert(keys, vals, mask, bitmap, row, slot):
    h = _home(row, mask)
    while keys[h] >= 0 and keys[h] != row:
        h = (h + 1) & mask
    vals[h] = slot  # the value first: a reader that finds the key sees a valid slot
    keys[h] = row
    bitmap[np.uint64(row) >> np.uint64(6)] |= np.uint64(1) << (np.uint64(row) & np.uint64(63))


@njit(nogil=True, cache=True)
def remove(keys, vals, mask, bitmap, row):
    """Delete ``row`` with backward-shift deletion (no tombstones, probes stay short)."""
    bitmap[np.uint64(row) >> np.uint64(6)] &= ~(np.uint64(1) << (np.uint64(row) & np.uint64(63)))
    h = _home(row, mask)
    while keys[h] != row:
        if keys[h] < 0:
            return
        h = (h + 1) & mask
    hole = h
    h = (h + 1) & mask
    while keys[h] >= 0:
        home = _home(keys[h], mask)
        # move keys[h] into the hole if its home is not in (hole, h] cyclically
        if ((h - home) & mask) >= ((h - hole) & mask):
            keys[hole] = keys[h]
            vals[hole] = vals[h]
            hole = h
        h = (h + 1) & mask
    keys[hole] = -1


@njit(nogil=True, cache=True)
def rebuild_hash(slot_row, keys, vals, mask, bitmap):
    """Fill an empty hash and bitmap from ``slot_row`` (used when the hash is resized)."""
    for s in range(slot_row.shape[0]):
        r = slot_row[s]
        if r >= 0:
            insert(keys, vals, mask, bitmap, r, s)


@njit(nogil=True, cache=True)
def lora_pool_range(indices, offsets, weights, use_w, mode, keys, vals, mask, bitmap, A, P, b0, b1):
    """``P[b] = sum_j w_j A[slot(i_j)]`` over bags [b0, b1) (0 for ids without a slot);
    mean mode divides by the bag length, as the W part does."""
    r = A.shape[1]
    for b in range(b0, b1):
        for q in range(r):
            P[b, q] = 0
        s = offsets[b]
        e = offsets[b + 1]
        for j in range(s, e):
            row = indices[j]
            if is_active(bitmap, row):
                sl = find_slot(keys, vals, mask, row)
                if sl >= 0:
                    w = weights[j] if use_w else 1.0
                    for q in range(r):
                        P[b, q] += w * A[sl, q]
        if mode == 1 and e > s:
            inv = 1.0 / (e - s)
            for q in range(r):
                P[b, q] *= inv


@njit(nogil=True, cache=True)
def pool_by_slots(slots, offsets, weights, use_w, mode, A, P):
    """``P[b] = sum_j w_j A[slots[j]]`` (slot -1 adds nothing): the backward's pooling,
    reusing the slots it just resolved instead of probing the hash again."""
    r = A.shape[1]
    for b in range(offsets.shape[0] - 1):
        for q in range(r):
            P[b, q] = 0
        s = offsets[b]
        e = offsets[b + 1]
        for j in range(s, e):
            sl = slots[j]
            if sl >= 0:
                w = weights[j] if use_w else 1.0
                for q in range(r):
                    P[b, q] += w * A[sl, q]
        if mode == 1 and e > s:
            inv = 1.0 / (e - s)
            for q in range(r):
                P[b, q] *= inv


@njit(nogil=True, cache=True)
def add_low_rank(P, B, scale, out, b0, b1):
    """``out[b] += scale * P[b] @ B`` for bags [b0, b1), skipping all-zero rows of P."""
    r, d = B.shape
    for b in range(b0, b1):
        nz = False
        for q in range(r):
            if P[b, q] != 0:
                nz = True
        if not nz:
            continue
        o = out[b]
        for q in range(r):
            pq = scale * P[b, q]
            for k in range(d):
                o[k] += pq * B[q, k]


@njit(nogil=True, cache=True)
def assign_slots(indices, keys, vals, mask, bitmap, slot_row, last_step, free, n_free, step, admit, slots):
    """Slot of every id, admitting rows without one into free slots (their A rows are
    zero). Returns (remaining free count, ids that found no free slot).
    ``free[:n_free]`` is a stack of free slots."""
    missed = 0
    for j in range(indices.shape[0]):
        row = indices[j]
        sl = -1
        if is_active(bitmap, row):
            sl = find_slot(keys, vals, mask, row)
        if sl < 0 and admit:
            if n_free > 0:
                n_free -= 1
                sl = free[n_free]
                slot_row[sl] = row
                insert(keys, vals, mask, bitmap, row, sl)
            else:
                missed += 1
        if sl >= 0:
            last_step[sl] = step
        slots[j] = sl
    return n_free, missed


@njit(nogil=True, cache=True)
def scatter_grad_a(slots, offsets, weights, use_w, mode, U, local, uniq, G, n_u):
    """Accumulate ``G[local[slot]] += w_j * U[bag(j)]`` in id order (deterministic),
    registering first-seen slots in ``uniq`` / ``local``. Returns the new unique count."""
    r = U.shape[1]
    n_bags = offsets.shape[0] - 1
    for b in range(n_bags):
        s = offsets[b]
        e = offsets[b + 1]
        f = 1.0
        if mode == 1 and e > s:
            f = 1.0 / (e - s)
        for j in range(s, e):
            sl = slots[j]
            if sl < 0:
                continue
            li = local[sl]
            if li < 0:
                li = n_u
                local[sl] = li
                uniq[n_u] = sl
                for q in range(r):
                    G[li, q] = 0
                n_u += 1
            w = f * (weights[j] if use_w else 1.0)
            for q in range(r):
                G[li, q] += w * U[b, q]
    return n_u


@njit(nogil=True, cache=True)
def rowwise_adagrad_a(A, acc, uniq, G, n_u, lr, wd, eps):
    """Row-wise Adagrad (one accumulator per slot: the mean squared gradient)."""
    r = A.shape[1]
    for i in range(n_u):
        sl = uniq[i]
        g2 = 0.0
        for q in range(r):
            g = G[i, q] + wd * A[sl, q]
            G[i, q] = g
            g2 += g * g
        acc[sl] += g2 / r
        step = lr / (np.sqrt(acc[sl]) + eps)
        for q in range(r):
            A[sl, q] -= step * G[i, q]


@njit(nogil=True, cache=True)
def sgd_a(A, uniq, G, n_u, lr, wd):
    r = A.shape[1]
    for i in range(n_u):
        sl = uniq[i]
        for q in range(r):
            A[sl, q] -= lr * (G[i, q] + wd * A[sl, q])


@njit(nogil=True, cache=True)
def reset_local(local, uniq, n_u):
    for i in range(n_u):
        local[uniq[i]] = -1


@njit(nogil=True, cache=True)
def fold_rows(table, A, B, scale, slot_row, slots):
    """``table[row] += scale * A[slot] @ B`` for the given slots."""
    r, d = B.shape
    for i in range(slots.shape[0]):
        sl = slots[i]
        row = slot_row[sl]
        if row < 0:
            continue
        for q in range(r):
            a = scale * A[sl, q]
            if a != 0:
                for k in range(d):
                    table[row, k] += a * B[q, k]


@njit(nogil=True, cache=True)
def evict_slots(keys, vals, mask, bitmap, slot_row, A, acc, last_step, slots, free, n_free):
    """Remove the given slots from the hash and bitmap, zero their state and push them
    on the free stack. Returns the new free count."""
    r = A.shape[1]
    for i in range(slots.shape[0]):
        sl = slots[i]
        row = slot_row[sl]
        if row < 0:
            continue
        remove(keys, vals, mask, bitmap, row)
        slot_row[sl] = -1
        for q in range(r):
            A[sl, q] = 0
        acc[sl] = 0
        last_step[sl] = -1
        free[n_free] = sl
        n_free += 1
    return n_free
