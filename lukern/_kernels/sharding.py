"""Kernels for NUMA sharding: the access sketch, id routing and the sharded lookups.

Contract: ids are in [0, n_rows); ``cuts`` are the first global row of each node's range
(non-decreasing, ``cuts[0] == 0``, ``cuts[-1] == n_rows``); node k's rows start at buffer
row ``starts[k]`` and its replicas at ``rep_starts[k]``; the ``n_rep`` replicated rows are
found through the LoRA hash kernels (same layout: keys/vals/mask plus a presence bitmap).
``me`` selects the ids a call pools: ``me < 0`` every id (replicas of node ``home``), else
node ``me``'s part: its own rows, plus the replicated ids at positions ``j % n_nodes == me``
read from its replicas (which spreads their load evenly over the nodes).

The lookups route inside the pooling loop (one pass over the ids): a ring of routed rows
lets the prefetch ``PF`` ids ahead hand its routing to the load.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._codegen import load_generated, with_slp
from ._intrinsics import prefetch_row
from .embedding import _DTYPE_NAMES, PREFETCH_DISTANCE, SPECIALISED_DIMS
from .lora import find_slot, is_active

PF = PREFETCH_DISTANCE
RING = 128  # a power of two > PF

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




@njit(nogil=True, inline="always", cache=True)
def route(row, j, cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home):
    """Buffer row of id ``row`` at position ``j``, or -1 when it is not part ``me``'s."""
    n_nodes = cuts.shape[0] - 1
    if n_rep > 0 and is_active(bitmap, row):
        r = find_slot(keys, vals, mask, row)
        if r >= 0:
            if me < 0:
                return rep_starts[home] + r
            if j % n_nodes == me:
                return rep_starts[me] + r
            return -1
    node = 0
    while node + 1 < n_nodes and row >= cuts[node + 1]:
        node += 1
    if me >= 0 and node != me:
        return -1
    return starts[node] + row - cuts[node]


@njit(nogil=True, cache=True)
def translate_ids(indices, cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home, out):
    """``out[j]`` = buffer row of ``indices[j]`` (-1: not part ``me``'s)."""
    for j in range(indices.shape[0]):
        out[j] = route(indices[j], j, cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home)


@njit(nogil=True, cache=True)
def sharded_bag_range(buf, indices, offsets, weights, use_w, mode, out, b0, b1,
                      cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home):
    """Pool bags [b0, b1) of part ``me``'s ids into ``out`` (any width, every mode; with
    ``me < 0`` it mirrors the generic plain kernel, so it gives its bits). A part with no
    id of a non-empty bag gives 0 (sum, mean) or -inf (max) there, for the combine."""
    d = buf.shape[1]
    ring = np.empty(RING, np.int64)
    pf_end = offsets[b1]
    j0 = offsets[b0]
    for j in range(j0, min(j0 + PF, pf_end)):
        q = route(indices[j], j, cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home)
        ring[j & (RING - 1)] = q
        if q >= 0:
            prefetch_row(buf, q)
    for b in range(b0, b1):
        s = offsets[b]
        e = offsets[b + 1]
        o = out[b]
        for k in range(d):
            o[k] = -np.inf if mode == 2 else 0
        for j in range(s, e):
            if j + PF < pf_end:
                jj = j + PF
                q = route(indices[jj], jj, cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home)
                ring[jj & (RING - 1)] = q
                if q >= 0:
                    prefetch_row(buf, q)
            q = ring[j & (RING - 1)]
            if q < 0:
                continue
            r = buf[q]
            if mode == 2:
                for k in range(d):
                    if r[k] > o[k] or r[k] != r[k]:  # NaN propagates, as in torch
                        o[k] = r[k]
            elif use_w:
                w = weights[j]
                for k in range(d):
                    o[k] += w * r[k]
            else:
                for k in range(d):
                    o[k] += r[k]
        if e == s:
            for k in range(d):
                o[k] = 0
        elif mode == 1:
            inv = 1.0 / (e - s)
            for k in range(d):
                o[k] = o[k] * inv


@njit(nogil=True, cache=True)
def combine_parts(parts, offsets, mode, out, b0, b1):
    """``out[b]`` = the parts' partial sums (maxima) of bag b added (maxed) in node order;
    mean divides the sum by the bag length; an empty bag gives zeros."""
    n_parts = parts.shape[0]
    d = out.shape[1]
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
            inv = 1.0 / n
            for k in range(d):
                o[k] = o[k] * inv


_SPECIALISED = """\"\"\"lukern sharded lookup for d={d}, {name}: generated by lukern._kernels.sharding.\"\"\"
import numpy as np
from numba import njit

from lukern._kernels._intrinsics import prefetch_row
from lukern._kernels.sharding import route

PF = {pf}
RING = {ring}


@njit(nogil=True, cache=True)
def sharded_bag_range(buf, indices, offsets, weights, use_w, mode, out, b0, b1,
                      cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home):
    ring = np.empty(RING, np.int64)
    pf_end = offsets[b1]
    j0 = offsets[b0]
    for j in range(j0, min(j0 + PF, pf_end)):
        q = route(indices[j], j, cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home)
        ring[j & (RING - 1)] = q
        if q >= 0:
            prefetch_row(buf, q)
    for b in range(b0, b1):
        s = offsets[b]
        e = offsets[b + 1]
        o = out[b]
{init}
        for j in range(s, e):
            if j + PF < pf_end:
                jj = j + PF
                q = route(indices[jj], jj, cuts, starts, keys, vals, mask, bitmap, n_rep, rep_starts, me, home)
                ring[jj & (RING - 1)] = q
                if q >= 0:
                    prefetch_row(buf, q)
            q = ring[j & (RING - 1)]
            if q >= 0:
                r = buf[np.uint64(q)]
                if use_w:
                    w = weights[j]
{add_w}
                else:
{add}
        scale = np.{name}(1.0)
        if mode == 1 and e > s:
            scale = np.{name}(1.0) / np.{name}(e - s)
{store}
"""


def _specialised_source(d: int, name: str) -> str:
    """``sharded_bag_range`` for width ``d``, modes sum and mean, with ``d`` scalar
    accumulators: the additions and the scale of lukern's generated plain kernel, so
    ``me < 0`` gives its bits."""
    acc = [f"a{k}" for k in range(d)]
    return _SPECIALISED.format(
        d=d, name=name, pf=PF, ring=RING,
        init="\n".join(f"        {a} = np.{name}(0.0)" for a in acc),
        add_w="\n".join(f"                    {a} += w * r[{k}]" for k, a in enumerate(acc)),
        add="\n".join(f"                    {a} += r[{k}]" for k, a in enumerate(acc)),
        store="\n".join(f"        o[{k}] = {a} * scale" for k, a in enumerate(acc)))


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
            k = sharded_bag_range
        _KERNELS[key] = k
    return k
