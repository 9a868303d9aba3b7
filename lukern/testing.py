"""numpy reference implementations and seeded problem builders.

Shared by lukern's tests, its benchmarks and the autotuner, so that all three agree on
what "correct" and "a realistic input" mean. Everything here is plain numpy: slow, short
and obviously right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LookupProblem",
    "make_lookup_problem",
    "make_offsets",
    "reference_embedding_bag",
    "reference_table_batch",
    "zipf_ids",
]


def reference_embedding_bag(table, indices, offsets, weights=None, mode="sum"):
    """Pooled rows per CSR bag, one bag at a time (torch ``include_last_offset=True``)."""
    n_bags = len(offsets) - 1
    out = np.zeros((n_bags, table.shape[1]), dtype=table.dtype)
    for b in range(n_bags):
        s, e = int(offsets[b]), int(offsets[b + 1])
        if e == s:
            continue
        rows = table[indices[s:e]].astype(np.float64)
        if weights is not None:
            rows = rows * weights[s:e, None]
        if mode == "sum":
            out[b] = rows.sum(axis=0)
        elif mode == "mean":
            out[b] = rows.mean(axis=0)
        elif mode == "max":
            out[b] = rows.max(axis=0)
        else:
            raise ValueError(mode)
    return out


def reference_table_batch(tables, indices, offsets, weights=None, mode="sum"):
    """Batched lookup in the TableBatch layout, table by table."""
    n_t = len(tables)
    n_bags = (len(offsets) - 1) // n_t
    cols = []
    for t, tab in enumerate(tables):
        off = offsets[t * n_bags:(t + 1) * n_bags + 1]
        s = int(off[0])
        w = None if weights is None else weights[s:int(off[-1])]
        cols.append(reference_embedding_bag(tab, indices[s:int(off[-1])], off - s, w, mode))
    return np.concatenate(cols, axis=1)


def zipf_ids(rng: np.random.Generator, n: int, n_rows: int, exponent: float = 1.05, dtype=np.int64):
    """``n`` ids in [0, n_rows) with P(rank k) proportional to k**-exponent, hot ids
    scattered over the table by a fixed permutation (popular rows are not adjacent)."""
    ranks = np.arange(1, n_rows + 1, dtype=np.float64)
    p = ranks ** -exponent
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    r = np.searchsorted(cdf, rng.random(n), side="right")
    r = np.minimum(r, n_rows - 1)
    # multiplicative hash as the permutation: cheap and needs no n_rows-sized array
    a = 2654435761 % n_rows or 1
    while np.gcd(a, n_rows) != 1:
        a += 1
    return ((r.astype(np.int64) * a + 12345) % n_rows).astype(dtype)


def make_offsets(rng: np.random.Generator, n_bags: int, pooling=(20, 40), dtype=np.int64):
    """CSR offsets for ``n_bags`` bags with lengths uniform in ``pooling`` (inclusive)."""
    lo, hi = pooling
    lengths = rng.integers(lo, hi + 1, size=n_bags)
    return np.concatenate(([0], np.cumsum(lengths))).astype(dtype)


@dataclass
class LookupProblem:
    table: np.ndarray
    indices: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None = None

    @property
    def n_bags(self) -> int:
        return len(self.offsets) - 1


def make_lookup_problem(n_rows=1000, dim=16, n_bags=64, pooling=(0, 8), distribution="uniform",
                        dtype=np.float32, index_dtype=np.int64, weighted=False, seed=0, table=None):
    """A seeded lookup problem; pass ``table`` to reuse a big table across problems."""
    rng = np.random.default_rng(seed)
    if table is None:
        table = rng.standard_normal((n_rows, dim)).astype(dtype)
    n_rows = table.shape[0]
    offsets = make_offsets(rng, n_bags, pooling, dtype=index_dtype)
    n = int(offsets[-1])
    if distribution == "uniform":
        indices = rng.integers(0, n_rows, size=n).astype(index_dtype)
    elif distribution == "zipf":
        indices = zipf_ids(rng, n, n_rows, dtype=index_dtype)
    else:
        raise ValueError(f"`distribution` must be 'uniform' or 'zipf'; got {distribution!r}.")
    weights = rng.random(n).astype(table.dtype) if weighted else None
    return LookupProblem(table, indices, offsets, weights)
