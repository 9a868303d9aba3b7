"""Embedding-bag kernels (forward), single table and table-batched.

Contract shared by every kernel here (the wrappers in :mod:`lukern.embedding` check it):

- ``table``: C-contiguous (n_rows, d) float32/float64; ``indices``: int32/int64 in
  [0, n_rows); ``offsets``: non-decreasing, ``offsets[0] == 0``, last == len(indices);
- ``weights``: per-index weights of the table dtype, read only when ``use_w``;
- ``mode``: ``MODE_SUM``, ``MODE_MEAN`` or ``MODE_MAX``; an empty bag gives zeros;
- ``out``: (n_bags, d) of the table dtype, every element of bags [b0, b1) is written.

Speed (DESIGN section 9): for the common widths the kernels are *generated per d* so the
accumulators are d scalars that LLVM's SLP vectorizer packs into vector registers, and an
explicit prefetch into L2 runs ``PREFETCH_DISTANCE`` ids ahead (across bag boundaries). Other
widths use a generic kernel that accumulates in the output row.
"""

from __future__ import annotations

import functools

import numpy as np

from ._codegen import load_generated, with_slp

MODE_SUM = 0
MODE_MEAN = 1
MODE_MAX = 2
MODES = {"sum": MODE_SUM, "mean": MODE_MEAN, "max": MODE_MAX}

#: widths that get a register-accumulator kernel; others use the generic one
SPECIALISED_DIMS = (4, 8, 16, 32, 48, 64, 96, 128)
#: how many ids ahead the row prefetch runs. The rows are prefetched into L2, not L1
#: (``prefetch_l2``): a prefetch into L1 holds one of the core's few L1 miss buffers until
#: its line arrives, which capped the rows in flight; L2 has several times more miss slots.
#: On 1 GB tables, 2048 bags of 20-40 ids, 1 thread, speed against torch 2.13's
#: ``embedding_bag`` in the same run (Zipf / uniform ids): d = 16 1.50 / 1.35x into L2 at 64
#: ids against 1.47 / 1.20x into L1 at 32; d = 64 1.25 / 1.97x against 1.06 / 1.03x; d = 128
#: 1.37 / 1.64x against 1.04 / 1.03x; 32-256 ids ahead were within a few percent (into L1,
#: 32 had been best). Before, with positions read as signed integers and rows prefetched
#: into L1 64 ahead, the d = 64 loop was 5-20% slower again.
PREFETCH_DISTANCE = 64
PF = PREFETCH_DISTANCE

_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def _pool_snippet(d: int, dtype: str, itemsize: int, pad: str, store: str = "o[{k}]", streamed: bool = False) -> str:
    """Source that pools bag [s, e) of ``table`` (row offset ``base``) into the view ``o``
    with ``d`` scalar accumulators (the store target is ``store``, formatted with the
    column ``k``); names ``table, indices, weights, use_w, mode, s, e, pf_end, base``
    must be in scope. Ids and the positions they are read at are cast to uint64, so
    numba emits no negative-index wraparound (a compare and a select per access, and a
    register held for the array length): ids were validated as >= 0, positions are. The
    positions' casts made the loop 5-20% faster (see ``PREFETCH_DISTANCE``)."""
    acc = [f"a{k}" for k in range(d)]
    lines_per_row = -(-d * itemsize // 64)
    step = 64 // itemsize
    pf = [f"q = np.uint64(base + indices[np.uint64(j + PF)])"]
    pf += [f"prefetch_l2(table, q, {c * step})" for c in range(lines_per_row)]
    # a row not aligned to 64 bytes spans one more line
    pf.append(f"prefetch_l2(table, q, {d - 1})")

    def block(weighted):
        body = [f"for j in range(s, e):", f"    if j + PF < pf_end:"]
        body += [f"        {x}" for x in pf]
        body += [f"    r = table[np.uint64(base + indices[np.uint64(j)])]"]
        if weighted:
            body += [f"    w = weights[np.uint64(j)]"] + [f"    {a} += w * r[{k}]" for k, a in enumerate(acc)]
        else:
            body += [f"    {a} += r[{k}]" for k, a in enumerate(acc)]
        return body

    code = [f"{a} = np.{dtype}(0.0)" for a in acc]
    code += ["if use_w:"] + ["    " + x for x in block(True)]
    code += ["else:"] + ["    " + x for x in block(False)]
    code += [f"scale = np.{dtype}(1.0)", "if mode == 1 and e > s:", f"    scale = np.{dtype}(1.0) / np.{dtype}(e - s)"]
    if streamed:  # see tbe_range_streamed: the row goes to the line-aligned stage, then out
        code += [f"stage[{k}] = {a} * scale" for k, a in enumerate(acc)]
        code += [f"stream_store_line(out_u8, b * row_bytes + col_bytes + {64 * i}, stage_u8, {64 * i})"
                 for i in range(d * itemsize // 64)]
    else:
        code += [f"{store.format(k=k)} = {a} * scale" for k, a in enumerate(acc)]
    return "\n".join(pad + x for x in code)


def _prologue_snippet(d: int, itemsize: int, pad: str) -> str:
    """Source that prefetches the first ``PF`` rows of a segment [j0, pf_end): the main
    loop prefetches ``PF`` ids ahead, so without this a segment's first ``PF`` rows are
    demand misses (2-thread batched lookups with 256-bag chunks ran 1.6x slower)."""
    step = 64 // itemsize
    lines = -(-d * itemsize // 64)
    body = [f"for j in range(j0, min(j0 + PF, pf_end)):", f"    q = np.uint64(base + indices[np.uint64(j)])"]
    body += [f"    prefetch_l2(table, q, {c * step})" for c in range(lines)] + [f"    prefetch_l2(table, q, {d - 1})"]
    return "\n".join(pad + x for x in body)


def _specialised_source(d: int, dtype: np.dtype) -> str:
    """Source of ``bag_range`` and ``tbe_range`` for width ``d`` (see :func:`_make_drivers`
    for the generic versions, which these mirror line for line), and for widths of whole
    cache lines ``tbe_range_streamed`` (else None)."""
    name = _DTYPE_NAMES[dtype]

    def tbe(streamed):
        fname, extra, head = "tbe_range", "", ""
        if streamed:
            # every bag's row goes out with non-temporal stores through out_u8 (out's bytes;
            # out, its rows and each table's columns line-aligned: the wrapper checks, see
            # lukern.embedding._STREAM_MIN_BYTES), from a line-aligned stage
            fname, extra = "tbe_range_streamed", " out_u8,"
            head = f"""
    row_bytes = out.strides[0]
    stage_u8 = np.empty({d * dtype.itemsize + 64}, np.uint8)
    skip = np.int64((np.uintp(64) - data_address(stage_u8) % np.uintp(64)) % np.uintp(64))
    stage_u8 = stage_u8[skip:skip + {d * dtype.itemsize}]
    stage = stage_u8.view(np.{name})"""
        tail = "\n    memory_fence()  # streamed stores are weakly ordered: done before out is read" if streamed else ""
        cols = "\n        col_bytes = col_off[t] * table.itemsize" if streamed else ""
        return f'''

@njit(nogil=True, cache=True)
def {fname}(table, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out,{extra} b0, b1):{head}
    for g in range(tids.shape[0]):
        t = tids[g]
        base = row_off[g]
        c = np.uint64(col_off[t])  # unsigned: no wraparound select, so stores vectorise{cols}
        first = t * n_bags
        pf_end = offsets[first + b1]
        j0 = offsets[first + b0]
{_prologue_snippet(d, dtype.itemsize, " " * 8)}
        for b in range(b0, b1):
            s = offsets[first + b]
            e = offsets[first + b + 1]
            o = out[b]
{_pool_snippet(d, name, dtype.itemsize, " " * 12, store="o[c + np.uint64({k})]", streamed=streamed)}{tail}
'''

    if d * dtype.itemsize % 64 == 0:
        streamed = tbe(True) + _STREAMED_PARALLEL_SOURCE
    else:
        streamed = "\n\ntbe_range_streamed = tbe_parallel_streamed = None\n"
    return f'''"""lukern bag kernels for d={d}, {name}: generated by lukern._kernels.embedding."""
import numpy as np
from numba import njit, prange

from lukern._kernels._intrinsics import data_address, memory_fence, prefetch_l2, stream_store_line

PF = {PREFETCH_DISTANCE}


@njit(nogil=True, cache=True)
def bag_range(table, indices, offsets, weights, use_w, mode, out, b0, b1):
    pf_end = offsets[b1]
    base = 0
    j0 = offsets[b0]
{_prologue_snippet(d, dtype.itemsize, " " * 4)}
    for b in range(b0, b1):
        s = offsets[b]
        e = offsets[b + 1]
        o = out[b]
{_pool_snippet(d, name, dtype.itemsize, " " * 8)}
{tbe(False)}{streamed}{_PARALLEL_SOURCE}'''


_PARALLEL_SOURCE = '''

@njit(nogil=True, parallel=True, cache=True)
def bag_parallel(table, indices, offsets, weights, use_w, mode, out, chunk):
    n = out.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    for c in prange(n_chunks):
        b0 = c * chunk
        bag_range(table, indices, offsets, weights, use_w, mode, out, b0, min(n, b0 + chunk))


@njit(nogil=True, parallel=True, cache=True)
def tbe_parallel(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out, chunk):
    n_chunks = (n_bags + chunk - 1) // chunk
    for c in prange(n_chunks):
        b0 = c * chunk
        tbe_range(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out,
                  b0, min(n_bags, b0 + chunk))
'''

_STREAMED_PARALLEL_SOURCE = '''

@njit(nogil=True, parallel=True, cache=True)
def tbe_parallel_streamed(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out, out_u8,
                          chunk):
    n_chunks = (n_bags + chunk - 1) // chunk
    for c in prange(n_chunks):
        b0 = c * chunk
        tbe_range_streamed(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out, out_u8,
                           b0, min(n_bags, b0 + chunk))
'''

_GENERIC_SOURCE = f'''"""lukern bag kernels for any width and mode max: generated by lukern._kernels.embedding."""
import numpy as np
from numba import njit, prange

from lukern._kernels._intrinsics import prefetch_row_l2

PF = {PREFETCH_DISTANCE}


@njit(nogil=True, inline="always", cache=True)
def pool_one(table, indices, weights, use_w, mode, s, e, pf_end, base, o):
    d = o.shape[0]
    for k in range(d):
        o[k] = 0
    if mode == 2:
        if e > s:
            r = table[base + indices[s]]
            for k in range(d):
                o[k] = r[k]
            for j in range(s + 1, e):
                r = table[base + indices[j]]
                for k in range(d):
                    if r[k] > o[k] or r[k] != r[k]:  # NaN propagates, as in torch
                        o[k] = r[k]
        return
    for j in range(s, e):  # unsigned positions: no wraparound selects (see _pool_snippet)
        if j + PF < pf_end:
            prefetch_row_l2(table, base + indices[np.uint64(j + PF)])
        r = table[base + indices[np.uint64(j)]]
        if use_w:
            w = weights[np.uint64(j)]
            for k in range(d):
                o[k] += w * r[k]
        else:
            for k in range(d):
                o[k] += r[k]
    if mode == 1 and e > s:
        inv = 1.0 / (e - s)
        for k in range(d):
            o[k] = o[k] * inv


@njit(nogil=True, cache=True)
def bag_range(table, indices, offsets, weights, use_w, mode, out, b0, b1):
    pf_end = offsets[b1]
    for j in range(offsets[b0], min(offsets[b0] + PF, pf_end)):
        prefetch_row_l2(table, indices[j])
    for b in range(b0, b1):
        pool_one(table, indices, weights, use_w, mode, offsets[b], offsets[b + 1], pf_end, 0, out[b])


@njit(nogil=True, cache=True)
def tbe_range(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out, b0, b1):
    # table-major: follows the memory order of indices, so the prefetch stream is the
    # next ids of the same table
    d = buf.shape[1]
    for g in range(tids.shape[0]):
        t = tids[g]
        base = row_off[g]
        c = col_off[t]
        first = t * n_bags
        pf_end = offsets[first + b1]
        for j in range(offsets[first + b0], min(offsets[first + b0] + PF, pf_end)):
            prefetch_row_l2(buf, base + indices[j])
        for b in range(b0, b1):
            pool_one(buf, indices, weights, use_w, mode, offsets[first + b], offsets[first + b + 1],
                     pf_end, base, out[b, c:c + d])
{_PARALLEL_SOURCE}'''


_KERNEL_SETS: dict = {}


def bag_kernels(d: int, dtype, use_max: bool):
    """The cached kernel set for width ``d``, ``dtype`` (any spelling) and max-or-not."""
    key = (d, dtype, use_max)
    ks = _KERNEL_SETS.get(key)  # the serving path: one dict probe (np.dtype.name costs 3 us)
    if ks is None:
        ks = _KERNEL_SETS[key] = _bag_kernels(int(d), np.dtype(dtype).name, bool(use_max))
    return ks


@functools.lru_cache(maxsize=None)
def _bag_kernels(d: int, dtype: str, use_max: bool):
    """Kernels for width ``d``, ``dtype`` name and max-or-not: a namespace with ``bag_range``,
    ``bag_parallel``, ``tbe_range``, ``tbe_parallel`` (see the module contract)."""
    dtype = np.dtype(dtype)
    if d in SPECIALISED_DIMS and not use_max:
        m = load_generated(f"bag_d{d}_{dtype.name}", _specialised_source(d, dtype))
        kernels = [with_slp(k) for k in (m.bag_range, m.bag_parallel, m.tbe_range, m.tbe_parallel)]
        streamed = [k and with_slp(k) for k in (m.tbe_range_streamed, m.tbe_parallel_streamed)]
        return KernelSet(*kernels, specialised=True, tbe_range_streamed=streamed[0], tbe_parallel_streamed=streamed[1])
    m = load_generated("bag_generic", _GENERIC_SOURCE)
    return KernelSet(m.bag_range, m.bag_parallel, m.tbe_range, m.tbe_parallel, specialised=False)


class KernelSet:
    """The kernels of one (width, dtype, max-or-not). The fused LoRA lookups live in
    :mod:`lukern._kernels.lora`."""

    __slots__ = ("bag_range", "bag_parallel", "tbe_range", "tbe_parallel", "specialised", "tbe_range_streamed",
                 "tbe_parallel_streamed")

    def __init__(self, bag_range, bag_parallel, tbe_range, tbe_parallel, specialised, tbe_range_streamed=None,
                 tbe_parallel_streamed=None):
        self.bag_range = bag_range
        self.bag_parallel = bag_parallel
        self.tbe_range = tbe_range
        self.tbe_parallel = tbe_parallel
        self.specialised = specialised
        # the table-batched kernels with an extra ``out_u8`` argument that write every row
        # with non-temporal stores (widths of whole cache lines only, else None)
        self.tbe_range_streamed = tbe_range_streamed
        self.tbe_parallel_streamed = tbe_parallel_streamed

    def all(self):
        return (self.bag_range, self.bag_parallel, self.tbe_range, self.tbe_parallel)


# kept under these names for kernels elsewhere that follow the same recipe
_with_slp = with_slp
