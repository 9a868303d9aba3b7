"""Row-sparse LoRA kernels: the id -> slot hash, backward scatter, optimizers, fold.

Contract (the wrappers in :mod:`lukern.lora` check it):

- the hash is open addressing with linear probing over ``keys`` (int64, -1 = empty) and
  ``vals`` (int64 slot), ``mask = len(keys) - 1`` (a power of two minus one), load <= 1/2;
- ``bitmap`` (uint64, one bit per table row) has the bit of every key in the hash set,
  so the common "row not active" case costs one load that usually hits L2;
- ``A`` (capacity, r), ``B`` (r, d); ``slot_row[slot]`` is the row of a slot or -1;
- ids are in [0, n_rows). Nothing here validates.

The fused lookup (``W`` pooling plus the correction in one pass) is generated per width
by :func:`fused_kernels`, like the plain kernels of :mod:`lukern._kernels.embedding`.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ._intrinsics import prefetch, prefetch_elem

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


@njit(nogil=True, inline="always", cache=True)
def _pending_row(local, uniq, sl, n_u):
    """The pending-gradient row of slot ``sl``, registered on its first touch in this
    batch. Returns (row, new pending count, whether it is new); the caller initialises
    a new row of ``G``."""
    li = local[sl]
    if li >= 0:
        return li, n_u, False
    local[sl] = n_u
    uniq[n_u] = sl
    return n_u, n_u + 1, True


@njit(nogil=True, cache=True)
def has_duplicate(rows):
    """Whether the non-negative ids ``rows`` repeat one: an open-addressing set of a
    power-of-two size >= 2n, O(n) (``np.unique`` sorts or hashes with more overhead,
    ~0.4 ms for 4096 ids, and a publication checks 26 tables)."""
    n = rows.shape[0]
    m = 2
    while m < 2 * n:
        m *= 2
    mask = m - 1
    seen = np.full(m, -1, np.int64)
    for i in range(n):
        v = rows[i]
        h = _home(v, mask)
        while seen[h] != -1:
            if seen[h] == v:
                return True
            h = (h + 1) & mask
        seen[h] = v
    return False


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


#: ids ahead whose hash lines :func:`find_slots` prefetches (16: 0.73 ms for 61k Zipf ids
#: on 129k active rows, 64: 0.46 ms; 128 no better)
_FIND_AHEAD = 64


@njit(nogil=True, cache=True)
def find_slots(indices, keys, vals, mask, bitmap, slots, test_bits=True):
    """``slots[j]`` = slot of ``indices[j]`` or -1 (nothing admitted). Returns the
    number of ids that have a slot. ``test_bits=False`` probes the hash for every id
    without testing the presence bitmap first: faster when most ids have a slot, as
    the bitmap word is one more scattered load per id (61k Zipf ids, all with a slot,
    caches flushed between calls: 1.27 -> 0.59 ms)."""
    n = indices.shape[0]
    found = 0
    for j in range(n):
        if j + _FIND_AHEAD < n:
            ahead = indices[j + _FIND_AHEAD]
            if not test_bits or is_active(bitmap, ahead):
                prefetch_probe(keys, vals, mask, ahead)
        row = indices[j]
        sl = -1
        if not test_bits or is_active(bitmap, row):
            sl = find_slot(keys, vals, mask, row)
        slots[j] = sl
        found += sl >= 0
    return found


@njit(nogil=True, cache=True)
def pool_slots(slots, offsets, weights, use_w, A, P):
    """``P[b] = sum_j w_j A[slots[j]]`` (slot -1 adds nothing) in A's dtype and in id
    order, as the fused kernels and :func:`backward_bags` pool: all give the same bits."""
    r = A.shape[1]
    for b in range(offsets.shape[0] - 1):
        for q in range(r):
            P[b, q] = 0.0
        for j in range(offsets[b], offsets[b + 1]):
            sl = slots[j]
            if sl >= 0:
                w = weights[j] if use_w else 1.0
                for q in range(r):
                    P[b, q] += w * A[sl, q]


@njit(nogil=True, cache=True)
def add_pooled(P, offsets, mode, B, scale, out):
    """``out[b] += s f_b P_b @ B`` (``f_b`` = 1, or 1 / len(b) in mean mode)."""
    r, d = B.shape
    for b in range(P.shape[0]):
        s = offsets[b]
        e = offsets[b + 1]
        f = scale
        if mode == 1 and e > s:
            f = scale / (e - s)
        o = out[b]
        for q in range(r):
            pq = f * P[b, q]
            if pq != 0.0:
                for k in range(d):
                    o[k] += pq * B[q, k]


#: ids ahead whose hash lines :func:`assign_slots` prefetches: 38 -> 28 us for 1024 Zipf
#: ids with the adapter's state evicted from cache. Probing 8 ids ahead as well, to
#: prefetch the slot's ``last_step`` and ``local`` lines, gained nothing more (29-33 us).
_ASSIGN_AHEAD = 16


@njit(nogil=True, cache=True)
def assign_slots(indices, keys, vals, mask, bitmap, slot_row, last_step, free, n_free, step, slots, local, uniq, n_u,
                 G, known, use_known, rows_out):
    """Slot of every id, admitting rows without one into free slots (their A rows are
    zero; ``free[:n_free]`` is a stack of free slots), and registering slots not yet
    pending in the pending list (``local``: slot -> pending row, ``uniq``: pending row ->
    slot, the row of ``G`` zeroed). With ``use_known``, ``known[j] >= 0`` is taken as the
    slot of id j without probing (a forward pass found it). ``rows_out[j]`` receives the
    pending row of id j (-1 without a slot), so the scatter reads it in order. Returns
    (free count, pending count, ids that found no free slot)."""
    missed = 0
    n_ids = indices.shape[0]
    for j in range(n_ids):
        if j + _ASSIGN_AHEAD < n_ids:
            prefetch_probe(keys, vals, mask, indices[j + _ASSIGN_AHEAD])
        row = indices[j]
        sl = -1
        if use_known and known[j] >= 0:
            sl = known[j]
        elif is_active(bitmap, row):
            sl = find_slot(keys, vals, mask, row)
        if sl < 0:
            if n_free > 0:
                n_free -= 1
                sl = free[n_free]
                slot_row[sl] = row
                insert(keys, vals, mask, bitmap, row, sl)
            else:
                missed += 1
        li = -1
        if sl >= 0:
            last_step[sl] = step
            li, n_u, fresh = _pending_row(local, uniq, sl, n_u)
            if fresh:
                for q in range(G.shape[1]):
                    G[li, q] = 0
        slots[j] = sl
        rows_out[j] = li
    return n_free, n_u, missed


#: bags whose ``g_b B^T`` are accumulated together: their r-wide sums interleave, so no
#: dependency chain of d additions stalls the loop (0.51 -> 0.30 ms for 2048 bags, d = 64)
_U_BLOCK = 8


@njit(nogil=True, cache=True)
def backward_bags(slots, offsets, weights, use_w, mode, grad, A, B, Bt, scale, U, dB_parts, chunk, c0, c1, P, have_p):
    """Bag side of the backward for chunks [c0, c1) of ``chunk`` bags:
    ``U[b] = s f_b g_b B^T`` and ``dB_parts[c] = s sum_b f_b P_b^T g_b`` with
    ``P_b = sum_j w_j A[slots[j]]`` (slot -1 adds nothing; pooled in A's dtype like the
    forward, or taken from ``P`` when ``have_p``) and ``f_b`` = 1, or 1 / len(b) in mean
    mode. ``Bt`` is ``B.T`` in float64. Float64 sums; the chunks are fixed by ``chunk``,
    not by the thread count, so summing ``dB_parts`` in chunk order gives the same bits
    however the chunks were spread over threads."""
    r, d = B.shape
    n_bags = offsets.shape[0] - 1
    p = np.empty(r, A.dtype)
    acc = np.empty((_U_BLOCK, r))
    for c in range(c0, c1):
        dBc = dB_parts[c]
        for q in range(r):
            for k in range(d):
                dBc[q, k] = 0.0
        end = min(n_bags, (c + 1) * chunk)
        for b0 in range(c * chunk, end, _U_BLOCK):
            nb = min(_U_BLOCK, end - b0)
            for i in range(nb):
                for q in range(r):
                    acc[i, q] = 0.0
            for k in range(d):
                for i in range(nb):
                    gk = np.float64(grad[b0 + i, k])
                    for q in range(r):
                        acc[i, q] += gk * Bt[k, q]
            for i in range(nb):
                b = b0 + i
                s = offsets[b]
                e = offsets[b + 1]
                f = scale
                if mode == 1 and e > s:
                    f = scale / (e - s)
                for q in range(r):
                    U[b, q] = f * acc[i, q]
                if have_p:
                    for q in range(r):
                        p[q] = P[b, q]
                else:
                    for q in range(r):
                        p[q] = 0.0
                    for j in range(s, e):
                        sl = slots[j]
                        if sl >= 0:
                            w = weights[j] if use_w else 1.0
                            for q in range(r):
                                p[q] += w * A[sl, q]
                g = grad[b]
                for q in range(r):
                    pq = f * p[q]
                    if pq != 0.0:
                        for k in range(d):
                            dBc[q, k] += pq * g[k]


#: bags whose ``g_b B^T`` the rank-specialised backward computes together, in scalar
#: accumulators (registers) that the SLP vectorizer packs
_U_BAGS = 4


def _backward_source(r: int, nbk: int = _U_BAGS) -> str:
    """Source of :func:`backward_bags` written for rank ``r``: the same arithmetic in the
    same order (the same bits), with the ``r``-wide sums of ``nbk`` bags in scalars.
    :func:`backward_bags` keeps them in an array, so every step of the d-long sum went
    through memory (0.36 -> 0.15-0.2 ms for 2048 bags, d = 64, r = 8)."""
    body = ["r, d = B.shape", "n_bags = offsets.shape[0] - 1", "p = np.empty(r, A.dtype)",
            "for c in range(c0, c1):",
            "    dBc = dB_parts[c]",
            "    for q in range(r):",
            "        for k in range(d):",
            "            dBc[q, k] = 0.0",
            "    end = min(n_bags, (c + 1) * chunk)",
            "    b0 = c * chunk",
            f"    while b0 + {nbk} <= end:"]
    u = [" = ".join(f"u{i}_{q}" for q in range(r)) + " = 0.0" for i in range(nbk)]
    u += ["for k in range(d):"] + [f"    g{i} = np.float64(grad[b0 + {i}, k])" for i in range(nbk)]
    u += [f"    bt{q} = Bt[k, {q}]" for q in range(r)]
    u += [f"    u{i}_{q} += g{i} * bt{q}" for i in range(nbk) for q in range(r)]
    for i in range(nbk):
        u += [f"f = bag_factor(offsets, b0 + {i}, mode, scale)"]
        u += [f"U[b0 + {i}, {q}] = f * u{i}_{q}" for q in range(r)]
    u += [f"b0 += {nbk}"]
    body += ["        " + x for x in u]
    one = [" = ".join(f"u_{q}" for q in range(r)) + " = 0.0", "for k in range(d):", "    gk = np.float64(grad[b, k])"]
    one += [f"    u_{q} += gk * Bt[k, {q}]" for q in range(r)]
    one += ["f = bag_factor(offsets, b, mode, scale)"] + [f"U[b, {q}] = f * u_{q}" for q in range(r)]
    body += ["    for b in range(b0, end):"] + ["        " + x for x in one]
    # the B side bag by bag, as backward_bags (P pooled through the array p in A's dtype)
    side = ["f = bag_factor(offsets, b, mode, scale)", "g = grad[b]", "if have_p:"]
    side += [f"    p{q} = P[b, {q}]" for q in range(r)]
    side += ["else:", "    for q in range(r):", "        p[q] = 0.0", "    for j in range(offsets[b], offsets[b + 1]):",
             "        sl = slots[j]", "        if sl >= 0:", "            w = weights[j] if use_w else 1.0",
             "            for q in range(r):", "                p[q] += w * A[sl, q]"]
    side += [f"    p{q} = p[{q}]" for q in range(r)]
    for q in range(r):
        side += [f"pq = f * p{q}", "if pq != 0.0:", "    for k in range(d):", f"        dBc[{q}, k] += pq * g[k]"]
    body += ["    for b in range(c * chunk, end):"] + ["        " + x for x in side]
    code = "\n".join("    " + x for x in body)
    return f'''"""lukern LoRA backward (bag side) for rank {r}: generated by lukern._kernels.lora."""
import numpy as np
from numba import njit

from lukern._kernels.lora import bag_factor


@njit(nogil=True, cache=True)
def backward_bags_fixed(slots, offsets, weights, use_w, mode, grad, A, B, Bt, scale, U, dB_parts, chunk, c0, c1, P,
                        have_p):
{code}
'''


@njit(nogil=True, inline="always", cache=True)
def bag_factor(offsets, b, mode, scale):
    """``s f_b``: the scale, divided by the bag length in mean mode."""
    s = offsets[b]
    e = offsets[b + 1]
    if mode == 1 and e > s:
        return scale / (e - s)
    return scale


def backward_bags_kernel(r: int):
    """:func:`backward_bags`, or for the common rank its specialised twin (same
    arguments, same bits)."""
    return _backward_kernel(int(r)) if r == FIXED_RANK else backward_bags


@functools.lru_cache(maxsize=None)
def _backward_kernel(r: int):
    from ._codegen import load_generated, with_slp

    return with_slp(load_generated(f"lora_backward_r{r}", _backward_source(r)).backward_bags_fixed)


@njit(nogil=True, cache=True)
def sum_parts(parts, out):
    """``out += sum_c parts[c]`` in chunk order (the deterministic merge)."""
    for c in range(parts.shape[0]):
        pc = parts[c]
        for q in range(out.shape[0]):
            for k in range(out.shape[1]):
                out[q, k] += pc[q, k]


@njit(nogil=True, cache=True)
def scatter_grad_a(rows, offsets, weights, use_w, U, G, lo, hi):
    """``G[rows[j]] += w_j U[bag(j)]`` in id order (``rows``: the pending row of every
    id, -1 for none), for the pending rows in [lo, hi) only. Each row is owned by one
    caller and summed in id order whatever the split, so the rows come out bit for bit
    as with one caller over [0, n_pending)."""
    r = U.shape[1]
    for b in range(offsets.shape[0] - 1):
        for j in range(offsets[b], offsets[b + 1]):
            li = rows[j]
            if li < lo or li >= hi:  # also skips -1
                continue
            w = weights[j] if use_w else 1.0
            for q in range(r):
                G[li, q] += w * U[b, q]


@njit(nogil=True, cache=True)
def count_below(x, v):
    n = 0
    for i in range(x.shape[0]):
        n += x[i] < v
    return n


#: ids ahead whose slot-indexed state (last step, pending row) assign_scatter prefetches
_SCATTER_AHEAD = 16


@njit(nogil=True, cache=True)
def assign_scatter(indices, offsets, weights, use_w, keys, vals, mask, bitmap, slot_row, last_step, free, n_free, step,
                   local, uniq, n_u, G, known, U):
    """:func:`assign_slots` (with ``known``) and :func:`scatter_grad_a` over every
    pending row in one pass over the ids, for one caller: the same admissions, pending
    order and sums in the same order, without the slot and pending-row arrays. Returns
    (free count, pending count, ids that found no free slot)."""
    r = G.shape[1]
    missed = 0
    n_ids = known.shape[0]
    for b in range(offsets.shape[0] - 1):
        for j in range(offsets[b], offsets[b + 1]):
            if j + _SCATTER_AHEAD < n_ids:  # the slot-indexed lines of a later id
                k = known[j + _SCATTER_AHEAD]
                if k >= 0:
                    prefetch_elem(last_step, k)
                    prefetch_elem(local, k)
            sl = known[j]
            if sl < 0:
                row = indices[j]
                if is_active(bitmap, row):
                    sl = find_slot(keys, vals, mask, row)
                if sl < 0:
                    if n_free == 0:
                        missed += 1
                        continue
                    n_free -= 1
                    sl = free[n_free]
                    slot_row[sl] = row
                    insert(keys, vals, mask, bitmap, row, sl)
            last_step[sl] = step
            li, n_u, fresh = _pending_row(local, uniq, sl, n_u)
            w = weights[j] if use_w else 1.0
            if fresh:
                # a new row starts at its first term (the same value as 0 + term):
                # zeroing it and adding at once stalled on the store just made (the
                # pass took 5-6x as long: 2.3-2.7 ms against 0.41-0.57 ms for 61k Zipf ids)
                for q in range(r):
                    G[li, q] = w * U[b, q]
            else:
                for q in range(r):
                    G[li, q] += w * U[b, q]
    return n_free, n_u, missed


@njit(nogil=True, cache=True)
def drop_pending(slots, local, uniq, G, n_u):
    """Remove the given slots from the pending list, keeping the others' order and
    gradients. Returns the new pending count."""
    for i in range(slots.shape[0]):
        sl = slots[i]
        if local[sl] >= 0:
            uniq[local[sl]] = -1
            local[sl] = -1
    k = 0
    for i in range(n_u):
        sl = uniq[i]
        if sl < 0:
            continue
        if k != i:
            uniq[k] = sl
            for q in range(G.shape[1]):
                G[k, q] = G[i, q]
        local[sl] = k
        k += 1
    return k


@njit(nogil=True, cache=True)
def rowwise_adagrad_a(A, acc, uniq, G, lr, wd, eps, i0, i1):
    """Row-wise Adagrad for pending rows [i0, i1): one accumulator per slot, the mean
    squared gradient of the row (the DLRM standard)."""
    r = A.shape[1]
    for i in range(i0, i1):
        if i + 16 < i1:  # the rows are scattered: keep a few misses in flight
            prefetch(A, uniq[i + 16], 0)
            prefetch_elem(acc, uniq[i + 16])
        sl = uniq[i]
        g2 = 0.0
        for q in range(r):
            g = G[i, q] + wd * A[sl, q]
            g2 += g * g
        acc[sl] += g2 / r
        step = lr / (np.sqrt(acc[sl]) + eps)
        for q in range(r):
            A[sl, q] -= step * (G[i, q] + wd * A[sl, q])


@njit(nogil=True, cache=True)
def sgd_a(A, uniq, G, lr, wd, i0, i1):
    r = A.shape[1]
    for i in range(i0, i1):
        sl = uniq[i]
        for q in range(r):
            A[sl, q] -= lr * (G[i, q] + wd * A[sl, q])


@njit(nogil=True, cache=True)
def reset_local(local, uniq, n_u):
    for i in range(n_u):
        local[uniq[i]] = -1


#: evicted rows ahead whose table lines :func:`fold_rows` prefetches
FOLD_AHEAD = 8


@njit(nogil=True, cache=True)
def fold_rows(table, A, B, scale, slot_row, slots):
    """``table[row] += scale * A[slot] @ B`` for the given slots, with the table rows of
    the slots ``FOLD_AHEAD`` ahead prefetched: evicted rows are scattered over a large
    table, so each fold would wait on a cache miss."""
    r, d = B.shape
    n = slots.shape[0]
    for i in range(n):
        if i + FOLD_AHEAD < n:
            ahead = slot_row[slots[i + FOLD_AHEAD]]
            if ahead >= 0:
                for k in range(0, d, 16):  # 16 float32 (or 8 float64: every other line) per line
                    prefetch(table, ahead, k)
                prefetch(table, ahead, d - 1)
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


# --- fused lookup: generated per width ---------------------------------------------------
#
# The W rows are pooled by a loop identical to the plain kernel's (d accumulators that
# LLVM's SLP vectorizer packs, rows prefetched ``PF`` ids ahead): nothing of the LoRA
# path runs inside it. The LoRA path is a pipeline over id positions that runs ahead of
# the current bag, between bags, in three tight loops over a queue of candidate ids:
#
# 1. scan: test the presence bit of the next ids (up to ``SCAN_AHEAD`` ids past the
#    current bag) and append the positions of set bits to the queue without a branch
#    (always store, advance the tail by the bit); then prefetch their hash lines;
# 2. probe: find the slots of queued ids up to ``PROBE_AHEAD`` ids past the current bag
#    (their hash lines arrived while earlier bags were pooled) and prefetch their A rows;
# 3. pool: add the A rows of the current bag's queued ids (prefetched) to ``p``.
#
# Inactive ids cost a few branch-free instructions. The first design (every stage inside
# the W loop, rings indexed by id position) cost ~25 extra cycles per id and ran at
# 1.5-2.7x the plain lookup (4M x 64 float32, r = 8, 1 thread).

# The fused lookup pools the W rows with the plain kernel's loop (d accumulators that
# LLVM's SLP vectorizer packs, rows prefetched ``PF`` ids ahead) plus one extra step per
# id: where the row of id j + PF is prefetched, its presence bit is tested (the id is in
# a register already); a set bit (rare: a well-predicted branch) appends the position to
# a queue and prefetches the id's hash lines (stage 1). Between bags, the queued ids up
# to ``PROBE_AHEAD`` past the bag are probed and their A rows prefetched (stage 2), and
# the bag's own A rows are pooled in id order (stage 3), then multiplied by B once.
#
# Measured (4M x 64 float32, r = 8, 5% of rows active at random, 1 thread, kernels
# called directly, medians of 60 on a machine shared with other benchmarks, so +-15%):
# the first design (every stage inside the W loop, rings indexed by id position) ran at
# 1.5-2.0x the plain lookup on uniform ids and 2.1-2.3x on Zipf ids, 2.8-3.6x with most
# ids active; this one at 1.25-1.45x, 1.5-1.85x and 2.1-2.6x, bit for bit the same
# output. Of the rest, the bit test costs ~10%, the probes of the 5% active ids ~20%
# (their prefetched hash lines often arrive late on a loaded memory system: the W
# loop keeps the miss queues full, so every extra memory operation waits). Tried and
# dropped: a separate branch-free scan loop over the ids (its loads queue behind the W
# loop's), a bitmap prefetch stage, the bit test further ahead than the row prefetch (a
# second id load), other distances (96/64, 128/80: within noise). The rank-8 copy of
# the loop (pooled row in registers) gained 5-9%.
#
# Later (same setup, kernels called directly, same-run ratios, 3-6 runs): a zero bitmap
# (the bit test, nothing set) ran at 1.2-1.45x and the loop without the bit test at
# 1.04-1.1x, so the bit test, not the probes, was most of the gap. Its code spilled the
# loop's registers (indices, bitmap, the row stride reloaded from the stack per id) and
# kept negative-index wraparound selects: unsigned indexing gained 3-7% on uniform ids
# and 5-13% on Zipf ids (now 1.22-1.27x and 1.35-1.5x). Tried and dropped: keys and
# slots interleaved in one array so a probe touches one line (new/old 0.96-1.04: the
# probes are not the bottleneck); a byte per row instead of a bit (2-3x slower); the
# branch-free append with the hash lines prefetched after the bag (+10%), or the branch
# without the prefetch in the loop (+5%); the table indexed through a flat view with
# a constant row stride (within noise). Dropping the unaligned-row fifth prefetch
# (redundant for 64-byte-aligned tables) gained the fused lookup 2-4%; not done, as
# the plain kernel carries the same prefetch.

# Re-measured on the Zen 5 machine (2 cores, shared with two other benchmark jobs;
# kernels called directly, thread CPU time, medians of 200, same-run ratios): this design
# at 1.20-1.28x the plain kernel on uniform ids and 1.45-1.50x on Zipf ids. Ablation on
# Zipf ids (stages cut out of the generated source, same run): the W loop with the
# stages but nothing queued 0.94-1.01x; the bit test, its branch and the append +12-16%;
# the probes (stage 2) +18%; the pooling and P @ B (stage 3) +14%. Each stage alone is
# about half the allowed 25%, so no reordering of them meets the bar on Zipf ids.
# Tried and dropped (same setup): (a) a block scan, the bits of the next 128/256/512 ids
# tested in a loop of their own between bags (branch-free append), the hits' hash lines
# prefetched after the block, with or without the bitmap words of the following block
# prefetched: 1.19-1.35x uniform, 1.32-1.61x Zipf, no better; the scan alone over a
# batch's 61k ids takes 0.04 ms warm, 0.06-0.075 ms right after a lookup (15-20% of a
# Zipf lookup by itself); (b) the block scan probing the previous block's hits before
# each new block (A rows prefetched 100+ ids ahead): worse, 1.31-1.35x and 1.60-1.65x;
# (c) the in-loop test without a branch (position always stored, tail advanced by the
# bit, the hash lines of the id or of slot 0 prefetched through a masked index): worse,
# 1.29-1.46x and 1.56-1.66x; (d) presence/probe distances 128/64, 192/96, 128/32 against
# 64/48: within 2%, so late lines are not the cost; (e) 512- and 1024-bag prange
# chunks on 2 threads: no better than 256. A 2-bag fused call costs ~3 us more than the
# plain one (kernel ~1 us), with the kernel arguments cached per state
# (``_State.lookup_args``): ~1% of a batch, not the gap.
#
# On the EPYC VM (2 MiB L2 per core), kernels called directly, same-run medians of 80,
# Zipf / uniform ids, fused/plain 1.46-1.51x / 1.24-1.29x: (f) two passes, the plain
# kernel then a correction kernel (branch-free scan of the bits into a hit list per
# 4096-id block, the hits probed with their hash lines 16 hits ahead, A pooled in
# registers for r = 8): 1.55-1.69x / 1.38-1.46x, worse. Alone, after a lookup, its
# scan took 73 / 88 us (61k ids: ~4 cycles an id, the bitmap lines evicted from L2 by
# the W rows), the probes +34 / 63 us, the pooling and P @ B +71 / 77 us; fused, the
# scan's loads overlap the W loop's. (g) the W rows prefetched non-temporal (locality 0,
# to keep the bitmap and hash lines in L2): 1.47-1.49x / 1.24-1.25x, within 2%; locality
# 1 and 2 were worse. (h) With nothing set in the bitmap the fused kernel runs at
# 1.04-1.09x whether the bitmap is full size or cut to 4/32/128 KB (index masked), so the
# bit test itself is cheap and its lines are not the cost; the 5% of ids that hit cost the
# rest, ~35 ns (~120 cycles) each on Zipf ids: the mispredicted bit branch, the queue
# loops' data-dependent exits (about one mispredict per bag each) and the probe.
# (i) Stage 3's first 1-3 queue entries pooled branch-free (masked, then the loop):
# within 1-3%, so those exits are not it. (j) Bounds on the probe's cost (same run,
# output wrong on purpose): a "slot" computed from the id instead of probed, hash lines
# still prefetched, 1.33-1.34x Zipf / 1.18-1.22x uniform; without the hash prefetches
# 1.26-1.29x / 1.12-1.16x; the slot known at stage 1 (A row prefetched there, no stage
# 2): 1.24-1.25x / 1.13-1.17x, and hot Zipf ids 1.93x against 2.66x. So the hash (its
# lines, the probe, the stage that waits for them) is ~0.2 of the Zipf ratio, and only an
# index whose presence word also gives the A row's position (e.g. a 32-bit presence mask
# and a 32-bit base per 32 rows, A in group order: position = base + popcount of the lower
# bits) reaches the bar. (k) Measured, a rank index that maps that position to a slot
# through a second array (the words replacing the bitmap, the position's line prefetched
# at stage 1, one load instead of the probe at stage 2): Zipf 1.47-1.49x, hot 2.67-3.04x,
# no better; uniform 1.19x against 1.26x. The dependent load of stage 2, not the hash's
# arithmetic, is the cost. (l) Built for real: a serving copy of A in row-group order
# (32-bit presence mask and 32-bit base per 32 rows, position = base + popcount of the
# lower bits, the copy kept in step at the end of every mutation; ~130 lines): Zipf
# 1.55-1.68x against 1.51-1.52x, hot 3.0-3.1x against 2.5-2.7x, uniform 1.21-1.26x
# against 1.25-1.27x, same run. The bounds in (j) were not reached: the stage-1 variant
# faked its positions as id & 65535, which keeps the A rows it reads in 2 MB that stay in
# L2 (the real rows of 5% random ids spread over 8 MB), and the real stage 1 adds the
# position arithmetic and two prefetches to the W loop's body; row order also scatters
# the hot rows, whose slots the admission order had kept together. Dropped.

# Later, on the EPYC VM, once the plain kernels read positions as unsigned integers and
# prefetched W rows into L2 (the fused W loop with them), the plain lookup got 15-40%
# faster and the ratios rose although the fused lookup got faster too (Zipf 1.40-1.47x,
# uniform 1.09-1.39x). Measured against that shared loop (kernel variants, same inputs,
# one thread, Zipf ids): the loop with nothing tested 1.0; the bit test with an empty
# bitmap +20% (with the bitmap index masked to 512 bytes, always in L1, only +8%: the
# bitmap's lines, not the instructions, are most of it); the 5% of ids that hit another
# +15-20%. Every extra line fetched per id shows, as the loop is bound by lines in flight:
# prefetching the bitmap words ahead (into L1 or L2, 64-192 ids ahead) was worse by 5-9%,
# and so was a pipeline that tests each id's bit at its own position (the word prefetched
# with its W row), appends it branch-free and probes, pools and adds P @ B every 4-16 bags
# (1.26-1.39x against 1.20-1.25x, same run). Even with every id's slot known beforehand
# and no test at all (``by_slot``), the fused loop ran 1.17-1.24x.

#: the rank whose fused kernels keep the pooled A row in registers (others use an array)
FIXED_RANK = 8
#: how far ahead (in ids) the presence bit is tested: with the row prefetch (one id load)
PRESENCE_AHEAD = 64
#: how far ahead the W rows are prefetched, as in the plain kernels (4M x 64 rows, 5%
#: active, 1 thread, fused/plain medians in one process, two runs each, against the plain
#: kernel of the time, which prefetched 64 ahead: Zipf ids 1.264-1.269x at 64 against
#: 1.209-1.234x at 32, uniform 1.134-1.178x against 1.098-1.129x; 24 and 40 no better)
ROW_AHEAD = 32
#: ids past the current bag whose slots are probed (stage 2); less than PRESENCE_AHEAD so
#: the hash lines have had time to arrive
PROBE_AHEAD = 48


def _fused_source(d: int, dtype: np.dtype, presence_ahead: int | None = None, probe_ahead: int | None = None,
                  row_ahead: int | None = None) -> str:
    pfb = PRESENCE_AHEAD if presence_ahead is None else presence_ahead
    pfa = PROBE_AHEAD if probe_ahead is None else probe_ahead
    pf = ROW_AHEAD if row_ahead is None else row_ahead
    assert 0 < pfa < pfb and pfb >= pf
    name = dtype.name
    step = 64 // dtype.itemsize
    lines = -(-d * dtype.itemsize // 64)
    acc = [f"a{k}" for k in range(d)]

    # ids, weights and queue entries are indexed with unsigned integers: numba then
    # emits no negative-index wraparound (a compare, a select and the array length held
    # in a register), which spilled the W loop's registers to the stack
    def row_prefetch(pos):
        # W rows into L2, as the plain kernels (see lukern._kernels.embedding.PREFETCH_DISTANCE):
        # fused Zipf / uniform lookups 0.93 / 2.1 ms -> 0.73 / 1.4 ms (kernel alone, 1 thread)
        code = [f"q = np.uint64(indices[np.uint64({pos})])"] + [f"prefetch_l2(table, q, {c * step})" for c in range(lines)]
        code.append(f"prefetch_l2(table, q, {d - 1})")  # a row not aligned to 64 bytes spans one more line
        return code

    def presence(pos):
        # stage 1: a set bit (rare, so the branch predicts well) queues the position
        # and prefetches the hash lines
        return [f"qb = np.uint64(indices[np.uint64({pos})])",
                "if (bitmap[qb >> np.uint64(6)] >> (qb & np.uint64(63))) & np.uint64(1):",
                f"    qpos[np.uint64(tail & qm)] = {pos}",
                "    tail += 1",
                "    prefetch_probe(keys, vals, mask, qb)"]

    def w_loop(weighted):  # the plain kernel's loop plus stage 1
        body = ["for j in range(s, e):"]
        if pfb == pf:  # one load of the id for both
            body += ["    if j + PF < pf_end:"] + [f"        {x}" for x in row_prefetch("j + PF")]
            body += [f"        {x}" for x in presence("j + PF")[1:]]
            body = [x.replace("qb", "q") for x in body]
        else:
            body += ["    if j + PFB < pf_end:"] + [f"        {x}" for x in presence("j + PFB")]
            body += ["    if j + PF < pf_end:"] + [f"        {x}" for x in row_prefetch("j + PF")]
        body += ["    r = table[np.uint64(indices[np.uint64(j)])]"]
        if weighted:
            body += ["    w = weights[np.uint64(j)]"] + [f"    {a} += w * r[{k}]" for k, a in enumerate(acc)]
        else:
            body += [f"    {a} += r[{k}]" for k, a in enumerate(acc)]
        return body

    def pool_a(fixed):
        # (zero, add, add weighted) for the pooled A row. fixed: the rank the code is
        # written for, with the row in scalars (registers); None: any rank, in the array p
        if fixed:
            return ([f"p{q} = np.{name}(0.0)" for q in range(fixed)], [f"p{q} += A[sl, {q}]" for q in range(fixed)],
                    [f"p{q} += w * A[sl, {q}]" for q in range(fixed)])
        return (["for qq in range(rank):", "    p[qq] = 0"], ["for qq in range(rank):", "    p[qq] += A[sl, qq]"],
                ["for qq in range(rank):", "    p[qq] += w * A[sl, qq]"])

    def finish_bag(code, train, fixed):
        # after pooling: keep P (train), add s * P @ B once per bag (if any id had a row),
        # scale (mean) and store; wrapped in the loop over bags
        if fixed:
            if train:
                code += [f"P_out[b, {q}] = p{q}" for q in range(fixed)]
            code += ["if hit:"]
            for q in range(fixed):
                code += [f"    pq = lscale * p{q}"] + [f"    {a} += pq * B[{q}, {k}]" for k, a in enumerate(acc)]
        else:
            if train:
                code += ["for qq in range(rank):", "    P_out[b, qq] = p[qq]"]
            code += ["if hit:", "    for qq in range(rank):", "        pq = lscale * p[qq]"]
            code += [f"        {a} += pq * B[qq, {k}]" for k, a in enumerate(acc)]
        code += [f"sc = np.{name}(1.0)", "if mode == 1 and e > s:", f"    sc = np.{name}(1.0) / np.{name}(e - s)"]
        code += [f"o[{k}] = {a} * sc" for k, a in enumerate(acc)]
        head_ = ["for b in range(b0, b1):", "    s = offsets[b]", "    e = offsets[b + 1]", "    o = out[b]"]
        return head_ + ["    " + x for x in code]

    def stages(train, fixed):
        zero, add, add_w = pool_a(fixed)
        add = [" " * 8 + x for x in add]
        add_w = [" " * 8 + x for x in add_w]
        return [
            # stage 2: probe the queued ids up to PROBE_AHEAD past the bag (their hash
            # lines were prefetched PF - PROBE_AHEAD ids ago), prefetch their A rows
            "upto = e + PROBE_AHEAD",
            "while mid < tail:",
            "    j = qpos[np.uint64(mid & qm)]",
            "    if j >= upto:",
            "        break",
            "    sl = find_slot(keys, vals, mask, indices[np.uint64(j)])",
            "    qslot[np.uint64(mid & qm)] = sl",
            "    if sl >= 0:",
            "        prefetch(A, sl, 0)",
            "        prefetch(A, sl, rank - 1)",  # a row may straddle two lines
            "    mid += 1",
            # stage 3: the bag's A rows in id order (the order of pool_slots, backward_bags)
        ] + zero + [
            "hit = False",
            "while head < mid:",
            "    j = qpos[np.uint64(head & qm)]",
            "    if j >= e:",
            "        break",
            "    sl = qslot[np.uint64(head & qm)]",
            "    head += 1",
            "    if sl < 0:",
            "        continue",
            "    hit = True",
        ] + (["    slots_out[np.uint64(j)] = sl"] if train else []) + [
            "    if use_w:",
            "        w = weights[np.uint64(j)]",
        ] + add_w + ["    else:"] + add

    def bag(train, fixed):
        code = []
        if train:
            code += ["for j in range(s, e):", "    slots_out[j] = -1"]
        code += [f"{a} = np.{name}(0.0)" for a in acc]
        code += ["if use_w:"] + [f"    {x}" for x in w_loop(True)]
        code += ["else:"] + [f"    {x}" for x in w_loop(False)]
        code += stages(train, fixed)
        return finish_bag(code, train, fixed)

    def bags(train):
        # the common rank gets its own copy of the loop (the pooled row in registers:
        # 5-9% faster on the fused lookup); other ranks use the generic one
        code = [f"if rank == {FIXED_RANK}:"] + ["    " + x for x in bag(train, FIXED_RANK)]
        code += ["else:"] + ["    " + x for x in bag(train, None)]
        return "\n".join(" " * 4 + x for x in code)

    def by_slot_bag(fixed):
        # the slots are known (find_slots ran first): the plain kernel's loop pools the W
        # rows and, in the same pass, the A rows of ids with a slot (prefetched with their
        # W rows), in id order, so the sums are those of lora_train_range (the same bits)
        zero, add, add_w = pool_a(fixed)

        def loop(weighted):
            body = ["for j in range(s, e):", "    if j + PF < pf_end:"]
            body += [f"        {x}" for x in row_prefetch("j + PF")]
            body += ["        qs = slots[np.uint64(j + PF)]", "        if qs >= 0:", "            prefetch(A, qs, 0)",
                     "            prefetch(A, qs, rank - 1)"]
            body += ["    r = table[np.uint64(indices[np.uint64(j)])]"]
            if weighted:
                body += ["    w = weights[np.uint64(j)]"] + [f"    {a} += w * r[{k}]" for k, a in enumerate(acc)]
            else:
                body += [f"    {a} += r[{k}]" for k, a in enumerate(acc)]
            body += ["    sl = slots[np.uint64(j)]", "    if sl >= 0:", "        hit = True"]
            return body + [f"        {x}" for x in (add_w if weighted else add)]

        code = [f"{a} = np.{name}(0.0)" for a in acc] + zero + ["hit = False"]
        code += ["if use_w:"] + [f"    {x}" for x in loop(True)] + ["else:"] + [f"    {x}" for x in loop(False)]
        return finish_bag(code, True, fixed)

    def by_slot_function():
        prologue = [f"    {x}" for x in row_prefetch("j")]
        prologue += ["    qs = slots[np.uint64(j)]", "    if qs >= 0:", "        prefetch(A, qs, 0)"]
        code = ["if b1 <= b0:", "    return", "pf_end = offsets[b1]", "rank = A.shape[1]", "p = np.zeros(rank, A.dtype)",
                "j0 = offsets[b0]", "for j in range(j0, min(j0 + PF, pf_end)):"] + prologue
        code += [f"if rank == {FIXED_RANK}:"] + ["    " + x for x in by_slot_bag(FIXED_RANK)]
        code += ["else:"] + ["    " + x for x in by_slot_bag(None)]
        body = "\n".join(" " * 4 + x for x in code)
        return f"""
@njit(nogil=True, cache=True)
def lora_slots_range(table, indices, offsets, weights, use_w, mode, out, b0, b1, slots, A, B, lscale, P_out):
{body}
"""

    def function(fname, extra, train):
        prologue = "\n".join(" " * 8 + x for x in row_prefetch("j"))
        prologue_b = "\n".join(" " * 8 + x for x in presence("j"))
        return f"""
@njit(nogil=True, cache=True)
def {fname}(table, indices, offsets, weights, use_w, mode, out, b0, b1, keys, vals, mask, bitmap, A, B, lscale{extra}):
    if b1 <= b0:
        return
    pf_end = offsets[b1]
    rank = A.shape[1]
    p = np.zeros(rank, A.dtype)
    # the queue holds the set-bit positions from the current bag's first id to PFB ids
    # past its last: room for the longest bag plus PFB
    longest = 0
    for b in range(b0, b1):
        longest = max(longest, offsets[b + 1] - offsets[b])
    qm = 1
    while qm < longest + PFB:
        qm = 2 * qm + 1
    qpos = np.empty(qm + 1, np.int64)  # positions of the ids whose presence bit is set
    qslot = np.empty(qm + 1, np.int64)  # their slots (-1: bit set, row not in the hash)
    tail = 0  # queue entries appended, probed, pooled
    mid = 0
    head = 0
    j0 = offsets[b0]
    for j in range(j0, min(j0 + PF, pf_end)):
{prologue}
    for j in range(j0, min(j0 + PFB, pf_end)):
{prologue_b}
{bags(train)}
"""

    return f'''"""lukern fused LoRA lookup for d={d}, {name}: generated by lukern._kernels.lora.

``lora_train_range`` is ``lora_bag_range`` that also keeps every id's slot and every
bag's pooled A row (unscaled) for the backward; ``lora_slots_range`` computes what it
does from slots found beforehand (``find_slots``)."""
import numpy as np
from numba import njit, prange

from lukern._kernels._intrinsics import prefetch, prefetch_l2
from lukern._kernels.lora import find_slot, prefetch_probe

PF = {pf}
PFB = {pfb}
PROBE_AHEAD = {pfa}
{function("lora_bag_range", "", False)}
{function("lora_train_range", ", slots_out, P_out", True)}
{by_slot_function()}

@njit(nogil=True, parallel=True, cache=True)
def lora_bag_parallel(table, indices, offsets, weights, use_w, mode, out, chunk, keys, vals, mask, bitmap, A, B,
                      lscale):
    n = out.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    for c in prange(n_chunks):
        b0 = c * chunk
        lora_bag_range(table, indices, offsets, weights, use_w, mode, out, b0, min(n, b0 + chunk), keys, vals,
                       mask, bitmap, A, B, lscale)
'''


class FusedKernels:
    """The fused lookup of one (width, dtype): ``range`` (bags [b0, b1), serial) and
    ``parallel`` (prange over chunks). Arguments: the plain kernel's, then the adapter
    state ``keys, vals, mask, bitmap, A, B, scale``. ``train`` is ``range`` that also
    writes the slots (n_ids) and the pooled A rows (n_bags x r, table dtype).
    ``by_slot`` computes ``train``'s output and pooled rows, the same bits, from the
    slots :func:`find_slots` wrote: arguments the plain kernel's, then
    ``slots, A, B, scale, P``."""

    __slots__ = ("range", "parallel", "train", "by_slot")

    def __init__(self, range_kernel, parallel_kernel, train_kernel, by_slot_kernel):
        self.range = range_kernel
        self.parallel = parallel_kernel
        self.train = train_kernel
        self.by_slot = by_slot_kernel


_FUSED: dict = {}


def fused_kernels(d: int, dtype):
    """Fused kernels for width ``d`` and ``dtype`` (any spelling), or None for widths
    without a specialised kernel (the correction then runs as a second pass)."""
    key = (d, dtype)
    ks = _FUSED.get(key, False)  # the serving path: one dict probe
    if ks is False:
        ks = _FUSED[key] = _fused_kernels(int(d), np.dtype(dtype).name)
    return ks


@functools.lru_cache(maxsize=None)
def _fused_kernels(d: int, dtype: str):
    from ._codegen import load_generated, with_slp
    from .embedding import SPECIALISED_DIMS

    if d not in SPECIALISED_DIMS:
        return None
    m = load_generated(f"lora_d{d}_{dtype}", _fused_source(d, np.dtype(dtype)))
    return FusedKernels(with_slp(m.lora_bag_range), with_slp(m.lora_bag_parallel), with_slp(m.lora_train_range),
                        with_slp(m.lora_slots_range))


@njit(nogil=True, cache=True)
def count_nonfinite_bits(u, m):
    """Number of elements of ``u`` (the bits of a float array, ravelled) whose exponent
    bits ``m`` are all set (Inf or NaN). No early exit and integer sums only, so LLVM
    vectorizes it (the early-exit float test ran at ~3 ns per element)."""
    n = 0
    for i in range(u.shape[0]):
        n += (u[i] & m) == m
    return n


_EXP_BITS = {np.dtype(np.float32): (np.uint32, np.uint32(0x7F800000)),
             np.dtype(np.float64): (np.uint64, np.uint64(0x7FF0000000000000))}


def all_finite(x) -> bool:
    """Whether the array ``x`` holds no NaN or Inf: for a contiguous float32/float64 array
    one pass over its bits with no temporary, else numpy's ``isfinite``."""
    bits = _EXP_BITS.get(x.dtype)
    if bits is None or not x.flags.c_contiguous:
        return bool(np.isfinite(x).all())
    ut, m = bits
    return count_nonfinite_bits(x.reshape(-1).view(ut), m) == 0
