"""Train the LoRA adapters of several tables with one validated call per mini-batch.

:meth:`LoRAAdapter.train_step` is built for one table: it validates its inputs, probes,
evicts, scatters and steps through a dozen numpy and numba calls. A DLRM's co-located
trainer calls it for every table on every mini-batch, so at replay sizes (a few thousand
ids per table) that glue costs more than the arithmetic. :class:`BatchedTrainer` checks
the batch once for all tables and runs each table's backward, eviction, accumulator
seeding and optimizer step in one kernel call
(:func:`lukern._kernels.lora_batch.train_table`). It admits and evicts the same rows as
``backward`` + ``step`` per table with a :class:`StableLRU` eviction policy, and its steps
equal theirs up to float rounding: it sums each touched row's gradient before multiplying
by B, one product per row instead of per bag (the tests compare the two).

Examples
--------
>>> import numpy as np, lukern
>>> from lukern.lora_batch import BatchedTrainer, StableLRU
>>> tables = [np.zeros((50, 8), np.float32), np.zeros((20, 8), np.float32)]
>>> adapters = [lukern.LoRAAdapter(50, 8, rank=2, capacity=4, eviction=StableLRU()),
...             lukern.LoRAAdapter(20, 8, rank=2, capacity=4, eviction=StableLRU())]
>>> trainer = BatchedTrainer(adapters, tables)
>>> ids = np.array([[1, 2, 3], [4, 4, 5]])          # (tables, ids): one id per bag here
>>> off = np.arange(4)
>>> trainer.train_step(ids, off, np.ones((2, 3, 8), np.float32))
[True, True]
>>> adapters[1].n_active
2
"""

from __future__ import annotations

import numpy as np

from . import _validate as V
from ._kernels import lora as LK
from ._kernels import lora_batch as K
from .lora import _BACKWARD_CHUNK, LeastRecentlyUsed, LoRAAdapter  # the chunk: B's gradient merges alike

__all__ = ["BatchedTrainer", "StableLRU"]


class StableLRU(LeastRecentlyUsed):
    """:class:`lukern.LeastRecentlyUsed` (ties broken by the lowest slot), named as the
    policy :class:`BatchedTrainer` reproduces inside its kernel: an adapter built with it
    evicts the same slots under ``LoRAAdapter.backward`` and under the batched trainer, so
    the two paths admit and evict alike.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> a = lukern.LoRAAdapter(10, 4, rank=2, capacity=4, eviction=StableLRU())
    >>> W = np.zeros((10, 4), np.float32)
    >>> _ = a.train_step(W, np.array([5, 1, 2]), np.array([0, 3]), np.ones((1, 4), np.float32))
    >>> a._state.slot_row[a.eviction.choose(a, 2)].tolist()  # same age: lowest slots
    [5, 1]
    """


def check_prior_acc(prior, adapter, name: str) -> None:
    """Raise ValueError unless ``prior`` is None or a contiguous 1-D array of the adapter's
    n_rows and dtype (a starting row-wise Adagrad accumulator per row); with no adapter
    (None) it must be None."""
    if prior is None:
        return
    if adapter is None or not isinstance(prior, np.ndarray) or prior.shape != (adapter.n_rows,) \
            or prior.dtype != adapter.dtype or not prior.flags.c_contiguous:
        want = "None (the table has no adapter)" if adapter is None else \
            f"a contiguous ({adapter.n_rows},) {adapter.dtype} array"
        got = f"{prior.shape} {prior.dtype}" if isinstance(prior, np.ndarray) else type(prior).__name__
        if isinstance(prior, np.ndarray) and not prior.flags.c_contiguous:
            got += ", not contiguous"
        raise ValueError(f"`{name}` must be {want}; got {got}. Pass numpy.ascontiguousarray(acc, dtype=...) of "
                         "one value per row, or None.")


_OPT_A = {"rowwise_adagrad": 0, "sgd": 1}
_OPT_B = {"adagrad": 0, "sgd": 1}
_BACKWARD = {"auto": K.AUTO, "row": K.BY_ROW, "bag": K.BY_BAG}
_EMPTY_PRIOR = {np.dtype(np.float32): np.zeros(1, np.float32), np.dtype(np.float64): np.zeros(1, np.float64)}


class BatchedTrainer:
    """One backward + optimizer step for the adapters of several tables per call.

    Parameters
    ----------
    adapters : sequence of LoRAAdapter or None
        One per table (None: the table has no adapter and its ids are ignored). Each must
        use :class:`StableLRU` eviction and have no pending gradients when stepped.
    tables : sequence of ndarray or None
        The tables (n_rows x dim) evicted rows are folded into, one per adapter. None
        for a table: its adapter never evicts; rows that find no free slot are dropped
        and counted in ``dropped_admissions``, as ``LoRAAdapter.backward`` does with
        ``table=None`` (the same bits; any eviction policy then, since none runs). For
        a trainer that may not write the served tables, e.g. in another process.
    prior_acc : sequence of 1-D arrays or None, optional
        Per table, a starting row-wise Adagrad accumulator for every row (length
        n_rows): a slot whose accumulator is 0 after the backward (a newly admitted row)
        starts from its row's value, before the step (the DLRM's own row history).
    backward : {"auto", "row", "bag"}, optional
        How each table's gradients are formed. "row": summed per touched row, then one
        product with B per row (a batch of one-id Zipf bags touches few distinct rows);
        "bag": the adapter's own per-bag kernel (the same bits as
        ``LoRAAdapter.backward``); "auto" (default): whichever takes fewer operations
        for the batch at hand.

    The tables, adapters and priors are checked here once; :meth:`train_step` checks
    only the batch.
    """

    def __init__(self, adapters, tables, *, prior_acc=None, backward: str = "auto"):
        V.check_choice("backward", backward, tuple(_BACKWARD))
        adapters = list(adapters)
        tables = list(tables)
        if len(tables) != len(adapters):
            raise ValueError(f"`tables` must hold one table per adapter ({len(adapters)}); got {len(tables)}.")
        priors = [None] * len(adapters) if prior_acc is None else list(prior_acc)
        if len(priors) != len(adapters):
            raise ValueError(f"`prior_acc` must hold one array (or None) per adapter ({len(adapters)}); "
                             f"got {len(priors)}.")
        dims, dtypes = set(), set()
        for t, (a, table, prior) in enumerate(zip(adapters, tables, priors)):
            if a is None:
                continue
            if not isinstance(a, LoRAAdapter):
                raise TypeError(f"`adapters[{t}]` must be a lukern.LoRAAdapter or None; got {type(a).__name__}.")
            if table is not None and type(a.eviction) is not StableLRU:
                raise TypeError(f"`adapters[{t}]` evicts with {type(a.eviction).__name__}; BatchedTrainer evicts "
                                "inside its kernel and supports lukern.lora_batch.StableLRU only. Build the "
                                "adapter with eviction=StableLRU(), or train it with LoRAAdapter.train_step.")
            if table is not None:
                V.check_table(table, f"tables[{t}]")
                a._check_compatible(table, f"tables[{t}]")
            check_prior_acc(prior, a, f"prior_acc[{t}]")
            dims.add(a.dim)
            dtypes.add(a.dtype)
        if len(dims) > 1 or len(dtypes) > 1:
            raise ValueError(f"all adapters must share one dim and dtype; got dims {sorted(dims)}, "
                             f"dtypes {sorted(str(d) for d in dtypes)}.")
        self.adapters, self.tables, self.prior_acc = adapters, tables, priors
        self.dim = dims.pop() if dims else None
        self.dtype = dtypes.pop() if dtypes else None
        self._n_rows = np.array([-1 if a is None else a.n_rows for a in adapters], np.int64)
        self._path = _BACKWARD[backward]

    def train_step(self, indices, offsets, grad, *, mode: str = "sum", between=None) -> list:
        """Backward and optimizer step of every adapter for one mini-batch.

        Parameters
        ----------
        indices : ndarray (n_tables, n_ids), int64
            Row ``t`` holds table ``t``'s ids (every table has the same bag layout).
        offsets : ndarray (n_bags + 1,), int64
            CSR bag boundaries shared by the tables.
        grad : ndarray (n_tables, n_bags, dim)
            d loss / d pooled output of every table. Its rows must be contiguous (the
            last axis of stride one); the other axes may be strided, so a model's
            (n_bags, n_tables * dim) gradient is passed without a copy as
            ``grad.reshape(n_bags, n_tables, dim).transpose(1, 0, 2)``.
        mode : {"sum", "mean"}
        between : callable, optional
            Called with no arguments after each table's step (a co-located trainer's
            pause check: a request then waits at most one table's step).

        Returns
        -------
        list
            Per table: True (stepped), False (rejected: non-finite gradients, nothing
            applied, counted in the adapter's ``rejected_steps``) or None (no adapter).
        """
        n_tables = len(self.adapters)
        V.check_array("indices", indices, 2)
        if indices.dtype != np.int64 or not indices.flags.c_contiguous:
            raise TypeError(f"`indices` must be a C-contiguous int64 array (n_tables, n_ids); got {indices.dtype}"
                            f"{'' if indices.flags.c_contiguous else ', not contiguous'}. Use "
                            "numpy.ascontiguousarray(indices, dtype=np.int64).")
        if indices.shape[0] != n_tables:
            raise ValueError(f"`indices` must have one row per table ({n_tables}); got shape {indices.shape}.")
        if offsets.dtype != np.int64:
            raise TypeError(f"`offsets` must be int64; got {offsets.dtype}. Use offsets.astype(np.int64).")
        V.check_offsets(offsets, indices.shape[1])
        n_bags = offsets.shape[0] - 1
        V.check_array("grad", grad, 3)
        if grad.shape != (n_tables, n_bags, self.dim if self.dim is not None else grad.shape[2]):
            raise ValueError(f"`grad` must have shape (n_tables, n_bags, dim) = ({n_tables}, {n_bags}, {self.dim}); "
                             f"got {grad.shape}.")
        rows_ok = grad.shape[2] <= 1 or grad.strides[2] == grad.itemsize
        if grad.dtype not in V.FLOAT_DTYPES or not rows_ok:
            raise TypeError(f"`grad` must be a float32 or float64 array with contiguous rows (last axis of stride "
                            f"one); got {grad.dtype}{'' if rows_ok else f' with strides {grad.strides}'}. Use "
                            "numpy.ascontiguousarray(grad).")
        V.check_choice("mode", mode, ("sum", "mean"))
        if indices.shape[1] >= 2**31:
            raise ValueError(f"`indices` may hold at most 2**31 - 1 ids per table; got {indices.shape[1]}.")
        t_bad, j_bad = K.first_bad_id(indices, self._n_rows)
        if t_bad >= 0:
            raise IndexError(f"`indices[{t_bad}, {j_bad}]` = {int(indices[t_bad, j_bad])} is outside table "
                             f"{t_bad}'s rows [0, {int(self._n_rows[t_bad])}).")
        for t, a in enumerate(self.adapters):
            if a is not None and (a._n_u or a._dB is not None):
                raise RuntimeError(f"`adapters[{t}]` has pending gradients from LoRAAdapter.backward(); call its "
                                   "step() first.")
        m = 1 if mode == "mean" else 0
        finite = np.empty(n_tables, np.bool_)
        # the common all-finite batch in one vectorised pass over its memory when that is
        # contiguous (a (n_tables, n_bags, dim) array, or the transposed view of a model's
        # (n_bags, n_tables * dim) gradient): 20 us against 150 us per table for 1024 x 416
        whole = grad if grad.flags.c_contiguous else grad.transpose(1, 0, 2)
        if whole.flags.c_contiguous and LK.all_finite(whole):
            finite[:] = True
        else:
            K.finite_tables(grad, finite)
        done = []
        for t, a in enumerate(self.adapters):
            done.append(None if a is None else self._one(t, a, indices[t], offsets, grad[t], m, finite[t]))
            if between is not None and a is not None:
                between()
        return done

    def _one(self, t, a: LoRAAdapter, idx, offsets, g, mode, finite):
        if not finite:
            a._reject("`grad` holds NaN or Inf")
            return False
        n_ids = idx.shape[0]
        need = min(n_ids, a.capacity)
        if a._G.shape[0] < need:  # the adapter's own growth rule (its nbytes counts G)
            a._G = np.zeros((min(max(need, 2 * a._G.shape[0]), a.capacity), a.rank), a.dtype)
        prior = self.prior_acc[t]
        table = self.tables[t]
        evict = table is not None
        if not evict:  # never read by the kernel then; a placeholder of the table's type
            table = np.empty((0, a.dim), a.dtype)
        dB = np.zeros((a.rank, a.dim), np.float64)
        B_new = np.empty((a.rank, a.dim), a.dtype)
        acc_b_new = np.empty((a.rank, a.dim), a.dtype)
        with a._mutating():
            st = a._state
            status, n_free, evicted, dropped, n_evicted = K.train_table(
                idx, offsets, g, mode, st.keys, st.vals, st.mask, st.bitmap, st.slot_row, st.last_step, st.A,
                st.acc_a, st.B, st.acc_b, float(st.scale), table.dtype.type(st.scale), a._free, a._n_free, a._local,
                a._uniq, a._G, a.step_count, int(a.capacity * a.evict_fraction), table,
                _EMPTY_PRIOR[a.dtype] if prior is None else prior, prior is not None, _OPT_A[a.optimizer_a],
                _OPT_B[a.optimizer_b], a.lr_a, a.lr_b, a.weight_decay, a.eps, _BACKWARD_CHUNK, dB, B_new, acc_b_new,
                evict, self._path)
            a._n_free = int(n_free)
            if status == K.OK:
                a._state = st.replace(B=B_new, acc_b=acc_b_new if a.optimizer_b == "adagrad" else st.acc_b)
        a._n_u = 0
        a._dB = None
        if evicted:
            a.evicted_rows += int(n_evicted)
            a.version += 1
        a.dropped_admissions += int(dropped)
        if a.grad_window is not None:
            a.grad_window.add(g)
        if status == K.BAD_STEP:
            a._reject("the accumulated gradients hold NaN or Inf")
            return False
        a.step_count += 1
        a.version += 1
        return True
