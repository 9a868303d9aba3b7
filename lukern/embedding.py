"""Embedding-bag lookups: :func:`embedding_bag` for one table, :class:`TableBatch` for many
tables in one call (FBGEMM's table-batched idea), and :func:`warmup`.

Every public call follows the same order: validate, resolve the plan, allocate ``out``
if not given, choose the driver, call the kernel, return.
"""

from __future__ import annotations

import time

import numba
import numpy as np

from . import _validate as V
from ._kernels import embedding as K
from ._kernels import lora as LK
from ._kernels.checks import first_out_of_range_batched
from ._kernels.lora_tbe import tbe_correct_kernel
from ._pool import run_ranges, split_by_work
from ._threading import prange_guard
from .memory import empty_table
from .lora import LoRAAdapter, read_consistent
from .plan import resolve_plan

__all__ = ["TableBatch", "embedding_bag", "warmup"]


def _empty_weights(dtype):
    return np.empty(0, dtype=dtype)


_EMPTY_W = {np.dtype(np.float32): _empty_weights(np.float32), np.dtype(np.float64): _empty_weights(np.float64)}
#: a table-batched output of at least this many bytes is written with non-temporal
#: stores where its lines allow (see ``TableBatch._plain``): the batched kernel writes each
#: table's columns of every output row in turn, and an output larger than L2 then had every
#: line read from memory and written back once per table (26 tables of 2048 one-id bags,
#: d = 16, a 3.4 MB output, kernel alone, three rounds in one process: 564-618 -> 354-440
#: us, against 292-378 us for one call over the same rows; with the stores aimed at a few
#: rows instead, the batched kernel ran as fast as the single call). Smaller outputs stay
#: in the cache for their reader, and take the kernels without the stage.
_STREAM_MIN_BYTES = 2 << 20


def _bucket(d: int, n_bags: int, n_ids: int, dtype) -> tuple:
    """Shape bucket of a call for the tuned profile: (dtype, d, log2 pooling, log2 bags)."""
    pooling = n_ids // max(n_bags, 1)
    return (K._DTYPE_NAMES.get(dtype) or np.dtype(dtype).name, d, min(6, max(pooling, 1).bit_length() - 1), max(n_bags, 1).bit_length() - 1)


def _check_mode_weights(mode, weights, n_ids, dtype):
    V.check_choice("mode", mode, K.MODES)
    if weights is not None:
        if mode != "sum":
            raise ValueError(f"`weights` (per-sample weights) are defined only for mode='sum'; got mode={mode!r}.")
        V.check_weights(weights, n_ids, dtype)
        return weights, True
    return _EMPTY_W[np.dtype(dtype)], False


def embedding_bag(table, indices, offsets, *, weights=None, mode="sum", out=None,
                  n_threads=None, chunk_size=None, driver=None, unchecked=False, adapter=None):
    """Pool rows of ``table`` over bags given in CSR form.

    ``out[b] = reduce(table[indices[offsets[b]:offsets[b + 1]]])``, the semantics of
    ``torch.nn.functional.embedding_bag(..., include_last_offset=True)``.

    Parameters
    ----------
    table : ndarray (n_rows, d), float32 or float64, C-contiguous
    indices : ndarray (n_ids,), int32 or int64, values in [0, n_rows)
    offsets : ndarray (n_bags + 1,), int32 or int64, non-decreasing, from 0 to n_ids
    weights : ndarray (n_ids,) of the table dtype, optional
        Per-sample weights (``mode="sum"`` only).
    mode : {"sum", "mean", "max"}
        An empty bag gives zeros in every mode.
    out : ndarray (n_bags, d), optional
        Written in full; left untouched when validation fails.
    n_threads, chunk_size, driver : optional
        Override the plan (see :func:`lukern.plan.resolve_plan`). ``driver`` is
        ``"serial"``, ``"threads"`` (lukern's worker threads, the default when parallel)
        or ``"prange"`` (numba's pool).
    unchecked : bool
        Skip the id range check (a pass over ``indices``) for callers that validated
        the ids already. An out-of-range id then reads arbitrary memory.
    adapter : LoRAAdapter, optional
        Add the adapter's low-rank correction: ``out[b] += s * (pooled A rows) @ B``,
        pooling the rank-r rows first and multiplying by B once per bag (``sum`` and
        ``mean`` modes). Ids without an active row add nothing.

    Returns
    -------
    out : ndarray (n_bags, d)

    Examples
    --------
    >>> import numpy as np, lukern
    >>> table = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> lukern.embedding_bag(table, np.array([0, 2, 3]), np.array([0, 2, 3]))
    array([[ 6.,  8., 10.],
           [ 9., 10., 11.]], dtype=float32)
    """
    V.check_table(table)
    n_rows, d = table.shape
    V.check_indices(indices, n_rows, check_range=not unchecked)
    n_ids = indices.shape[0]
    V.check_offsets(offsets, n_ids)
    n_bags = offsets.shape[0] - 1
    w, use_w = _check_mode_weights(mode, weights, n_ids, table.dtype)
    if adapter is not None:
        _check_adapter(adapter, table, mode)
    if out is None:
        out = np.empty((n_bags, d), dtype=table.dtype)
    else:
        V.check_out(out, (n_bags, d), table.dtype)
    if n_bags == 0:
        return out
    if adapter is not None:
        return _fused_lookup(adapter, table, indices, offsets, weights, w, use_w, mode, out, n_ids, n_bags, d,
                             n_threads, chunk_size, driver)
    return _plain_bag(table, indices, offsets, w, use_w, mode, out, n_ids, n_bags, d, n_threads, chunk_size, driver)


def _check_adapter(adapter, table, mode, name="adapter"):
    if not isinstance(adapter, LoRAAdapter):
        raise TypeError(f"`{name}` must be a lukern.LoRAAdapter or None; got {type(adapter).__name__}.")
    if (adapter.n_rows, adapter.dim) != table.shape or adapter.dtype != table.dtype:  # the message only on error
        adapter._check_compatible(table, name="table" if name == "adapter" else name.replace("adapters", "tables"))
    if mode == "max":
        raise ValueError(f"`{name}` works with mode 'sum' or 'mean' (a max of corrected rows is not low-rank); got 'max'.")


def _fused_lookup(adapter, table, indices, offsets, weights, w, use_w, mode, out, n_ids, n_bags, d, n_threads,
                  chunk_size, driver):
    """Plain lookup plus the adapter's correction from one consistent adapter state
    (:func:`lukern.lora.read_consistent`): one fused pass for the specialised widths, a
    second pass otherwise."""
    fused = LK.fused_kernels(d, table.dtype)

    def run(states):
        st = states[0]
        if fused is not None:
            _plain_bag(table, indices, offsets, w, use_w, mode, out, n_ids, n_bags, d, n_threads, chunk_size, driver,
                       st.lookup_args(), fused, op="lora_lookup")
        else:
            _plain_bag(table, indices, offsets, w, use_w, mode, out, n_ids, n_bags, d, n_threads, chunk_size, driver)
            adapter._add_correction_state(st, indices, offsets, out, weights, mode)

    read_consistent([adapter], run)
    return out


def _plain_bag(table, indices, offsets, w, use_w, mode, out, n_ids, n_bags, d, n_threads, chunk_size, driver,
               lora=(), fused=None, op="embedding_bag"):
    """The lookup itself; with ``fused`` (:func:`lukern._kernels.lora.fused_kernels`)
    ``lora`` holds its adapter arguments (the plan is tuned under its own op name,
    ``lora_lookup``)."""
    plan = resolve_plan(op, n_ids, n_threads=n_threads, chunk_size=chunk_size, driver=driver,
                        bucket=_bucket(d, n_bags, n_ids, table.dtype), n_items=n_bags)
    ks = K.bag_kernels(d, table.dtype, mode == "max")
    m = K.MODES[mode]
    serial, parallel = (fused.range, fused.parallel) if lora else (ks.bag_range, ks.bag_parallel)
    if plan.driver == "serial":
        serial(table, indices, offsets, w, use_w, m, out, 0, n_bags, *lora)
    elif plan.driver == "threads":
        run_ranges(lambda b0, b1: serial(table, indices, offsets, w, use_w, m, out, b0, b1, *lora),
                   split_by_work(offsets, plan.n_threads))
    else:
        _run_prange(parallel, plan, (table, indices, offsets, w, use_w, m, out, plan.chunk_size, *lora))
    return out


def _run_prange(kernel, plan, args):
    with prange_guard():
        n = min(plan.n_threads, numba.config.NUMBA_NUM_THREADS)
        previous = numba.get_num_threads()
        if previous == n:
            kernel(*args)
            return
        numba.set_num_threads(n)  # thread-local in numba: other callers are unaffected
        try:
            kernel(*args)
        finally:
            numba.set_num_threads(previous)


def pack_batched(indices_list, offsets_list):
    """Concatenate per-table CSR (indices, offsets) pairs, each with the same number of
    bags, into the table-batched layout of :class:`TableBatch` (table-major: every bag of
    table 0, then of table 1, ...). Returns (indices, offsets) as int64.
    ``batch.pack(...)`` does the same and also checks the number of tables."""
    if len(indices_list) != len(offsets_list):
        raise ValueError(f"`indices_list` and `offsets_list` must have the same length; got {len(indices_list)} "
                         f"and {len(offsets_list)}.")
    if not indices_list:
        raise ValueError("`indices_list` must hold at least one table's ids; got an empty list.")
    ids = [np.ascontiguousarray(i) for i in indices_list]
    offs = [np.ascontiguousarray(o) for o in offsets_list]
    # O(1) per table (this may run per request): the CSR ends; a decrease inside one
    # table's offsets is a decrease of the packed offsets, which lookup() reports
    for t, (i, o) in enumerate(zip(ids, offs)):
        for kind, a in (("indices", i), ("offsets", o)):
            dt = a.dtype  # kind and size, not dtype equality: several times cheaper, two per table
            if a.ndim != 1 or dt.kind != "i" or dt.itemsize not in (4, 8):
                raise TypeError(f"`{kind}_list[{t}]` must be a 1-D int32 or int64 array; got {a.ndim}-D {a.dtype}. "
                                f"Convert with np.asarray(..., dtype=np.int64).")
        if o.size == 0 or o[0] != 0 or o[-1] != i.shape[0]:
            got = "an empty array" if o.size == 0 else f"[{int(o[0])}, ..., {int(o[-1])}]"
            raise ValueError(f"`offsets_list[{t}]` must run from 0 to len(indices_list[{t}]) = {i.shape[0]} "
                             f"(CSR form, n_bags + 1 entries); got {got}.")
    n_bags = {len(o) - 1 for o in offs}
    if len(n_bags) != 1:
        raise ValueError(f"every table needs the same number of bags; got {sorted(n_bags)}.")
    idx = np.concatenate([i.astype(np.int64, copy=False) for i in ids])
    parts, base = [np.zeros(1, np.int64)], 0
    for i, o in zip(ids, offs):
        parts.append(o[1:].astype(np.int64) + base)
        base += len(i)
    return idx, np.concatenate(parts)


class TableBatch:
    """Many embedding tables looked up in one call (FBGEMM's TBE layout).

    Tables of the same width share one contiguous buffer; ``batch.tables[t]`` are views
    into it (write through them, e.g. to fold LoRA updates into the table).

    Parameters
    ----------
    tables : sequence of ndarray (n_rows_t, d_t)
        Same float dtype. They are copied once into the shared buffer(s); use
        :meth:`from_buffer` to wrap an existing buffer without a copy.

    Notes
    -----
    A lookup takes ``indices`` of all tables concatenated table-major and ``offsets`` of
    length ``n_tables * n_bags + 1`` (table ``t`` owns bags ``t*n_bags .. (t+1)*n_bags``),
    and returns ``(n_bags, sum(d_t))`` with table ``t`` in columns
    ``col_offsets[t]:col_offsets[t + 1]``. :meth:`pack` builds that layout from per-table
    CSR pairs.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> batch = lukern.TableBatch([np.ones((5, 4), np.float32), np.ones((7, 2), np.float32)])
    >>> idx, off = batch.pack([np.array([0, 1]), np.array([6])], [np.array([0, 2]), np.array([0, 1])])
    >>> batch.lookup(idx, off)
    array([[2., 2., 2., 2., 1., 1.]], dtype=float32)
    """

    def __init__(self, tables, *, _buffers=None):
        tables = list(tables)
        if not tables:
            raise ValueError("`tables` must hold at least one table; got an empty sequence.")
        for t, tab in enumerate(tables):
            V.check_table(tab, name=f"tables[{t}]")
        dtypes = {tab.dtype for tab in tables}
        if len(dtypes) != 1:
            raise TypeError(f"`tables` must share one dtype; got {sorted(str(x) for x in dtypes)}. Convert them first.")
        self.dtype = tables[0].dtype
        self.n_rows = np.array([tab.shape[0] for tab in tables], dtype=np.int64)
        self.dims = np.array([tab.shape[1] for tab in tables], dtype=np.int64)
        self.col_offsets = np.concatenate(([0], np.cumsum(self.dims))).astype(np.int64)
        self.total_dim = int(self.col_offsets[-1])
        self._tbe_cache = None  # the adapters' kernel arguments of the last lookup (see _correction_args)
        self.groups = []  # (d, buffer, table ids, row offsets within buffer)
        views = [None] * len(tables)
        for d in sorted(set(self.dims.tolist())):
            tids = np.flatnonzero(self.dims == d).astype(np.int64)
            rows = self.n_rows[tids]
            row_off = np.concatenate(([0], np.cumsum(rows))).astype(np.int64)
            if _buffers is not None:
                buf = _buffers[d]
            else:
                buf = empty_table(int(row_off[-1]), d, self.dtype)
                for g, t in enumerate(tids):
                    buf[row_off[g]:row_off[g + 1]] = tables[t]
            for g, t in enumerate(tids):
                views[t] = buf[row_off[g]:row_off[g + 1]]
            self.groups.append((d, buf, tids, row_off[:-1].copy()))
        self.tables = views
        # widths whose tables' columns all start on a 64-byte line of an output row (whose
        # bytes are a multiple of 64): the kernel can stream those rows out line by line
        item = self.dtype.itemsize
        self._streamable = {d: bool(self.total_dim * item % 64 == 0 and d * item % 64 == 0
                                    and all(self.col_offsets[t] * item % 64 == 0 for t in tids))
                            for d, _, tids, _ in self.groups}

    @classmethod
    def from_buffer(cls, buffer, row_counts):
        """Wrap one (sum(row_counts), d) buffer as a batch of same-width tables, no copy."""
        V.check_table(buffer, name="buffer")
        counts = np.asarray(row_counts, dtype=np.int64)
        if counts.ndim != 1 or counts.size == 0 or counts.min() < 0 or counts.sum() != buffer.shape[0]:
            raise ValueError(f"`row_counts` must be non-negative and sum to buffer rows {buffer.shape[0]}; got {counts.tolist()}.")
        bounds = np.concatenate(([0], np.cumsum(counts)))
        tables = [buffer[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return cls(tables, _buffers={buffer.shape[1]: buffer})

    @property
    def n_tables(self) -> int:
        return len(self.tables)

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for _, buf, _, _ in self.groups)

    def pack(self, indices_list, offsets_list):
        """Concatenate one CSR (indices, offsets) pair per table of this batch, each with
        the same number of bags, into the batched layout (see :func:`pack_batched`).
        Returns (indices, offsets) as int64."""
        n = len(indices_list)
        if n != self.n_tables:
            raise ValueError(f"`indices_list` must hold one id array per table of this batch ({self.n_tables}); "
                             f"got {n}. The batched layout cannot tell tables from bags, so a wrong count would "
                             "read other tables' rows.")
        return pack_batched(indices_list, offsets_list)

    def lookup(self, indices, offsets, *, weights=None, mode="sum", out=None,
               n_threads=None, chunk_size=None, driver=None, unchecked=False, adapters=None):
        """Pooled lookups of every table in one call; see the class notes for the layout
        and :func:`embedding_bag` for the arguments. ``adapters`` holds one
        :class:`~lukern.LoRAAdapter` or None per table (fused corrections). Returns
        (n_bags, total_dim)."""
        V.check_indices(indices, None)
        n_ids = indices.shape[0]
        V.check_offsets(offsets, n_ids)
        n_t = self.n_tables
        if (offsets.shape[0] - 1) % n_t:
            raise ValueError(
                f"`offsets` must have n_tables * n_bags + 1 entries with n_tables = {n_t}; got {offsets.shape[0]}. "
                "Build the layout with TableBatch.pack()."
            )
        n_bags = (offsets.shape[0] - 1) // n_t
        if not unchecked and n_ids:
            j, t = first_out_of_range_batched(indices, offsets, self.n_rows, n_bags)
            if j >= 0:
                raise IndexError(f"`indices[{j}]` = {int(indices[j])} belongs to table {t} and must be in [0, {int(self.n_rows[t])}).")
        w, use_w = _check_mode_weights(mode, weights, n_ids, self.dtype)
        active = []
        if adapters is not None:
            if len(adapters) != n_t:
                raise ValueError(f"`adapters` must hold one adapter or None per table ({n_t}); got {len(adapters)}.")
            for t, a in enumerate(adapters):
                if a is not None:
                    _check_adapter(a, self.tables[t], mode, name=f"adapters[{t}]")
                    active.append((t, a))
        if out is None:
            out = empty_table(n_bags, self.total_dim, self.dtype)  # line-aligned: see _STREAM_MIN_BYTES
        else:
            V.check_out(out, (n_bags, self.total_dim), self.dtype)
        if n_bags == 0:
            return out
        if not active:
            self._plain(indices, offsets, w, use_w, mode, out, n_ids, n_bags, n_threads, chunk_size, driver)
            return out
        def run(states):
            plan = self._plain(indices, offsets, w, use_w, mode, out, n_ids, n_bags, n_threads, chunk_size, driver)
            # the adapted tables of each width in one kernel call, over the lookup's threads
            # (bags split evenly; a bag's correction does not depend on the split)
            ranges = _even_ranges(n_bags, 1 if plan.driver == "serial" else plan.n_threads)
            for kernel, tids, ptrs, meta, scales in self._correction_args(active, states):
                run_ranges(lambda b0, b1: kernel(indices, offsets, n_bags, tids, self.col_offsets, ptrs, meta, scales,
                                                 w, use_w, K.MODES[mode], out, b0, b1), ranges)

        read_consistent([a for _, a in active], run)
        return out

    def _correction_args(self, active, states):
        """Per width of the adapted tables, ``(kernel, tids, ptrs, meta, scales)`` for
        :mod:`lukern._kernels.lora_tbe` from the adapters' states. Kept for the next call
        while the states are the same objects: the cache holds them, so the arrays whose
        addresses it stores stay alive."""
        tids = [t for t, _ in active]
        cached = self._tbe_cache
        if (cached is not None and cached[1] == tids and len(cached[0]) == len(states)
                and all(x is y for x, y in zip(cached[0], states))):
            return cached[2]
        rows = [st.tbe_args() for st in states]
        packed = []
        for d in sorted({int(self.dims[t]) for t in tids}):
            ks = [k for k, t in enumerate(tids) if self.dims[t] == d]
            packed.append((tbe_correct_kernel(d, self.dtype.name), np.array([tids[k] for k in ks], np.int64),
                           np.stack([rows[k][0] for k in ks]),
                           np.stack([rows[k][1] for k in ks]), np.array([rows[k][2] for k in ks], self.dtype)))
        self._tbe_cache = (tuple(states), tids, packed)
        return packed

    def _plain(self, indices, offsets, w, use_w, mode, out, n_ids, n_bags, n_threads, chunk_size, driver,
               stream_min_bytes=None):
        """The plain table-batched lookup into ``out``; returns the plan it ran with.
        ``stream_min_bytes`` overrides ``_STREAM_MIN_BYTES`` (warmup compiles the streamed
        kernels with 0)."""
        n_t = self.n_tables
        plan = resolve_plan("table_batch", n_ids, n_threads=n_threads, chunk_size=chunk_size, driver=driver,
                            bucket=_bucket(int(self.dims.max()), n_bags * n_t, n_ids, self.dtype), n_items=n_bags,
                            # every chunk restarts the prefetch stream in every table: one
                            # chunk per thread (256-bag chunks: 1.3x slower on 2 threads)
                            chunks_per_thread=1)
        m = K.MODES[mode]
        limit = _STREAM_MIN_BYTES if stream_min_bytes is None else stream_min_bytes
        big = out.nbytes >= limit and mode != "max" and out.ctypes.data % 64 == 0
        for d, buf, tids, row_off in self.groups:
            ks = K.bag_kernels(d, self.dtype, mode == "max")
            args = (buf, row_off, self.col_offsets, tids, n_bags, indices, offsets, w, use_w, m, out)
            serial, parallel = ks.tbe_range, ks.tbe_parallel
            if big and self._streamable[d] and ks.tbe_range_streamed is not None:
                serial, parallel = ks.tbe_range_streamed, ks.tbe_parallel_streamed
                args += (out.reshape(-1).view(np.uint8),)
            if plan.driver == "serial":
                serial(*args, 0, n_bags)
            elif plan.driver == "threads":
                run_ranges(lambda b0, b1: serial(*args, b0, b1), _even_ranges(n_bags, plan.n_threads))
            else:
                _run_prange(parallel, plan, args + (plan.chunk_size,))
        return plan


def _even_ranges(n: int, parts: int) -> list:
    """[0, n) cut into at most ``parts`` contiguous ranges of nearly equal length."""
    step = -(-n // max(1, min(parts, n)))
    return [(b, min(n, b + step)) for b in range(0, n, step)]


def warmup(dims=(64,), dtypes=("float32",), index_dtypes=("int64", "int32"), modes=("sum", "mean"),
           drivers=("serial", "threads", "prange"), batched=True):
    """Compile the lookup kernels for these widths and dtypes now, so that the serving
    path never compiles. Returns a report: ``{"compiled": [...], "seconds": float}``.

    Examples
    --------
    >>> import lukern
    >>> report = lukern.warmup(dims=(8,), dtypes=("float32",), index_dtypes=("int64",), drivers=("serial",))
    >>> report["compiled"][0]
    'embedding_bag d=8 float32 int64 sum serial'
    """
    start = time.perf_counter()
    compiled = []
    for dt in dtypes:
        for d in dims:
            table = np.zeros((4, d), dtype=dt)
            for it in index_dtypes:
                idx = np.array([0, 1, 3], dtype=it)
                off = np.array([0, 2, 3], dtype=it)
                for mode in modes:
                    for drv in drivers:
                        nt = 1 if drv == "serial" else 2
                        embedding_bag(table, idx, off, mode=mode, driver=drv, n_threads=nt, chunk_size=1)
                        compiled.append(f"embedding_bag d={d} {dt} {it} {mode} {drv}")
                        if batched:
                            batch = TableBatch([table])
                            batch.lookup(idx, off, mode=mode, driver=drv, n_threads=nt, chunk_size=1)
                            compiled.append(f"table_batch d={d} {dt} {it} {mode} {drv}")
                            if mode != "max" and batch._streamable[d]:  # the kernels of large outputs
                                out = empty_table(2, d, dt)
                                batch._plain(idx, off, _EMPTY_W[np.dtype(dt)], False, mode, out, 3, 2, nt, 1, drv,
                                             stream_min_bytes=0)
                                compiled.append(f"table_batch streamed d={d} {dt} {it} {mode} {drv}")
    return {"compiled": compiled, "seconds": time.perf_counter() - start}
