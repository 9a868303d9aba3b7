"""Model-refresh strategies compared by the replay (DESIGN section 7).

Every strategy serves one model and is run prequentially: :meth:`Strategy.predict` scores
a batch (after applying any update that has *arrived* by the batch's time), then
:meth:`Strategy.learn` sees its labels, and :meth:`Strategy.end_window` is called at each
window boundary (where the shipping strategies send their update).

- ``stale``: the initial model, never updated.
- ``full``: every T windows the training side's model (trained continuously on the
  stream, like a production retraining pipeline) is shipped whole.
- ``delta``: every T windows all rows changed since the last shipment plus the MLP weights.
- ``priority``: every T windows only the top ``p`` % of changed rows by update magnitude
  ``||W_trainer[row] - W_served[row]||`` plus the MLP weights (QuickUpdate-style); rows
  not sent keep their gap and compete again next time.
- ``lukern``: the served model learns in place through row-sparse LoRA adapters on its
  embedding tables, trained from the same labelled traffic on the serving node; nothing
  is shipped.

Shipments arrive ``bytes / bandwidth`` after they are sent, with the bandwidth model of
:class:`Bandwidth`. CPU-seconds spent on updating are measured with
:func:`time.process_time`: for the shipping strategies the training side's steps (its own
forward and backward over every labelled batch) plus packing and applying the update; for
lukern the adapter trainer's steps (backward from the kept serving activations, adapter
optimizer, rank control).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .dlrm import DLRM, _sigmoid

__all__ = ["Bandwidth", "ClusterTrainer", "DeltaSync", "FullSync", "LukernStrategy", "PriorityDelta",
           "Stale", "Strategy", "adapter_available"]

#: bytes of one shipped row id (int64).
ID_BYTES = 8


@dataclass(frozen=True)
class Bandwidth:
    """Transfer time of a shipment, scaled to a production setting.

    The replay's tables are tiny, so shipping them over any real link would be instant.
    What matters is the *ratio* of sync time to table size in production: a table of
    ``prod_table_bytes`` behind a link of ``prod_link_bps`` bits/s takes
    ``prod_table_bytes * 8 / prod_link_bps`` seconds to ship whole. A shipment of
    ``b`` bytes of a replay model whose tables hold ``table_bytes`` takes the same
    fraction of that time: ``b / table_bytes * seconds_per_table``.

    The default is DESIGN section 7's example: a 200 TB table over 100 GbE, so 10 % of it
    (20 TB) takes 1,600 s (26.7 min) and the whole table 16,000 s (4.4 h). The link is
    assumed to carry nothing else and to run at line rate (optimistic for shipping).

    Examples
    --------
    >>> bw = Bandwidth()
    >>> round(bw.seconds(10, table_bytes=100) / 60, 1)
    26.7
    """

    prod_table_bytes: float = 200e12
    prod_link_bps: float = 100e9

    @property
    def seconds_per_table(self) -> float:
        return self.prod_table_bytes * 8.0 / self.prod_link_bps

    def seconds(self, nbytes: float, *, table_bytes: float) -> float:
        return float(nbytes) / float(table_bytes) * self.seconds_per_table

    def describe(self) -> dict:
        return {"prod_table_bytes": self.prod_table_bytes, "prod_link_bps": self.prod_link_bps,
                "seconds_per_table": self.seconds_per_table,
                "seconds_per_10pct": 0.1 * self.seconds_per_table}


def adapter_available() -> bool:
    """True when :class:`lukern.LoRAAdapter` can be imported."""
    try:
        from .. import LoRAAdapter  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class WindowStats:
    bytes_shipped: int = 0
    update_cpu_s: float = 0.0
    adapter_mem_pct: float | None = None
    syncs_sent: int = 0
    syncs_applied: int = 0
    rank: list | None = None
    rank_decisions: list = field(default_factory=list)
    evictions: int | None = None


class Strategy:
    """Base class: serves ``self.model``; subclasses learn or receive updates."""

    name = "strategy"

    def __init__(self, model: DLRM):
        self.model = model
        self.stats = WindowStats()
        self.total_bytes = 0
        self.total_cpu = 0.0

    def predict(self, batch, now: float) -> np.ndarray:
        return _sigmoid(self.model.forward(batch)[0].astype(np.float64))

    def learn(self, batch) -> None:
        pass

    def flush(self) -> None:
        """Train on labelled rows still buffered (called at every window end)."""

    def end_window(self, index: int, now: float) -> None:
        pass

    def take_stats(self) -> WindowStats:
        """Stats of the window just finished; starts a new window."""
        s = self.stats
        self.total_bytes += s.bytes_shipped
        self.total_cpu += s.update_cpu_s
        self.stats = WindowStats()
        return s

    def settings(self) -> dict:
        return {}


class Stale(Strategy):
    """The initial model, never updated."""

    name = "stale"


class ClusterTrainer:
    """The training side shared by the shipping strategies: one model trained continuously
    on the labelled stream in mini-batches of ``train_batch`` rows (full training: MLPs by
    Adam, touched rows by row-wise Adagrad).

    Each shipping strategy would run its own training pipeline in production; they would
    all compute the same thing, so the replay runs it once and charges its CPU time to
    each of them.
    """

    def __init__(self, model: DLRM, *, train_batch: int = 1024):
        self.model = model
        self.train_batch = int(train_batch)
        self.cpu_window = 0.0
        self.touched_since = {}  # strategy name -> bool mask of global rows changed since its last send
        self._buffer = []
        self._buffered = 0

    def register(self, name: str):
        self.touched_since[name] = np.zeros(self.model.emb_buffer.shape[0], dtype=bool)

    def learn(self, batch):
        self._buffer.append(batch)
        self._buffered += len(batch)
        if self._buffered >= self.train_batch:
            self.flush()

    def flush(self):
        if not self._buffer:
            return
        c0 = time.process_time()
        b = _concat(self._buffer)
        self._buffer, self._buffered = [], 0
        _, rows = self.model.train_step(b)
        for mask in self.touched_since.values():
            mask[rows] = True
        self.cpu_window += time.process_time() - c0

    def take_cpu(self) -> float:
        c, self.cpu_window = self.cpu_window, 0.0
        return c


def _concat(batches):
    from .streams import Batch

    if len(batches) == 1:
        return batches[0]
    return Batch(*(np.concatenate([getattr(b, f) for b in batches]) for f in ("t", "dense", "cat", "labels")))


@dataclass
class _Shipment:
    arrival: float
    rows: np.ndarray | None     # None: the whole model
    values: np.ndarray | None
    dense: dict
    nbytes: int


class _Shipping(Strategy):
    """Common machinery: pending shipments that arrive after their transfer time.
    Subclasses define ``_select() -> (rows or None for the whole table, row values)``."""

    def __init__(self, model: DLRM, trainer: ClusterTrainer, *, every: int, bandwidth: Bandwidth):
        super().__init__(model)
        if every < 1:
            raise ValueError(f"`every` (T, in windows) must be >= 1; got {every}.")
        self.trainer = trainer
        self.every = int(every)
        self.bandwidth = bandwidth
        self.pending: list[_Shipment] = []
        self.syncs = []
        trainer.register(self.name)

    def _apply_due(self, now: float):
        while self.pending and self.pending[0].arrival <= now:
            c0 = time.process_time()
            s = self.pending.pop(0)
            if s.rows is None:
                np.copyto(self.model.emb_buffer, s.values)
            elif s.rows.size:
                self.model.emb_buffer[s.rows] = s.values
            for k, v in s.dense.items():
                np.copyto(self.model.params[k], v)
            self.stats.update_cpu_s += time.process_time() - c0
            self.stats.syncs_applied += 1

    def predict(self, batch, now):
        self._apply_due(now)
        return super().predict(batch, now)

    def end_window(self, index, now):
        if (index + 1) % self.every:
            return
        c0 = time.process_time()
        rows, values = self._select()
        dense = {k: v.copy() for k, v in self.trainer.model.params.items()}
        dense_bytes = self.trainer.model.dense_nbytes
        if rows is None:
            nbytes = self.trainer.model.table_nbytes + dense_bytes
        else:
            nbytes = int(rows.size) * (ID_BYTES + values.shape[1] * values.itemsize) + dense_bytes
        delay = self.bandwidth.seconds(nbytes, table_bytes=self.model.table_nbytes)
        self.pending.append(_Shipment(now + delay, rows, values, dense, nbytes))
        self.stats.update_cpu_s += time.process_time() - c0
        self.stats.bytes_shipped += nbytes
        self.stats.syncs_sent += 1
        self.syncs.append({"window": index, "sent_t": now, "arrives_t": now + delay, "transfer_s": delay,
                           "bytes": nbytes, "rows": None if rows is None else int(rows.size)})

    def settings(self):
        return {"every_windows": self.every}


class FullSync(_Shipping):
    """Ship the whole trained model every T windows."""

    name = "full"

    def _select(self):
        self.trainer.touched_since[self.name][:] = False
        return None, self.trainer.model.emb_buffer.copy()


class DeltaSync(_Shipping):
    """Ship every row changed since the last shipment, plus the MLP weights."""

    name = "delta"

    def _select(self):
        mask = self.trainer.touched_since[self.name]
        rows = np.flatnonzero(mask)
        mask[:] = False
        return rows, self.trainer.model.emb_buffer[rows].copy()


class PriorityDelta(_Shipping):
    """Ship the top ``pct`` % of changed rows by update magnitude, plus the MLP weights."""

    name = "priority"

    def __init__(self, model, trainer, *, every, bandwidth, pct=20.0):
        if not 0 < pct <= 100:
            raise ValueError(f"`pct` must be in (0, 100]; got {pct}.")
        super().__init__(model, trainer, every=every, bandwidth=bandwidth)
        self.pct = float(pct)
        # rows changed on the trainer and not yet sent: they stay candidates until sent
        self.candidates = trainer.touched_since[self.name]

    def _select(self):
        cand = np.flatnonzero(self.candidates)
        if cand.size == 0:
            return cand, np.zeros((0, self.model.dim), self.model.dtype)
        gap = np.linalg.norm(self.trainer.model.emb_buffer[cand] - self.model.emb_buffer[cand], axis=1)
        # Rows already shipped in flight count from the served copy; good enough at T >= 1 window.
        k = max(1, int(np.ceil(cand.size * self.pct / 100.0)))
        top = np.argpartition(-gap, k - 1)[:k] if k < cand.size else np.arange(cand.size)
        rows = np.sort(cand[top])
        self.candidates[rows] = False
        return rows, self.trainer.model.emb_buffer[rows].copy()

    def settings(self):
        return {**super().settings(), "pct_of_changed_rows": self.pct}


class LukernStrategy(Strategy):
    """The served model learns in place: one row-sparse LoRA adapter per embedding table,
    trained on the serving node from the labelled batches, MLP weights frozen, nothing
    shipped.

    The trainer reuses the serving forward's activations (:meth:`DLRM.backward_pooled`):
    co-located, it needs no second forward pass, and with the MLPs frozen it back-propagates
    only to the tables' pooled outputs. Each table's gradient rows are then summed per
    distinct id (one id per bag, sum pooling: the adapter's gradients are unchanged and
    its backward runs over distinct rows, not bags). With the default LRU eviction a
    table's backward, eviction and optimizer step run in one validated kernel call
    (:class:`lukern.lora_batch.BatchedTrainer`, the same bits as ``LoRAAdapter.backward``
    + ``step``); other eviction policies use the adapters' own per-table path.

    Parameters
    ----------
    model : DLRM
        The initial model (copied; evicted adapter rows are folded into its tables).
    rank, alpha, lr_a, lr_b : adapter settings (see :class:`lukern.LoRAAdapter`).
    budget_pct : float
        Adapter memory budget as % of the tables; sets each adapter's capacity.
    demand : sequence of int, optional
        How much each table wants slots: the runner passes the number of ids seen at
        least twice in the last window of traffic (a row seen once gains little from a
        slot). The byte budget is water-filled over the demands, then any leftover is
        shared in proportion to them (default demand: the table's rows).
    prior_acc : bool
        Start the row-wise Adagrad accumulator of a newly admitted slot from its row's
        accumulator in the base model instead of zero. Without it a fresh slot's first
        steps have full normalised size whatever the row's history, which on rare-label
        logs (TalkingData) makes lukern worse than stale; with it lukern beats delta there.
    min_rows_for_adapter : int
        Tables with fewer rows get no adapter (their few rows are learned well already).
    rank_control : bool
        Attach :class:`lukern.RankController` when it is available.
    train_batch : int
        Rows per trainer step (the training side uses the same mini-batches).
    rank_every : int
        Trainer steps between two rounds of the rank controllers (the first step decides
        too); the runner sets it to ``rank_every_windows`` windows' worth of steps.
    rank_min_window : int, optional
        A table gets a rank controller only when a quarter of its budget share holds a
        gradient window of this many rows (default ``2 * dim``); smaller shares keep a
        fixed rank and spend their bytes on slots.
    init_b : {"none", "served"}
        ``"served"``: B starts at the top gradient directions of the first trainer step
        (see :meth:`init_directions`; the replay's default); ``"none"``: the adapters'
        random B until :meth:`init_directions` is called (replicas that must share B).
    rank_energy, min_rank : float, int
        The controller keeps the smallest rank (at least ``min_rank``) holding
        ``rank_energy`` of the correction's energy.
    """

    name = "lukern"

    def __init__(self, model: DLRM, *, rank=4, alpha=None, lr_a=0.1, lr_b=0.01, budget_pct=1.0,
                 rank_control=True, min_rows_for_adapter=64, demand=None, optimizer_a="rowwise_adagrad",
                 optimizer_b="adagrad", eviction="lru", prior_acc=True,
                 train_batch=1024, rank_every=8, rank_energy=0.999, min_rank=2, init_b="none", rank_min_window=None):
        super().__init__(model)
        from .. import LoRAAdapter

        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.lr_a, self.lr_b = float(lr_a), float(lr_b)
        self.budget_pct = float(budget_pct)
        d = model.dim
        from .. import SmallestNorm
        from ..lora_batch import StableLRU

        # StableLRU is LRU with ties broken by the lowest slot: the policy the batched
        # trainer runs inside its kernel
        policies = {"lru": StableLRU, "smallest_norm": SmallestNorm}
        if eviction not in policies:
            raise ValueError(f"`eviction` must be one of {sorted(policies)}; got {eviction!r}.")
        self.optimizer_a, self.optimizer_b, self.eviction = optimizer_a, optimizer_b, eviction
        self._kw = dict(rank=self.rank, alpha=self.alpha, dtype=model.dtype, lr_a=self.lr_a, lr_b=self.lr_b,
                        seed=model.seed, optimizer_a=optimizer_a, optimizer_b=optimizer_b,
                        eviction=policies[eviction]())
        eligible = [t for t, n in enumerate(model.cat_sizes) if n >= min_rows_for_adapter]
        if demand is None:
            demand = model.cat_sizes
        budget = self.budget_pct / 100.0 * model.table_nbytes
        # One probe adapter per table gives the byte model (worst case, pending gradients
        # at their largest: the figure the rank controller enforces too).
        probes = {t: LoRAAdapter(model.cat_sizes[t], d, capacity=1, **self._kw) for t in eligible}
        shares = _water_fill(probes, model, eligible, [int(demand[t]) for t in eligible], budget)
        self.adapters = [None] * model.n_tables
        self.capacity = [0] * model.n_tables
        self.share_bytes = [0.0] * model.n_tables
        for t, share in zip(eligible, shares):
            cap = _fit_capacity(probes[t], model.cat_sizes[t], share)
            if cap < 1:
                continue
            self.capacity[t] = cap
            self.share_bytes[t] = share
            self.adapters[t] = LoRAAdapter(model.cat_sizes[t], d, capacity=cap, **{**self._kw, "seed": model.seed + t})
        # Row-wise Adagrad history of every base row (the training pipeline's accumulators
        # ship with the model): a newly admitted slot starts from its row's history.
        self.prior_acc = model.emb_acc.copy() if prior_acc else None
        self.controllers = [None] * model.n_tables
        self.model_names = list(getattr(model, "table_names", None) or range(model.n_tables))
        self.rank_control_note = None
        self.fixed_rank_tables = []  # adapters whose share is too small for a controller
        if rank_control:
            try:
                from .. import RankController
            except ImportError:
                RankController = None
                self.rank_control_note = "lukern.RankController is not available in this build"
            if RankController is not None:
                # The controller's gradient window (a quarter of the table's share at
                # most) and row bookkeeping come out of the same budget as the slots. A
                # window of fewer than `rank_min_window` rows (default 2d, what it needs
                # before it judges growth) says little about the spectrum and costs slots:
                # at a 1% budget, controllers on such tables lost AUC on all three test
                # streams (MovieLens 0.7094 -> 0.7062, synthetic 0.7621 -> 0.7595,
                # TalkingData equal), so those tables keep their rank.
                min_window = 2 * d if rank_min_window is None else int(rank_min_window)
                row_bytes = d * np.dtype(np.float32).itemsize
                for t, a in enumerate(self.adapters):
                    if a is None:
                        continue
                    if self.share_bytes[t] / 4 < min_window * row_bytes:
                        self.fixed_rank_tables.append(self.model_names[t])
                        continue
                    # the controller keeps this table's share of the global budget
                    share = min(1.0, self.share_bytes[t] / model.table(t).nbytes)
                    # every=1: flush() calls the controllers every `rank_every` steps
                    self.controllers[t] = RankController(a, model.table(t), budget=share, every=1,
                                                         max_rank=min(d, max(16, self.rank)),
                                                         energy=rank_energy, min_rank=min(min_rank, self.rank))
        self._cache = None
        self.train_batch = int(train_batch)
        self.rank_every = int(rank_every)
        if self.rank_every < 1:
            raise ValueError(f"`rank_every` must be >= 1; got {rank_every}.")
        self._steps = 0
        self._pending, self._n_pending = [], 0
        self._offsets = np.arange(self.train_batch + 1, dtype=np.int64)
        self._grouping = None  # sum_by_id's outputs and scratch, sized on first use
        # One validated kernel call per table and mini-batch (lukern.lora_batch), unless
        # an eviction policy needs the adapter's own Python path. One trainer per table:
        # each table's distinct ids differ in number (see flush).
        self._batched = None
        if eviction == "lru" and any(a is not None for a in self.adapters):
            from ..lora_batch import BatchedTrainer

            ro = model.row_offsets
            self._batched = [None if a is None else BatchedTrainer(
                [a], [model.table(t)],
                prior_acc=None if self.prior_acc is None else [self.prior_acc[ro[t]:ro[t + 1]]])
                for t, a in enumerate(self.adapters)]
        if init_b not in ("served", "none"):
            raise ValueError(f"`init_b` must be 'served' or 'none'; got {init_b!r}.")
        # B from the gradients of the first trainer step (see flush); init_directions()
        # called before it replaces that
        self.init_on_first_step = init_b == "served"
        self.init_captured = None
        self._warmup(LoRAAdapter)

    def init_directions(self, batches) -> list:
        """Start each adapter's B at the top-r directions of recent embedding gradients.

        A LoRA update of row i is ``s * A_i @ B``: it can only move the row inside B's
        row space. A random B captures about r/d of a gradient's energy, and B only turns
        once A is non-zero, so early learning is slow. The gradients d loss / d pooled of
        the served model on recent labelled traffic have a few dominant directions; their
        top-r eigenvectors make B point where updates are needed. The corrections stay
        zero (A is zero), so served values do not change.

        With ``init_b="served"`` (the replay's default) the strategy does this itself on its first
        trainer step, from that step's gradients (which the step computes anyway); this
        method does it from ``batches`` instead (an extra forward and backward over them,
        e.g. the last window of the training side's traffic) and cancels the default.
        Returns, per table, the share of gradient energy inside B's span (None: no adapter).
        """
        d = self.model.dim
        grams = [np.zeros((d, d)) for _ in self.adapters]
        for b in batches:
            _, g = self.model.backward_pooled(self.model.forward_cache(b), b.labels, table_major=True,
                                              want_loss=False)
            self._add_grams(grams, g)
        return self._set_directions(grams)

    def _add_grams(self, grams, g):
        for t, a in enumerate(self.adapters):
            if a is not None:
                # one mini-batch's Gram in the gradients' dtype, summed over batches in float64
                grams[t] += g[t].T @ g[t]

    def _set_directions(self, grams):
        captured = []
        for t, a in enumerate(self.adapters):
            if a is None:
                captured.append(None)
                continue
            w, v = np.linalg.eigh(grams[t])
            top = v[:, ::-1][:, :a.rank].T  # (r, d), orthonormal rows like B's default scale
            total = float(w.sum())
            captured.append(float(w[::-1][:a.rank].sum() / total) if total > 0 else 0.0)
            a.refactor(np.zeros((a.n_active, a.rank), a.dtype), np.ascontiguousarray(top, dtype=a.dtype))
        self.init_captured = captured
        self.init_on_first_step = False
        return captured

    def _warmup(self, cls):
        """Compile the fused lookup and the trainer kernels now, on scratch copies, so that
        JIT time is neither served nor charged to updating (a real node warms up too)."""
        m = self.model
        scratch = [None if a is None else cls(a.n_rows, a.dim, capacity=min(4, a.capacity), **self._kw)
                   for a in self.adapters]
        tables = [np.zeros_like(m.table(t)) for t in range(m.n_tables)]
        from ..embedding import TableBatch

        tb = TableBatch(tables)
        n = 2
        idx = np.zeros(n * m.n_tables, np.int64)
        off = np.arange(n * m.n_tables + 1, dtype=np.int64)
        tb.lookup(idx, off, adapters=scratch, unchecked=True)
        for t, a in enumerate(scratch):
            if a is not None:
                # more distinct ids than slots: the eviction and folding path compiles too
                k = min(a.n_rows, 2 * a.capacity + 2)
                a.train_step(tb.tables[t], np.arange(k, dtype=np.int64), np.arange(k + 1, dtype=np.int64),
                             np.ones((k, m.dim), m.dtype))
                a.train_step(tb.tables[t], np.arange(k, dtype=np.int64)[::-1].copy(),
                             np.arange(k + 1, dtype=np.int64), np.ones((k, m.dim), m.dtype))
        # the interaction backward of DLRM.backward_pooled (also the training side's)
        from .._kernels.dlrm import interaction_backward

        k = m.n_tables + 1
        pi, pj = m._tri
        interaction_backward(np.zeros((1, pi.size), m.dtype), pi, pj, np.zeros((1, k, m.dim), m.dtype), 1,
                             np.zeros((k - 1, 1, m.dim), m.dtype), 0)
        if self._batched is not None:
            from ..lora_batch import BatchedTrainer

            # the batched kernel, its eviction and seeding paths
            k = max(min(a.n_rows, 2 * a.capacity + 2) for a in scratch if a is not None)
            priors = [None if a is None else np.ones(a.n_rows, m.dtype) for a in scratch]
            bt = BatchedTrainer(scratch, tb.tables, prior_acc=priors)
            ids = np.stack([np.arange(k, dtype=np.int64) % max(1, n) for n in m.cat_sizes])
            for rows in (ids, np.ascontiguousarray(ids[:, ::-1])):
                bt.train_step(rows, np.arange(k + 1, dtype=np.int64), np.ones((m.n_tables, k, m.dim), m.dtype))
        # the per-id gradient sums of flush(), and the accumulator look-up the rank steps use
        self._grouping, offsets = None, self._offsets
        self._sum_by_id(np.zeros((2, m.n_tables), np.int64), np.zeros((m.n_tables, 2, m.dim), m.dtype))
        self._offsets = offsets
        for a in scratch:
            if a is not None and a.n_active:
                rows, acc, _ = a.optimizer_state()
                a.set_row_accumulators(rows[:1], acc[:1])
                break
        if any(c is not None for c in self.controllers):
            # the rank controller's spectrum and window kernels
            from .. import GatheredRows, GradientWindow, LowRankRows, randomized_svd

            d = m.dim
            rng = np.random.default_rng(0)
            M = rng.standard_normal((64, d)).astype(m.dtype)
            for method in ("gram", "randomized"):
                randomized_svd(M, 2, method=method, rng=0)
                randomized_svd(GatheredRows(M, np.arange(8)), 2, method=method, rng=0)
            LowRankRows(M[:8, :2].copy(), M[:2].copy(), 1.0).svd()
            w = GradientWindow(d, capacity=4)
            w.add(M[:8])
            w.residual_energy(M[:2])
            w.top_directions(1, exclude=M[:2])

    def predict(self, batch, now):
        c = self.model.forward_cache(batch, adapters=self.adapters)
        self._cache = c
        return _sigmoid(c.logits.astype(np.float64))

    def learn(self, batch):
        """Keep the labels with the serving forward's activations; train every
        ``train_batch`` rows (the same mini-batches as the training side)."""
        c = self._cache
        if c is None or c.n != len(batch):
            raise RuntimeError("LukernStrategy.learn() must follow predict() on the same batch.")
        self._cache = None
        self._pending.append((c, batch))
        self._n_pending += len(batch)
        if self._n_pending >= self.train_batch:
            self.flush()

    def flush(self):
        if not self._pending:
            return
        c0 = time.process_time()
        caches, batches = zip(*self._pending)
        self._pending, self._n_pending = [], 0
        # d loss / d pooled from the activations the serving forwards kept: a co-located
        # trainer never runs a second forward pass.
        labels = np.concatenate([b.labels for b in batches]) if len(batches) > 1 else batches[0].labels
        cat = np.concatenate([b.cat for b in batches]) if len(batches) > 1 else batches[0].cat
        _, g = self.model.backward_pooled(self.model.concat_caches(caches, backward_only=True), labels,
                                          table_major=True, want_loss=False)
        if self.init_on_first_step:
            # B from this step's gradients: no extra pass (A is still zero, so nothing
            # served has depended on B yet)
            grams = [np.zeros((self.model.dim,) * 2) for _ in self.adapters]
            self._add_grams(grams, g)
            self._set_directions(grams)
        ids, gsum, counts = self._sum_by_id(cat, g)
        if self._batched is not None:
            for t, bt in enumerate(self._batched):
                if bt is not None:
                    u = int(counts[t])
                    bt.train_step(ids[t:t + 1, :u], self._offsets[:u + 1], gsum[t:t + 1, :u])
        else:
            for t, a in enumerate(self.adapters):
                if a is None:
                    continue
                u = int(counts[t])
                if a.backward(ids[t, :u], self._offsets[:u + 1], gsum[t, :u], table=self.model.table(t)):
                    if self.prior_acc is not None:
                        self._seed_fresh_slots(t, a)
                    a.step()
        # the controllers decide on the first step and every `rank_every` steps after
        if self._steps % self.rank_every == 0:
            self._rank_step()
        self._steps += 1
        self.stats.update_cpu_s += time.process_time() - c0
        self._note_memory()

    def _sum_by_id(self, cat, g):
        """Each table's distinct ids in this mini-batch (first-appearance order) with
        their summed gradients, written over ``g``: with one id per bag and sum pooling
        the adapter's gradients are the same as over the bags, and its backward then
        runs over distinct rows instead of bags (a 161-row table sees ~150 distinct ids
        in 1,024 rows). The training side sums repeated rows too (DLRM.gradients).
        Returns (ids (n_tables, n), g, counts): table t's rows are ``[:counts[t]]``."""
        from .._kernels.dlrm import sum_by_id

        n, n_t = cat.shape
        gr = self._grouping
        if gr is None or gr[0].shape[1] < n:
            m = 1 << max(4, int(2 * n - 1).bit_length())
            gr = self._grouping = (np.empty((n_t, n), np.int64), np.empty(n_t, np.int64), np.empty(m, np.int64),
                                   np.empty(m, np.int64))
        ids, counts, keys, pos = gr
        if self._offsets.shape[0] < n + 1:
            self._offsets = np.arange(n + 1, dtype=np.int64)
        idx = np.ascontiguousarray(cat.T, dtype=np.int64)
        sum_by_id(idx, g, ids, counts, keys, pos)
        return ids, g, counts

    def _rank_step(self):
        """Let every table's RankController decide (between trainer steps), keeping the
        rows' Adagrad history across a re-factor and refilling freed capacity."""
        for t, ctl in enumerate(self.controllers):
            if ctl is not None:
                a = self.adapters[t]
                rows, acc, _ = a.optimizer_state()
                decision = ctl.step()
                if decision:
                    self._unit_rows(a)
                    self._restore_acc(a, rows, acc)
                    grown = self._refill_capacity(t, a, ctl)
                    if grown:
                        decision = {**decision, "capacity": grown}
                    _record(self.stats, {"table": self.model_names[t], **decision})

    @staticmethod
    def _unit_rows(a):
        """Rescale the factors so that B's rows have unit norm (A B unchanged). The
        controller's balanced factors give B rows of norm sqrt(sigma / s); the A step
        size was tuned for unit rows, so the served update per step keeps its scale."""
        B = a.B.astype(np.float64)
        n = np.linalg.norm(B, axis=1)
        n[n == 0] = 1.0
        _, slots = a.active_rows()
        a.refactor((a.A[slots] * n).astype(a.dtype), (B / n[:, None]).astype(a.dtype))

    def _refill_capacity(self, t, a, ctl):
        """After a rank change, spend the table's budget share on rows: a lower rank makes
        every slot cheaper, so more recently active rows can keep their corrections."""
        cap = _fit_capacity(a, a.n_rows, ctl.limit_bytes)
        if cap <= a.capacity:
            return None
        old = a.capacity
        a.resize(cap)
        self.capacity[t] = cap
        return {"old": old, "new": cap}

    @staticmethod
    def _restore_acc(a, rows, acc):
        # A rank change re-factors A and restarts its optimizer state; the rows' Adagrad
        # history still says how settled each row is, so it is carried over by row id.
        new_rows, _ = a.active_rows()
        order = np.argsort(rows, kind="stable")
        rows_sorted = rows[order]
        pos = np.searchsorted(rows_sorted, new_rows)
        ok = (pos < rows_sorted.size) & (rows_sorted[np.minimum(pos, rows_sorted.size - 1)] == new_rows) \
            if rows_sorted.size else np.zeros(new_rows.size, bool)
        a.set_row_accumulators(new_rows[ok], acc[order][pos[ok]])

    def _seed_fresh_slots(self, t, a):
        # The rows whose accumulator is still 0 (admitted by this backward) are seeded
        # here, between backward() and step(), from the base rows' history.
        rows, acc, _ = a.optimizer_state()
        fresh = rows[acc == 0]
        if fresh.size:
            a.set_row_accumulators(fresh, self.prior_acc[self.model.row_offsets[t] + fresh])

    def _note_memory(self):
        pct = 100.0 * self.adapter_nbytes / self.model.table_nbytes
        if self.stats.adapter_mem_pct is None or pct > self.stats.adapter_mem_pct:
            self.stats.adapter_mem_pct = pct

    @property
    def adapter_nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.adapters if a is not None))

    def take_stats(self):
        self.stats.rank = [None if a is None else int(a.rank) for a in self.adapters]
        if self.stats.adapter_mem_pct is None:
            self._note_memory()
        return super().take_stats()

    def settings(self):
        return {"rank": self.rank, "alpha": self.alpha, "lr_a": self.lr_a, "lr_b": self.lr_b,
                "optimizer_a": self.optimizer_a, "optimizer_b": self.optimizer_b, "eviction": self.eviction,
                "budget_pct": self.budget_pct, "capacity": self.capacity,
                "rank_control": any(c is not None for c in self.controllers),
                "rank_control_tables": [n for n, c in zip(self.model_names, self.controllers) if c is not None],
                "fixed_rank_tables": list(self.fixed_rank_tables)}


def _record(stats: WindowStats, decision):
    if decision:
        stats.rank_decisions.append(decision if isinstance(decision, (dict, str)) else str(decision))


def _bytes(probe, capacity) -> int:
    """Worst-case bytes of an adapter like ``probe`` at ``capacity`` (its rank)."""
    from ..rank import adapter_bytes

    return adapter_bytes(probe, int(capacity), probe.rank)


def _water_fill(probes, model, tables, demand, budget) -> list:
    """Bytes per table. First the demands, water-filled (the smallest are met in full,
    the rest share equally: a busy 600-row user table must not starve behind a big item
    table); then, if every demand is met, the leftover in proportion to demand, no table
    above an adapter over all its rows."""
    need, full = [], []
    for t, dm in zip(tables, demand):
        n = model.cat_sizes[t]
        need.append(_bytes(probes[t], max(1, min(int(dm), n))))
        full.append(_bytes(probes[t], n))
    out = [0.0] * len(tables)
    left = float(budget)
    order = sorted(range(len(tables)), key=lambda i: need[i])
    for k, i in enumerate(order):
        out[i] = min(need[i], left / (len(order) - k))
        left -= out[i]
    weight = [float(max(dm, 1)) for dm in demand]
    open_ = {i for i in range(len(tables)) if out[i] < full[i]}
    while open_ and left > 1e-9:
        total = sum(weight[i] for i in open_)
        capped = [i for i in open_ if out[i] + left * weight[i] / total >= full[i]]
        if not capped:
            for i in open_:
                out[i] += left * weight[i] / total
            break
        for i in capped:
            left -= full[i] - out[i]
            out[i] = full[i]
            open_.discard(i)
    return out


def _fit_capacity(probe, n_rows, budget_bytes) -> int:
    """Largest capacity whose adapter stays within ``budget_bytes`` (0 if none does)."""
    lo, hi = 0, int(n_rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _bytes(probe, mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


