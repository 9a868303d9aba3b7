"""Kernels for NUMA sharding: the access sketch and id translation.

Contract: ids are in [0, n_rows); ``cuts`` are the first global row of each node's range
(non-decreasing, ``cuts[0] == 0``, ``cuts[-1] == n_rows``); replicated rows are found
through the LoRA hash kernels (same layout: keys/vals/mask plus a presence bitmap).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .lora import find_slot, is_active

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
def translate_ids(indices, cuts, starts, rep_keys, rep_vals, rep_mask, rep_bitmap, rep_starts, home, out):
    """Global id -> row of the shard buffer: a replicated row reads the ``home`` node's
    replica (``rep_starts[home] + replica index``); any other row reads its owner's range
    (``starts[node] + id - cuts[node]``). ``cuts`` has n_nodes + 1 entries."""
    n_nodes = cuts.shape[0] - 1
    for j in range(indices.shape[0]):
        row = indices[j]
        if is_active(rep_bitmap, row):
            r = find_slot(rep_keys, rep_vals, rep_mask, row)
            if r >= 0:
                out[j] = rep_starts[home] + r
                continue
        node = 0
        while node + 1 < n_nodes and row >= cuts[node + 1]:
            node += 1
        out[j] = starts[node] + row - cuts[node]
