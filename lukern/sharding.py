"""NUMA-sharded tables: access statistics, frequency-aware partitioning with hot-row
replication, and :class:`ShardedTable` (issue 9; UpDLRM's idea, balancing lookup *load*
rather than row counts, brought from memory banks to NUMA nodes).

Load model: a lookup of a non-replicated row runs on the node that owns it; lookups of
replicated rows are spread evenly over the nodes' replicas. ``imbalance = max / mean`` of
the expected per-node load.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from . import _validate as V
from ._kernels import embedding as EK
from ._kernels import lora as LK
from ._kernels import sharding as SK
from ._pool import pinned_pool, run_ranges, split_by_work
from .embedding import _bucket, _check_adapter, _check_mode_weights, embedding_bag
from .memory import empty_table
from .plan import resolve_plan

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
        and its filter (see :class:`ShardedTable`)."""
        n_rep = self.replicated.size
        hcap = 1 << max(4, int(2 * max(n_rep, 1) - 1).bit_length())
        filt = (1 << max(12, int(64 * max(n_rep, 1) - 1).bit_length())) // 8
        return (0 if self.cuts is None else self.cuts.nbytes) + hcap * 12 + filt


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


# --- placement: libnuma (ctypes) or first touch ------------------------------------------------

_MPOL_BIND = 2
_MPOL_F_NODE = 1
_MPOL_F_ADDR = 2
_MASK_LONGS = 16  # node masks of 1024 bits
_PAGE = mmap.PAGESIZE
_HUGE = 2 << 20
_libnuma_cache: list = []


def libnuma():
    """libnuma through ctypes (its ``mbind``/``get_mempolicy``), or ``None`` when the
    library is absent or the kernel has no NUMA support."""
    if not _libnuma_cache:
        lib = None
        for name in ("libnuma.so.1", "libnuma.so"):
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError:
                continue
        if lib is not None:
            lib.numa_available.restype = ctypes.c_int
            if lib.numa_available() < 0:
                lib = None
        if lib is not None:
            ul_p = ctypes.POINTER(ctypes.c_ulong)
            lib.mbind.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ul_p, ctypes.c_ulong, ctypes.c_uint]
            lib.mbind.restype = ctypes.c_long
            lib.get_mempolicy.argtypes = [ctypes.POINTER(ctypes.c_int), ul_p, ctypes.c_ulong, ctypes.c_void_p,
                                          ctypes.c_ulong]
            lib.get_mempolicy.restype = ctypes.c_long
        _libnuma_cache.append(lib)
    return _libnuma_cache[0]


def _mbind(lib, addr: int, nbytes: int, node: int) -> int:
    """Bind [addr, addr + nbytes) to ``node`` (pages not yet touched); 0 or errno."""
    if not 0 <= node < 64 * _MASK_LONGS:
        return 22  # EINVAL
    mask = (ctypes.c_ulong * _MASK_LONGS)()
    mask[node // 64] = 1 << (node % 64)
    if lib.mbind(addr, nbytes, _MPOL_BIND, mask, 64 * _MASK_LONGS + 1, 0) != 0:
        return ctypes.get_errno() or 22
    return 0


def memory_policy(addr: int) -> tuple[int, tuple[int, ...], int]:
    """(policy mode, its nodes, node of the page) of the page at ``addr`` (libnuma's
    ``get_mempolicy``; the page is touched when it is not yet). For tests and checks."""
    lib = libnuma()
    if lib is None:
        raise RuntimeError("memory_policy needs libnuma (Debian: apt-get install libnuma1).")
    mode = ctypes.c_int(-1)
    mask = (ctypes.c_ulong * _MASK_LONGS)()
    if lib.get_mempolicy(ctypes.byref(mode), mask, 64 * _MASK_LONGS + 1, addr, _MPOL_F_ADDR) != 0:
        raise OSError(ctypes.get_errno(), "get_mempolicy failed")
    nodes = tuple(i for i in range(64 * _MASK_LONGS) if mask[i // 64] >> (i % 64) & 1)
    where = ctypes.c_int(-1)
    if lib.get_mempolicy(ctypes.byref(where), None, 0, addr, _MPOL_F_ADDR | _MPOL_F_NODE) != 0:
        raise OSError(ctypes.get_errno(), "get_mempolicy failed")
    return mode.value, nodes, where.value


def _map_node_cpus(topology):
    """(requested, used) CPU sets of each node with CPUs. A real topology keeps each
    node's CPUs this process may use; a fake one (tests, a cpuset hiding whole nodes)
    gets this process's CPUs dealt round-robin over its nodes, so every node still runs
    on threads pinned to CPUs that exist."""
    req = tuple(frozenset(n.cpus) for n in topology.nodes if n.cpus)
    allowed = sorted(os.sched_getaffinity(0))
    used = tuple(r & frozenset(allowed) for r in req)
    if all(used):
        return req, used
    n = len(req)
    if len(allowed) >= n:
        return req, tuple(frozenset(allowed[i] for i in range(k, len(allowed), n)) for k in range(n))
    return req, tuple(frozenset({allowed[k % len(allowed)]}) for k in range(n))


def _alloc_rows(n_rows: int, dim: int, dtype, align: int) -> np.ndarray:
    """Untouched anonymous memory for (n_rows, dim), starting on an ``align`` boundary
    (pages get their node from ``mbind`` or from the first write)."""
    nbytes = max(n_rows * dim * dtype.itemsize, 1)
    mm = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE)
    if align >= _HUGE and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_HUGEPAGE)  # as numpy does for large arrays
    raw = np.frombuffer(mm, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n_rows * dim * dtype.itemsize].view(dtype).reshape(n_rows, dim)


class _Placement:
    """Where each node's part lives and runs: memory node ids, CPU sets, worker pools."""

    @property
    def pools(self):
        # looked up per use, not held: a forked child gets fresh pools (lukern._pool)
        return None if self.pool_keys is None else tuple(pinned_pool(c, t) for c, t in self.pool_keys)

    def __init__(self, topology, n_nodes: int, numa: str, threads_per_node):
        V.check_choice("numa", numa, ("auto", "libnuma", "first-touch"))
        self.numa = numa
        if topology is None:
            self.memory_nodes = self.requested_cpus = self.node_cpus = self.pool_keys = None
            return
        with_cpus = [n for n in topology.nodes if n.cpus]
        if len(with_cpus) != n_nodes:
            raise ValueError(f"`partition` has {n_nodes} nodes; `topology` has {len(with_cpus)} nodes with CPUs. "
                             "Partition with nodes=topology.")
        self.memory_nodes = tuple(n.id for n in with_cpus)
        self.requested_cpus, self.node_cpus = _map_node_cpus(topology)
        if threads_per_node is None:
            counts = [len(c) for c in self.node_cpus]
        else:
            counts = [V.check_positive_int("threads_per_node", threads_per_node, allow_none=False)] * n_nodes
        self.pool_keys = tuple(zip(self.node_cpus, counts))
        if numa == "libnuma" and libnuma() is None:
            raise RuntimeError("numa='libnuma' but libnuma is not available; install it (Debian: apt-get install "
                               "libnuma1) or pass numa='auto'.")


# --- the sharded table -----------------------------------------------------------------------------

class _Layout:
    """One shard layout: the buffer and its routing tables (swapped as a whole)."""

    def __init__(self, table, partition: Partition, placement: _Placement):
        n_nodes = partition.n_nodes
        if partition.cuts is None:
            raise ValueError("ShardedTable needs contiguous ranges: use strategy 'frequency' or 'range', not 'hash'.")
        cuts = partition.cuts.astype(np.int64)
        rep = partition.replicated.astype(np.int64)
        sizes = np.diff(cuts)
        dim, dtype = table.shape[1], table.dtype
        row_bytes = dim * dtype.itemsize
        # buffer: node 0's range then its replicas, node 1's, ...; each node starts on a
        # page (2 MiB for large tables) so mbind and first touch place whole pages
        total = int(table.shape[0] + n_nodes * rep.size) * row_bytes
        align = _HUGE if total >= 8 * _HUGE else _PAGE
        unit = align // math.gcd(align, row_bytes)
        per_node = sizes + rep.size
        starts = np.zeros(n_nodes, np.int64)
        end = 0
        for k in range(n_nodes):
            starts[k] = -(-end // unit) * unit
            end = int(starts[k] + per_node[k])
        self.starts = starts
        self.rep_starts = (starts + sizes).astype(np.int64)
        if placement.memory_nodes is None:  # nothing to place: numpy's memory, as the plain tables
            self.buffer = empty_table(end, dim, dtype, align=align)
        else:
            self.buffer = _alloc_rows(end, dim, dtype, align)
        self.node_allocation = self._place(placement, per_node, row_bytes)
        pools = placement.pools
        for k in range(n_nodes):
            lo, n_own = int(starts[k]), int(sizes[k])

            def fill(k=k, lo=lo, n_own=n_own):
                # the first write places a page not bound by mbind on the writer's node
                self.buffer[lo:lo + n_own] = table[cuts[k]:cuts[k + 1]]
                if rep.size:
                    self.buffer[lo + n_own:lo + n_own + rep.size] = table[rep]

            if pools is None:
                fill()
            else:
                pools[k].submit(fill).result()
        self.cuts = cuts
        self.n_rep = int(rep.size)
        hcap = 1 << max(4, int(2 * max(rep.size, 1) - 1).bit_length())
        self.keys = np.full(hcap, -1, np.int64)
        self.vals = np.full(hcap, -1, np.int32)
        bitmap = np.zeros((partition.n_rows + 63) // 64, np.uint64)  # the LoRA layout's; the kernels use filt
        LK.rebuild_hash(rep.copy(), self.keys, self.vals, hcap - 1, bitmap)
        self.filt = SK.replica_filter(rep, rep.size)
        self.partition = partition

    def _place(self, placement: _Placement, per_node, row_bytes) -> tuple[str, ...]:
        if placement.memory_nodes is None:
            return ("none",) * len(per_node)
        lib = libnuma() if placement.numa != "first-touch" else None
        out = []
        base = self.buffer.ctypes.data
        for k, node in enumerate(placement.memory_nodes):
            nbytes = -(-int(per_node[k]) * row_bytes // _PAGE) * _PAGE
            err = _mbind(lib, base + int(self.starts[k]) * row_bytes, nbytes, node) if lib and nbytes else None
            if err and placement.numa == "libnuma":
                raise OSError(err, f"mbind of node {k}'s rows to memory node {node} failed ({os.strerror(err)}); "
                                   "pass numa='auto' to fall back to first touch.")
            out.append("libnuma" if err == 0 else "first-touch")
        return tuple(out)


class ShardedTable:
    """An embedding table split over NUMA nodes by a :class:`Partition`.

    Memory: all shards live in one buffer, node k's rows then its copies of the
    replicated hot rows, each node's part starting on its own pages. With a
    ``topology``, node k's pages are bound to memory node k through libnuma's ``mbind``
    (via ctypes) when libnuma is present, else placed by first touch from a thread pinned
    to node k's CPUs; :attr:`allocation` says which (``"libnuma"``, ``"first-touch"``,
    ``"mixed"`` when some nodes could not be bound, ``"none"`` without a topology).

    Lookup (``execution``): ``"pinned"`` runs node k's part, its own rows and an even
    share of the replicated ids read from its replicas, on worker threads pinned to node
    k's CPUs, each writing per-bag partial sums, then adds the parts in node order;
    ``"ordered"`` routes and pools every id in one pass in the original order (replicas
    of ``home_node``), which gives :func:`lukern.embedding_bag`'s bits exactly. Pinned
    sums differ from the plain lookup only by rounding (bit for bit when each bag's ids
    fall in one part, and always in mode ``max``). Both fuse the id -> (node, local row)
    routing into the pooling pass; in ``pinned`` execution every node's threads scan all
    ids and pool their own (no bucketing pass), so routing work grows with the nodes. The default, ``"auto"``, is ``pinned`` when a
    topology with two or more nodes is given, else ``ordered``.

    A fake topology (more nodes or CPUs than this machine has) still runs: its nodes get
    this process's CPUs round-robin (:attr:`node_cpus`, beside :attr:`requested_cpus`)
    and memory nodes that do not exist fall back to first touch.

    Parameters
    ----------
    table : ndarray (n_rows, d)
        The full table (copied into the shards).
    partition : Partition
        From :func:`partition_rows` (``frequency`` or ``range``); with a topology, one
        node per topology node with CPUs.
    topology : lukern.topology.Topology, optional
    numa : {"auto", "libnuma", "first-touch"}
        ``libnuma`` fails when libnuma or a node's binding is unavailable; ``auto`` falls
        back to first touch.
    threads_per_node : int, optional
        Worker threads per node (default: the node's CPUs).
    execution : {"auto", "pinned", "ordered"}

    Examples
    --------
    >>> import numpy as np, lukern
    >>> t = np.arange(32, dtype=np.float64).reshape(8, 4)
    >>> st = lukern.ShardedTable(t, lukern.partition_rows(np.ones(8), 2))
    >>> idx, off = np.array([0, 7]), np.array([0, 2])
    >>> bool((st.lookup(idx, off) == lukern.embedding_bag(t, idx, off)).all())
    True
    """

    def __init__(self, table, partition: Partition, *, topology=None, numa: str = "auto",
                 threads_per_node: int | None = None, execution: str = "auto"):
        V.check_table(table)
        if not isinstance(partition, Partition):
            raise TypeError(f"`partition` must be a lukern.Partition; got {type(partition).__name__}.")
        if partition.n_rows != table.shape[0]:
            raise ValueError(f"`partition` covers {partition.n_rows} rows; the table has {table.shape[0]}.")
        V.check_choice("execution", execution, ("auto", "pinned", "ordered"))
        if execution == "pinned" and topology is None:
            raise ValueError("execution='pinned' needs a `topology` (whose CPUs the node threads are pinned to).")
        self.n_rows, self.dim = table.shape
        self.dtype = table.dtype
        self.topology = topology
        self._placement = _Placement(topology, partition.n_nodes, numa, threads_per_node)
        if execution == "auto":
            execution = "pinned" if topology is not None and partition.n_nodes > 1 else "ordered"
        self.execution = execution
        self._layout = _Layout(table, partition, self._placement)

    @property
    def partition(self) -> Partition:
        return self._layout.partition

    @property
    def node_allocation(self) -> tuple[str, ...]:
        """How each node's pages were placed: ``libnuma``, ``first-touch`` or ``none``."""
        return self._layout.node_allocation

    @property
    def allocation(self) -> str:
        kinds = set(self._layout.node_allocation)
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def node_cpus(self):
        """The CPUs each node's threads are pinned to (``None`` without a topology)."""
        return self._placement.node_cpus

    @property
    def requested_cpus(self):
        """Each node's CPUs as the topology lists them."""
        return self._placement.requested_cpus

    @property
    def memory_nodes(self):
        return self._placement.memory_nodes

    @property
    def pools(self):
        """The pinned worker pool of each node (``None`` without a topology)."""
        return self._placement.pools

    @property
    def nbytes(self) -> int:
        L = self._layout
        return L.buffer.nbytes + L.keys.nbytes + L.vals.nbytes + L.filt.nbytes + L.cuts.nbytes

    def shard(self, node: int) -> np.ndarray:
        """Node ``node``'s range of rows (a view; its replicas follow it in the buffer)."""
        L = self._layout
        return L.buffer[L.starts[node]:L.starts[node] + (L.cuts[node + 1] - L.cuts[node])]

    def node_rows(self, node: int) -> np.ndarray:
        """Node ``node``'s rows and replicas (a view of the buffer)."""
        L = self._layout
        return L.buffer[L.starts[node]:L.rep_starts[node] + L.n_rep]

    def translate(self, indices, home_node: int = 0, part: int = -1) -> np.ndarray:
        """Buffer rows for global ids: of every id (``part=-1``, replicated rows read from
        ``home_node``'s replicas), or of part ``part``'s ids (-1 for the others)."""
        L = self._layout
        out = np.empty(indices.shape[0], np.int64)
        SK.translate_ids(indices, L.cuts, L.starts, L.keys, L.vals, L.keys.shape[0] - 1, L.filt, L.n_rep,
                         L.rep_starts, int(part), int(home_node), out)
        return out

    def lookup(self, indices, offsets, *, weights=None, mode="sum", out=None, adapter=None, home_node=0,
               execution=None, n_threads=None, chunk_size=None, driver=None):
        """Pooled lookup of global ids; the arguments are those of
        :func:`lukern.embedding_bag` plus ``home_node`` (whose replicas serve replicated
        rows in ``ordered`` execution) and ``execution`` (default: the table's).
        ``n_threads``/``chunk_size``/``driver`` apply to ``ordered`` execution (pinned
        execution uses the node pools). ``adapter`` (a LoRAAdapter over the whole table)
        adds its correction."""
        L = self._layout  # read once: a repartition swaps the whole layout
        if L.partition.is_identity and home_node == 0:
            # one node, no replicas: the buffer is the table; embedding_bag validates
            return embedding_bag(L.buffer, indices, offsets, weights=weights, mode=mode, out=out, n_threads=n_threads,
                                 chunk_size=chunk_size, driver=driver, adapter=adapter)
        execution = self.execution if execution is None else execution
        V.check_choice("execution", execution, ("pinned", "ordered"))
        if execution == "pinned" and self._placement.pool_keys is None:
            raise ValueError("execution='pinned' needs a table built with a `topology`.")
        V.check_indices(indices, self.n_rows)
        n_ids = indices.shape[0]
        V.check_offsets(offsets, n_ids)
        n_bags = offsets.shape[0] - 1
        w, use_w = _check_mode_weights(mode, weights, n_ids, self.dtype)
        if not 0 <= home_node < L.partition.n_nodes:
            raise ValueError(f"`home_node` must be in [0, {L.partition.n_nodes}); got {home_node}.")
        if adapter is not None:
            _check_adapter(adapter, _ShapeOnly(self.n_rows, self.dim, self.dtype), mode)
        if out is None:
            out = np.empty((n_bags, self.dim), self.dtype)
        else:
            V.check_out(out, (n_bags, self.dim), self.dtype)
        if n_bags == 0:
            return out
        if execution == "ordered":
            self._ordered(L, indices, offsets, w, use_w, mode, out, home_node, n_threads)
        else:
            self._pinned(L, indices, offsets, w, use_w, mode, out)
        if adapter is not None:
            adapter.add_correction(indices, offsets, out, weights=weights, mode=mode)
        return out

    def _args(self, L):
        return (L.cuts, L.starts, L.keys, L.vals, L.keys.shape[0] - 1, L.filt, L.n_rep, L.rep_starts)

    def _ordered(self, L, indices, offsets, w, use_w, mode, out, home_node, n_threads):
        n_bags = offsets.shape[0] - 1
        plan = resolve_plan("embedding_bag", indices.shape[0], n_threads=n_threads, driver="threads",
                            bucket=_bucket(self.dim, n_bags, indices.shape[0], self.dtype), n_items=n_bags)
        kern = SK.sharded_kernel(self.dim, self.dtype, mode == "max")
        m, route = EK.MODES[mode], self._args(L)
        run_ranges(lambda b0, b1: kern(L.buffer, indices, offsets, w, use_w, m, out, b0, b1, *route, -1, home_node),
                   split_by_work(offsets, plan.n_threads))

    def _pinned(self, L, indices, offsets, w, use_w, mode, out):
        n_nodes, n_bags = L.partition.n_nodes, offsets.shape[0] - 1
        kern = SK.sharded_kernel(self.dim, self.dtype, mode == "max")
        m = EK.MODES[mode]
        part_mode = EK.MODE_MAX if m == EK.MODE_MAX else EK.MODE_SUM  # the mean divides after the combine
        parts = np.empty((n_nodes, n_bags, self.dim), self.dtype)
        route = self._args(L)
        futures = []
        for k, pool in enumerate(self._placement.pools):  # node k's part on its pinned threads
            for b0, b1 in split_by_work(offsets, pool.n_threads):
                futures.append(pool.submit(kern, L.buffer, indices, offsets, w, use_w, part_mode, parts[k], b0, b1,
                                           *route, k, 0))
        errors = [f.exception() for f in futures]  # wait for every part before reading any
        for e in errors:
            if e is not None:
                raise e
        SK.combine_parts(parts, offsets, m, out, 0, n_bags)

    def repartition(self, partition: Partition, table=None) -> None:
        """Build the layout of ``partition`` beside the current one and swap it in
        (lookups in flight finish on the old layout). Rows come from ``table`` or, by
        default, from the current shards."""
        if table is None:
            table = self.gather()
        V.check_table(table)
        if not isinstance(partition, Partition) or partition.n_rows != self.n_rows:
            raise ValueError(f"`partition` must be a lukern.Partition of {self.n_rows} rows.")
        keys = self._placement.pool_keys
        if keys is not None and partition.n_nodes != len(keys):
            raise ValueError(f"`partition` has {partition.n_nodes} nodes; this table's topology has {len(keys)}.")
        self._layout = _Layout(table, partition, self._placement)

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
