"""One table's LoRA backward, eviction, optimizer-state seeding and A step in one call.

:class:`lukern.lora_batch.BatchedTrainer` calls :func:`train_table` once per table and
mini-batch instead of ``LoRAAdapter.backward`` + ``step`` (about 15 Python-level calls,
validations and temporaries each). It composes the kernels of
:mod:`lukern._kernels.lora` in the order the adapter's methods run them, so the results
are the same bits (``tests/test_lora_batch.py`` compares them).

Contract (the wrapper checks it): ``grad`` is finite; the adapter has no pending gradients (``n_u == 0``,
every ``local`` entry -1); ids are in [0, n_rows); ``grad`` is (n_bags, d), C-contiguous;
``G`` has at least ``min(n_ids, capacity)`` rows; ``dB`` is a zeroed (r, d) float64
array that receives B's gradient; B's step goes to new arrays (B is replaced, not
written in place, because lookups may be reading it). Eviction is least recently used
with ties broken by the lowest slot (:class:`lukern.lora_batch.StableLRU`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .checks import first_non_finite
from .lora import (FIXED_RANK, assign_slots, backward_bags_kernel, drop_pending, evict_slots, fold_rows, reset_local,
                   rowwise_adagrad_a, scatter_grad_a, sgd_a, sum_parts)

#: the adapters' own rank-8 bag kernel (generated, pooled rows in registers): the same
#: bits as :func:`bag_grads`, 38 against 53 us for 1024 one-id bags (d = 16)
_BAGS_FIXED = backward_bags_kernel(FIXED_RANK)

#: status codes of :func:`train_table`
OK = 0
BAD_STEP = 1      # the accumulated gradients not finite: rows admitted, no step


@njit(nogil=True, cache=True)
def stable_lru(slot_row, last_step, step, n):
    """The slots :class:`StableLRU` evicts, ascending: among active slots not touched at
    ``step`` (all active slots when fewer than ``n`` of those), the ``n`` with the
    smallest ``(last_step, slot)``. No sort: ``last_step`` is a small integer range, so
    a histogram finds the last step value v that is taken; every candidate older than v
    is taken, and those at v in slot order until ``n``."""
    cap = slot_row.shape[0]
    n_active = 0
    n_older = 0
    lo = step
    hi = -1
    for s in range(cap):
        if slot_row[s] >= 0:
            n_active += 1
            ls = last_step[s]
            if ls < step:
                n_older += 1
            lo = min(lo, ls)
            hi = max(hi, ls)
    use_older = n_older >= n
    m = n_older if use_older else n_active
    take = min(n, m)
    out = np.empty(take, np.int64)
    if take == 0:
        return out
    counts = np.zeros(hi - lo + 1, np.int64)
    for s in range(cap):
        if slot_row[s] >= 0 and (last_step[s] < step or not use_older):
            counts[last_step[s] - lo] += 1
    below = 0  # candidates strictly older than the threshold value v
    v = 0
    while below + counts[v] < take:
        below += counts[v]
        v += 1
    at_v = take - below  # taken among those with last_step == lo + v, lowest slots first
    k = 0
    for s in range(cap):
        if slot_row[s] >= 0 and (last_step[s] < step or not use_older):
            ls = last_step[s] - lo
            if ls < v:
                out[k] = s
                k += 1
            elif ls == v and at_v > 0:
                out[k] = s
                k += 1
                at_v -= 1
    return out


@njit(nogil=True, cache=True)
def _pool_dB(slots, offsets, A, grad, b, f, p, dBc):
    """``dBc += f P_b^T g_b`` with ``P_b`` pooled in A's dtype (as backward_bags does)."""
    r = p.shape[0]
    d = grad.shape[1]
    for q in range(r):
        p[q] = 0.0
    for j in range(offsets[b], offsets[b + 1]):
        sl = slots[j]
        if sl >= 0:
            w = 1.0
            for q in range(r):
                p[q] += w * A[sl, q]
    g = grad[b]
    for q in range(r):
        pq = f * p[q]
        if pq != 0.0:
            for k in range(d):
                dBc[q, k] += pq * g[k]


@njit(nogil=True, inline="always", cache=True)
def _pool_into(slots, offsets, A, b, p):
    """``p = P_b`` (the bag's A rows summed in A's dtype, as backward_bags does)."""
    for q in range(p.shape[0]):
        p[q] = 0.0
    for j in range(offsets[b], offsets[b + 1]):
        sl = slots[j]
        if sl >= 0:
            w = 1.0
            for q in range(p.shape[0]):
                p[q] += w * A[sl, q]


@njit(nogil=True, cache=True)
def _pool_dB2(slots, offsets, A, grad, b, f0, f1, p0, p1, dBc):
    """:func:`_pool_dB` for bags ``b`` then ``b + 1`` in one pass over ``dBc``: each
    element gets the two products in bag order, as two calls would add them. Adding a
    zero product (which :func:`_pool_dB` skips) changes no bit: ``grad`` is finite, and
    a sum started at +0.0 never becomes -0.0, so ``x + (+-0.0) == x`` exactly."""
    _pool_into(slots, offsets, A, b, p0)
    _pool_into(slots, offsets, A, b + 1, p1)
    g0 = grad[b]
    g1 = grad[b + 1]
    d = grad.shape[1]
    for q in range(p0.shape[0]):
        a0 = f0 * p0[q]
        a1 = f1 * p1[q]
        if a0 == 0.0 and a1 == 0.0:
            continue
        for k in range(d):
            dBc[q, k] = (dBc[q, k] + a0 * g0[k]) + a1 * g1[k]


@njit(nogil=True, cache=True)
def bag_grads(slots, offsets, mode, grad, A, Bt, scale, U, dB_parts, chunk):
    """:func:`lukern._kernels.lora.backward_bags` without weights or a kept ``P``, with
    the same float64 operations in the same order (so the same bits), arranged for the
    CPU: ``g_b B^T`` runs on two bags and four columns of B at once in sixteen scalar
    accumulators (eight independent chains instead of one, kept in registers), B's
    columns padded to a multiple of four with zeros whose lanes are dropped."""
    d, r = Bt.shape
    n_bags = offsets.shape[0] - 1
    rq = (r + 3) // 4 * 4
    Bp = np.zeros((d, rq))
    for k in range(d):
        for q in range(r):
            Bp[k, q] = Bt[k, q]
    p = np.empty(r, A.dtype)
    p1 = np.empty(r, A.dtype)
    for c in range(dB_parts.shape[0]):
        dBc = dB_parts[c]
        for q in range(r):
            for k in range(d):
                dBc[q, k] = 0.0
        end = min(n_bags, (c + 1) * chunk)
        for b in range(c * chunk, end, 2):
            two = b + 1 < end
            b1 = b + 1 if two else b  # an odd last bag: lane 1 recomputes it, unused
            f0 = scale
            if mode == 1 and offsets[b + 1] > offsets[b]:
                f0 = scale / (offsets[b + 1] - offsets[b])
            f1 = scale
            if mode == 1 and offsets[b1 + 1] > offsets[b1]:
                f1 = scale / (offsets[b1 + 1] - offsets[b1])
            for q0 in range(0, rq, 4):
                x0 = x1 = x2 = x3 = y0 = y1 = y2 = y3 = 0.0
                for k in range(d):
                    g0 = np.float64(grad[b, k])
                    g1 = np.float64(grad[b1, k])
                    c0 = Bp[k, q0]
                    c1 = Bp[k, q0 + 1]
                    c2 = Bp[k, q0 + 2]
                    c3 = Bp[k, q0 + 3]
                    x0 += g0 * c0
                    x1 += g0 * c1
                    x2 += g0 * c2
                    x3 += g0 * c3
                    y0 += g1 * c0
                    y1 += g1 * c1
                    y2 += g1 * c2
                    y3 += g1 * c3
                m = min(4, r - q0)
                for jj in range(m):
                    xv = x0 if jj == 0 else (x1 if jj == 1 else (x2 if jj == 2 else x3))
                    U[b, q0 + jj] = f0 * xv
                    if two:
                        yv = y0 if jj == 0 else (y1 if jj == 1 else (y2 if jj == 2 else y3))
                        U[b1, q0 + jj] = f1 * yv
            if two:
                _pool_dB2(slots, offsets, A, grad, b, f0, f1, p, p1, dBc)
            else:
                _pool_dB(slots, offsets, A, grad, b, f0, p, dBc)


@njit(nogil=True, cache=True)
def step_b(dB, B, acc_b, adagrad, lr, wd, eps, B_new, acc_new):
    """B's optimizer into new arrays, as :meth:`LoRAAdapter.step` computes it with numpy,
    operation for operation in the same precisions (so the same bits): ``g = dB + wd B``
    (``wd B`` in B's dtype, the sum in float64); Adagrad adds ``g^2`` rounded to B's dtype
    to the accumulator in B's dtype and divides by ``sqrt(acc) + eps`` computed in B's
    dtype; the float64 step is subtracted in float64 and rounded to B's dtype."""
    r, d = B.shape
    one = np.empty(1, B.dtype)  # rounds a float64 to B's dtype
    one[0] = wd
    wd_t = one[0]
    one[0] = eps
    eps_t = one[0]
    for q in range(r):
        for k in range(d):
            g = dB[q, k] + np.float64(wd_t * B[q, k])
            if adagrad:
                one[0] = g * g
                a = acc_b[q, k] + one[0]
                acc_new[q, k] = a
                den = np.sqrt(a) + eps_t
                B_new[q, k] = np.float64(B[q, k]) - lr * g / np.float64(den)
            else:
                acc_new[q, k] = acc_b[q, k]
                B_new[q, k] = np.float64(B[q, k]) - lr * g


@njit(nogil=True, cache=True)
def train_table(indices, offsets, grad, mode, keys, vals, mask, bitmap, slot_row, last_step, A, acc_a, B, acc_b,
                scale, fold_scale, free, n_free, local, uniq, G, step, evict_min, table, prior, use_prior, opt_a, opt_b,
                lr_a, lr_b, wd, eps, chunk, dB, B_new, acc_b_new, evict=True):
    """Backward + optimizer step of one adapter for one batch (see the module docstring).

    ``opt_a``: 0 row-wise Adagrad, 1 SGD; ``opt_b``: 0 Adagrad, 1 SGD. B and its
    accumulator are written to ``B_new`` and ``acc_b_new`` (the caller swaps them in). ``evict_min``: slots freed at least when the
    free slots run out (``int(capacity * evict_fraction)``). ``prior``: per-row starting
    Adagrad accumulator for slots whose accumulator is 0 (``use_prior``).

    ``evict=False``: rows that find no free slot are dropped (``LoRAAdapter.backward``
    with ``table=None``); ``table`` is then never touched (may be empty).

    Returns ``(status, n_free, evicted, dropped, n_evicted)``: ``evicted`` is True when
    the slots ran out and the policy ran (the adapter's version moves then, even if it
    freed nothing); ``dB`` holds B's gradient when status is OK.
    """
    n_ids = indices.shape[0]
    n_bags = offsets.shape[0] - 1
    slots = np.empty(n_ids, np.int64)
    pend = np.empty(n_ids, np.int32)
    known = np.empty(0, np.int64)
    n_u = 0
    n_free, n_u, missed = assign_slots(indices, keys, vals, mask, bitmap, slot_row, last_step, free, n_free, step,
                                       slots, local, uniq, n_u, G, known, False, pend)
    n_evicted = 0
    evicted = evict and missed > 0
    if evicted:
        ev = stable_lru(slot_row, last_step, step, max(missed, evict_min))
        fold_rows(table, A, B, fold_scale, slot_row, ev)
        n_u = drop_pending(ev, local, uniq, G, n_u)
        before = n_free
        n_free = evict_slots(keys, vals, mask, bitmap, slot_row, A, acc_a, last_step, ev, free, n_free)
        n_evicted = n_free - before
        n_free, n_u, missed = assign_slots(indices, keys, vals, mask, bitmap, slot_row, last_step, free, n_free,
                                           step, slots, local, uniq, n_u, G, known, False, pend)
    r, d = B.shape
    U = np.empty((n_bags, r), np.float64)
    n_chunks = (n_bags + chunk - 1) // chunk
    parts = np.empty((n_chunks, r, d), np.float64)
    Bt = np.ascontiguousarray(B.T).astype(np.float64)
    no_w = np.empty(0, A.dtype)
    if r == FIXED_RANK:
        _BAGS_FIXED(slots, offsets, no_w, False, mode, grad, A, B, Bt, scale, U, parts, chunk, 0, n_chunks,
                    np.empty((0, r), A.dtype), False)
    else:
        bag_grads(slots, offsets, mode, grad, A, Bt, scale, U, parts, chunk)
    sum_parts(parts, dB)
    scatter_grad_a(pend, offsets, no_w, False, U, G, 0, n_u)
    if use_prior:
        for s in range(slot_row.shape[0]):
            if acc_a[s] == 0 and slot_row[s] >= 0:
                acc_a[s] = prior[slot_row[s]]
    if first_non_finite(G[:n_u]) >= 0 or first_non_finite(dB) >= 0:
        reset_local(local, uniq, n_u)
        return BAD_STEP, n_free, evicted, missed, n_evicted
    if opt_a == 0:
        rowwise_adagrad_a(A, acc_a, uniq, G, lr_a, wd, eps, 0, n_u)
    else:
        sgd_a(A, uniq, G, lr_a, wd, 0, n_u)
    step_b(dB, B, acc_b, opt_b == 0, lr_b, wd, eps, B_new, acc_b_new)
    reset_local(local, uniq, n_u)
    return OK, n_free, evicted, missed, n_evicted


@njit(nogil=True, cache=True)
def finite_tables(grad, ok):
    """``ok[t]`` = every value of ``grad[t]`` (n_tables x ...) is finite. One pass with
    no early exit, so that it vectorises (a finite batch is the common case)."""
    for t in range(grad.shape[0]):
        flat = grad[t].ravel()
        good = True
        for i in range(flat.shape[0]):
            good &= np.abs(flat[i]) < np.inf  # False for NaN and +-Inf
        ok[t] = good


@njit(nogil=True, cache=True)
def first_bad_id(indices, n_rows):
    """(table, position) of the first id of row t of ``indices`` (n_tables x n_ids)
    outside [0, n_rows[t]); tables with ``n_rows[t] < 0`` are skipped. (-1, -1) if none."""
    for t in range(indices.shape[0]):
        n = n_rows[t]
        if n < 0:
            continue
        bad = False
        for j in range(indices.shape[1]):  # branch-free pass; locate only on failure
            v = indices[t, j]
            bad |= (v < 0) | (v >= n)
        if bad:
            for j in range(indices.shape[1]):
                if indices[t, j] < 0 or indices[t, j] >= n:
                    return t, j
    return -1, -1
