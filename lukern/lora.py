"""The row-sparse LoRA adapter of one embedding table (DESIGN section 3).

``W_served = W + s * A @ B`` where ``A`` holds rows only for recently active ids (a hash
maps row id -> slot; a presence bitmap makes "not active" one load), ``B`` (r x d) is
shared and ``s = alpha / r``. Admission happens on a row's first gradient (its A row
starts at zero, so served values do not jump); when the slots run out, the coldest rows
are *folded* into the table (``W[row] += s * A[slot] @ B``) and their slots reused.

Concurrency: the trainer is the only writer. Per-row updates happen in place; every
structural change (resize, rank change, adopting factors) builds new arrays and swaps
the one ``_state`` reference, so a lookup that read the reference once sees a
consistent (hash, A, B). Every writer mutation (optimizer step, fold, eviction, swap)
runs inside :meth:`LoRAAdapter._mutating`: it holds the adapter's write lock and keeps
``generation`` odd meanwhile. Lookups are optimistic (see :func:`read_consistent`): they
run without a lock and check ``generation`` afterwards; when a mutation overlapped them
twice in a row, the third attempt runs under the write lock. Every result therefore
equals the lookup of one state the writer published, never a mix. Admitting a row
needs no window: its A row is zero, so a lookup that sees it and one that does not give
the same values.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from . import _validate as V
from ._io import atomic_write
from ._kernels import lora as LK
from ._pool import run_ranges

__all__ = [
    "Factors",
    "ForwardContext",
    "LeastRecentlyUsed",
    "LoRAAdapter",
    "SmallestNorm",
    "load_factors",
    "read_consistent",
    "save_factors",
]

_OPTIMIZERS_A = ("rowwise_adagrad", "sgd")
_OPTIMIZERS_B = ("adagrad", "sgd")


class _State:
    """Everything a lookup reads, swapped as one reference on structural changes."""

    __slots__ = ("keys", "vals", "mask", "bitmap", "A", "B", "scale", "slot_row", "acc_a", "acc_b", "last_step",
                 "_lookup", "_tbe")
    _FIELDS = __slots__[:-2]

    def __init__(self, **kw):
        self._lookup = None
        self._tbe = None
        for k, v in kw.items():
            setattr(self, k, v)

    def replace(self, **kw):
        """A new state with the fields ``kw`` replaced (the caches empty). The copy is
        spelt out: the trainer swaps B every step (0.7 us against 1.9 us for a loop over
        ``_FIELDS``; a test checks that every field is carried)."""
        new = object.__new__(_State)
        new.keys, new.vals, new.mask, new.bitmap, new.A = self.keys, self.vals, self.mask, self.bitmap, self.A
        new.B, new.scale, new.slot_row, new.acc_a = self.B, self.scale, self.slot_row, self.acc_a
        new.acc_b, new.last_step, new._lookup, new._tbe = self.acc_b, self.last_step, None, None
        for k, v in kw.items():
            setattr(new, k, v)
        return new

    def lookup_args(self):
        """The fused lookup kernel's adapter arguments ``(keys, vals, mask, bitmap, A, B,
        scale)``, the scale in A's dtype: built once per state (a state is never
        modified in place, only replaced), so a serving call does not rebuild them."""
        args = self._lookup
        if args is None:
            args = self._lookup = (self.keys, self.vals, self.mask, self.bitmap, self.A, self.B,
                                   self.A.dtype.type(self.scale))
        return args

    def tbe_args(self):
        """This state's row of the table-batched correction kernel's arguments
        (:mod:`lukern._kernels.lora_tbe`): the addresses of ``keys, vals, bitmap, A, B``,
        their shapes, and the scale in A's dtype. Cached like :meth:`lookup_args`; the
        caller keeps the state alive while the kernel runs."""
        args = self._tbe
        if args is None:
            arrays = (self.keys, self.vals, self.bitmap, self.A, self.B)
            # the kernel reads them by address: every state builds them so (a copy here
            # would hide the trainer's in-place row updates)
            if not (all(x.flags.c_contiguous for x in arrays) and self.keys.dtype == np.int64
                    and self.vals.dtype == np.int32 and self.bitmap.dtype == np.uint64):
                raise RuntimeError("lukern bug: an adapter state array is not C-contiguous or has an unexpected "
                                   "dtype; please report it.")
            ptrs = np.array([x.ctypes.data for x in arrays], np.int64)
            meta = np.array([self.keys.shape[0], self.mask, self.bitmap.shape[0], self.A.shape[0], self.A.shape[1]],
                            np.int64)
            args = self._tbe = (ptrs, meta, self.A.dtype.type(self.scale))
        return args


class _Mutation:
    """The context of :meth:`LoRAAdapter._mutating`, as a class: the trainer enters one per
    table and step, and a generator-based context manager cost ~1 us more each time."""

    __slots__ = ("adapter",)

    def __init__(self, adapter):
        self.adapter = adapter

    def __enter__(self):
        a = self.adapter
        a._write_lock.acquire()
        a.generation += 1

    def __exit__(self, *exc):
        a = self.adapter
        a.generation += 1
        a._write_lock.release()
        return False


#: optimistic attempts of a lookup before it takes the adapters' write locks
_OPTIMISTIC_READS = 2


def read_consistent(adapters, fn):
    """Call ``fn(states)`` with the current state of every adapter in ``adapters`` such
    that no writer mutation overlapped the call: up to ``_OPTIMISTIC_READS`` lock-free
    attempts (checked with ``generation``), then one under the adapters' write locks
    (taken in a fixed order; writers hold one lock at a time, so this cannot deadlock).
    ``fn`` must be idempotent: it may run more than once."""
    if len(adapters) == 1:  # the serving path's common case, without the list building
        a = adapters[0]
        for _ in range(_OPTIMISTIC_READS):
            g = a.generation
            if g & 1:
                continue
            fn([a._state])
            if a.generation == g:
                return
        with a._write_lock:
            fn([a._state])
        return
    for _ in range(_OPTIMISTIC_READS):
        g0 = [a.generation for a in adapters]
        if any(g & 1 for g in g0):
            continue  # a mutation is under way: do not waste a pass
        fn([a._state for a in adapters])
        if all(a.generation == g for a, g in zip(adapters, g0)):
            return
    with contextlib.ExitStack() as stack:
        for a in sorted({id(a): a for a in adapters}.values(), key=id):
            stack.enter_context(a._write_lock)
        fn([a._state for a in adapters])


# --- eviction policies -------------------------------------------------------------------

def _candidates(adapter, n: int) -> np.ndarray:
    """Active slots a policy may evict: those not touched since the last step (a row
    admitted by the batch being processed has a zero A row, which must not make it the
    first to go), or every active slot when there are fewer than ``n`` of those."""
    st = adapter._state
    active = np.flatnonzero(st.slot_row >= 0)
    older = active[st.last_step[active] < adapter.step_count]
    return older if older.size >= n else active


class LeastRecentlyUsed:
    """Evict the slots touched longest ago (ties: lowest slot).

    Examples
    --------
    >>> import numpy as np, lukern
    >>> a = lukern.LoRAAdapter(10, 4, rank=2, capacity=4, eviction=lukern.LeastRecentlyUsed())
    >>> W = np.zeros((10, 4), np.float32)
    >>> for ids in ([1], [2], [3]):
    ...     _ = a.train_step(W, np.array(ids), np.array([0, 1]), np.ones((1, 4), np.float32))
    >>> a._state.slot_row[a.eviction.choose(a, 1)].tolist()  # row 1 was touched first
    [1]
    """

    name = "lru"

    def choose(self, adapter, n: int) -> np.ndarray:
        st = adapter._state
        cand = _candidates(adapter, n)
        if n >= cand.size:
            return cand
        # a stable sort over ascending slots breaks ties by the lowest slot, as documented
        # (argpartition leaves the choice between equally old slots unspecified)
        return np.sort(cand[np.argsort(st.last_step[cand], kind="stable")[:n]])


class SmallestNorm:
    """Evict the slots whose A rows carry the least correction (||A[slot]||): their fold
    changes the table the least."""

    name = "smallest_norm"

    def choose(self, adapter, n: int) -> np.ndarray:
        st = adapter._state
        cand = _candidates(adapter, n)
        if n >= cand.size:
            return cand
        norms = np.einsum("ij,ij->i", st.A[cand], st.A[cand])
        return np.sort(cand[np.argpartition(norms, n)[:n]])


# --- factors: export, save, load ------------------------------------------------------------

@dataclass(frozen=True)
class Factors:
    """The compact update of one adapter: ``W[row_ids] += scale * A @ B``.

    ``k (8 + 4r) + 4 r d`` bytes (float32) instead of ``k (8 + 4d)`` for a row delta.
    """

    row_ids: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scale: float
    version: int

    @property
    def nbytes(self) -> int:
        return int(self.row_ids.nbytes + self.A.nbytes + self.B.nbytes + 16)

    def delta(self) -> np.ndarray:
        """Dense ``scale * A @ B`` for the exported rows (k x d)."""
        return (self.scale * (self.A.astype(np.float64) @ self.B.astype(np.float64))).astype(self.A.dtype)


_FORMAT = "lukern-factors-1"


def _checksum(row_ids, A, B, scale, version) -> str:
    h = hashlib.sha256()
    for a in (row_ids, A, B):
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr((float(scale), int(version))).encode())
    return h.hexdigest()


def _check_factors(f) -> None:
    if not isinstance(f, Factors):
        raise TypeError(f"`factors` must be a lukern.Factors; got {type(f).__name__}.")
    for name in ("row_ids", "A", "B"):
        if not isinstance(getattr(f, name), np.ndarray):
            raise TypeError(f"`factors.{name}` must be a numpy array; got {type(getattr(f, name)).__name__}.")
    if f.A.dtype not in V.FLOAT_DTYPES or f.B.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"`factors.A` and `factors.B` must be float32 or float64; got {f.A.dtype} and {f.B.dtype}.")
    if not np.issubdtype(f.row_ids.dtype, np.integer):
        raise TypeError(f"`factors.row_ids` must be integers; got {f.row_ids.dtype}.")
    if f.row_ids.ndim != 1 or f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape != (f.row_ids.size, f.B.shape[0]):
        raise ValueError(f"`factors` shapes are inconsistent: row_ids {f.row_ids.shape}, A {f.A.shape}, B {f.B.shape}.")


def save_factors(path, factors: Factors) -> None:
    """Write ``factors`` as an ``.npz`` (no pickle) atomically: a temporary file in the
    same folder, fsync, rename, fsync of the folder. A reader sees the old file or the
    new one, never a partial one.

    Examples
    --------
    >>> import numpy as np, lukern, tempfile, os
    >>> f = lukern.Factors(np.array([3]), np.ones((1, 2), np.float32), np.ones((2, 4), np.float32), 0.5, 1)
    >>> p = os.path.join(tempfile.mkdtemp(), "f.npz"); lukern.save_factors(p, f)
    >>> lukern.load_factors(p).scale
    0.5
    """
    _check_factors(factors)
    arrays = dict(row_ids=np.ascontiguousarray(factors.row_ids, dtype=np.int64), A=np.ascontiguousarray(factors.A),
                  B=np.ascontiguousarray(factors.B), scale=np.array(factors.scale, np.float64),
                  version=np.array(factors.version, np.int64), format=np.array(_FORMAT))
    arrays["checksum"] = np.array(_checksum(arrays["row_ids"], arrays["A"], arrays["B"], factors.scale, factors.version))
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_factors(path) -> Factors:
    """Read factors written by :func:`save_factors`, verifying format, shapes and the
    checksum. Raises ``ValueError`` naming the file for truncated, corrupted or
    inconsistent files."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, OSError ...
        raise ValueError(f"{path}: not a readable lukern factors file (truncated or corrupted?): {e}") from None
    missing = {"row_ids", "A", "B", "scale", "version", "format", "checksum"} - set(data)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}; was it written by lukern.save_factors?")
    if str(data["format"]) != _FORMAT:
        raise ValueError(f"{path}: format {str(data['format'])!r}, expected {_FORMAT!r}.")
    row_ids, A, B = data["row_ids"], data["A"], data["B"]
    scale, version = float(data["scale"]), int(data["version"])
    if A.ndim != 2 or B.ndim != 2 or row_ids.ndim != 1 or A.shape[0] != row_ids.shape[0] or A.shape[1] != B.shape[0]:
        raise ValueError(f"{path}: inconsistent shapes row_ids {row_ids.shape}, A {A.shape}, B {B.shape}.")
    if _checksum(row_ids, A, B, scale, version) != str(data["checksum"]):
        raise ValueError(f"{path}: checksum mismatch: the file is corrupted.")
    return Factors(row_ids, A, B, scale, version)


# --- the adapter -------------------------------------------------------------------------------

class ForwardContext:
    """What :meth:`LoRAAdapter.forward` keeps for the backward of the same batch: the
    slot of every id and the pooled A rows, so the backward neither probes the hash
    for known ids nor pools A again."""

    __slots__ = ("indices", "offsets", "weights", "mode", "slots", "P", "state", "version")

    def __init__(self, indices, offsets, weights, mode, slots, P, state, version):
        self.indices, self.offsets, self.weights, self.mode = indices, offsets, weights, mode
        self.slots, self.P, self.state, self.version = slots, P, state, version


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, int(n - 1).bit_length())


class LoRAAdapter:
    """Row-sparse low-rank correction of one (n_rows x dim) embedding table.

    Parameters
    ----------
    n_rows, dim : int
        Shape of the table this adapter corrects.
    rank : int
        r, the width of the low-rank factors.
    capacity : int, optional
        Maximum number of active rows (default: 1% of ``n_rows``, at least 64).
    alpha : float, optional
        Scale numerator: the correction is ``(alpha / rank) * A @ B`` (default ``rank``).
    dtype : float32 or float64
        The table's dtype.
    optimizer_a : {"rowwise_adagrad", "sgd"}
    optimizer_b : {"adagrad", "sgd"}
    lr_a, lr_b, weight_decay, eps : float
    eviction : policy, optional
        Object with ``choose(adapter, n) -> slots`` (default :class:`LeastRecentlyUsed`).
    evict_fraction : float
        Share of the capacity freed at once when the slots run out (amortises eviction).
    seed : int
        Seed of B's initialisation (A starts at zero, so the correction starts at zero).
    acc_a_init : float, ndarray (n_rows,) or callable, optional
        Starting row-wise Adagrad accumulator of rows admitted from now on (default 0):
        one value for every row, one per table row, or ``f(row_ids) -> values`` called
        with the rows a backward admits (e.g. the base rows' own Adagrad history, so a
        settled row does not take full-size steps). Also settable later as the
        attribute ``acc_a_init``. See :meth:`optimizer_state` and
        :meth:`set_row_accumulators` for the accumulators of rows already active.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> table = np.zeros((100, 8), np.float32)
    >>> a = lukern.LoRAAdapter(100, 8, rank=2, capacity=10)
    >>> idx, off = np.array([1, 2, 2]), np.array([0, 1, 3])
    >>> a.train_step(table, idx, off, np.ones((2, 8), np.float32))
    True
    >>> a.n_active
    2
    """

    def __init__(self, n_rows: int, dim: int, *, rank: int = 8, capacity: int | None = None, alpha: float | None = None,
                 dtype=np.float32, optimizer_a: str = "rowwise_adagrad", optimizer_b: str = "adagrad",
                 lr_a: float = 0.05, lr_b: float = 0.01, weight_decay: float = 0.0, eps: float = 1e-8,
                 eviction=None, evict_fraction: float = 1 / 16, seed: int = 0, acc_a_init=None):
        n_rows = V.check_positive_int("n_rows", n_rows, allow_none=False)
        dim = V.check_positive_int("dim", dim, allow_none=False)
        rank = V.check_positive_int("rank", rank, allow_none=False)
        if capacity is None:
            capacity = max(64, n_rows // 100)
        capacity = min(V.check_positive_int("capacity", capacity, allow_none=False), n_rows)
        dtype = np.dtype(dtype)
        if dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"`dtype` must be float32 or float64; got {dtype}.")
        V.check_choice("optimizer_a", optimizer_a, _OPTIMIZERS_A)
        V.check_choice("optimizer_b", optimizer_b, _OPTIMIZERS_B)
        for name, v in (("lr_a", lr_a), ("lr_b", lr_b), ("weight_decay", weight_decay), ("eps", eps)):
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0; got {v!r}.")
        if alpha is not None and not np.isfinite(alpha):
            raise ValueError(f"`alpha` must be a finite number; got {alpha!r}.")
        if not 0 < evict_fraction <= 1:
            raise ValueError(f"`evict_fraction` must be in (0, 1]; got {evict_fraction!r}.")
        if eviction is not None and not callable(getattr(eviction, "choose", None)):
            raise TypeError(f"`eviction` must have a choose(adapter, n) method; got {type(eviction).__name__}.")
        self.n_rows, self.dim, self.dtype = n_rows, dim, dtype
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.optimizer_a, self.optimizer_b = optimizer_a, optimizer_b
        self.lr_a, self.lr_b, self.weight_decay, self.eps = float(lr_a), float(lr_b), float(weight_decay), float(eps)
        self.eviction = eviction if eviction is not None else LeastRecentlyUsed()
        self.evict_fraction = float(evict_fraction)
        self.acc_a_init = acc_a_init  # validated by the property setter
        self.grad_window = None  # optional object with .add(pooled_grad), fed by backward()
        self.step_count = 0
        self.version = 0
        self.generation = 0  # odd while the writer mutates; see the module docstring
        self.rejected_steps = 0
        self._forward_hits = 0.0  # share of the last forward()'s ids that had a slot
        self.dropped_admissions = 0
        self.evicted_rows = 0
        self._warned_nonfinite = False
        # re-entrant: a lookup made by the writer thread inside a mutation cannot deadlock
        self._write_lock = threading.RLock()
        rng = np.random.default_rng(seed)
        B = (rng.standard_normal((rank, dim)) / np.sqrt(dim)).astype(dtype)
        self._state = self._new_state(capacity, rank, B)
        self._alloc_pending(capacity, rank)

    # -- state construction ---------------------------------------------------------------

    def _new_state(self, capacity, rank, B, acc_b=None):
        hcap = _pow2_at_least(2 * capacity)
        st = _State(
            keys=np.full(hcap, -1, np.int64), vals=np.full(hcap, -1, np.int32), mask=hcap - 1,
            bitmap=np.zeros((self.n_rows + 63) // 64, np.uint64),
            A=np.zeros((capacity, rank), self.dtype), B=B, scale=self.alpha / rank,
            slot_row=np.full(capacity, -1, np.int64), acc_a=np.zeros(capacity, self.dtype),
            acc_b=np.zeros((rank, self.dim), self.dtype) if acc_b is None else acc_b,
            last_step=np.full(capacity, -1, np.int64))
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int32)  # a stack: slot 0 on top
        self._n_free = capacity
        return st

    def _alloc_pending(self, capacity, rank):
        self._local = np.full(capacity, -1, np.int32)  # slot -> pending row, or -1
        self._uniq = np.zeros(capacity, np.int32)  # pending row -> slot
        self._G = np.zeros((0, rank), self.dtype)  # pending dA rows; grows to the most seen
        self._n_u = 0
        self._dB = None

    def _mutating(self):
        """A writer mutation (``with adapter._mutating():``): under the write lock, with
        ``generation`` odd meanwhile."""
        return _Mutation(self)

    # -- read-only properties ---------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._state.A.shape[1]

    @property
    def capacity(self) -> int:
        return self._state.A.shape[0]

    @property
    def scale(self) -> float:
        return self._state.scale

    @property
    def A(self) -> np.ndarray:
        return self._state.A

    @property
    def B(self) -> np.ndarray:
        return self._state.B

    @property
    def n_active(self) -> int:
        return self.capacity - self._n_free

    def nbytes_breakdown(self) -> dict:
        """Bytes of every array the adapter owns, by name."""
        st = self._state
        parts = {name: getattr(st, name).nbytes for name in ("keys", "vals", "bitmap", "A", "B", "slot_row", "acc_a",
                                                             "acc_b", "last_step")}
        parts.update(free=self._free.nbytes, pending_local=self._local.nbytes, pending_uniq=self._uniq.nbytes,
                     pending_grad_a=self._G.nbytes,
                     pending_grad_b=0 if self._dB is None else self._dB.nbytes)
        return parts

    @property
    def nbytes(self) -> int:
        """Everything the adapter owns: hash, bitmap, A, B, optimizer state, slot
        bookkeeping and the pending-gradient buffers."""
        return int(sum(self.nbytes_breakdown().values()))

    def nbytes_at(self, capacity: int | None = None, rank: int | None = None) -> int:
        """``nbytes`` at ``capacity`` and ``rank`` (default: the current ones) once the
        pending-gradient buffers have grown to their largest: the figure a memory budget
        has to hold at every step."""
        capacity = self.capacity if capacity is None else int(capacity)
        rank = self.rank if rank is None else int(rank)
        it = self.dtype.itemsize
        hcap = _pow2_at_least(2 * capacity)
        return int(hcap * (8 + 4) + (self.n_rows + 63) // 64 * 8 + capacity * rank * it * 2  # hash, bitmap, A, G
                   + 2 * rank * self.dim * it + rank * self.dim * 8  # B, acc_b, dB
                   + capacity * (8 + it + 8 + 4 * 3))  # slot_row, acc_a, last_step, free/local/uniq

    def active_rows(self):
        """(row_ids, slots) of the active rows, in slot order."""
        st = self._state
        slots = np.flatnonzero(st.slot_row >= 0)
        return st.slot_row[slots].copy(), slots

    def __repr__(self):
        return (f"LoRAAdapter(n_rows={self.n_rows}, dim={self.dim}, rank={self.rank}, capacity={self.capacity}, "
                f"active={self.n_active}, scale={self.scale:g}, nbytes={self.nbytes})")

    # -- optimizer state -------------------------------------------------------------------

    @property
    def acc_a_init(self):
        """Starting row-wise Adagrad accumulator of newly admitted rows: None (0), a
        float, an array of ``n_rows`` values or a callable ``f(row_ids) -> values``."""
        return self._acc_a_init

    @acc_a_init.setter
    def acc_a_init(self, value):
        if value is None or callable(value):
            pass
        elif np.ndim(value) == 0:
            v = value
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"`acc_a_init` must be None, a number >= 0, an array of n_rows values or a callable; "
                                f"got {type(value).__name__}.")
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"`acc_a_init` must be a finite number >= 0; got {value!r}.")
            value = float(value)
        else:
            arr = np.asarray(value)
            if arr.shape != (self.n_rows,) or arr.dtype.kind not in "fiu":
                raise ValueError(f"`acc_a_init` as an array must hold one number per table row, shape "
                                 f"({self.n_rows},); got shape {arr.shape}, dtype {arr.dtype}. Pass a callable "
                                 "f(row_ids) to compute values on demand.")
            if not np.isfinite(arr).all() or (arr < 0).any():
                raise ValueError("`acc_a_init` must hold finite values >= 0.")
            value = arr
        self._acc_a_init = value

    def _initial_acc(self, rows: np.ndarray) -> np.ndarray:
        """Validated starting accumulators of ``rows`` from ``acc_a_init``."""
        init = self._acc_a_init
        if callable(init):
            vals = np.asarray(init(rows.copy()))
            if vals.ndim == 0:
                vals = np.full(rows.size, vals)
            if vals.shape != (rows.size,) or vals.dtype.kind not in "fiu":
                raise ValueError(f"`acc_a_init` returned shape {vals.shape} ({vals.dtype}) for {rows.size} rows; "
                                 "it must return one number per row id given.")
            if not np.isfinite(vals).all() or (vals < 0).any():
                raise ValueError("`acc_a_init` returned values that are not finite and >= 0.")
            return vals
        if isinstance(init, float):
            return np.full(rows.size, init)
        return init[rows]

    def _seed_admitted(self, n_free_before: int) -> None:
        """Give the slots popped from the free stack since ``n_free_before`` (the rows
        just admitted) their starting accumulators."""
        if self._acc_a_init is None or self._n_free >= n_free_before:
            return
        st = self._state
        slots = self._free[self._n_free:n_free_before].astype(np.int64)
        st.acc_a[slots] = self._initial_acc(st.slot_row[slots])

    def optimizer_state(self):
        """``(row_ids, acc_a, acc_b)``: the active rows (in :meth:`active_rows` order),
        their row-wise Adagrad accumulators and B's accumulator (r x d), as copies from
        one state. With SGD the accumulators stay zero.

        Examples
        --------
        >>> import numpy as np, lukern
        >>> a = lukern.LoRAAdapter(10, 4, rank=2, dtype=np.float64)
        >>> _ = a.train_step(None, np.array([3]), np.array([0, 1]), np.ones((1, 4)))
        >>> rows, acc_a, acc_b = a.optimizer_state()
        >>> rows.tolist(), acc_a.shape, acc_b.shape
        ([3], (1,), (2, 4))
        """
        st = self._state
        slots = np.flatnonzero(st.slot_row >= 0)
        return st.slot_row[slots].copy(), st.acc_a[slots].copy(), st.acc_b.copy()

    def set_row_accumulators(self, row_ids, acc_a, *, missing: str = "raise") -> int:
        """Set the row-wise Adagrad accumulators of active rows by row id.

        ``acc_a`` is one number >= 0 for all or one per id. Rows that are not active
        raise ``KeyError`` (``missing="raise"``, nothing is written) or are skipped
        (``missing="ignore"``). Call it from the trainer's thread (the one writer);
        lookups never read optimizer state. Returns the number of rows set.

        Examples
        --------
        >>> import numpy as np, lukern
        >>> a = lukern.LoRAAdapter(10, 4, rank=2, dtype=np.float64)
        >>> a.backward(np.array([3, 5]), np.array([0, 2]), np.zeros((1, 4)))
        True
        >>> a.set_row_accumulators([5, 3], [0.5, 0.25])
        2
        >>> a.optimizer_state()[1].tolist()
        [0.25, 0.5]
        """
        V.check_choice("missing", missing, ("raise", "ignore"))
        rows = np.asarray(row_ids)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise TypeError(f"`row_ids` must be a 1-D array of integers; got shape {rows.shape}, dtype {rows.dtype}.")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"`row_ids` must be in [0, {self.n_rows}); got [{rows.min()}, {rows.max()}].")
        if LK.has_duplicate(rows):
            raise ValueError("`row_ids` must be unique (which value would win for a repeated id?).")
        vals = np.asarray(acc_a)
        if vals.ndim == 0:
            vals = np.full(rows.size, vals)
        if vals.shape != (rows.size,) or vals.dtype.kind not in "fiu":
            raise ValueError(f"`acc_a` must be one number or one per row id ({rows.size},); got shape {vals.shape}, "
                             f"dtype {vals.dtype}.")
        if not np.isfinite(vals).all() or (vals < 0).any():
            raise ValueError("`acc_a` must hold finite values >= 0 (Adagrad accumulators); nothing was written.")
        st = self._state
        slots = np.empty(rows.size, np.int64)
        LK.find_slots(rows, st.keys, st.vals, st.mask, st.bitmap, slots)
        found = slots >= 0
        if not found.all():
            if missing == "raise":
                raise KeyError(f"{int((~found).sum())} of `row_ids` are not active (first: {int(rows[~found][0])}); "
                               "nothing was written. Pass missing='ignore' to skip them.")
            slots, vals = slots[found], vals[found]
        st.acc_a[slots] = vals
        return int(slots.size)


    # -- forward -----------------------------------------------------------------------------

    def _check_compatible(self, table, name="table"):
        if table.shape != (self.n_rows, self.dim):
            raise ValueError(f"`{name}` must have the adapter's shape ({self.n_rows}, {self.dim}); got {table.shape}. "
                             "An adapter belongs to one table: build one per table (LoRAAdapter(n_rows, dim)).")
        if table.dtype != self.dtype:
            raise TypeError(f"`{name}` must have the adapter's dtype {self.dtype}; got {table.dtype}. Build the "
                            f"adapter with LoRAAdapter(..., dtype=np.{table.dtype}) or convert the table once "
                            f"(table.astype(np.{self.dtype})).")

    def add_correction(self, indices, offsets, out, *, weights=None, mode="sum"):
        """``out[b] += s * (pooled A rows of bag b) @ B`` for inputs that are already
        validated (the second pass of lookups without a fused kernel). ``out`` must hold
        the plain lookup; the correction is computed from one consistent state.
        Returns the pooled A rows ``P`` (n_bags x r)."""
        base = out.copy()  # a retry starts again from the plain values
        res = []

        def run(states):
            out[...] = base
            res[:] = [self._add_correction_state(states[0], indices, offsets, out, weights, mode)]

        read_consistent([self], run)
        return res[0]

    def _add_correction_state(self, st, indices, offsets, out, weights, mode):
        n_bags = offsets.shape[0] - 1
        P = np.empty((n_bags, st.A.shape[1]), self.dtype)
        w = weights if weights is not None else _EMPTY[self.dtype]
        m = 1 if mode == "mean" else 0
        LK.lora_pool_range(indices, offsets, w, weights is not None, m, st.keys, st.vals, st.mask, st.bitmap, st.A,
                           P, 0, n_bags)
        LK.add_low_rank(P, st.B, self.dtype.type(st.scale), out, 0, n_bags)
        return P

    def forward(self, table, indices, offsets, *, weights=None, mode="sum", out=None):
        """The trainer's lookup: ``out = embedding_bag(table, ...) + correction``, like
        ``embedding_bag(..., adapter=self)``, plus a :class:`ForwardContext` that lets
        :meth:`backward` (or :meth:`train_step`) of the same batch skip the hash probes of
        the ids found here and the pooling of A. Rows are still admitted by the backward.
        Call it from the trainer's thread (the one writer): unlike the serving lookup it
        does not guard against a concurrent mutation. When most ids of the previous call
        had an A row (a trainer revisiting the rows it admitted), it finds every id's
        slot first and then pools W and A in one pass: the same result, faster there.

        Returns ``(out, context)``.

        Examples
        --------
        >>> import numpy as np, lukern
        >>> W = np.ones((10, 4)); a = lukern.LoRAAdapter(10, 4, rank=2, dtype=np.float64)
        >>> idx, off = np.array([1, 2]), np.array([0, 2])
        >>> y, ctx = a.forward(W, idx, off)
        >>> a.train_step(W, idx, off, y - 1.0, context=ctx)
        True
        """
        from .embedding import embedding_bag

        V.check_table(table)
        self._check_compatible(table)
        V.check_choice("mode", mode, ("sum", "mean"))
        st = self._state
        fused = LK.fused_kernels(self.dim, self.dtype)
        if fused is None:  # generic width: plain lookup, then the correction
            out = embedding_bag(table, indices, offsets, weights=weights, mode=mode, out=out, n_threads=1)
        else:  # validation only (no rows): the fused kernel below writes every bag
            V.check_indices(indices, self.n_rows)
            V.check_offsets(offsets, indices.shape[0])
            if weights is not None:
                if mode != "sum":
                    raise ValueError("`weights` are defined only for mode='sum'.")
                V.check_weights(weights, indices.shape[0], self.dtype)
            n_bags = offsets.shape[0] - 1
            if out is None:
                out = np.empty((n_bags, self.dim), self.dtype)
            else:
                V.check_out(out, (n_bags, self.dim), self.dtype)
        slots = np.empty(indices.shape[0], np.int64)
        P = np.empty((offsets.shape[0] - 1, st.A.shape[1]), self.dtype)
        w = weights if weights is not None else _EMPTY[self.dtype]
        m = 1 if mode == "mean" else 0
        n_bags, n_ids = offsets.shape[0] - 1, indices.shape[0]
        if fused is None:
            found = LK.find_slots(indices, st.keys, st.vals, st.mask, st.bitmap, slots)
            LK.pool_slots(slots, offsets, w, weights is not None, st.A, P)
            LK.add_pooled(P, offsets, m, st.B, float(st.scale), out)
        elif self._forward_hits >= _PROBE_FIRST_AT:
            # most ids have an A row (a trainer's batches revisit the rows it admitted): probe
            # them all first (no bitmap test: most would pass it), then pool W and A in one
            # pass (the same bits)
            found = LK.find_slots(indices, st.keys, st.vals, st.mask, st.bitmap, slots, False)
            fused.by_slot(table, indices, offsets, w, weights is not None, m, out, 0, n_bags, slots, st.A, st.B,
                          self.dtype.type(st.scale), P)
        else:
            fused.train(table, indices, offsets, w, weights is not None, m, out, 0, n_bags, st.keys, st.vals, st.mask,
                        st.bitmap, st.A, st.B, self.dtype.type(st.scale), slots, P)
            found = n_ids - LK.count_below(slots, 0)
        self._forward_hits = found / max(n_ids, 1)
        return out, ForwardContext(indices, offsets, weights, mode, slots, P, st, self.version)

    def dense_delta(self) -> np.ndarray:
        """The dense correction ``s * A_dense @ B`` (n_rows x d, float64): for tests and
        small tables."""
        st = self._state
        delta = np.zeros((self.n_rows, self.dim), np.float64)
        rows, slots = self.active_rows()
        delta[rows] = st.scale * (st.A[slots].astype(np.float64) @ st.B.astype(np.float64))
        return delta

    # -- backward and step ---------------------------------------------------------------

    def backward(self, indices, offsets, grad, *, weights=None, mode="sum", table=None, n_threads=None,
                 context=None) -> bool:
        """Accumulate the gradients of A (touched rows) and B for one batch.

        ``grad`` (n_bags x d) is the gradient of the loss with respect to the pooled
        outputs ``y_b``. With ``u_b = s g_b B^T`` and ``P`` the pooled A rows per bag,
        ``dA[slot(i_j)] += w_j u_b`` and ``dB += s P^T G`` (DESIGN section 2). Rows without
        a slot are admitted (A row zero); when no slot is free the coldest
        ``evict_fraction`` of the capacity is folded into ``table`` first (with
        ``table=None`` such rows are skipped and counted in ``dropped_admissions``).

        Deterministic: the B gradient is summed per fixed chunk of bags and merged in
        chunk order, each pending A row by one thread in id order, so ``n_threads``
        (default 1: the trainer runs beside serving) never changes a bit.
        Returns False, writes nothing and counts the step in ``rejected_steps`` when
        ``grad`` holds NaN or Inf. ``context`` (from :meth:`forward` on the same arrays)
        spares the probes, the pooling and a second check of ``indices`` and ``offsets``
        (so do not modify them in between); a context from an older state is ignored.

        Examples
        --------
        >>> import numpy as np, lukern
        >>> a = lukern.LoRAAdapter(10, 4, rank=2, capacity=4, dtype=np.float64)
        >>> a.backward(np.array([3, 3, 5]), np.array([0, 2, 3]), np.ones((2, 4)))
        True
        >>> sorted(a.pending_gradients()[0].tolist())
        [3, 5]
        """
        if not (isinstance(context, ForwardContext) and context.indices is indices and context.offsets is offsets):
            V.check_indices(indices, self.n_rows)  # else forward() checked these very arrays
            V.check_offsets(offsets, indices.shape[0])
        n_bags = offsets.shape[0] - 1
        n_ids = indices.shape[0]
        V.check_array("grad", grad, 2)
        if grad.shape != (n_bags, self.dim):
            raise ValueError(f"`grad` must have shape (n_bags, dim) = ({n_bags}, {self.dim}); got {grad.shape}.")
        V.check_choice("mode", mode, ("sum", "mean"))
        if weights is not None:
            if mode != "sum":
                raise ValueError("`weights` are defined only for mode='sum'.")
            V.check_weights(weights, n_ids, self.dtype)
        if table is not None:
            V.check_table(table)
            self._check_compatible(table)
        n_threads = 1 if n_threads is None else V.check_positive_int("n_threads", n_threads, allow_none=False)
        if n_ids >= 2**31:
            raise ValueError(f"`indices` may hold at most 2**31 - 1 ids per backward; got {n_ids}. Split the batch.")
        if grad.dtype not in V.FLOAT_DTYPES or not grad.flags.c_contiguous:
            grad = np.ascontiguousarray(grad, dtype=np.float64)
        if not LK.all_finite(grad):
            self._reject("`grad` holds NaN or Inf")
            return False
        st = self._state
        if context is not None:
            if not isinstance(context, ForwardContext):
                raise TypeError(f"`context` must come from LoRAAdapter.forward; got {type(context).__name__}.")
            if (context.indices is not indices or context.offsets is not offsets or context.weights is not weights
                    or context.mode != mode):
                raise ValueError("`context` belongs to another batch: pass the indices, offsets, weights and mode "
                                 "given to forward().")
            if context.state is not st or context.version != self.version:
                context = None  # the state changed since the forward: probe and pool again
        known = context.slots if context is not None else _NO_SLOTS
        r = self.rank
        need = min(self._n_u + n_ids, self.capacity)
        if self._G.shape[0] < need:
            G = np.zeros((min(max(need, 2 * self._G.shape[0]), self.capacity), r), self.dtype)
            G[:self._n_u] = self._G[:self._n_u]
            self._G = G
        w = weights if weights is not None else _EMPTY[self.dtype]
        use_w = weights is not None
        m = 1 if mode == "mean" else 0
        scale = float(st.scale)
        Bt = np.ascontiguousarray(st.B.T, dtype=np.float64)
        n_chunks = -(-n_bags // _BACKWARD_CHUNK)
        U = np.empty((n_bags, r), np.float64)
        parts = np.empty((n_chunks, r, self.dim), np.float64)
        dB = np.zeros((r, self.dim), np.float64) if self._dB is None else self._dB
        if n_threads == 1 and context is not None and LK.count_below(known, 0) <= self._n_free:
            # the serial trainer after forward(), every admission fitting the free slots:
            # the bag side from the forward's pooled rows, then one pass over the ids
            # that finds slots, admits, registers pending rows and scatters u_b, with the
            # sums of the two-pass path below in the same order (the same bits)
            LK.backward_bags_kernel(r)(_NO_SLOTS, offsets, w, use_w, m, grad, st.A, st.B, Bt, scale, U, parts,
                                       _BACKWARD_CHUNK, 0, n_chunks, context.P, True)
            LK.sum_parts(parts, dB)
            n_free0 = self._n_free
            self._n_free, self._n_u, missed = LK.assign_scatter(
                indices, offsets, w, use_w, st.keys, st.vals, st.mask, st.bitmap, st.slot_row, st.last_step,
                self._free, self._n_free, self.step_count, self._local, self._uniq, self._n_u, self._G, known, U)
            self._seed_admitted(n_free0)
            self.dropped_admissions += int(missed)  # 0: the free slots were counted
        else:
            self._backward_two_pass(indices, offsets, w, use_w, m, grad, table, n_threads, context, known, U, parts,
                                    dB, Bt, scale)
        self._dB = dB
        if self.grad_window is not None:
            self.grad_window.add(grad)
        return True

    def _backward_two_pass(self, indices, offsets, w, use_w, m, grad, table, n_threads, context, known, U, parts, dB,
                           Bt, scale):
        """The backward in passes that split over ``n_threads``: slots (admitting, and
        evicting when the slots run out), the bag side by chunks, the id side by
        pending rows."""
        st = self._state
        n_ids = indices.shape[0]
        slots = np.empty(n_ids, np.int64)
        pend = np.empty(n_ids, np.int32)  # every id's pending row
        n_free0 = self._n_free
        self._n_free, self._n_u, missed = LK.assign_slots(
            indices, st.keys, st.vals, st.mask, st.bitmap, st.slot_row, st.last_step, self._free, self._n_free,
            self.step_count, slots, self._local, self._uniq, self._n_u, self._G, known, context is not None, pend)
        self._seed_admitted(n_free0)
        if missed:
            if table is not None:
                # rows pending from this batch stay pending; evicted ones leave the list,
                # and the forward's slots may be stale now: probe every id again
                self._evict(max(missed, int(self.capacity * self.evict_fraction)), table)
                st = self._state
                n_free0 = self._n_free
                self._n_free, self._n_u, missed = LK.assign_slots(
                    indices, st.keys, st.vals, st.mask, st.bitmap, st.slot_row, st.last_step, self._free,
                    self._n_free, self.step_count, slots, self._local, self._uniq, self._n_u, self._G, known, False,
                    pend)
                self._seed_admitted(n_free0)
                # the folded rows left the parameters B acts on: pool A again without them
                context = None
            self.dropped_admissions += int(missed)
        # bag side: u_b and the chunk partials of dB
        P, have_p = (context.P, True) if context is not None else (_NO_P[self.dtype], False)
        n_chunks = parts.shape[0]
        bags = LK.backward_bags_kernel(st.A.shape[1])
        _run_split(lambda c0, c1: bags(slots, offsets, w, use_w, m, grad, st.A, st.B, Bt, scale, U, parts,
                                                   _BACKWARD_CHUNK, c0, c1, P, have_p),
                   n_chunks, n_threads)
        LK.sum_parts(parts, dB)
        # id side: each pending row owned by one thread, summed in id order
        G = self._G
        _run_split(lambda lo, hi: LK.scatter_grad_a(pend, offsets, w, use_w, U, G, lo, hi), self._n_u, n_threads)

    def pending_gradients(self):
        """(row_ids, dA rows, dB) accumulated by :meth:`backward` since the last step
        (float64 copies; rows in first-touched order)."""
        st = self._state
        uniq = self._uniq[:self._n_u]
        dB = np.zeros((self.rank, self.dim)) if self._dB is None else self._dB.copy()
        return st.slot_row[uniq].copy(), self._G[:self._n_u].astype(np.float64), dB

    def step(self, *, n_threads=None) -> bool:
        """Apply the optimizers to the accumulated gradients, then clear them.

        Row-wise Adagrad (or SGD) touches only the pending A rows; B gets Adagrad (or SGD)
        as a new array swapped in with the state. Returns False (nothing written,
        ``rejected_steps`` incremented, a warning the first time) when the accumulated
        gradients are not finite.
        """
        if self._dB is None:
            return True
        n_threads = 1 if n_threads is None else V.check_positive_int("n_threads", n_threads, allow_none=False)
        st = self._state
        n_u = self._n_u
        if not (LK.all_finite(self._G[:n_u]) and LK.all_finite(self._dB)):
            self._clear_pending()
            self._reject("the accumulated gradients hold NaN or Inf")
            return False
        g = self._dB + self.weight_decay * st.B
        if self.optimizer_b == "adagrad":
            acc_b = st.acc_b + (g * g).astype(self.dtype)
            B = (st.B - self.lr_b * g / (np.sqrt(acc_b) + self.eps)).astype(self.dtype)
        else:
            acc_b = st.acc_b
            B = (st.B - self.lr_b * g).astype(self.dtype)
        uniq, G = self._uniq, self._G
        if self.optimizer_a == "rowwise_adagrad":
            def apply(i0, i1):
                LK.rowwise_adagrad_a(st.A, st.acc_a, uniq, G, self.lr_a, self.weight_decay, self.eps, i0, i1)
        else:
            def apply(i0, i1):
                LK.sgd_a(st.A, uniq, G, self.lr_a, self.weight_decay, i0, i1)
        with self._mutating():
            _run_split(apply, n_u, n_threads)
            # B is small: copy-on-write, swapped with the state reference
            self._state = st.replace(B=B, acc_b=acc_b)
        self._clear_pending()
        self.step_count += 1
        self.version += 1
        return True

    def train_step(self, table, indices, offsets, grad, *, weights=None, mode="sum", n_threads=None,
                   context=None) -> bool:
        """:meth:`backward` then :meth:`step` (``table`` receives folded rows; ``context``
        from :meth:`forward` of the same batch spares the probes and the pooling).

        The optimizer is not folded into the scatter on purpose: a step is rejected when
        any accumulated gradient is not finite, which is known only once every row's
        gradient is summed; the extra pass reads the touched rows' r floats only.
        """
        return (self.backward(indices, offsets, grad, weights=weights, mode=mode, table=table, n_threads=n_threads,
                              context=context)
                and self.step(n_threads=n_threads))

    def _clear_pending(self):
        LK.reset_local(self._local, self._uniq, self._n_u)
        self._n_u = 0
        self._dB = None

    def _reject(self, why):
        self.rejected_steps += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"LoRAAdapter: step rejected, {why}; nothing was written (counted in rejected_steps; "
                          "this warning is shown once).", RuntimeWarning, stacklevel=3)

    # -- eviction and folding -------------------------------------------------------------

    def _fold_and_free(self, slots: np.ndarray, table) -> None:
        st = self._state
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            raise IndexError(f"the eviction policy returned slots outside [0, {self.capacity}).")
        with self._mutating():
            if table is not None:
                LK.fold_rows(table, st.A, st.B, table.dtype.type(st.scale), st.slot_row, slots)
            # the freed rows leave the pending list; the others keep their gradients
            self._n_u = LK.drop_pending(slots, self._local, self._uniq, self._G, self._n_u)
            n_before = self._n_free
            self._n_free = LK.evict_slots(st.keys, st.vals, st.mask, st.bitmap, st.slot_row, st.A, st.acc_a,
                                          st.last_step, slots, self._free, self._n_free)
        self.evicted_rows += int(self._n_free - n_before)
        self.version += 1

    def _evict(self, n: int, table) -> np.ndarray:
        slots = np.unique(np.asarray(self.eviction.choose(self, int(n)), dtype=np.int64))
        self._fold_and_free(slots, table)
        return slots

    def evict(self, n: int, table) -> np.ndarray:
        """Fold the ``n`` coldest rows (by the eviction policy) into ``table`` and free
        their slots. Returns the freed slots."""
        V.check_table(table)
        self._check_compatible(table)
        return self._evict(V.check_positive_int("n", n, allow_none=False), table)

    def fold_all(self, table) -> None:
        """Merge every active row into ``table`` and reset A (B and its optimizer state
        are kept). Afterwards the plain lookup of ``table`` equals the fused lookup before.

        Examples
        --------
        >>> import numpy as np, lukern
        >>> W = np.zeros((10, 4)); a = lukern.LoRAAdapter(10, 4, rank=2, dtype=np.float64)
        >>> _ = a.train_step(W, np.array([1]), np.array([0, 1]), np.ones((1, 4)))
        >>> before = lukern.embedding_bag(W, np.array([1]), np.array([0, 1]), adapter=a)
        >>> a.fold_all(W); a.n_active
        0
        >>> bool(np.allclose(W[1], before[0]))
        True
        """
        V.check_table(table)
        self._check_compatible(table)
        _, slots = self.active_rows()
        self._fold_and_free(slots, table)

    def resize(self, capacity: int) -> None:
        """Change the capacity: new arrays holding the active rows, swapped in at once.
        Shrinking below the active count raises (evict first)."""
        capacity = min(V.check_positive_int("capacity", capacity, allow_none=False), self.n_rows)
        rows, slots = self.active_rows()
        if rows.size > capacity:
            raise ValueError(f"`capacity` {capacity} is below the {rows.size} active rows; call evict() first.")
        st = self._state
        self._adopt(rows, st.A[slots], st.B, st.acc_b, capacity=capacity, acc_a=st.acc_a[slots],
                    last_step=st.last_step[slots])

    def refactor(self, A_active, B, *, scale=None, acc_a=None, acc_b=None) -> None:
        """Replace the factors of the active rows (same rows, in :meth:`active_rows`
        order) by ``A_active`` (k x r') and ``B`` (r' x d): the rank controller's way to
        change the rank. Built aside and swapped in at once.

        The optimizer state restarts (zero accumulators) unless given: ``acc_a`` (k,),
        the row-wise Adagrad accumulators of the rows in the same order (they do not
        depend on the rank, e.g. ``optimizer_state()[1]``), and ``acc_b`` (r' x d), B's
        accumulator. Both must be finite and >= 0. Bad input raises and changes nothing.

        Examples
        --------
        >>> import numpy as np, lukern
        >>> a = lukern.LoRAAdapter(10, 4, rank=2, dtype=np.float64)
        >>> _ = a.train_step(None, np.array([3]), np.array([0, 1]), np.ones((1, 4)))
        >>> rows, acc_a, acc_b = a.optimizer_state()
        >>> a.refactor(np.ones((1, 1)), np.ones((1, 4)), acc_a=acc_a, acc_b=acc_b[:1])
        >>> a.rank, bool(np.array_equal(a.optimizer_state()[1], acc_a))
        (1, True)
        """
        rows, slots = self.active_rows()
        A_active = np.asarray(A_active)
        B = np.asarray(B)
        if A_active.ndim != 2 or A_active.shape[0] != rows.size or A_active.shape[1] < 1:
            raise ValueError(f"`A_active` must have one row per active row ({rows.size}) and rank >= 1; "
                             f"got shape {A_active.shape}.")
        if B.ndim != 2 or B.shape != (A_active.shape[1], self.dim):
            raise ValueError(f"`B` must have shape ({A_active.shape[1]}, {self.dim}); got {B.shape}.")
        if not (np.isfinite(A_active).all() and np.isfinite(B).all()):
            raise ValueError("`A_active` and `B` must be finite.")
        if acc_a is not None:
            acc_a = self._check_acc("acc_a", acc_a, (rows.size,), "one per active row, in active_rows() order")
        if acc_b is not None:
            acc_b = self._check_acc("acc_b", acc_b, B.shape, "the shape of `B`").copy()
        s = self._state.scale if scale is None else float(scale)
        if not np.isfinite(s):
            raise ValueError(f"`scale` must be a finite number; got {scale!r}.")
        self._adopt(rows, A_active, B, acc_b, capacity=self.capacity, acc_a=acc_a,
                    last_step=self._state.last_step[slots], scale=s)

    def _check_acc(self, name, acc, shape, what):
        acc = np.asarray(acc)
        if acc.shape != tuple(shape) or acc.dtype.kind not in "fiu":
            raise ValueError(f"`{name}` must have shape {tuple(shape)} ({what}); got shape {acc.shape}, "
                             f"dtype {acc.dtype}.")
        if not np.isfinite(acc).all() or (acc < 0).any():
            raise ValueError(f"`{name}` must hold finite values >= 0 (Adagrad accumulators).")
        return acc.astype(self.dtype, copy=False)

    def _adopt(self, rows, A_rows, B, acc_b, *, capacity, acc_a=None, last_step=None, scale=None):
        """Build a state holding ``rows`` with ``A_rows`` and ``B`` aside, then swap it in."""
        rank = A_rows.shape[1]
        scale = self._state.scale if scale is None else scale
        k = rows.size
        free = np.zeros(capacity, np.int32)  # the stack keeps capacity entries
        free[:capacity - k] = np.arange(capacity - 1, k - 1, -1)
        hcap = _pow2_at_least(2 * capacity)
        st = _State(keys=np.full(hcap, -1, np.int64), vals=np.full(hcap, -1, np.int32), mask=hcap - 1,
                    bitmap=np.zeros((self.n_rows + 63) // 64, np.uint64),
                    A=np.zeros((capacity, rank), self.dtype), B=np.ascontiguousarray(B, dtype=self.dtype),
                    scale=float(scale), slot_row=np.full(capacity, -1, np.int64),
                    acc_a=np.zeros(capacity, self.dtype),
                    acc_b=np.zeros((rank, self.dim), self.dtype) if acc_b is None else acc_b,
                    last_step=np.full(capacity, -1, np.int64))
        if k:
            st.A[:k] = A_rows
            st.slot_row[:k] = rows
            if acc_a is not None:
                st.acc_a[:k] = acc_a
            if last_step is not None:
                st.last_step[:k] = last_step
            LK.rebuild_hash(st.slot_row, st.keys, st.vals, st.mask, st.bitmap)
        with self._mutating():
            self._state = st
            self._free, self._n_free = free, capacity - k
            self.alpha = float(scale) * rank
            self._alloc_pending(capacity, rank)
        self.version += 1

    # -- export / import --------------------------------------------------------------------------

    def export(self) -> Factors:
        """The active rows' ids and A rows, B, the scale and the version (copies, from
        one consistent state)."""
        out = []

        def run(states):
            st = states[0]
            slots = np.flatnonzero(st.slot_row >= 0)
            out[:] = [Factors(st.slot_row[slots].copy(), st.A[slots].copy(), st.B.copy(), float(st.scale),
                              int(self.version))]

        read_consistent([self], run)
        return out[0]

    def apply_factors(self, factors: Factors, *, table=None, how: str = "replace") -> None:
        """Merge imported factors (e.g. another replica's learning).

        Parameters
        ----------
        factors : Factors
            From :meth:`export` or :func:`load_factors` (same ``dim``; any rank).
        table : ndarray, optional
            Fold their correction into this table, ``table[rows] += s A B``, and leave
            the adapter as it is.
        how : {"replace", "add"}
            Without ``table``: "replace" adopts the factors as this adapter's state (rows,
            A, B, scale); "add" adds their correction to this adapter's own, exactly, by
            concatenating the ranks on the union of the rows (rank r + r', A of a row
            missing on one side is zero there); shrink the rank afterwards with a
            :class:`~lukern.RankController` or :meth:`refactor`. Both restart the
            optimizer state (the factors are new parameters).

        Mismatched factors raise and change nothing.

        Examples
        --------
        >>> import numpy as np, lukern
        >>> a = lukern.LoRAAdapter(10, 4, rank=1, dtype=np.float64)
        >>> f = lukern.Factors(np.array([2]), np.ones((1, 1)), np.ones((1, 4)), 1.0, 0)
        >>> a.apply_factors(f, how="add"); a.apply_factors(f, how="add")
        >>> a.rank, a.dense_delta()[2].tolist()
        (3, [2.0, 2.0, 2.0, 2.0])
        """
        _check_factors(factors)
        V.check_choice("how", how, ("replace", "add"))
        rows, A, B = factors.row_ids, factors.A, factors.B
        if B.shape[1] != self.dim:
            raise ValueError(f"`factors` do not fit a dim-{self.dim} adapter: row_ids {rows.shape}, A {A.shape}, B {B.shape}.")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"`factors.row_ids` must be in [0, {self.n_rows}); got [{rows.min()}, {rows.max()}].")
        rows = np.ascontiguousarray(rows, np.int64)
        if LK.has_duplicate(rows):
            raise ValueError("`factors.row_ids` must be unique.")
        if not (np.isfinite(A).all() and np.isfinite(B).all() and np.isfinite(factors.scale)):
            raise ValueError("`factors` hold NaN or Inf; nothing was applied.")
        if table is not None:
            V.check_table(table)
            self._check_compatible(table)
            delta = (factors.scale * (A.astype(np.float64) @ B.astype(np.float64))).astype(table.dtype)
            with self._mutating():
                table[rows] += delta
            return
        if how == "replace":
            if rows.size > self.capacity:
                raise ValueError(f"`factors` hold {rows.size} rows, more than the capacity {self.capacity}; "
                                 "resize() first.")
            self._adopt(rows, A.astype(self.dtype), B, None, capacity=self.capacity, scale=float(factors.scale))
            return
        own_rows, own_slots = self.active_rows()
        st = self._state
        union = np.union1d(own_rows, rows)
        if union.size > self.capacity:
            raise ValueError(f"the merged adapter would hold {union.size} rows, more than the capacity "
                             f"{self.capacity}; resize() first.")
        r0, r1 = self.rank, A.shape[1]
        A_cat = np.zeros((union.size, r0 + r1), self.dtype)
        A_cat[np.searchsorted(union, own_rows), :r0] = st.A[own_slots]
        # their correction s' A' B' = s (s'/s A') B': same scale for both halves
        A_cat[np.searchsorted(union, rows), r0:] = (factors.scale / st.scale) * A.astype(np.float64)
        B_cat = np.concatenate([st.B, B.astype(self.dtype)], axis=0)
        last = np.full(union.size, self.step_count, np.int64)
        last[np.searchsorted(union, own_rows)] = st.last_step[own_slots]
        self._adopt(union, A_cat, B_cat, None, capacity=self.capacity, last_step=last)

    # -- warm-up ---------------------------------------------------------------------------------

    def warmup(self, *, index_dtypes=("int64", "int32"), drivers=("serial", "threads", "prange")) -> dict:
        """Compile the lookup, backward and optimizer kernels this adapter uses, on a
        scratch copy of its configuration (this adapter is not touched), so that neither
        the serving path nor the trainer compiles later. Returns ``{"compiled": [...],
        "seconds": float}``."""
        import time

        from .embedding import TableBatch, embedding_bag

        t0 = time.perf_counter()
        scratch = LoRAAdapter(64, self.dim, rank=self.rank, capacity=8, dtype=self.dtype,
                              optimizer_a=self.optimizer_a, optimizer_b=self.optimizer_b)
        table = np.zeros((64, self.dim), self.dtype)
        done = []
        for it in index_dtypes:
            idx = np.array([1, 2, 3, 5], dtype=it)
            off = np.array([0, 2, 4], dtype=it)
            grad = np.ones((2, self.dim), self.dtype)
            for weights in (None, np.ones(4, self.dtype)):
                for nt in (1, 2):
                    _, ctx = scratch.forward(table, idx, off, weights=weights)
                    scratch.train_step(table, idx, off, grad, weights=weights, context=ctx, n_threads=nt)
                    scratch.train_step(table, idx, off, grad, weights=weights, n_threads=nt)
            done.append(f"forward + train_step {it}")
            for mode in ("sum", "mean"):
                for drv in drivers:
                    embedding_bag(table, idx, off, mode=mode, adapter=scratch, driver=drv,
                                  n_threads=1 if drv == "serial" else 2, chunk_size=1)
                    done.append(f"lookup {it} {mode} {drv}")
        # the table-batched lookup's correction kernel (generated per width)
        batch = TableBatch([table])
        for it in index_dtypes:
            idx, off = np.array([1, 2, 3, 5], dtype=it), np.array([0, 2, 4], dtype=it)
            for mode in ("sum", "mean"):
                batch.lookup(idx, off, mode=mode, adapters=[scratch])
            done.append(f"table-batched lookup {it}")
        # structural changes (resize, refactor: the rank controller's) rebuild the hash
        scratch.resize(scratch.capacity + 1)
        rows, slots = scratch.active_rows()
        scratch.refactor(scratch.A[slots], scratch.B)
        done.append("resize / refactor")
        return {"compiled": done, "seconds": time.perf_counter() - t0}


#: the share of ids with an A row in the last forward() from which the next one probes
#: every id first and then pools W and A in one pass (``FusedKernels.by_slot``) instead
#: of the serving lookup's pipeline, which pays ~35 ns per id with a row. 4M x 64 float32,
#: 61k Zipf ids, r = 8, same-run medians (EPYC VM): 100% of ids with a row 2.0-2.4 ms
#: against 2.7-3.0 ms (plain lookup 1.0-1.3 ms); 87% 1.5-2.7 against 1.8-3.1; 6% 1.1-1.8
#: against 1.0-1.8 (worse: the probe pass walks every id)
_PROBE_FIRST_AT = 0.5

#: bags per chunk of the backward's B gradient (the unit of its deterministic merge)
_BACKWARD_CHUNK = 256


def _run_split(fn, n: int, n_threads: int) -> None:
    """``fn(i0, i1)`` over [0, n) in at most ``n_threads`` contiguous parts on lukern's
    worker threads (the trainer's driver, DESIGN section 2 (b))."""
    if n <= 0:
        return
    if n_threads <= 1 or n == 1:
        fn(0, n)
        return
    k = min(n_threads, n)
    bounds = [(i * n) // k for i in range(k + 1)]
    run_ranges(fn, [(bounds[i], bounds[i + 1]) for i in range(k)])


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}
_NO_P = {np.dtype(np.float32): np.empty((0, 0), np.float32), np.dtype(np.float64): np.empty((0, 0), np.float64)}
_NO_SLOTS = np.empty(0, np.int64)
