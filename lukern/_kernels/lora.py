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
def backward_bags(slots, offsets, weights, use_w, mode, grad, A, B, scale, U, dB_parts, chunk, c0, c1):
    """Bag side of the backward for chunks [c0, c1) of ``chunk`` bags:
    ``U[b] = s f_b g_b B^T`` and ``dB_parts[c] = s sum_b f_b P_b^T g_b`` with
    ``P_b = sum_j w_j A[slots[j]]`` (slot -1 adds nothing) and ``f_b`` = 1, or
    1 / len(b) in mean mode. Float64 sums; the chunks are fixed by ``chunk``, not by the
    thread count, so summing ``dB_parts`` in chunk order gives the same bits however
    the chunks were spread over threads."""
    r, d = B.shape
    n_bags = offsets.shape[0] - 1
    p = np.empty(r)
    for c in range(c0, c1):
        dBc = dB_parts[c]
        for q in range(r):
            for k in range(d):
                dBc[q, k] = 0.0
        for b in range(c * chunk, min(n_bags, (c + 1) * chunk)):
            s = offsets[b]
            e = offsets[b + 1]
            f = scale
            if mode == 1 and e > s:
                f = scale / (e - s)
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
                u = 0.0
                for k in range(d):
                    u += g[k] * B[q, k]
                U[b, q] = f * u
                pq = f * p[q]
                if pq != 0.0:
                    for k in range(d):
                        dBc[q, k] += pq * g[k]


@njit(nogil=True, cache=True)
def sum_parts(parts, out):
    """``out += sum_c parts[c]`` in chunk order (the deterministic merge)."""
    for c in range(parts.shape[0]):
        pc = parts[c]
        for q in range(out.shape[0]):
            for k in range(out.shape[1]):
                out[q, k] += pc[q, k]


@njit(nogil=True, cache=True)
def group_ids(slots, offsets, local, uniq, n_u, G, blocal, border, bstart, perm_j, perm_b):
    """Counting sort of the ids that have a slot by slot, stable (id order inside a group):
    group ``i`` is slot ``border[i]``, its ids ``perm_j[bstart[i]:bstart[i + 1]]`` (bags in
    ``perm_b``). Slots not pending yet join the pending list (``local``/``uniq``, their
    ``G`` row zeroed). ``blocal`` (capacity, all -1 on entry) numbers the groups; the
    reduction resets it. Returns (new pending count, number of groups)."""
    r = G.shape[1]
    nb = 0
    for j in range(slots.shape[0]):
        sl = slots[j]
        if sl < 0:
            continue
        bi = blocal[sl]
        if bi < 0:
            bi = nb
            blocal[sl] = bi
            border[bi] = sl
            bstart[bi + 1] = 0
            nb += 1
            if local[sl] < 0:
                local[sl] = n_u
                uniq[n_u] = sl
                for q in range(r):
                    G[n_u, q] = 0
                n_u += 1
        bstart[bi + 1] += 1
    bstart[0] = 0
    for i in range(nb):
        bstart[i + 1] += bstart[i]
    # bstart[i] doubles as group i's fill cursor; shifted back afterwards
    for b in range(offsets.shape[0] - 1):
        for j in range(offsets[b], offsets[b + 1]):
            sl = slots[j]
            if sl >= 0:
                bi = blocal[sl]
                t = bstart[bi]
                perm_j[t] = j
                perm_b[t] = b
                bstart[bi] = t + 1
    for i in range(nb, 0, -1):
        bstart[i] = bstart[i - 1]
    bstart[0] = 0
    return n_u, nb


@njit(nogil=True, cache=True)
def reduce_groups(border, bstart, perm_j, perm_b, weights, use_w, U, local, G, blocal, i0, i1):
    """``G[local[slot]] += sum_j w_j U[bag(j)]`` for groups [i0, i1), each summed in id
    order by one caller (float64), so any split of the groups over threads gives the
    serial result bit for bit. Resets ``blocal`` of the groups' slots."""
    r = U.shape[1]
    acc = np.empty(r)
    for i in range(i0, i1):
        sl = border[i]
        for q in range(r):
            acc[q] = 0.0
        for t in range(bstart[i], bstart[i + 1]):
            w = weights[perm_j[t]] if use_w else 1.0
            b = perm_b[t]
            for q in range(r):
                acc[q] += w * U[b, q]
        li = local[sl]
        for q in range(r):
            G[li, q] += acc[q]
        blocal[sl] = -1


@njit(nogil=True, cache=True)
def rowwise_adagrad_a(A, acc, uniq, G, lr, wd, eps, i0, i1):
    """Row-wise Adagrad for pending rows [i0, i1): one accumulator per slot, the mean
    squared gradient of the row (the DLRM standard)."""
    r = A.shape[1]
    for i in range(i0, i1):
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


# --- fused lookup: generated per width ---------------------------------------------------

#: bags per block of the fused lookup. Each block first collects, without branches, the
#: ids whose presence bit is set, probes the hash for them in a tight loop (hash lines
#: prefetched ``PROBE_PREFETCH`` candidates ahead, A rows prefetched as found), then runs
#: the W pass, which takes the A rows from that list: the W loop keeps no data-dependent
#: branch (a mispredicted "is active" test in it cost about 0.2x of a plain lookup, as the
#: flushed speculative row loads had to be reissued). 32 and 64 measured the same.
FUSED_BLOCK_BAGS = 64
#: ids per block at most (a longer bag gets a block, and a scratch, of its own)
FUSED_BLOCK_IDS = 4096
#: hash-line prefetch distance of the probe loop, in candidates (4-16 measured the same)
PROBE_PREFETCH = 8


def _fused_source(d: int, dtype: np.dtype) -> str:
    from .embedding import PREFETCH_DISTANCE, _prologue_snippet

    name = dtype.name
    step = 64 // dtype.itemsize
    lines = -(-d * dtype.itemsize // 64)
    acc = [f"a{k}" for k in range(d)]
    pf = ["q = np.uint64(indices[j + PF])"] + [f"prefetch(table, q, {c * step})" for c in range(lines)]
    pf.append(f"prefetch(table, q, {d - 1})")  # a row not aligned to 64 bytes spans one more line

    def w_loop(weighted):
        body = ["for j in range(s, e):", "    if j + PF < pf_end:"] + [f"        {x}" for x in pf]
        body += ["    r = table[np.uint64(indices[j])]"]
        if weighted:
            body += ["    w = weights[j]"] + [f"    {a} += w * r[{k}]" for k, a in enumerate(acc)]
        else:
            body += [f"    {a} += r[{k}]" for k, a in enumerate(acc)]
        return body

    bag = [f"{a} = np.{name}(0.0)" for a in acc]
    bag += ["if use_w:"] + [f"    {x}" for x in w_loop(True)] + ["else:"] + [f"    {x}" for x in w_loop(False)]
    bag += ["if ptr < n and cpos[ptr] < e:",
            "    for qq in range(rank):",
            "        p[qq] = 0",
            "    while ptr < n and cpos[ptr] < e:",
            "        sl = cslot[ptr]",
            "        if sl >= 0:",
            "            w = weights[cpos[ptr]] if use_w else one",
            "            for qq in range(rank):",
            "                p[qq] += w * A[sl, qq]",
            "        ptr += 1",
            "    for qq in range(rank):",
            "        pq = lscale * p[qq]"]
    bag += [f"        {a} += pq * B[qq, {k}]" for k, a in enumerate(acc)]
    bag += [f"sc = np.{name}(1.0)", "if mode == 1 and e > s:", f"    sc = np.{name}(1.0) / np.{name}(e - s)"]
    bag += [f"o[{k}] = {a} * sc" for k, a in enumerate(acc)]
    bag = "\n".join(" " * 12 + x for x in bag)
    return f'''"""lukern fused LoRA lookup for d={d}, {name}: generated by lukern._kernels.lora."""
import numpy as np
from numba import njit, prange

from lukern._kernels._intrinsics import prefetch
from lukern._kernels.lora import find_slot, prefetch_probe

PF = {PREFETCH_DISTANCE}
BLOCK_BAGS = {FUSED_BLOCK_BAGS}
BLOCK_IDS = {FUSED_BLOCK_IDS}
PPF = {PROBE_PREFETCH}


@njit(nogil=True, cache=True)
def lora_bag_range(table, indices, offsets, weights, use_w, mode, out, b0, b1, keys, vals, mask, bitmap, A, B,
                   lscale):
    if b1 <= b0:
        return
    pf_end = offsets[b1]
    base = 0
    rank = A.shape[1]
    one = np.{name}(1.0)
    cap = BLOCK_IDS
    for b in range(b0, b1):
        cap = max(cap, offsets[b + 1] - offsets[b])
    cpos = np.empty(cap, np.int64)  # positions of the block's ids with the presence bit set
    cslot = np.empty(cap, np.int64)  # their slots (-1: not in the hash after all)
    p = np.zeros(rank, A.dtype)
    j0 = offsets[b0]
{_prologue_snippet(d, dtype.itemsize, " " * 4)}
    b = b0
    while b < b1:
        js = offsets[b]
        bend = b + 1
        while bend < min(b1, b + BLOCK_BAGS) and offsets[bend + 1] - js <= cap:
            bend += 1
        je = offsets[bend]
        n = 0
        for j in range(js, je):  # branch-free: the store is kept only when the bit is set
            rid = np.uint64(indices[j])
            cpos[n] = j
            n += np.int64((bitmap[rid >> np.uint64(6)] >> (rid & np.uint64(63))) & np.uint64(1))
        for k in range(min(PPF, n)):
            prefetch_probe(keys, vals, mask, indices[cpos[k]])
        for k in range(n):
            if k + PPF < n:
                prefetch_probe(keys, vals, mask, indices[cpos[k + PPF]])
            sl = find_slot(keys, vals, mask, indices[cpos[k]])
            cslot[k] = sl
            if sl >= 0:
                prefetch(A, sl, 0)
        ptr = 0
        for bb in range(b, bend):
            s = offsets[bb]
            e = offsets[bb + 1]
            o = out[bb]
{bag}
        b = bend


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
    state ``keys, vals, mask, bitmap, A, B, scale``."""

    __slots__ = ("range", "parallel")

    def __init__(self, range_kernel, parallel_kernel):
        self.range = range_kernel
        self.parallel = parallel_kernel


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
    return FusedKernels(with_slp(m.lora_bag_range), with_slp(m.lora_bag_parallel))
