"""Kernel families the tuner knows: what to run, on which shapes, in which space.

A family is an op name (the one lukern's wrapper passes to ``resolve_plan``, so the
profile entries land where the wrapper looks), a few representative shapes, and a
``build`` function turning a shape into a ready :class:`~lukern_tuning.runner.Case`
(data, a ring of batches, the numpy reference of batch 0, the bucket key computed by
lukern's own bucketing). The search space and the parameter -> plan mapping default to
the bag-parallel lookup ones. Adding a family is a ``register(Family(...))`` call; for
example the fused LoRA lookup, once ``embedding_bag(..., adapter=)`` exists::

    def _build_lora_lookup(shape, ws):
        base = _build_embedding_bag(shape, ws)            # same table, batches, bucket
        adapter = ws.adapter(base, rank=shape["rank"])    # seeded LoRAAdapter
        ...call = lambda plan, i: lukern.embedding_bag(..., adapter=adapter, **plan)
        return dataclasses.replace(base, op="lora_lookup", call=call, expected=...)

    register(Family("lora_lookup", "fused LoRA lookup", EMBEDDING_AXES,
                    shapes=EMBEDDING_BAG_SHAPES, build=_build_lora_lookup))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .runner import Case
from .space import DEFAULT_CHUNKS_PER_THREAD, SearchSpace, lookup_space

__all__ = ["EMBEDDING_AXES", "FAMILIES", "Family", "Workspace", "register"]

#: what lukern.embedding._bucket returns: (dtype name, d, log2 pooling, log2 bags)
EMBEDDING_AXES = ("dtype", "d", "log2_pooling", "log2_bags")


def chunked_plan(params: dict, n_items: int) -> dict:
    """Search parameters -> the plan keywords a lookup takes. ``chunks_per_thread``
    becomes an absolute ``chunk_size`` (what ``resolve_plan`` and the profile hold)."""
    nt = int(params["n_threads"])
    driver = params["driver"]
    if driver == "prange":
        cpt = int(params.get("chunks_per_thread", DEFAULT_CHUNKS_PER_THREAD))
        chunk = max(1, -(-n_items // (cpt * nt)))
    else:
        chunk = default_chunk(n_items, nt)
    return {"n_threads": nt, "chunk_size": chunk, "driver": driver}


def default_chunk(n_items: int, n_threads: int) -> int:
    """lukern's heuristic chunk (a few per thread, at least 16 bags); drivers other than
    prange ignore the chunk, so their plans all carry this one."""
    return max(16, -(-n_items // (DEFAULT_CHUNKS_PER_THREAD * n_threads)))


def normalize_plan(plan: dict, n_items: int) -> dict:
    """Give equivalent plans one spelling (the journal and the cache key on it)."""
    plan = {"n_threads": int(plan["n_threads"]), "chunk_size": int(plan["chunk_size"]), "driver": plan["driver"]}
    if plan["n_threads"] == 1:
        plan["driver"] = "serial"
    if plan["driver"] != "prange":
        plan["chunk_size"] = default_chunk(n_items, plan["n_threads"])
    return plan


@dataclass(frozen=True)
class Family:
    """One tunable kernel family (see the module docstring)."""

    op: str
    summary: str
    bucket_axes: tuple
    shapes: tuple
    build: Callable[[dict, "Workspace"], Case]
    estimate: Callable[[dict], dict] | None = None
    space: Callable[..., SearchSpace] = field(default=lambda topology, n_items, **kw: lookup_space(topology, n_items, **kw))
    to_plan: Callable[[dict, int], dict] = chunked_plan
    normalize: Callable[[dict, int], dict] = normalize_plan

    def shapes_for(self, dims=None) -> list[dict]:
        """The family's shapes, with ``d`` replaced by each of ``dims`` when given."""
        if not dims:
            return [dict(s) for s in self.shapes]
        out = []
        for d in dims:
            for s in self.shapes:
                s = dict(s)
                if "d" in s:
                    s["d"] = int(d)
                    s["label"] = f"{s['label']} d={d}" if len(dims) > 1 else s["label"]
                out.append(s)
        return out


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.op] = family
    return family


# -- shared data -----------------------------------------------------------------------------

class Workspace:
    """Seeded data shared by the cases of one session: one big table per (rows, d, dtype),
    so the single-table and table-batched families read the same memory."""

    def __init__(self, seed: int = 0, n_rows: int = 1 << 19, n_batches: int = 8):
        self.seed = seed
        self.n_rows = n_rows
        self.n_batches = n_batches
        self._tables: dict = {}

    def table(self, d: int, dtype, n_rows: int | None = None) -> np.ndarray:
        n_rows = int(n_rows or self.n_rows)
        key = (n_rows, int(d), np.dtype(dtype).name)
        if key not in self._tables:
            rng = np.random.default_rng([self.seed, n_rows, d])
            if np.dtype(dtype) == np.float32:
                self._tables[key] = rng.standard_normal((n_rows, d), dtype=np.float32)
            else:
                self._tables[key] = rng.standard_normal((n_rows, d)).astype(dtype)
        return self._tables[key]

    def rng(self, label: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, *label.encode()])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tables.values())


def _ids(rng, n, n_rows, distribution):
    from lukern.testing import zipf_ids

    if distribution == "zipf":
        return zipf_ids(rng, n, n_rows, exponent=1.05)
    return rng.integers(0, n_rows, size=n, dtype=np.int64)


def _ring(make_one, bucket_of, n_batches, label):
    """``n_batches`` distinct batches that all fall in the bucket of the first one (the
    bucket depends on the drawn id count; a batch across a boundary is drawn again)."""
    batches = [make_one()]
    bucket = bucket_of(batches[0])
    tries = 0
    while len(batches) < n_batches:
        b = make_one()
        tries += 1
        if bucket_of(b) == bucket:
            batches.append(b)
        elif tries > 20 * n_batches:
            raise RuntimeError(f"shape {label!r} straddles a bucket boundary; pick a pooling range away from it.")
    return batches, bucket


# -- embedding_bag ---------------------------------------------------------------------------

EMBEDDING_BAG_SHAPES = (
    # pooling ranges keep the mean id count per bag away from the log2 bucket edges
    {"label": "128 bags x 1-4 ids", "n_bags": 128, "pooling": (1, 4), "d": 64, "dtype": "float32"},
    {"label": "512 bags x 20-40 ids", "n_bags": 512, "pooling": (20, 40), "d": 64, "dtype": "float32"},
    {"label": "2048 bags x 20-40 ids", "n_bags": 2048, "pooling": (20, 40), "d": 64, "dtype": "float32"},
    {"label": "8192 bags x 1-4 ids", "n_bags": 8192, "pooling": (1, 4), "d": 64, "dtype": "float32"},
)


def _estimate_lookup(shape: dict) -> dict:
    from lukern.embedding import _bucket

    n_t = int(shape.get("n_tables", 1))
    lo, hi = shape["pooling"]
    n_ids = int(shape["n_bags"] * n_t * (lo + hi) / 2)
    return {"n_work": n_ids, "n_items": shape["n_bags"],
            "bucket": _bucket(shape["d"], shape["n_bags"] * n_t, n_ids, shape["dtype"]),
            "batch_bytes": n_ids * 8 + (shape["n_bags"] * n_t + 1) * 8}


def _lookup_ring(shape: dict, ws: Workspace):
    """(table, batches, bucket) of a single-table lookup shape."""
    from lukern.embedding import _bucket
    from lukern.testing import make_offsets

    d, dtype, n_bags = int(shape["d"]), np.dtype(shape["dtype"]), int(shape["n_bags"])
    table = ws.table(d, dtype)
    rng = ws.rng(shape["label"] + f"/{d}")

    def one():
        off = make_offsets(rng, n_bags, tuple(shape["pooling"]))
        return _ids(rng, int(off[-1]), table.shape[0], shape.get("distribution", "zipf")), off

    batches, bucket = _ring(one, lambda b: _bucket(d, n_bags, len(b[0]), dtype), ws.n_batches, shape["label"])
    return table, batches, bucket


def _build_embedding_bag(shape: dict, ws: Workspace) -> Case:
    import lukern
    from lukern.testing import reference_embedding_bag

    d, dtype, n_bags = int(shape["d"]), np.dtype(shape["dtype"]), int(shape["n_bags"])
    table, batches, bucket = _lookup_ring(shape, ws)
    out = np.empty((n_bags, d), dtype=dtype)
    expected = reference_embedding_bag(table, *batches[0])
    n = len(batches)

    def call(plan, i):
        idx, off = batches[i % n]
        return lukern.embedding_bag(table, idx, off, out=out, **plan)

    return Case("embedding_bag", shape["label"], bucket, len(batches[0][0]), n_bags, call, expected, n,
                rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4 if dtype == np.float32 else 1e-10,
                nbytes=table.nbytes, shape=dict(shape))


register(Family("embedding_bag", "one table, pooled lookup (lukern.embedding_bag)", EMBEDDING_AXES,
                EMBEDDING_BAG_SHAPES, _build_embedding_bag, _estimate_lookup))


# -- lora_lookup -----------------------------------------------------------------------------

LORA_SHAPES = (
    {"label": "2048 bags x 20-40 ids, r=8, 5% active", "n_bags": 2048, "pooling": (20, 40), "d": 64,
     "dtype": "float32", "rank": 8, "active": 0.05},
    {"label": "512 bags x 20-40 ids, r=8, 5% active", "n_bags": 512, "pooling": (20, 40), "d": 64,
     "dtype": "float32", "rank": 8, "active": 0.05},
)


def _build_lora_lookup(shape: dict, ws: Workspace) -> Case:
    import lukern
    from lukern.testing import reference_embedding_bag

    table, batches, bucket = _lookup_ring(shape, ws)
    rng = ws.rng(shape["label"] + "/adapter")
    n_active = int(table.shape[0] * shape["active"])
    adapter = lukern.LoRAAdapter(table.shape[0], table.shape[1], rank=int(shape["rank"]), capacity=n_active,
                                 dtype=table.dtype)
    rows = rng.choice(table.shape[0], n_active, replace=False).astype(np.int64)
    adapter.backward(rows, np.array([0, rows.size]), np.zeros((1, table.shape[1]), table.dtype))
    adapter.step()
    adapter.A[:] = (rng.standard_normal(adapter.A.shape) * 0.01).astype(table.dtype)
    expected = reference_embedding_bag((table + adapter.dense_delta()).astype(table.dtype), *batches[0])
    out = np.empty_like(expected)
    n = len(batches)

    def call(plan, i):
        idx, off = batches[i % n]
        return lukern.embedding_bag(table, idx, off, out=out, adapter=adapter, **plan)

    f32 = table.dtype == np.float32
    return Case("lora_lookup", shape["label"], bucket, len(batches[0][0]), int(shape["n_bags"]), call, expected, n,
                rtol=1e-4 if f32 else 1e-10, atol=1e-4 if f32 else 1e-10, nbytes=table.nbytes + adapter.nbytes,
                shape=dict(shape))


register(Family("lora_lookup", "fused LoRA lookup (lukern.embedding_bag with adapter=)", EMBEDDING_AXES,
                LORA_SHAPES, _build_lora_lookup, _estimate_lookup))


# -- table_batch -----------------------------------------------------------------------------

TABLE_BATCH_SHAPES = (
    {"label": "8 tables x 128 bags x 1-4 ids", "n_tables": 8, "n_bags": 128, "pooling": (1, 4), "d": 64,
     "dtype": "float32"},
    {"label": "8 tables x 1024 bags x 8-16 ids", "n_tables": 8, "n_bags": 1024, "pooling": (8, 16), "d": 64,
     "dtype": "float32"},
    # Criteo-like: 26 one-hot features per sample
    {"label": "26 tables x 512 bags x 1 id", "n_tables": 26, "n_bags": 512, "pooling": (1, 1), "d": 64,
     "dtype": "float32"},
)


def _build_table_batch(shape: dict, ws: Workspace) -> Case:
    import lukern
    from lukern.embedding import _bucket
    from lukern.testing import make_offsets, reference_table_batch

    d, dtype = int(shape["d"]), np.dtype(shape["dtype"])
    n_t, n_bags = int(shape["n_tables"]), int(shape["n_bags"])
    buffer = ws.table(d, dtype)
    counts = [buffer.shape[0] // n_t] * n_t
    counts[-1] += buffer.shape[0] - sum(counts)
    batch = lukern.TableBatch.from_buffer(buffer, counts)  # views of the shared table, no copy
    rng = ws.rng(shape["label"] + f"/{d}")

    def one():
        offs = [make_offsets(rng, n_bags, tuple(shape["pooling"])) for _ in range(n_t)]
        ids = [_ids(rng, int(o[-1]), counts[t], shape.get("distribution", "zipf")) for t, o in enumerate(offs)]
        return batch.pack(ids, offs)

    batches, bucket = _ring(one, lambda b: _bucket(d, n_bags * n_t, len(b[0]), dtype), ws.n_batches, shape["label"])
    out = np.empty((n_bags, batch.total_dim), dtype=dtype)
    expected = reference_table_batch(batch.tables, *batches[0])
    n = len(batches)

    def call(plan, i):
        idx, off = batches[i % n]
        return batch.lookup(idx, off, out=out, **plan)

    return Case("table_batch", shape["label"], bucket, len(batches[0][0]), n_bags, call, expected, n,
                rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4 if dtype == np.float32 else 1e-10,
                nbytes=buffer.nbytes, shape=dict(shape), plan_kwargs={"chunks_per_thread": 1})


register(Family("table_batch", "many tables in one call (lukern.TableBatch.lookup)", EMBEDDING_AXES,
                TABLE_BATCH_SHAPES, _build_table_batch, _estimate_lookup))

