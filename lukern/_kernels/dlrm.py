"""The replay DLRM's dot-interaction backward (:mod:`lukern.replay.dlrm`).

Contract: ``z`` (n, k, d) holds ``[x0, e_1, ..., e_{k-1}]`` per row; ``gp`` (n, P) the loss
gradient of every pair product ``<z_i, z_j>`` for the pairs ``(pi[p], pj[p])``, i != j;
``out`` (k - t0, N, d) with N >= row0 + n. Nothing is validated.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
