"""NUMA-sharded tables: access statistics, frequency-aware partitioning with hot-row
replication, and :class:`ShardedTable` (issue 9; UpDLRM's idea, balancing lookup *load*
rather than row counts, brought from memory banks to NUMA nodes).

Load model: a lookup of a non-replicated row runs on the node that owns it; lookups of
replicated rows are served from the replica of the requesting node, so their load is
spread evenly. ``imbalance = max / mean`` of the expected per-node load.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np

from . import _validate as V
from ._kernels import lora as LK
from ._kernels import sharding as SK
from .embedding import embedding_bag
from .memory import empty_table

__all__ = ["AccessCounter", "Partition", "ShardedTable", "partition_rows"]


# --- access statistics ---------------------------------------------------------------------

class AccessCounter:
    """Bounded-memory row-access counts: a count-min sketch for every row plus a small
    candidate table of heavy hitters (rows whose estimate passed a rising threshold).

    Parameters
    ----------
    n_rows : int
    width, depth : int
        Sketch shape (``width`` a power of two); estimates overshoot by at most
        ``e * total / width`` with probability ``1 - exp(-depth)``.
    candidates : int
        How many heavy-hitter candidates are kept.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> c = lukern.AccessCounter(1000)
    >>> c.observe(np.array([7, 7, 7, 3]))
    >>> int(c.hottest(1)[0])
    7
    """

    def __init__(self, n_rows: int, *, width: int = 1 << 16, depth: int = 4, candidates: int = 4096):
        self.n_rows = V.check_positive_int("n_rows", n_rows, allow_none=False)
        if width & (width - 1) or width < 16:
            raise ValueError(f"`width` must be a power of two >= 16; got {width}.")
        if not 1 <= depth <= len(SK._MULTS):
            raise ValueError(f"`depth` must be in [1, {len(SK._MULTS)}]; got {depth}.")
        self.sketch = np.zeros((depth, width), np.uint32)
        self._mults = SK._MULTS[:depth].copy()
        cap = 1 << max(4, int(4 * candidates - 1).bit_length())
        self._cand_keys = np.full(cap, -1, np.int64)
        self._cand_vals = np.zeros(cap, np.uint32)
        self._keep = int(candidates)
        self._threshold = np.uint32(1)
        self.total = 0

    @property
    def nbytes(self) -> int:
        return self.sketch.nbytes + self._cand_keys.nbytes + self._cand_vals.nbytes

    def observe(self, indices) -> None:
        """Count a batch of looked-up ids (int32/int64, in [0, n_rows))."""
        V.check_indices(indices, self.n_rows)
        start = 0
        while start < indices.shape[0]:
            start = SK.cms_observe(self.sketch, self._mults, indices, start, self._cand_keys, self._cand_vals,
                                   self._cand_keys.shape[0] - 1, self._threshold)
            if start < indices.shape[0]:
                self._compact()  # the candidate table filled up: keep the hottest, go on
        self.total += int(indices.shape[0])

    def _compact(self):
        keys = self._cand_keys[self._cand_keys >= 0]
        est = self.estimate(keys)
        order = np.argsort(-est.astype(np.int64), kind="stable")[: self._keep]
        self._threshold = np.uint32(max(int(est[order[-1]]) if order.size else 1, 1))
        self._cand_keys[:] = -1
        self._cand_vals[:] = 0
        mask = self._cand_keys.shape[0] - 1
        for k, v in zip(keys[order], est[order]):  # a few thousand entries, once in a while
            h = (((int(k) * int(SK._MULTS[0])) & 0xFFFFFFFFFFFFFFFF) >> 40) & mask
            while self._cand_keys[h] >= 0:
                h = (h + 1) & mask
            self._cand_keys[h] = k
            self._cand_vals[h] = v

    @classmethod
    def from_stream(cls, n_rows: int, ids, **kw) -> "AccessCounter":
        """A counter fed with a recorded id stream (one array, or an iterable of batches)."""
        c = cls(n_rows, **kw)
        batches = [ids] if isinstance(ids, np.ndarray) else ids
        for b in batches:
            c.observe(np.ascontiguousarray(b, dtype=np.int64))
        return c

    def estimate(self, rows) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty(rows.shape[0], np.uint32)
        SK.cms_estimate(self.sketch, self._mults, rows, out)
        return out

    def hottest(self, k: int) -> np.ndarray:
        """The ``k`` rows with the largest estimates among the candidates, hottest first."""
        keys = self._cand_keys[self._cand_keys >= 0]
        est = self.estimate(keys).astype(np.int64)
        order = np.lexsort((keys, -est))[:k]
        return keys[order]


# --- partitioning ----------------------------------------------------------------------------------

_STRATEGIES = ("frequency", "range", "hash")


@dataclass
class Partition:
    """Rows -> nodes. ``cuts[k]:cuts[k+1]`` is node k's contiguous range (``None`` for the
    hash strategy, where row r belongs to node ``r % n_nodes``); ``replicated`` rows
    (sorted) live on every node."""

    strategy: str
    n_rows: int
    n_nodes: int
    cuts: np.ndarray | None
    replicated: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def owner_of(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.cuts is None:
            return (rows % self.n_nodes).astype(np.int64)
        return (np.searchsorted(self.cuts, rows, side="right") - 1).astype(np.int64)

    def load(self, freq) -> np.ndarray:
        """Expected lookups per node for per-row frequencies ``freq``."""
        freq = np.asarray(freq, dtype=np.float64)
        f = freq.copy()
        rep_load = f[self.replicated].sum() if self.replicated.size else 0.0
        if self.replicated.size:
            f[self.replicated] = 0
        if self.cuts is None:
            load = np.bincount(np.arange(self.n_rows) % self.n_nodes, weights=f, minlength=self.n_nodes)
        else:
            c = np.concatenate(([0.0], np.cumsum(f)))
            load = c[self.cuts[1:]] - c[self.cuts[:-1]]
        return load + rep_load / self.n_nodes

    def imbalance(self, freq) -> float:
        load = self.load(freq)
        return float(load.max() / load.mean()) if load.mean() > 0 else 1.0

    @property
    def is_identity(self) -> bool:
        return self.n_nodes == 1 and self.replicated.size == 0

    def map_nbytes(self) -> int:
        """Bytes of the id -> (node, local row) map: cut points plus the replica hash
        and presence bitmap (see :class:`ShardedTable`)."""
        hcap = 1 << max(4, int(2 * max(self.replicated.size, 1) - 1).bit_length())
        return (0 if self.cuts is None else self.cuts.nbytes) + hcap * 12 + (self.n_rows + 63) // 64 * 8


def partition_rows(freq, nodes, *, strategy: str = "frequency", replicate_bytes: int = 0,
                   row_bytes: int = 256) -> Partition:
    """Assign rows to NUMA nodes.

    Parameters
    ----------
    freq : ndarray (n_rows,)
        Per-row access frequencies (exact counts or :meth:`AccessCounter.estimate`).
    nodes : int or Topology
        Number of nodes, or a :class:`lukern.topology.Topology` (its nodes with CPUs).
    strategy : {"frequency", "range", "hash"}
        ``frequency``: replicate the hottest rows within ``replicate_bytes`` per node, then
        cut contiguous ranges at equal cumulative remaining frequency. ``range``: equal
        row counts. ``hash``: row r on node r % n.
    replicate_bytes : int
        Replica budget per node (frequency strategy only).
    row_bytes : int
        Bytes of one row (d * itemsize), for the budget.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> f = np.array([100, 1, 1, 1, 1, 1, 1, 1.0])
    >>> p = lukern.partition_rows(f, 2, replicate_bytes=256, row_bytes=256)
    >>> p.replicated.tolist(), round(p.imbalance(f), 3)
    ([0], 1.0)
    """
    freq = np.asarray(freq, dtype=np.float64)
    if freq.ndim != 1 or freq.size == 0:
        raise ValueError(f"`freq` must be a non-empty 1-D array of per-row frequencies; got shape {freq.shape}.")
    if not np.isfinite(freq).all() or freq.min() < 0:
        raise ValueError("`freq` must be finite and >= 0.")
    n_nodes = nodes if isinstance(nodes, (int, np.integer)) else len([n for n in nodes.nodes if n.cpus])
    n_nodes = V.check_positive_int("nodes", int(n_nodes), allow_none=False)
    V.check_choice("strategy", strategy, _STRATEGIES)
    n = freq.size
    if strategy == "hash":
        return Partition("hash", n, n_nodes, None)
    if strategy == "range":
        return Partition("range", n, n_nodes, (np.arange(n_nodes + 1) * n) // n_nodes)
    k = min(int(replicate_bytes) // max(int(row_bytes), 1), n)
    replicated = np.zeros(0, np.int64)
    f = freq
    if k > 0:
        replicated = np.sort(np.argpartition(-freq, k - 1)[:k]).astype(np.int64) if k < n else np.arange(n)
        f = freq.copy()
        f[replicated] = 0
    c = np.cumsum(f)
    total = c[-1]
    if total <= 0:
        cuts = (np.arange(n_nodes + 1) * n) // n_nodes
    else:
        cuts = np.concatenate(([0], np.searchsorted(c, total * np.arange(1, n_nodes) / n_nodes, side="left") + 1, [n]))
        cuts = np.maximum.accumulate(np.minimum(cuts, n))
    return Partition("frequency", n, n_nodes, cuts.astype(np.int64), replicated)


# --- the sharded table -----------------------------------------------------------------------------

def _node_cpus(topology, node: int):
    if topology is None:
        return None
    cpus = [n.cpus for n in topology.nodes if n.cpus]
    return tuple(cpus[node]) if node < len(cpus) else None


def _first_touch(buf, rows, src_rows_fn, cpus):
    """Fill ``buf[rows]`` from a thread pinned to ``cpus``: Linux places a page on the node
    of the CPU that first writes it, so each shard's pages land on its node."""
    errors = []

    # CPUs this process may not use (a fake topology, a cpuset) are dropped; with none
    # left the range is filled unpinned
    cpus = tuple(set(cpus or ()) & os.sched_getaffinity(0))

    def fill():
        try:
            if cpus:
                os.sched_setaffinity(0, cpus)  # this thread only
            buf[rows] = src_rows_fn()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=fill, name="lukern-first-touch")
    t.start()
    t.join()
    if errors:
        raise errors[0]


class _Layout:
    """One shard layout: the buffer and its id translation tables (swapped as a whole)."""

    def __init__(self, table, partition: Partition, topology):
        n_nodes = partition.n_nodes
        if partition.cuts is None:
            raise ValueError("ShardedTable needs contiguous ranges: use strategy 'frequency' or 'range', not 'hash'.")
        cuts = partition.cuts.astype(np.int64)
        rep = partition.replicated.astype(np.int64)
        sizes = np.diff(cuts)
        # buffer: node 0 range, node 0 replicas, node 1 range, node 1 replicas, ...
        per_node = sizes + rep.size
        node_base = np.concatenate(([0], np.cumsum(per_node)))[:-1].astype(np.int64)
        self.starts = node_base.copy()
        self.rep_starts = (node_base + sizes).astype(np.int64)
        self.buffer = empty_table(int(per_node.sum()), table.shape[1], table.dtype)
        for k in range(n_nodes):
            cpus = _node_cpus(topology, k)
            lo = int(self.starts[k])
            _first_touch(self.buffer, slice(lo, lo + int(sizes[k])), lambda k=k: table[cuts[k]:cuts[k + 1]], cpus)
            if rep.size:
                r0 = int(self.rep_starts[k])
                _first_touch(self.buffer, slice(r0, r0 + rep.size), lambda: table[rep], cpus)
        self.cuts = cuts
        hcap = 1 << max(4, int(2 * max(rep.size, 1) - 1).bit_length())
        self.keys = np.full(hcap, -1, np.int64)
        self.vals = np.full(hcap, -1, np.int32)
        self.bitmap = np.zeros((partition.n_rows + 63) // 64, np.uint64)
        slot_row = rep.copy()
        LK.rebuild_hash(slot_row, self.keys, self.vals, hcap - 1, self.bitmap)
        self.partition = partition


class ShardedTable:
    """An embedding table split over NUMA nodes by a :class:`Partition`.

    All shards live in one buffer whose ranges are first-touched by threads pinned to
    their nodes (so each range's pages are on its node); replicated hot rows are copied
    into every node's range. A lookup translates ids to buffer rows (a replicated row
    reads the ``home_node`` replica) and runs lukern's lookup kernel on them, summing
    each bag's rows in their original order: the result equals
    :func:`lukern.embedding_bag` on the unsharded table bit for bit.

    Parameters
    ----------
    table : ndarray (n_rows, d)
        The full table (copied into the shards).
    partition : Partition
        From :func:`partition_rows` (``frequency`` or ``range``).
    topology : lukern.topology.Topology, optional
        Where to first-touch each node's range (default: the calling thread's CPUs).

    Examples
    --------
    >>> import numpy as np, lukern
    >>> t = np.arange(32, dtype=np.float64).reshape(8, 4)
    >>> st = lukern.ShardedTable(t, lukern.partition_rows(np.ones(8), 2))
    >>> idx, off = np.array([0, 7]), np.array([0, 2])
    >>> bool((st.lookup(idx, off) == lukern.embedding_bag(t, idx, off)).all())
    True
    """

    def __init__(self, table, partition: Partition, *, topology=None):
        V.check_table(table)
        if not isinstance(partition, Partition):
            raise TypeError(f"`partition` must be a lukern.Partition; got {type(partition).__name__}.")
        if partition.n_rows != table.shape[0]:
            raise ValueError(f"`partition` covers {partition.n_rows} rows; the table has {table.shape[0]}.")
        self.n_rows, self.dim = table.shape
        self.dtype = table.dtype
        self.topology = topology
        self._layout = _Layout(table, partition, topology)

    @property
    def partition(self) -> Partition:
        return self._layout.partition

    @property
    def nbytes(self) -> int:
        L = self._layout
        return L.buffer.nbytes + L.keys.nbytes + L.vals.nbytes + L.bitmap.nbytes + L.cuts.nbytes

    def shard(self, node: int) -> np.ndarray:
        """Node ``node``'s range of rows (a view; its replicas follow it in the buffer)."""
        L = self._layout
        return L.buffer[L.starts[node]:L.starts[node] + (L.cuts[node + 1] - L.cuts[node])]

    def translate(self, indices, home_node: int = 0) -> np.ndarray:
        """Buffer rows for global ids (``home_node``'s replicas for replicated rows)."""
        L = self._layout
        out = np.empty(indices.shape[0], np.int64)
        SK.translate_ids(indices, L.cuts, L.starts, L.keys, L.vals, L.keys.shape[0] - 1, L.bitmap, L.rep_starts,
                         int(home_node), out)
        return out

    def lookup(self, indices, offsets, *, weights=None, mode="sum", out=None, adapter=None, home_node=0,
               n_threads=None, chunk_size=None, driver=None):
        """Pooled lookup of global ids; the arguments are those of
        :func:`lukern.embedding_bag` plus ``home_node`` (whose replicas serve replicated
        rows). ``adapter`` (a LoRAAdapter over the whole table) adds its correction."""
        V.check_indices(indices, self.n_rows)
        L = self._layout  # read once: a repartition swaps the whole layout
        if not 0 <= home_node < L.partition.n_nodes:
            raise ValueError(f"`home_node` must be in [0, {L.partition.n_nodes}); got {home_node}.")
        rows = indices if L.partition.is_identity else self.translate(indices, home_node)
        out = embedding_bag(L.buffer, rows, offsets, weights=weights, mode=mode, out=out, n_threads=n_threads,
                            chunk_size=chunk_size, driver=driver, unchecked=True)
        if adapter is not None:
            from .embedding import _check_adapter

            _check_adapter(adapter, _ShapeOnly(self.n_rows, self.dim, self.dtype), mode)
            adapter.add_correction(indices, offsets, out, weights=weights, mode=mode)
        return out

    def repartition(self, partition: Partition, table=None) -> None:
        """Build the layout of ``partition`` beside the current one and swap it in
        (lookups in flight finish on the old layout). Rows come from ``table`` or, by
        default, from the current shards."""
        if table is None:
            table = self.gather()
        V.check_table(table)
        self._layout = _Layout(table, partition, self.topology)

    def gather(self) -> np.ndarray:
        """The whole table back as one array (rows from their owners' ranges)."""
        L = self._layout
        out = np.empty((self.n_rows, self.dim), self.dtype)
        for k in range(L.partition.n_nodes):
            out[L.cuts[k]:L.cuts[k + 1]] = self.shard(k)
        return out


class _ShapeOnly:
    """Just enough of a table for the adapter compatibility check."""

    def __init__(self, n_rows, dim, dtype):
        self.shape = (n_rows, dim)
        self.dtype = np.dtype(dtype)
