"""The LoRA correction of a table-batched lookup: every adapted table in one kernel call.

``TableBatch.lookup(..., adapters=...)`` runs the plain table-batched kernel, then this
one, which adds ``s * (pooled A rows) @ B`` of every adapted table of one width to its
columns. The adapters' arrays (each adapter's own, replaced as a whole on structural
changes) reach the kernel as addresses (``adapter_ptrs``) with their shapes
(``adapter_meta``), so one call serves any number of tables: two calls and some numpy
per table took 7-10x the plain lookup for 26 tables of 256 one-id bags.

Per adapter ``k`` (table ``tids[k]``): ``adapter_ptrs[k]`` holds the addresses of
``keys, vals, bitmap, A, B`` and ``adapter_meta[k]`` ``len(keys), mask, len(bitmap),
capacity, rank``; ``scales[k]`` is its scale in the table dtype. A bag's correction is
``f_b * P_b @ B`` (``f_b`` the scale, divided by the bag length in mean mode) with the
pooled A rows ``P_b`` summed in id order as :func:`lukern._kernels.lora.pool_slots`
does; it is added to the bag's columns once. Generated per width (the columns unrolled,
rank 8 pooled in registers, like the fused single-table kernel), other ranks take a
generic loop.
"""

from __future__ import annotations

import functools

#: the rank pooled in registers
FIXED_RANK = 8
#: ids ahead whose hash lines are prefetched (the adapters of many tables do not stay in
#: L2 between requests, so a probe's lines come from L3), and ids ahead whose slots are
#: probed (kept in a ring until used) to prefetch their A rows. In situ (26 tables of 256
#: one-id bags, each call after a plain lookup, kernel alone), 28% / 84% of ids active: no
#: prefetch 164 / 362 us; hash lines 16 ahead 120 / 232 us; plus A rows 4 ahead, probed
#: twice 131 / 197 us; probed once (the ring) 8 ahead 128 / 215 us against 132 / 232 us for
#: the twice-probed in the same run
AHEAD = 16
A_AHEAD = 8


def _source(d: int, dtype_name: str) -> str:
    r = FIXED_RANK
    ps = [f"p{q}" for q in range(r)]
    # positions are read as unsigned integers, so numba emits no negative-index
    # wraparound select per access (kernel alone, the serving request: 73 -> 69 us with
    # 12% of ids adapted, 164 -> 156 us with 84%)
    fixed = [f"{p} = DT(0.0)" for p in ps] + [
        "hit = False",
        "for j in range(s, e):",
        "    if j + AHEAD < t_end:",
        "        ahead = indices[np.uint64(j + AHEAD)]",
        "        if is_active(bitmap, ahead):",
        "            prefetch_probe(keys, vals, mask, ahead)",
        # the id A_AHEAD on: its hash lines have arrived, so probe it now, prefetch its
        # A row and keep its slot in the ring until it is used
        "    if j + A_AHEAD < t_end:",
        "        ahead = indices[np.uint64(j + A_AHEAD)]",
        "        sa = -1",
        "        if is_active(bitmap, ahead):",
        "            sa = find_slot(keys, vals, mask, ahead)",
        "            if sa >= 0:",
        "                prefetch(A, sa, 0)",
        "        ring[np.uint64(j + A_AHEAD) & np.uint64(RM)] = sa",
        "    sl = ring[np.uint64(j) & np.uint64(RM)]",
        "    if sl >= 0:",
        "        hit = True",
        "        if use_w:",
        "            w = weights[np.uint64(j)]",
    ] + [f"            {p} += w * A[sl, {q}]" for q, p in enumerate(ps)] + ["        else:"] + [
        f"            {p} += A[sl, {q}]" for q, p in enumerate(ps)] + [
        "if hit:",
        "    f = scale",
        "    if mode == 1 and e > s:",
        "        f = scale / DT(e - s)",
    ] + [f"    q{q} = f * {p}" for q, p in enumerate(ps)] + [
        f"    g{c} = " + " + ".join(f"q{q} * B[{q}, {c}]" for q in range(r)) for c in range(d)] + [
        # every B load before the first store, and the stores through the bag's own columns
        # at constant indices: with ``o[c0 + c]`` (a runtime offset, so a wraparound select
        # per index) nothing of P @ B vectorised (180 -> 83 us for 26 tables x 256 one-id
        # bags with 84% of ids adapted, the same bits)
        f"    o = out[b, c0:c0 + {d}]"] + [f"    o[{c}] += g{c}" for c in range(d)]
    ring_start = [  # the slots of the range's first A_AHEAD ids
        "t_start = offsets[base + b0]",
        "for j in range(t_start, min(t_start + A_AHEAD, t_end)):",
        "    row = indices[j]",
        "    sa = -1",
        "    if is_active(bitmap, row):",
        "        sa = find_slot(keys, vals, mask, row)",
        "    ring[j & RM] = sa",
    ]
    generic = [
        "hit = False",
        "for q in range(rank):",
        "    p[q] = 0",
        "for j in range(s, e):",
        "    row = indices[j]",
        "    if is_active(bitmap, row):",
        "        sl = find_slot(keys, vals, mask, row)",
        "        if sl >= 0:",
        "            hit = True",
        "            w = weights[j] if use_w else DT(1.0)",
        "            for q in range(rank):",
        "                p[q] += w * A[sl, q]",
        "if hit:",
        "    f = scale",
        "    if mode == 1 and e > s:",
        "        f = scale / DT(e - s)",
    ] + [f"    g{c} = DT(0.0)" for c in range(d)] + [
        "    for q in range(rank):",
        "        pq = f * p[q]",
    ] + [f"        g{c} += pq * B[q, {c}]" for c in range(d)] + [f"    o = out[b, c0:c0 + {d}]"] + [
        f"    o[{c}] += g{c}" for c in range(d)]

    rm = 1  # ring index mask: a power of two above A_AHEAD, minus one
    while rm < A_AHEAD + 1:
        rm = 2 * rm + 1

    def block(lines, indent):
        return "\n".join(" " * indent + x for x in lines)

    return f'''"""lukern table-batched LoRA correction for d={d}, {dtype_name}: generated by
lukern._kernels.lora_tbe."""
import numpy as np
from numba import carray, njit

from lukern._kernels._intrinsics import address_as_voidptr, prefetch
from lukern._kernels.lora import find_slot, is_active, prefetch_probe

DT = np.{dtype_name}
AHEAD = {AHEAD}
A_AHEAD = {A_AHEAD}
RM = {rm}


@njit(nogil=True, cache=True)
def tbe_lora_correct(indices, offsets, n_bags, tids, col_offsets, adapter_ptrs, adapter_meta, scales, weights,
                     use_w, mode, out, b0, b1):
    ring = np.empty(RM + 1, np.int64)  # slots of the ids A_AHEAD on (rank {r})
    for k in range(tids.shape[0]):
        t = tids[k]
        hcap = adapter_meta[k, 0]
        mask = adapter_meta[k, 1]
        rank = adapter_meta[k, 4]
        keys = carray(address_as_voidptr(adapter_ptrs[k, 0]), (hcap,), np.int64)
        vals = carray(address_as_voidptr(adapter_ptrs[k, 1]), (hcap,), np.int32)
        bitmap = carray(address_as_voidptr(adapter_ptrs[k, 2]), (adapter_meta[k, 2],), np.uint64)
        A = carray(address_as_voidptr(adapter_ptrs[k, 3]), (adapter_meta[k, 3], rank), DT)
        B = carray(address_as_voidptr(adapter_ptrs[k, 4]), (rank, {d}), DT)
        scale = scales[k]
        c0 = col_offsets[t]
        base = t * n_bags
        t_end = offsets[base + b1]
        if rank == {r}:
{block(ring_start, 12)}
            for b in range(b0, b1):
                s = offsets[base + b]
                e = offsets[base + b + 1]
{block(fixed, 16)}
        else:
            p = np.zeros(rank, DT)
            for b in range(b0, b1):
                s = offsets[base + b]
                e = offsets[base + b + 1]
{block(generic, 16)}
'''


@functools.lru_cache(maxsize=None)
def tbe_correct_kernel(d: int, dtype_name: str):
    """The kernel for tables of width ``d`` and ``dtype_name`` (float32 or float64)."""
    from ._codegen import load_generated, with_slp

    m = load_generated(f"lora_tbe_d{d}_{dtype_name}", _source(int(d), str(dtype_name)))
    return with_slp(m.tbe_lora_correct)
