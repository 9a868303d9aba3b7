"""The replay DLRM's dot-interaction backward (:mod:`lukern.replay.dlrm`).

Contract: ``z`` (n, k, d) holds ``[x0, e_1, ..., e_{k-1}]`` per row; ``gp`` (n, P) the loss
gradient of every pair product ``<z_i, z_j>`` for the pairs ``(pi[p], pj[p])``, i != j;
``out`` (k - t0, N, d) with N >= row0 + n. Nothing is validated.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lora import _home


@njit(nogil=True, cache=True)
def interaction_backward(gp, pi, pj, z, t0, out, row0):
    """``out[t - t0, row0 + b] = sum_j S_b[t, j] z[b, j]`` for t in [t0, k): the gradient
    of the pair products with respect to ``z[b, t]`` (``S_b`` symmetric, ``S_b[pi, pj] =
    gp[row0 + b, p]``, zero diagonal), written table-major so that each slot's rows are
    contiguous. Skipping t < t0 spares the gradients a caller does not need; ``row0``
    lets the rows of several forward passes' ``z`` land in one ``out`` without joining
    them first."""
    n, k, d = z.shape
    S = np.zeros((k, k), gp.dtype)
    for b in range(n):
        for p in range(pi.shape[0]):
            S[pi[p], pj[p]] = gp[row0 + b, p]
            S[pj[p], pi[p]] = gp[row0 + b, p]
        for t in range(t0, k):
            o = out[t - t0, row0 + b]
            for x in range(d):
                o[x] = 0.0
            for j in range(k):
                s = S[t, j]
                if j != t:
                    for x in range(d):
                        o[x] += s * z[b, j, x]


@njit(nogil=True, cache=True)
def sum_by_id(ids, grad, out_ids, counts, keys, pos):
    """Per table ``t``: the distinct ids of ``ids[t]`` (n,) in order of first appearance
    into ``out_ids[t, :u]``, and the sum of each one's rows of ``grad[t]`` (n, d) into
    ``grad[t, :u]`` **in place** (row u is written only after every row <= u was read),
    ``counts[t] = u``. Sums in grad's dtype, rows in order.

    With one id per bag and sum pooling, a LoRA backward on the summed rows gives the
    same gradients of A and B as on the bags (both are linear in the bag gradients),
    and the first-appearance order keeps the order rows are admitted to slots.
    Scratch: ``keys`` and ``pos`` (m,) int64, ``m`` a power of two >= 2n (an
    open-addressing table, cleared here per table)."""
    n_tables, n = ids.shape
    d = grad.shape[2]
    m = keys.shape[0]
    mask = m - 1
    for t in range(n_tables):
        for i in range(m):
            keys[i] = -1
        u = 0
        g = grad[t]
        for b in range(n):
            v = ids[t, b]
            h = _home(v, mask)  # the adapters' hash (Fibonacci hashing, the product's high bits)
            while keys[h] != -1 and keys[h] != v:
                h = (h + 1) & mask
            if keys[h] == -1:
                keys[h] = v
                pos[h] = u
                out_ids[t, u] = v
                if u != b:
                    for x in range(d):
                        g[u, x] = g[b, x]
                u += 1
            else:
                p = pos[h]
                for x in range(d):
                    g[p, x] += g[b, x]
        counts[t] = u
