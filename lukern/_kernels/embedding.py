"""Embedding-bag kernels (forward), single table and table-batched.

Contract shared by every kernel here (the wrappers in :mod:`lukern.embedding` check it):

- ``table``: C-contiguous (n_rows, d) float32/float64; ``indices``: int32/int64 in
  [0, n_rows); ``offsets``: non-decreasing, ``offsets[0] == 0``, last == len(indices);
- ``weights``: per-index weights of the table dtype, read only when ``use_w``;
- ``mode``: ``MODE_SUM``, ``MODE_MEAN`` or ``MODE_MAX``; an empty bag gives zeros;
- ``out``: (n_bags, d) of the table dtype, every element of bags [b0, b1) is written.

Speed (DESIGN section 9): for the common widths the kernels are *generated per d* so the
accumulators are d scalars that LLVM's SLP vectorizer packs into vector registers, and an
explicit prefetch runs ``PREFETCH_DISTANCE`` ids ahead (across bag boundaries). Other
widths use a generic kernel that accumulates in the output row.
"""

from __future__ import annotations

import contextlib
import functools

import numba
import numpy as np
from numba import njit, prange
from numba.core.compiler_lock import global_compiler_lock

from ._intrinsics import prefetch_row

MODE_SUM = 0
MODE_MEAN = 1
MODE_MAX = 2
MODES = {"sum": MODE_SUM, "mean": MODE_MEAN, "max": MODE_MAX}

#: widths that get a register-accumulator kernel; others use the generic one
SPECIALISED_DIMS = (4, 8, 16, 32, 48, 64, 96, 128)
#: how many ids ahead the row prefetch runs (about one DRAM latency of work)
PREFETCH_DISTANCE = 8
PF = PREFETCH_DISTANCE

_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def _unrolled_source(d: int, dtype: str) -> str:
    """Python source of ``pool_one`` for width ``d``: d scalar accumulators."""
    acc = [f"a{k}" for k in range(d)]
    init = "\n".join(f"    {a} = zero" for a in acc)
    add_w = "\n".join(f"            {a} += w * r[{k}]" for k, a in enumerate(acc))
    add = "\n".join(f"            {a} += r[{k}]" for k, a in enumerate(acc))
    store = "\n".join(f"    o[{k}] = {a} * scale" for k, a in enumerate(acc))
    return f'''
def pool_one(table, indices, weights, use_w, mode, s, e, pf_end, base, o):
    zero = np.{dtype}(0.0)
    one = np.{dtype}(1.0)
{init}
    if use_w:
        for j in range(s, e):
            if j + PF < pf_end:
                prefetch_row(table, base + indices[j + PF])
            w = weights[j]
            r = table[base + indices[j]]
{add_w}
    else:
        for j in range(s, e):
            if j + PF < pf_end:
                prefetch_row(table, base + indices[j + PF])
            r = table[base + indices[j]]
{add}
    scale = one
    if mode == 1 and e > s:
        scale = one / np.{dtype}(e - s)
{store}
'''


def _generic_pool_one(table, indices, weights, use_w, mode, s, e, pf_end, base, o):
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
    for j in range(s, e):
        if j + PF < pf_end:
            prefetch_row(table, base + indices[j + PF])
        r = table[base + indices[j]]
        if use_w:
            w = weights[j]
            for k in range(d):
                o[k] += w * r[k]
        else:
            for k in range(d):
                o[k] += r[k]
    if mode == 1 and e > s:
        inv = 1.0 / (e - s)
        for k in range(d):
            o[k] = o[k] * inv


def _make_drivers(pool_one):
    """Range and prange kernels, single-table and table-batched, around ``pool_one``."""

    def bag_range(table, indices, offsets, weights, use_w, mode, out, b0, b1):
        pf_end = offsets[b1]
        for b in range(b0, b1):
            pool_one(table, indices, weights, use_w, mode, offsets[b], offsets[b + 1], pf_end, 0, out[b])

    def tbe_range(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out, b0, b1):
        # table-major: follows the memory order of indices, so the prefetch stream is
        # the next ids of the same table
        d = buf.shape[1]
        for g in range(tids.shape[0]):
            t = tids[g]
            base = row_off[g]
            c = col_off[t]
            first = t * n_bags
            pf_end = offsets[first + b1]
            for b in range(b0, b1):
                pool_one(buf, indices, weights, use_w, mode, offsets[first + b], offsets[first + b + 1],
                         pf_end, base, out[b, c:c + d])

    bag_range = njit(nogil=True)(bag_range)
    tbe_range = njit(nogil=True)(tbe_range)

    def bag_parallel(table, indices, offsets, weights, use_w, mode, out, chunk):
        n = out.shape[0]
        n_chunks = (n + chunk - 1) // chunk
        for c in prange(n_chunks):
            b0 = c * chunk
            bag_range(table, indices, offsets, weights, use_w, mode, out, b0, min(n, b0 + chunk))

    def tbe_parallel(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out, chunk):
        n_chunks = (n_bags + chunk - 1) // chunk
        for c in prange(n_chunks):
            b0 = c * chunk
            tbe_range(buf, row_off, col_off, tids, n_bags, indices, offsets, weights, use_w, mode, out,
                      b0, min(n_bags, b0 + chunk))

    return (bag_range, njit(nogil=True, parallel=True)(bag_parallel),
            tbe_range, njit(nogil=True, parallel=True)(tbe_parallel))


@contextlib.contextmanager
def _slp_vectorizer_on():
    """LLVM's SLP vectorizer on for compilations inside this block only.

    numba reads ``config.SLP_VECTORIZE`` when it builds each pass pipeline; the switch is
    flipped only while numba's global compiler lock is held, so no other compilation (of
    lukern or of the user) sees it, and numba's global config is restored at once.
    """
    with global_compiler_lock:
        saved = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            numba.config.SLP_VECTORIZE = saved


def _with_slp(dispatcher):
    """Make every compilation of ``dispatcher`` (lazy or eager) use the SLP vectorizer."""
    lazy, eager = dispatcher._compile_for_args, dispatcher.compile

    def compile_for_args(*args, **kws):
        with _slp_vectorizer_on():
            return lazy(*args, **kws)

    def compile_signature(sig):
        with _slp_vectorizer_on():
            return eager(sig)

    dispatcher._compile_for_args = compile_for_args
    dispatcher.compile = compile_signature
    return dispatcher


@functools.lru_cache(maxsize=None)
def bag_kernels(d: int, dtype, use_max: bool):
    """Kernels for width ``d``, ``dtype`` and max-or-not: a namespace with ``bag_range``,
    ``bag_parallel``, ``tbe_range``, ``tbe_parallel`` (see the module contract)."""
    dtype = np.dtype(dtype)
    if d in SPECIALISED_DIMS and not use_max:
        namespace = {"np": np, "prefetch_row": prefetch_row, "PF": PREFETCH_DISTANCE}
        exec(compile(_unrolled_source(d, _DTYPE_NAMES[dtype]), f"<lukern pool_one d={d} {dtype}>", "exec"), namespace)
        pool_one = njit(nogil=True)(namespace["pool_one"])
        slp = True
    else:
        pool_one = _generic_pool
        slp = False
    kernels = _make_drivers(pool_one)
    if slp:
        kernels = tuple(_with_slp(k) for k in kernels)
    return KernelSet(*kernels, specialised=slp)


class KernelSet:
    __slots__ = ("bag_range", "bag_parallel", "tbe_range", "tbe_parallel", "specialised")

    def __init__(self, bag_range, bag_parallel, tbe_range, tbe_parallel, specialised):
        self.bag_range = bag_range
        self.bag_parallel = bag_parallel
        self.tbe_range = tbe_range
        self.tbe_parallel = tbe_parallel
        self.specialised = specialised

    def all(self):
        return (self.bag_range, self.bag_parallel, self.tbe_range, self.tbe_parallel)


_generic_pool = njit(nogil=True)(_generic_pool_one)
