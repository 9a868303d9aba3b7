"""Kernels of the randomized SVD (DESIGN section 2, "Randomized SVD").

Every pass streams the operand once, in row blocks that stay in cache: a block of rows
(a slice of a dense matrix, or rows gathered from a table by id with software prefetch)
is multiplied by the small test matrix with BLAS (numba's ``np.dot``) and the result is
folded back at once, so ``M^T M Q`` costs one read of ``M`` and the tall ``M Q`` is never
written to memory. Accumulators are float64 and owned by the caller (one per worker
thread, merged in a fixed order by the wrapper), so results are deterministic for a given
thread count.

Contracts: ``M``/``table`` are C-contiguous float32 or float64; ``Q``, ``X`` and the block
buffer have the operand's dtype and are C-contiguous; ``Z``/``G`` are float64 and are
accumulated into (not overwritten); ``row_ids`` are int64 in range; ``[lo, hi)`` is a
range of operand rows. Nothing is validated here.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._intrinsics import prefetch_row

__all__ = [
    "gather_block",
    "gram_apply_dense",
    "gram_apply_gathered",
    "gram_dense",
    "gram_gathered",
    "matmul_dense",
    "matmul_gathered",
]

# Rows per block: 256 rows x 128 float32 = 128 KiB stays in L2 while both products read
# it. One pass at 200000 x 128, l = 14, two threads: 29 ms with 256-row blocks, 34 ms
# with 512, 37 ms with 8192 (l = 42: 82 / 96 / 124 ms), reference host under load.
BLOCK_ROWS = 256
_PREFETCH_AHEAD = 8


@njit(nogil=True)
def gather_block(table, row_ids, start, n, buf):
    """``buf[:n] = table[row_ids[start:start + n]]`` with rows prefetched a few ids ahead."""
    d = table.shape[1]
    n_ids = row_ids.shape[0]
    for j in range(n):
        ahead = start + j + _PREFETCH_AHEAD
        if ahead < n_ids:
            prefetch_row(table, row_ids[ahead])
        r = row_ids[start + j]
        for c in range(d):
            buf[j, c] = table[r, c]


@njit(nogil=True)
def _fold_gram_apply(blk, Q, Z, Y, keep, b0):
    # Z += blk^T (blk Q): the block is read twice while it is in cache; with ``keep``
    # the sketch rows blk Q are stored too (the last pass, so U needs no extra pass)
    Yb = np.dot(blk, Q)
    Z += np.dot(blk.T, Yb)
    if keep:
        Y[b0:b0 + blk.shape[0]] = Yb


@njit(nogil=True)
def gram_apply_dense(M, Q, Z, Y, keep, lo, hi):
    """``Z += M[lo:hi]^T (M[lo:hi] Q)``; ``Q`` (d x l), ``Z`` (d x l, float64); with
    ``keep``, also ``Y[lo:hi] = M[lo:hi] Q`` (``Y`` n x l, else any 2-D array)."""
    for b0 in range(lo, hi, BLOCK_ROWS):
        b1 = min(b0 + BLOCK_ROWS, hi)
        _fold_gram_apply(M[b0:b1], Q, Z, Y, keep, b0)


@njit(nogil=True)
def gram_apply_gathered(table, row_ids, Q, Z, Y, keep, buf, lo, hi):
    """``Z += T^T (T Q)`` with ``T = table[row_ids[lo:hi]]`` gathered block by block into
    ``buf`` (BLOCK_ROWS x d), never materialised whole; ``keep``: as gram_apply_dense."""
    for b0 in range(lo, hi, BLOCK_ROWS):
        n = min(BLOCK_ROWS, hi - b0)
        gather_block(table, row_ids, b0, n, buf)
        _fold_gram_apply(buf[:n], Q, Z, Y, keep, b0)


@njit(nogil=True)
def gram_dense(M, G, lo, hi):
    """``G += M[lo:hi]^T M[lo:hi]`` (d x d, float64)."""
    for b0 in range(lo, hi, BLOCK_ROWS):
        b1 = min(b0 + BLOCK_ROWS, hi)
        blk = M[b0:b1]
        G += np.dot(blk.T, blk)


@njit(nogil=True)
def gram_gathered(table, row_ids, G, buf, lo, hi):
    """``G += T^T T`` with ``T = table[row_ids[lo:hi]]`` gathered block by block."""
    for b0 in range(lo, hi, BLOCK_ROWS):
        n = min(BLOCK_ROWS, hi - b0)
        gather_block(table, row_ids, b0, n, buf)
        blk = buf[:n]
        G += np.dot(blk.T, blk)


@njit(nogil=True)
def matmul_dense(M, X, out, lo, hi):
    """``out[lo:hi] = M[lo:hi] @ X`` block by block."""
    for b0 in range(lo, hi, BLOCK_ROWS):
        b1 = min(b0 + BLOCK_ROWS, hi)
        out[b0:b1] = np.dot(M[b0:b1], X)


@njit(nogil=True)
def matmul_gathered(table, row_ids, X, out, buf, lo, hi):
    """``out[lo:hi] = table[row_ids[lo:hi]] @ X`` block by block."""
    for b0 in range(lo, hi, BLOCK_ROWS):
        n = min(BLOCK_ROWS, hi - b0)
        gather_block(table, row_ids, b0, n, buf)
        out[b0:b0 + n] = np.dot(buf[:n], X)
