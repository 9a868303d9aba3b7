"""One table's LoRA backward, eviction, optimizer-state seeding and A step in one call.

:class:`lukern.lora_batch.BatchedTrainer` calls :func:`train_table` once per table and
mini-batch instead of ``LoRAAdapter.backward`` + ``step`` (about 15 Python-level calls,
validations and temporaries each). It runs the admission, eviction and optimizer kernels
of :mod:`lukern._kernels.lora` in the order the adapter's methods run them; the gradients
come from :func:`row_grads` (one-id bags: each touched row's gradient summed before it
is multiplied by B, the results equal to the adapter's up to float rounding) or, for
long bags, from the adapter's own bag kernel (the same bits). ``tests/test_lora_batch.py``
compares them: the same slots, admissions and evictions, the values within rounding.

Contract (the wrapper checks it): ``grad`` is finite; the adapter has no pending gradients (``n_u == 0``,
every ``local`` entry -1); ids are in [0, n_rows); ``grad`` is (n_bags, d) with contiguous rows;
``G`` has at least ``min(n_ids, capacity)`` rows; ``dB`` is a zeroed (r, d) float64
array that receives B's gradient; B's step goes to new arrays (B is replaced, not
written in place, because lookups may be reading it). Eviction is least recently used
with ties broken by the lowest slot (:class:`lukern.lora_batch.StableLRU`).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ._intrinsics import prefetch
from .checks import first_non_finite
from .lora import (FIXED_RANK, assign_slots, backward_bags, backward_bags_kernel, bag_factor, drop_pending,
                   evict_slots, fold_rows, reset_local, rowwise_adagrad_a, scatter_grad_a, sgd_a, sum_parts)

#: the adapters' rank-8 bag kernel (generated, pooled rows in registers), for the by-bag
#: backward
_BAGS_FIXED = backward_bags_kernel(FIXED_RANK)

#: :func:`train_table`'s backward: chosen by operation count, or forced
AUTO, BY_ROW, BY_BAG = 0, 1, 2

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


#: reassociation lets LLVM vectorise the d-long dot products of ``S_i B^T`` (19 -> 11 us
#: for 1024 Zipf ids on 270 rows, d = 16, r = 8); the order is fixed per build, so the
#: results stay deterministic. No ``nnan``/``ninf``: the caller checks the output for them.
_REASSOC = {"reassoc", "contract"}

#: touched rows ahead whose A row :func:`row_grads` prefetches (they are scattered)
_ROWS_AHEAD = 8


@njit(nogil=True, inline="always", cache=True)
def _row_sums(pend, offsets, mode, grad, scale, n_u):
    """``S_i = sum of s f_b g_b`` over the ids of pending row i, in id order (float64)."""
    d = grad.shape[1]
    S = np.zeros((n_u, d))
    for b in range(offsets.shape[0] - 1):
        f = bag_factor(offsets, b, mode, scale)
        for j in range(offsets[b], offsets[b + 1]):
            li = pend[j]
            if li >= 0:
                for k in range(d):
                    S[li, k] += f * grad[b, k]
    return S


@njit(nogil=True, cache=True, fastmath=_REASSOC)
def row_grads(pend, offsets, mode, grad, A, uniq, B, scale, n_u, G, dB):
    """The backward by pending row instead of by bag.

    ``S_i = sum of s f_b g_b`` over the ids j of pending row i (``pend[j] == i``, in id
    order, float64) gives ``G_i = S_i B^T`` (A's gradient) and ``dB = sum_i A_i^T S_i``
    (in row order), which is what summing ``U_b = s f_b g_b B^T`` and ``P_b^T g_b`` over
    bags gives, with one r x d product per touched row instead of two per bag: a
    mini-batch of Zipf ids touches a few rows many times (1024 ids, ~270 rows).
    ``dB`` (r, d) float64 is added to.

    Measured (EPYC VM, 1024 one-id Zipf bags over 20k rows, d = 16, r = 8): the bag
    kernel took 33 us of a table's 52 us step with warm caches, this one 11 us; a
    BatchedTrainer step over 26 such tables takes 1.34 ms against 2.41 ms by bag
    (``python -m lukern.bench lora``, same run); with 4 serving requests before each
    step (the sidecar's case, caches cold; a throwaway script) 1.74-1.84 against 2.41 ms."""
    d = grad.shape[1]
    r = B.shape[0]
    S = _row_sums(pend, offsets, mode, grad, scale, n_u)
    for i in range(n_u):
        if i + _ROWS_AHEAD < n_u:
            prefetch(A, uniq[i + _ROWS_AHEAD], 0)
        for q in range(r):
            acc = 0.0
            for k in range(d):
                acc += S[i, k] * np.float64(B[q, k])
            G[i, q] = acc
        sl = uniq[i]
        for q in range(r):
            aq = np.float64(A[sl, q])
            for k in range(d):
                dB[q, k] += aq * S[i, k]


def _row_grads_source(r: int) -> str:
    """Source of :func:`row_grads` written for rank ``r``: the same sums (``dB`` in the
    same order, the same bits; ``G_i``'s d-long dot products, which both kernels may
    reassociate, within float64 rounding), with the ``r`` entries of ``G_i`` and ``A_i`` in scalars
    and ``dB`` summed into a (d, r) array, so each of the d steps is an r-wide vector
    operation. :func:`row_grads` left LLVM r dot products and r d-long updates per row,
    which it did not vectorise (all scalar FMAs): 23 -> 13 us for 1024 Zipf ids on
    485 rows, d = 16, r = 8 (EPYC VM, warm, medians)."""
    qs = range(r)
    body = ["d = grad.shape[1]", "S = _row_sums(pend, offsets, mode, grad, scale, n_u)",
            f"Bt = np.empty((d, {r}))", f"Dt = np.zeros((d, {r}))", "for k in range(d):"]
    body += [f"    Bt[k, {q}] = B[{q}, k]" for q in qs]
    body += ["for i in range(n_u):", "    if i + _ROWS_AHEAD < n_u:", "        prefetch(A, uniq[i + _ROWS_AHEAD], 0)",
             "    sl = uniq[i]"]
    body += [f"    a{q} = np.float64(A[sl, {q}])" for q in qs]
    body += ["    " + " = ".join(f"u{q}" for q in qs) + " = 0.0", "    for k in range(d):", "        s = S[i, k]"]
    body += [f"        u{q} += s * Bt[k, {q}]" for q in qs]
    body += [f"        Dt[k, {q}] += a{q} * s" for q in qs]
    body += [f"    G[i, {q}] = u{q}" for q in qs]
    body += ["for k in range(d):"] + [f"    dB[{q}, k] += Dt[k, {q}]" for q in qs]
    code = "\n".join("    " + x for x in body)
    return f'''"""lukern LoRA backward by touched row for rank {r}: generated by lukern._kernels.lora_batch."""
import numpy as np
from numba import njit

from lukern._kernels._intrinsics import prefetch
from lukern._kernels.lora_batch import _ROWS_AHEAD, _row_sums


@njit(nogil=True, cache=True, fastmath=set({sorted(_REASSOC)!r}))
def row_grads_fixed(pend, offsets, mode, grad, A, uniq, B, scale, n_u, G, dB):
{code}
'''


@functools.lru_cache(maxsize=None)
def row_grads_kernel(r: int):
    """:func:`row_grads` written for rank ``r`` (same arguments and results, see
    :func:`_row_grads_source`)."""
    from ._codegen import load_generated, with_slp

    return with_slp(load_generated(f"lora_row_grads_r{r}", _row_grads_source(int(r))).row_grads_fixed)


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


#: the common rank's by-row backward (generated, G_i and A_i in registers)
_ROW_GRADS_FIXED = row_grads_kernel(FIXED_RANK)


@njit(nogil=True, cache=True)
def train_table(indices, offsets, grad, mode, keys, vals, mask, bitmap, slot_row, last_step, A, acc_a, B, acc_b,
                scale, fold_scale, free, n_free, local, uniq, G, step, evict_min, table, prior, use_prior, opt_a, opt_b,
                lr_a, lr_b, wd, eps, chunk, dB, B_new, acc_b_new, evict=True, path=AUTO):
    """Backward + optimizer step of one adapter for one batch (see the module docstring).

    ``opt_a``: 0 row-wise Adagrad, 1 SGD; ``opt_b``: 0 Adagrad, 1 SGD. B and its
    accumulator are written to ``B_new`` and ``acc_b_new`` (the caller swaps them in).
    ``evict_min``: slots freed at least when the free slots run out
    (``int(capacity * evict_fraction)``). ``prior``: per-row starting
    Adagrad accumulator for slots whose accumulator is 0 (``use_prior``).

    ``evict=False``: rows that find no free slot are dropped (``LoRAAdapter.backward``
    with ``table=None``); ``table`` is then never touched (may be empty).

    The backward runs by touched row (:func:`row_grads`) or by bag (the adapter's own
    bag kernel, B's gradient summed in chunks of ``chunk`` bags), whichever takes fewer
    operations: by row for one-id bags (a DLRM's categorical features), by bag for long
    bags, whose per-id scatter of d-wide gradients would cost more than the r x d
    products it saves. ``path`` forces one.

    Returns ``(status, n_free, evicted, dropped, n_evicted)``: ``evicted`` is True when
    the slots ran out and the policy ran (the adapter's version moves then, even if it
    freed nothing); ``dB`` holds B's gradient when status is OK.
    """
    n_ids = indices.shape[0]
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
    n_bags = offsets.shape[0] - 1
    by_row = path == BY_ROW or (path == AUTO and n_ids * d + 2 * n_u * r * d <= 2 * n_bags * r * d + n_ids * r)
    if by_row:
        if r == FIXED_RANK:
            _ROW_GRADS_FIXED(pend, offsets, mode, grad, A, uniq, B, scale, n_u, G, dB)
        else:
            row_grads(pend, offsets, mode, grad, A, uniq, B, scale, n_u, G, dB)
    else:
        U = np.empty((n_bags, r), np.float64)
        n_chunks = (n_bags + chunk - 1) // chunk
        parts = np.empty((n_chunks, r, d), np.float64)
        Bt = np.ascontiguousarray(B.T).astype(np.float64)
        no_w = np.empty(0, A.dtype)
        no_p = np.empty((0, r), A.dtype)
        if r == FIXED_RANK:
            _BAGS_FIXED(slots, offsets, no_w, False, mode, grad, A, B, Bt, scale, U, parts, chunk, 0, n_chunks, no_p,
                        False)
        else:
            backward_bags(slots, offsets, no_w, False, mode, grad, A, B, Bt, scale, U, parts, chunk, 0, n_chunks, no_p,
                          False)
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
    """``ok[t]`` = every value of ``grad[t]`` (n_tables x n_bags x d, rows contiguous,
    the other axes possibly strided) is finite. The per-table pass (~150 us for 26 x 1024
    x 16 float32): the wrapper first checks the whole batch in one pass where its memory
    is contiguous, and comes here only when that finds a NaN or Inf, or cannot run."""
    for t in range(grad.shape[0]):
        good = True
        for b in range(grad.shape[1]):
            row = grad[t, b]
            for k in range(row.shape[0]):
                good &= np.abs(row[k]) < np.inf  # False for NaN and +-Inf
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
