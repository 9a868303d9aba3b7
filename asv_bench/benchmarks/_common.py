"""Shared setup for the lukern asv suite.

Data builders are append-only (new cases get new names) so history stays comparable.
Every benchmark pins its thread count and bypasses the tuned profile, except the class
that measures the tuned plan. ``ASV_SKIP_SLOW=1`` skips the 1 GiB cases.
"""

import os

import numpy as np

from lukern.testing import make_offsets, zipf_ids

SKIP_SLOW = os.environ.get("ASV_SKIP_SLOW", "") not in ("", "0")
N_BATCHES = 8  # a ring of distinct batches so repeated calls do not hit a warm cache


def lookup_batches(n_rows, n_bags, pooling, distribution, seed=0, n_batches=N_BATCHES):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        off = make_offsets(rng, n_bags, pooling)
        n = int(off[-1])
        idx = rng.integers(0, n_rows, size=n) if distribution == "uniform" else zipf_ids(rng, n, n_rows)
        out.append((idx, off))
    return out


_TABLES = {}


def table(n_rows, dim, dtype="float32"):
    """One seeded table per shape per process (the 1 GiB one is built once)."""
    key = (n_rows, dim, dtype)
    if key not in _TABLES:
        rng = np.random.default_rng(42)
        _TABLES[key] = rng.standard_normal((n_rows, dim)).astype(dtype)
    return _TABLES[key]


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch
