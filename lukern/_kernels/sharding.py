"""Kernels for NUMA sharding: the access sketch, id routing and the sharded lookups.

Contract: ids are in [0, n_rows); ``cuts`` are the first global row of each node's range
(non-decreasing, ``cuts[0] == 0``, ``cuts[-1] == n_rows``); node k's rows start at buffer
row ``starts[k]`` and its replicas at ``rep_starts[k]``; the ``n_rep`` replicated rows are
found in a hash of the LoRA layout (keys/vals/mask, built by ``lora.rebuild_hash``) after
a small filter (:func:`replica_filter`) says an id may be one.
``me`` selects the ids a call pools: ``me < 0`` every id (replicas of node ``home``), else
node ``me``'s part: its own rows, plus the replicated ids at positions ``j % n_nodes == me``
read from its replicas (which spreads their load evenly over the nodes).

The lookups route inside the pooling pass (no id array is translated beforehand): ids are
routed ``BLK`` at a time into a small ring just before the prefetch ``PF`` ids ahead needs
them, and the pooling loop reads the ring.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._codegen import load_generated, with_slp
from .embedding import _DTYPE_NAMES, PREFETCH_DISTANCE, SPECIALISED_DIMS

PF = PREFETCH_DISTANCE
BLK = 256  # ids routed at a time
RING = 1024  # a power of two > BLK + PF
#: the replica filter's hash multiplier (:func:`replica_filter`)
FILTER_MULT = np.uint64(0xC2B2AE3D27D4EB4F)

_MULTS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                   0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


@njit(nogil=True, cache=True)
def cms_observe(sketch, mults, indices, start, cand_keys, cand_vals, cand_mask, threshold):
    """Count ids from ``start`` on in the count-min ``sketch`` (depth x width, width a
    power of two); ids whose estimate reaches ``threshold`` are recorded in the candidate
    hash (open addressing, -1 empty). Returns where it stopped: ``len(indices)``, or
    earlier when the candidate hash became half full (the caller compacts, then goes on)."""
    depth, width = sketch.shape
    wmask = np.uint64(width - 1)
    n_cand = 0
    for h in range(cand_keys.shape[0]):
        if cand_keys[h] >= 0:
            n_cand += 1
    n_cand_cap = (cand_mask + 1) // 2
    for j in range(start, indices.shape[0]):
        row = np.uint64(indices[j])
        est = np.uint32(0xFFFFFFFF)
        for k in range(depth):
            h = np.int64(((row * mults[k]) >> np.uint64(29)) & wmask)
            c = sketch[k, h] + np.uint32(1)
            sketch[k, h] = c
            if c < est:
                est = c
        if est >= threshold:
            h = np.int64((row * mults[0]) >> np.uint64(40)) & cand_mask
            while cand_keys[h] >= 0 and cand_keys[h] != indices[j]:
                h = (h + 1) & cand_mask
            if cand_keys[h] < 0:
                cand_keys[h] = indices[j]
                n_cand += 1
            cand_vals[h] = est
            if n_cand >= n_cand_cap:
                return j + 1
    return indices.shape[0]


@njit(nogil=True, cache=True)
def cms_estimate(sketch, mults, rows, out):
    depth, width = sketch.shape
    wmask = np.uint64(width - 1)
    for j in range(rows.shape[0]):
        row = np.uint64(rows[j])
        est = np.uint32(0xFFFFFFFF)
        for k in range(depth):
            c = sketch[k, np.int64(((row * mults[k]) >> np.uint64(29)) & wmask)]
            if c < est:
                est = c
        out[j] = est


@njit(nogil=True, cache=True)
def combine_parts(parts, offsets, mode, out, b0, b1):
    """``out[b]`` = the parts' partial sums (maxima) of bag b added (maxed) in node order;
    mean divides the sum by the bag length; an empty bag gives zeros."""
    n_parts = parts.shape[0]
    d = out.shape[1]
    scale = np.empty(1, out.dtype)
    for b in range(b0, b1):
        n = offsets[b + 1] - offsets[b]
        o = out[b]
        if n == 0:
            for k in range(d):
                o[k] = 0
            continue
        for k in range(d):
            o[k] = parts[0, b, k]
        for p in range(1, n_parts):
            q = parts[p, b]
            if mode == 2:
                for k in range(d):
                    if q[k] > o[k] or q[k] != q[k]:
                        o[k] = q[k]
            else:
                for k in range(d):
                    o[k] += q[k]
        if mode == 1:
            # the scale in the table's dtype, as lukern's specialised plain kernels take it
            scale[0] = 1.0
            scale[0] = scale[0] / n
            for k in range(d):
                o[k] = o[k] * scale[0]


def _route(pad: str) -> str:
    """Source that sets ``q`` to the buffer row of the id at position ``jj`` (-1: not
    part ``me``'s). Pasted into each kernel: as a called function it took ~50 ns per id
    (numba's reference counting of its array arguments, when LLVM did not inline it);
    for the same reason no inlined helper taking arrays is called per id."""
    body = """row = indices[jj]
u = np.uint64(row)
node = 0
for k in range(1, n_nodes):  # no branch: random ids mispredicted a search loop
    node += np.int64(row >= cuts[k])
q = starts[node] + row - cuts[node]
if me >= 0 and node != me:
    q = -1
f = np.int64((u * FILTER_MULT) >> np.uint64(32)) & fmask
if n_rep > 0 and (filt[f >> 6] >> np.uint64(f & 63)) & np.uint64(1):
    # maybe replicated: probe the LoRA-layout hash (lukern._kernels.lora.find_slot)
    h = np.int64((u * GOLDEN) >> np.uint64(32)) & mask
    while keys[h] >= 0 and keys[h] != row:
        h = (h + 1) & mask
    if keys[h] == row:
        q = rep_base + np.int64(vals[h])
        if me >= 0 and jj % n_nodes != me:
            q = -1"""
    return "\n".join(pad + x for x in body.splitlines())


_HEADER = """\"\"\"lukern sharded lookups ({what}): generated by lukern._kernels.sharding.\"\"\"
import numpy as np
from numba import njit

from lukern._kernels._intrinsics import prefetch_l2
from lukern._kernels.lora import _GOLDEN as GOLDEN

FILTER_MULT = np.uint64({filter_mult})

PF = {pf}
BLK = {blk}
RING = {ring}
"""

# the loop shared by the generic and the specialised kernel: ids are routed a block of
# ``BLK`` at a time into a ring (a tight loop, L1-resident), just before the prefetch
# ``PF`` ids ahead needs them; the pooling loop reads the ring. Routing one id at a time
# inside the pooling loop ran 1.5-2x slower than routing in blocks.
_LOOP = """

@njit(nogil=True, cache=True)
def sharded_bag_range(buf, indices, offsets, weights, use_w, mode, out, b0, b1,
                      cuts, starts, keys, vals, mask, filt, n_rep, rep_starts, me, home):
    n_nodes = cuts.shape[0] - 1
    rep_base = rep_starts[home] if me < 0 else rep_starts[me]
    fmask = filt.shape[0] * 64 - 1
    ring = np.empty(RING, np.int64)
    pf_end = offsets[b1]
    j0 = offsets[b0]
    routed = min(j0 + BLK, pf_end)
    for jj in range(j0, routed):
{route8}
        ring[jj & (RING - 1)] = q
    for jj in range(j0, min(j0 + PF, pf_end)):
        q = ring[jj & (RING - 1)]
        if q >= 0:
{prefetch8}
    for b in range(b0, b1):
        s = offsets[b]
        e = offsets[b + 1]
{init}
        for j in range(s, e):
            jp = j + PF
            if jp < pf_end:
                if jp >= routed:
                    hi = min(routed + BLK, pf_end)
                    for jj in range(routed, hi):
{route24}
                        ring[jj & (RING - 1)] = q
                    routed = hi
                q = ring[jp & (RING - 1)]
                if q >= 0:
{prefetch20}
            q = ring[j & (RING - 1)]
            if q >= 0:
                u = np.uint64(q)
{pool}
{store}
"""

_GENERIC_INIT = """        for k in range(buf.shape[1]):
            out[b, k] = -np.inf if mode == 2 else 0"""
_GENERIC_POOL = """                if mode == 2:
                    for k in range(buf.shape[1]):
                        x = buf[u, k]
                        if x > out[b, k] or x != x:  # NaN propagates, as in torch
                            out[b, k] = x
                elif use_w:
                    w = weights[j]
                    for k in range(buf.shape[1]):
                        out[b, k] += w * buf[u, k]
                else:
                    for k in range(buf.shape[1]):
                        out[b, k] += buf[u, k]"""
_GENERIC_STORE = """        if e == s:
            for k in range(buf.shape[1]):
                out[b, k] = 0
        elif mode == 1:
            inv = 1.0 / (e - s)
            for k in range(buf.shape[1]):
                out[b, k] = out[b, k] * inv"""

_TRANSLATE = """

@njit(nogil=True, cache=True)
def translate_ids(indices, cuts, starts, keys, vals, mask, filt, n_rep, rep_starts, me, home, out):
    n_nodes = cuts.shape[0] - 1
    rep_base = rep_starts[home] if me < 0 else rep_starts[me]
    fmask = filt.shape[0] * 64 - 1
    for jj in range(indices.shape[0]):
{route8}
        out[jj] = q
"""


def replica_filter(rows: np.ndarray, n_rep: int) -> np.ndarray:
    """The filter the kernels test before probing the replica hash: one bit per hash of
    a row, 64 bits per replicated row (false positives ~1/64, which only cost a probe),
    so it stays in L1/L2 where a bit per table row (500 KB for 4M rows) competed with
    the row prefetches and doubled the routing cost."""
    n_bits = 1 << max(12, int(64 * max(n_rep, 1) - 1).bit_length())
    filt = np.zeros(n_bits // 64, np.uint64)
    with np.errstate(over="ignore"):
        f = ((rows.astype(np.uint64) * FILTER_MULT) >> np.uint64(32)) & np.uint64(n_bits - 1)
    np.bitwise_or.at(filt, (f >> np.uint64(6)).astype(np.int64), np.uint64(1) << (f & np.uint64(63)))
    return filt


def _prefetch(d: int | None, itemsize: int | None, pad: str) -> str:
    """Prefetch every line of row ``q`` into L2, as the plain kernels (``d`` None: a loop over
    the row's width)."""
    if d is None:
        return f"{pad}for c in range(0, buf.shape[1], 64 // buf.itemsize):\n{pad}    prefetch_l2(buf, q, c)"
    step = 64 // itemsize
    cols = list(range(0, d, step)) + [d - 1]  # a row not aligned to 64 bytes spans one more line
    return "\n".join(f"{pad}prefetch_l2(buf, q, {c})" for c in cols)


def _generic_source() -> str:
    """``translate_ids`` and the any-width, every-mode ``sharded_bag_range``, which
    mirrors the generic plain kernel (so ``me < 0`` gives its bits). A part with no id of
    a non-empty bag gives 0 (sum, mean) or -inf (max) there, for the combine."""
    return (_HEADER.format(what="generic", pf=PF, blk=BLK, ring=RING, filter_mult=int(FILTER_MULT))
            + _LOOP.format(route8=_route(" " * 8), route24=_route(" " * 24), init=_GENERIC_INIT, pool=_GENERIC_POOL,
                           store=_GENERIC_STORE, prefetch8=_prefetch(None, None, " " * 12),
                           prefetch20=_prefetch(None, None, " " * 20))
            + _TRANSLATE.format(route8=_route(" " * 8)))


def _specialised_source(d: int, name: str) -> str:
    """``sharded_bag_range`` for width ``d``, modes sum and mean, with ``d`` scalar
    accumulators: the additions and the scale of lukern's generated plain kernel, so
    ``me < 0`` gives its bits."""
    acc = [f"a{k}" for k in range(d)]
    pool = ["                if use_w:", "                    w = weights[j]"]
    pool += [f"                    {a} += w * buf[u, {k}]" for k, a in enumerate(acc)]
    pool += ["                else:"] + [f"                    {a} += buf[u, {k}]" for k, a in enumerate(acc)]
    store = [f"        scale = np.{name}(1.0)", "        if mode == 1 and e > s:",
             f"            scale = np.{name}(1.0) / np.{name}(e - s)"]
    store += [f"        out[b, {k}] = {a} * scale" for k, a in enumerate(acc)]
    return (_HEADER.format(what=f"d={d}, {name}", pf=PF, blk=BLK, ring=RING, filter_mult=int(FILTER_MULT))
            + _LOOP.format(route8=_route(" " * 8), route24=_route(" " * 24),
                           prefetch8=_prefetch(d, np.dtype(name).itemsize, " " * 12),
                           prefetch20=_prefetch(d, np.dtype(name).itemsize, " " * 20),
                           init="\n".join(f"        {a} = np.{name}(0.0)" for a in acc), pool="\n".join(pool),
                           store="\n".join(store)))


def _generic():
    return load_generated("sharded_generic", _generic_source())


def translate_ids(indices, cuts, starts, keys, vals, mask, filt, n_rep, rep_starts, me, home, out):
    """``out[j]`` = buffer row of ``indices[j]`` (-1: not part ``me``'s)."""
    _generic().translate_ids(indices, cuts, starts, keys, vals, mask, filt, n_rep, rep_starts, me, home, out)


_KERNELS: dict = {}


def sharded_kernel(d: int, dtype, use_max: bool):
    """The sharded lookup kernel for width ``d``, ``dtype`` and max-or-not (the
    register-accumulator one for lukern's specialised widths, else the generic one)."""
    key = (d, dtype, use_max)
    k = _KERNELS.get(key)
    if k is None:
        name = _DTYPE_NAMES[np.dtype(dtype)]
        if d in SPECIALISED_DIMS and not use_max:
            k = with_slp(load_generated(f"sharded_d{d}_{name}", _specialised_source(d, name)).sharded_bag_range)
        else:
            k = _generic().sharded_bag_range
        _KERNELS[key] = k
    return k
