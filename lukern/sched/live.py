"""``LiveUpdater``: the co-located trainer that keeps LoRA adapters fresh from live traffic
without moving inference tail latency (DESIGN section 5, issue 6).

The serving side calls :meth:`LiveUpdater.record` with the categorical ids and labels of
served samples (a bounded ring: when full, the oldest samples are dropped and counted)
and keeps calling the fused lookup with the same adapters. One trainer thread, pinned
to the NUMA node that holds the tables and run at the QoS level probed at start
(SCHED_IDLE here), takes mini-batches from the ring and for each:

1. pools the batch's embeddings *with* the adapters (TableBatch lookup), in chunks of
   about 1 ms of work, unless the serving forward's pooled rows were recorded (then
   read from the ring, or in place from an :meth:`~LiveUpdater.out_buffer`);
2. calls the model's ``loss_grad(pooled, labels[, extra]) -> (loss, d loss/d pooled)``;
3. steps each table's adapter (one table per chunk): backward, eviction and optimizer
   step in one :class:`lukern.lora_batch.BatchedTrainer` kernel call where that gives
   the adapter's own results, else the adapter's ``backward`` and then ``step()``.

Placement: when the serving threads are pinned (they report requests through
:meth:`LiveUpdater.serving`), a SCHED_IDLE trainer moves onto their CPUs
(``follow_serving``): the kernel preempts it the moment a request wakes a serving thread,
and no serving thread is pushed off its warm core. On the 2-core reference VM that kept
inference P50 and P99 within the A/A noise; a trainer on the other core slowed every
request by ~7%.

Between chunks the fast guard pauses while inference has requests in flight; every
``period`` the slow controller moves chunk size, step rate and threads against the
user's P99 target. The heavy work is in nogil Numba kernels; the Python glue per step is
a few calls per table, so a trainer that holds the GIL does so in short stretches
(``switch_interval`` shortens the longest wait inference can see, process-wide).

A loss callback that raises, or returns a non-finite or misshaped gradient, is logged,
counted and leaves every adapter untouched (the gradient is checked before any table
steps). On the per-adapter path a step is committed only after every backward
succeeded; on the batched path each table commits with its own call (the ids were
checked at record(), so nothing is expected to fail in between).

Examples
--------
>>> import numpy as np, lukern
>>> tb = lukern.TableBatch([np.zeros((50, 4), np.float32), np.zeros((30, 4), np.float32)])
>>> w = np.ones(8, np.float32)
>>> def loss_grad(pooled, labels):
...     err = pooled @ w - labels
...     return float((err ** 2).mean()), (2 * err[:, None] * w[None, :] / len(err)).astype(np.float32)
>>> with lukern.LiveUpdater(tb, loss_grad, batch_size=4, pin=False) as up:
...     up.record(np.array([[1, 2], [3, 4], [5, 6], [7, 8]]), np.ones(4))
...     up.flush(timeout=30)
True
>>> up.stats()["samples"]
4
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import traceback
import threading
import time

import numpy as np

from .._kernels.lora import all_finite
from .._kernels.sched import fence, first_bad_sample, gather_pooled, spin_while_busy, stream_copy
from ..embedding import TableBatch
from ..lora import LoRAAdapter
from ..lora_batch import BatchedTrainer, StableLRU, check_prior_acc
from . import qos as _qos
from .guard import FastGuard, SlowController
from .load import ServingLoad
from .placement import first_touch, node_of_array, pin_thread, trainer_cpus, trainer_node

__all__ = ["LiveUpdater"]

log = logging.getLogger("lukern.sched")


def _set_timer_slack(ns):
    """prctl(PR_SET_TIMERSLACK): how late the kernel may wake this thread's sleeps
    (default 50 us, as long as the 0.1 ms steps the sidecar sleeps in). Linux only; a
    no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(29, ctypes.c_ulong(int(ns)), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _shared_array(shape, dtype):
    """A zeroed array in anonymous shared memory (MAP_SHARED): a forked child sees the
    same pages."""
    import mmap
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype, count=int(np.prod(shape))).reshape(shape)


# adapter counters the sidecar reports back with every publication
_ADAPTER_COUNTERS = ("step_count", "rejected_steps", "dropped_admissions", "evicted_rows")


#: copies below this many bytes are plain: streaming pays off on the many lines of a
#: request's pooled rows (~430 KB), not on its labels
_STREAM_MIN_BYTES = 4096


def _copy_rows(dst, src):
    """``dst[...] = src`` (record()'s copy into the ring). A large copy of the ring's dtype
    from contiguous rows is written with non-temporal stores: the ring's lines are not
    read first and evict nothing from the caches, so the copy is faster (the pooled rows
    of a 256-sample request, 26 x 16 floats, in the serving benchmark's process on the
    2-core EPYC VM: 24-26 against 32-33 us) and leaves the tables the next requests
    read where they were."""
    if (src.dtype == dst.dtype and src.shape == dst.shape and src.nbytes >= _STREAM_MIN_BYTES
            and src.flags.c_contiguous and dst.flags.c_contiguous):
        stream_copy(dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8))
    else:
        dst[...] = src


def _train_state(a):
    """Everything a trainer needs to carry on with adapter ``a``: the factors plus what
    :class:`~lukern.Factors` leave out (Adagrad accumulators, each row's last step, the
    step count)."""
    st = a._state
    rows, slots = a.active_rows()
    return {"rows": rows, "A": st.A[slots], "B": st.B, "acc_a": st.acc_a[slots], "acc_b": st.acc_b,
            "last_step": st.last_step[slots], "scale": float(st.scale), "version": a.version,
            **{k: getattr(a, k) for k in _ADAPTER_COUNTERS}}


def _adopt_train_state(a, s):
    """Make adapter ``a`` the trainer state ``s`` (from :func:`_train_state`), swapped in
    one reference like ``apply_factors``."""
    a._adopt(np.asarray(s["rows"], np.int64), s["A"], s["B"], np.array(s["acc_b"], a.dtype),
             capacity=max(a.capacity, s["rows"].size), acc_a=s["acc_a"], last_step=s["last_step"], scale=s["scale"])
    a.version = s["version"]
    for k in _ADAPTER_COUNTERS:
        setattr(a, k, s[k])


class LiveUpdater:
    """Owns the trainer thread for the tables of one NUMA node and their LoRA adapters.

    Parameters
    ----------
    tables : TableBatch or sequence of 2-D arrays
        The served tables (float32/float64). With a sequence they are packed into one
        :class:`~lukern.TableBatch` (a copy): serve from ``updater.tables`` then.
    loss_grad : callable
        ``loss_grad(pooled, labels) -> (loss, grad)`` with ``pooled`` (n, sum(d_t)) the
        adapted pooled embeddings of the batch and ``grad`` their loss gradient, same
        shape. When samples were recorded with ``extra`` (e.g. dense features) it is
        called as ``loss_grad(pooled, labels, extra)``. ``pooled`` and ``extra`` may be
        read-only views of the ring, valid during the call: copy them to keep or
        modify them.
    adapters : sequence of LoRAAdapter or None, optional
        One per table (None: that table is not trained). Default: one adapter per table,
        built with ``adapter_kwargs`` on a thread pinned to the trainer's node so their
        arrays are first touched there.
    batch_size : int
        Samples per mini-batch step. Larger steps train more samples per CPU second: a
        step costs mostly per distinct row, and skewed ids repeat rows. In the serving
        benchmark (26 tables, Zipf ids, 50 % load), steps of 2048 against 1024 samples
        raised the trained share from 0.47-0.53 to 0.55-0.69.
    buffer_size : int
        Capacity of the ring of recorded samples.
    max_backlog : int, "auto" or None
        While the trainer runs, :meth:`record` sheds a record (copies nothing; its
        samples count as recorded and as dropped, and in ``stats()["shed"]``) that would
        take the unread samples past this many. The copy is the serving thread's main
        cost of feeding the trainer (~40 us per 256-sample request of 26 x 16 pooled
        floats on the reference VM, 7-10 % of the request), and a trainer that far behind
        would only drop those samples later. "auto" (default): ``buffer_size``, so a full
        ring sheds new records instead of overwriting its oldest unread samples: the
        trainer reads samples of the same age either way and keeps the whole ring as its
        backlog, and the serving thread copies only about what the trainer trains. In
        six same-run pairs on the reference VM (``python -m lukern.bench serving --arms
        off,offb,on,onkeep``), with shedding inference P50 was 1-8 % lower in five (3 %
        higher in the sixth) and the trained share 0.01-0.05 lower in five (0.06 higher
        in the other). A smaller cap also cuts the trainer's backlog, so it cannot catch
        up after a burst. None: never shed, the ring overwrites its
        oldest unread samples. An integer must lie in [``batch_size``, ``buffer_size``].
    target_p99 : float, optional
        The inference P99 budget in seconds the slow controller steers against.
    load : ServingLoad, optional
        The load signal (default: a new one, see :meth:`serving`).
    qos : {"auto", "sched_idle", "nice", "cgroup", "cooperative", "none"}
        CPU priority of the trainer thread; "auto" takes the ladder's best level (plus
        resctrl when usable); "none" runs at normal priority.
    pause : bool
        False disables the fast guard (a misbehaving trainer, for benchmarks).
    pin : bool
        Pin the trainer to the CPUs of the node holding most tables.
    topology : lukern.topology.Topology, optional
    cpus : sequence of int, optional
        Pin the trainer to exactly these CPUs (overrides ``pin``'s node choice). On the
        serving thread's own CPU the kernel preempts a SCHED_IDLE trainer the instant a
        request wakes that thread (inside any kernel); on another CPU it runs alongside
        and yields at its chunk boundaries. ``python -m lukern.bench serving
        --serve-cpu 0 --arms off,onsame,onother`` compares the two.
    follow_serving : bool
        Without ``cpus``: when the threads that report requests (``serving()``) are
        pinned to fewer CPUs than the trainer may use, and the trainer runs at
        SCHED_IDLE (or in an idle cgroup), pin it to the serving threads' CPUs (default
        True). The kernel then preempts it the instant a request wakes a serving
        thread, and a serving thread is never moved off its warm cache because the
        trainer holds its CPU. Measured on the 2-core reference VM (serving pinned to
        CPU 0, ``python -m lukern.bench serving --serve-cpu 0 --arms
        off,offb,onsame,onother``): the trainer on the serving CPU moved P50 / P99 by
        1.007x / 1.017x (A/A 0.993x / 0.982x), on the other CPU by 1.145x / 1.250x
        (service time +7.6%: the two vCPUs share more than a cache).
    n_threads, max_threads : int
        Kernel threads the trainer's lookups use (the controller moves it up to
        ``max_threads``).
    chunk_ms : float
        Target work per chunk in milliseconds (rows per chunk follow from the measured
        cost per row; the slow controller moves the target between 0.25 and 4 ms).
    max_rate : float, optional
        Steps per second cap (the controller sets one when latency slack runs out).
    switch_interval : float, optional
        ``sys.setswitchinterval`` while running (process-wide; restored by stop()). In
        process mode it bounds how long a serving thread waits for the GIL while the
        receiver thread adopts published factors.
    period : float
        Slow controller period in seconds.
    batch_wait : float
        Sidecar only: seconds it waits for a full ``batch_size`` before it trains on
        fewer samples (default 0.05).
    pause_wait : {"sleep", "spin"}
        Sidecar only: how the paused trainer waits for the in-flight counter to drop:
        0.1 ms sleeps (default; its CPU goes idle, so the kernel can move waiting tasks
        onto it) or spinning on the shared counter (resumes within a microsecond, but
        keeps the CPU busy).
    breathe_every : float
        Sidecar only: after this many seconds of unbroken work the trainer sleeps 50 us
        at its next chunk boundary (0: never), for the same reason.
    pause_in_flight : int
        The fast guard pauses while at least this many requests are in flight (default
        1). Measured on the reference machine with the sidecar: pausing only when every
        CPU could be busy (2) left inference P99 x1.5-4 (the trainer on the other core
        still takes cache and memory bandwidth); pausing on any request, P99 within noise.
    batched : bool
        Step each table with :class:`lukern.lora_batch.BatchedTrainer` (one kernel call
        per table for backward, eviction and optimizer step) where its results equal
        ``backward`` + ``step`` (see :meth:`_batched_trainers`); False: always the
        adapters' own ``backward`` + ``step`` (for comparison).
    out_buffers, out_rows : int
        Process mode with ``record_pooled``: ``out_buffers`` shared-memory buffers of
        ``out_rows`` samples each, handed out by :meth:`out_buffer` for the serving
        forward to write its pooled embeddings into; ``record(..., pooled=that buffer)``
        then queues a reference instead of copying them (the copy cost ~15-25 us of the
        serving thread per 256-sample request of 26 x 16 floats). A buffer is reused
        ``out_buffers`` requests later: samples the trainer has not read by then are
        dropped (counted), so size it like the ring (``out_buffers * out_rows`` samples).
        Measured on a 2-core EPYC VM: no cheaper for the serving thread than the copy.
        The forward's writes into a buffer last used several requests ago miss the
        cache: serving alone, a request took 242 us with one out buffer and 254 / 276 /
        301 / 317 us with 2 / 3 / 4 / 8 in rotation, while the copy it saves is ~25 us.
        Kept opt-in.
    prior_acc : sequence of 1-D arrays or None, optional
        Per table (None for none), a starting row-wise Adagrad accumulator for every row
        (length n_rows, the adapter's dtype), e.g. the model's own embedding optimizer
        state: a row admitted into an adapter starts from its row's value instead of 0,
        so its first steps are as large as the model's history says (as
        :class:`lukern.lora_batch.BatchedTrainer`'s ``prior_acc``).
    mode : {"process", "thread"}, optional
        Default "process" where ``os.fork`` exists (else "thread"): on the reference
        machine a trainer *thread* could not keep inference latency in its bar (the GIL
        it shares with inference; see ``python -m lukern.bench serving``).
        "thread": the trainer is a thread of this process. "process": the sidecar mode,
        the trainer runs in a forked child (its own GIL: its Python glue never delays
        inference) that reads the ring from shared memory and every ``publish_every``
        seconds sends its adapters' factors back; a receiver thread here adopts them
        (``apply_factors``), so the served adapters move in steps of ``publish_every``.
        In this mode the ring's layout is fixed up front by ``pooling``, ``extra_width``
        and ``record_pooled``, and rows that find no free adapter slot are dropped
        (counted in the adapter's ``dropped_admissions``) rather than folded, because
        the child cannot write the served tables: size ``capacity`` to the working set.
        ``loss_grad`` runs in the child on the state the process had at start() (a
        model whose other weights change while serving must be restarted to be seen).
    """

    def __init__(self, tables, loss_grad, *, adapters=None, adapter_kwargs=None, batch_size: int = 256,
                 buffer_size: int = 65536, max_backlog="auto", target_p99: float | None = None,
                 load: ServingLoad | None = None, qos: str = "auto", pause: bool = True, pin: bool = True,
                 topology=None, n_threads: int = 1, max_threads: int = 1, chunk_ms: float = 1.0,
                 max_rate: float | None = None, switch_interval: float | None = None, period: float = 0.25,
                 mode: str | None = None, publish_every: float = 0.2, pooling: int = 1, extra_width: int = 0,
                 record_pooled: bool = False, pause_in_flight: int = 1, cpus=None, follow_serving: bool = True,
                 batch_wait: float = 0.05,
                 pause_wait: str = "sleep", breathe_every: float = 1e-3, batched: bool = True,
                 out_buffers: int = 0, out_rows: int = 0, prior_acc=None,
                 clock=time.perf_counter):
        if isinstance(tables, TableBatch):
            self.tables = tables
        else:
            self.tables = TableBatch(list(tables))
        if not callable(loss_grad):
            raise TypeError(f"`loss_grad` must be callable (pooled, labels) -> (loss, grad); got {type(loss_grad).__name__}.")
        for name, v in (("batch_size", batch_size), ("buffer_size", buffer_size), ("n_threads", n_threads),
                        ("max_threads", max_threads)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")
        choices = ("auto", "none") + _qos.LEVELS
        if qos not in choices:
            raise ValueError(f"`qos` must be one of {', '.join(choices)}; got {qos!r}.")
        self.loss_grad = loss_grad
        self.n_tables = self.tables.n_tables
        self.n_rows = np.asarray(self.tables.n_rows, np.int64)
        self.col_offsets = [int(c) for c in self.tables.col_offsets]
        self.dtype = self.tables.dtype
        self.batch_size, self.buffer_size = int(batch_size), int(buffer_size)
        if isinstance(max_backlog, str) and max_backlog == "auto":
            max_backlog = self.buffer_size
        elif max_backlog is not None and (isinstance(max_backlog, (bool, str)) or not isinstance(max_backlog, (
                int, np.integer)) or not self.batch_size <= max_backlog <= self.buffer_size):
            raise ValueError(f"`max_backlog` must be 'auto', None or an integer in [batch_size, buffer_size] = "
                             f"[{self.batch_size}, {self.buffer_size}] (the trainer waits for a full batch; the ring "
                             f"holds no more); got {max_backlog!r}.")
        self.max_backlog = None if max_backlog is None else int(max_backlog)
        self.load = load if load is not None else ServingLoad()
        if mode is None:
            mode = "process" if hasattr(os, "fork") else "thread"
        if mode not in ("thread", "process"):
            raise ValueError(f"`mode` must be 'thread' or 'process'; got {mode!r}.")
        if mode == "process" and not hasattr(os, "fork"):
            raise ValueError("mode='process' needs os.fork (Linux / macOS); use mode='thread'.")
        self.mode, self.publish_every = mode, float(publish_every)
        self.qos_request, self.pausing, self.pin = qos, bool(pause), bool(pin)
        self.switch_interval = switch_interval
        self.chunk_ms = float(chunk_ms)
        self.batch_wait = float(batch_wait)
        if pause_wait not in ("sleep", "spin"):
            raise ValueError(f"`pause_wait` must be 'sleep' or 'spin'; got {pause_wait!r}.")
        if not breathe_every >= 0:
            raise ValueError(f"`breathe_every` must be >= 0 seconds (0: never); got {breathe_every!r}.")
        self.pause_wait, self.breathe_every = pause_wait, float(breathe_every)
        self.clock = clock
        self._row_cost = None  # seconds per row of the forward (EMA), for rows per chunk

        # placement: the node holding most tables, and its CPUs
        self._follow = bool(follow_serving) and cpus is None
        self._follow_gen = -1
        self._start_cpus = None  # the trainer thread's CPUs before any pinning
        self.cpus_in_use = None
        self.cpus = None
        self.node = None
        if cpus is not None:
            self.cpus = tuple(int(c) for c in cpus)
            if not self.cpus or not set(self.cpus) <= set(os.sched_getaffinity(0)):
                raise ValueError(f"`cpus` must be a non-empty subset of the CPUs this process may use "
                                 f"{sorted(os.sched_getaffinity(0))}; got {list(cpus)!r}.")
        elif pin:
            if topology is None:
                from ..topology import read_topology
                topology = read_topology()
            self.node = trainer_node(topology, [node_of_array(t) for t in self.tables.tables])
            self.cpus = trainer_cpus(topology, self.node)

        if adapters is None:
            kw = dict(adapter_kwargs or {})

            def build():
                return [LoRAAdapter(int(self.n_rows[t]), int(self.tables.dims[t]), dtype=self.dtype, **kw)
                        for t in range(self.n_tables)]

            adapters = first_touch(build, self.cpus) if self.cpus else build()
        adapters = list(adapters)
        if len(adapters) != self.n_tables:
            raise ValueError(f"`adapters` must hold one adapter or None per table ({self.n_tables}); got {len(adapters)}.")
        for t, a in enumerate(adapters):
            if a is not None and (a.n_rows, a.dim, a.dtype) != (int(self.n_rows[t]), int(self.tables.dims[t]), self.dtype):
                raise ValueError(f"`adapters[{t}]` is for a ({a.n_rows} x {a.dim}, {a.dtype}) table; table {t} is "
                                 f"({int(self.n_rows[t])} x {int(self.tables.dims[t])}, {self.dtype}).")
        self.adapters = adapters
        self._trained = [t for t, a in enumerate(adapters) if a is not None]
        self.prior_acc = None
        if prior_acc is not None:
            prior_acc = list(prior_acc)
            if len(prior_acc) != self.n_tables:
                raise ValueError(f"`prior_acc` must hold one array (or None) per table ({self.n_tables}); got "
                                 f"{len(prior_acc)}.")
            for t, p in enumerate(prior_acc):
                check_prior_acc(p, adapters[t], f"prior_acc[{t}]")
            self.prior_acc = prior_acc

        if int(pause_in_flight) < 1:
            raise ValueError(f"`pause_in_flight` must be >= 1; got {pause_in_flight!r}.")
        self.pause_in_flight = int(pause_in_flight)
        self.guard = FastGuard(self._busy, enabled=self.pausing, clock=clock)
        self.controller = SlowController(target_p99, period=period, n_threads=n_threads, max_threads=max_threads,
                                         chunk_s=self.chunk_ms * 1e-3, max_rate=max_rate, clock=clock)

        # the ring of recorded samples (allocated on the first record: its shape follows the data)
        self._lock = threading.Lock()  # between producers (serving threads) only
        if mode == "process":
            self._ctr = _shared_array(16, np.int64)
            self._p99 = _shared_array(1, np.float64)
            self._flight = self.load.share()
        else:
            self._ctr = np.zeros(16, np.int64)
        self._ring = None  # dict of per-sample columns: ids (n, T, L), labels, [extra], [pooled]
        if mode == "process":
            self._ring = {"ids": _shared_array((self.buffer_size, self.n_tables, int(pooling)), np.int64),
                          "labels": _shared_array(self.buffer_size, np.float64)}
            if extra_width:
                self._ring["extra"] = _shared_array((self.buffer_size, int(extra_width)), np.float64)
            if record_pooled:
                self._ring["pooled"] = _shared_array((self.buffer_size, self.col_offsets[-1]), self.dtype)
        for name, v in (("out_buffers", out_buffers), ("out_rows", out_rows)):
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"`{name}` must be an integer >= 0; got {v!r}.")
        self._stage = None
        if out_buffers:
            if mode != "process" or not record_pooled or out_rows < 1:
                raise ValueError("`out_buffers` needs mode='process', record_pooled=True and `out_rows` >= 1 (the "
                                 f"samples per buffer); got mode={mode!r}, record_pooled={record_pooled!r}, "
                                 f"out_rows={out_rows!r}.")
            # per buffer: the pooled rows, and a generation bumped whenever it is handed out
            self._stage = _shared_array((int(out_buffers), int(out_rows), self.col_offsets[-1]), self.dtype)
            self._stage_gen = _shared_array(int(out_buffers), np.int64)
            self._stage_next = 0
            self._stage_tls = threading.local()
            base = self._stage.__array_interface__["data"][0]
            self._stage_span = (base, base + self._stage.nbytes, self._stage[0].nbytes, self._stage[0, 0].nbytes)
            # per ring slot: (buffer, generation, row) of a staged sample, buffer -1: pooled in the ring
            self._ring["_stage"] = _shared_array((self.buffer_size, 3), np.int64)
        # record()'s kernels compiled (or loaded from numba's cache) now, not on the first request
        first_bad_sample(np.zeros((0, self.n_tables, 1), np.int64), self.n_rows, np.zeros(0))
        stream_copy(np.zeros(0, np.uint8), np.zeros(0, np.uint8))
        fence()
        self._in_child = False
        # per-table BatchedTrainers, built by the trainer on its first step (False: not used)
        self._batched = None if batched else False
        self._held_evt = threading.Event()
        self._pid = None
        self._receiver = None

        self._thread = None
        self._stop = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._old_switch = None
        self.steps = self.samples = self.loss_errors = self.rejected = 0
        self.consumed = 0  # samples taken from the ring by finished steps (trained or not)
        self.last_loss = None
        self.last_error = None
        self.qos_level = None
        self.qos_applied = None
        self.ladder = None
        self.starts = 0

    # ring counters live in _ctr (shared with the sidecar child in process mode)
    # _ctr: 0 read position (consumer), 1 dropped by the consumer (overwritten before read),
    # 2 recorded, 3 dropped by the producer (a record larger than the ring), 4 stop flag
    # (process mode), 5 written position, 6 held by pause(), 7 claimed position (producer),
    # 8 the trainer reached the hold point, 9 shed by the producer (the trainer was behind),
    # 10 taken position (consumer): the end of the samples a step reads in place (_pop)
    @property
    def _count(self) -> int:
        """Samples written and not read yet that are still in the ring."""
        return min(self.buffer_size, int(self._ctr[5]) - int(self._ctr[0]))

    @property
    def _dropped(self) -> int:
        overwritten_unread = max(0, int(self._ctr[5]) - self.buffer_size - int(self._ctr[0]))
        return int(self._ctr[1]) + int(self._ctr[3]) + int(self._ctr[9]) + overwritten_unread

    # ------------------------------------------------------------------ serving side

    def serving(self):
        """``with updater.serving():`` around one inference request (load signal)."""
        return self.load.request()

    def out_buffer(self, n: int):
        """A writable (n, sum(d_t)) buffer for the serving forward's pooled output
        (``lookup(..., out=buf)``), or None (no ``out_buffers``, or ``n > out_rows``).
        Record that request with ``record(ids, labels, pooled=buf)`` from the same
        thread, before asking for the next buffer there: the trainer reads the rows in
        place, the serving thread copies nothing. The buffer is the caller's until it
        records; it is handed out again ``out_buffers`` calls later."""
        if self._stage is None or n > self._stage.shape[1]:
            return None
        with self._lock:
            k = self._stage_next % self._stage.shape[0]
            self._stage_next += 1
            g = int(self._stage_gen[k]) + 1
            self._stage_gen[k] = g  # claimed: a reader of its old rows now sees them invalid
            fence()  # ... before the forward writes them
        self._stage_tls.issued = (k, g)
        return self._stage[k, :n]

    def _staged(self, pooled, n):
        """(buffer, generation, first row) when ``pooled`` lies in a staging buffer, else
        None; raises when it is one this thread was not handed (or was handed again)."""
        lo, hi, buf_bytes, row_bytes = self._stage_span
        addr = pooled.__array_interface__["data"][0]
        if not lo <= addr < hi:
            return None
        k, rest = divmod(addr - lo, buf_bytes)
        row = rest // row_bytes
        issued = getattr(self._stage_tls, "issued", None)
        if (not pooled.flags.c_contiguous or rest % row_bytes or issued is None or issued[0] != k
                or int(self._stage_gen[k]) != issued[1] or row + n > self._stage.shape[1]):
            raise ValueError("`pooled` lies in an out_buffer() buffer that is not the one this thread was handed "
                             "last (or was handed out again since): record each buffer once, from the thread that "
                             "asked for it, before asking for the next.")
        return k, issued[1], row

    def record(self, batch, labels, *, extra=None, pooled=None, queued: int = 0) -> None:
        """Queue labelled samples for training.

        Parameters
        ----------
        batch : int array (n, n_tables) or (n, n_tables, pooling), or an object with
            ``.cat`` (and ``.dense``, used as ``extra``) such as a replay batch.
        labels : array (n,), finite.
        extra : float array (n, k), optional
            Per-sample side input handed to ``loss_grad`` (e.g. dense features).
        pooled : array (n, sum(d_t)), optional
            The adapted pooled embeddings the serving forward already computed. The
            trainer then skips its own forward (learning costs a backward, not a second
            forward); the gradient is taken at the slightly older adapter state.
        queued : int
            Requests waiting in the serving stack's queue behind this one. While some
            wait, the trainer runs and already has its next few batches in the ring
            (4 batches, at most half of ``max_backlog``), the record is shed (with
            ``max_backlog`` set): copying it (~40 us per 256 samples of 26 x 16 pooled
            floats) would delay them, and the trainer does not need it yet.

        While the trainer runs and is ``max_backlog`` samples behind, the record is
        validated, counted and shed (nothing copied). Either every record carries
        ``extra`` (``pooled``) or none does. Raises
        ``TypeError`` / ``ValueError`` / ``IndexError`` (nothing queued) for bad dtypes,
        shapes, non-finite labels or ids out of range. Safe to call from several threads.
        """
        if not isinstance(queued, (int, np.integer)):
            raise TypeError(f"`queued` must be an int, the number of requests waiting behind this one (0 when "
                            f"the serving stack does not know); got {type(queued).__name__} {queued!r}.")
        if queued < 0:
            raise ValueError(f"`queued` must be the number of requests waiting behind this one, >= 0; got {queued}. "
                             "Pass 0 when the serving stack does not know.")
        if self._record_fast(batch, labels, extra, pooled, queued):
            return
        if hasattr(batch, "cat"):
            if extra is None and getattr(batch, "dense", None) is not None and batch.dense.ndim == 2 \
                    and batch.dense.shape[1] > 0:
                extra = batch.dense
            batch = batch.cat
        ids = np.asarray(batch)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"`batch` ids must be integers; got dtype {ids.dtype}.")
        if ids.ndim not in (2, 3) or ids.shape[1] != self.n_tables:
            raise ValueError(f"`batch` must have shape (n, {self.n_tables}) or (n, {self.n_tables}, pooling); "
                             f"got {ids.shape}.")
        n = ids.shape[0]
        y = np.asarray(labels, dtype=np.float64)
        if y.shape != (n,):
            raise ValueError(f"`labels` must have shape ({n},) to match `batch`; got {y.shape}.")
        ids3 = ids.reshape(n, self.n_tables, -1) if n else ids.reshape(0, self.n_tables, 1)
        kind, i, t = first_bad_sample(ids3, self.n_rows, np.ascontiguousarray(y))
        if kind == 2:
            raise ValueError(f"`labels` must be finite; labels[{i}] = {y[i]}. Drop unlabelled samples before "
                             "recording them.")
        if kind == 1:
            col = ids3[:, t, :]
            raise IndexError(f"`batch[:, {t}]` ids must be in [0, {int(self.n_rows[t])}); got "
                             f"{int(col.min())}..{int(col.max())} (first bad sample {i}).")
        if extra is not None:
            extra = np.asarray(extra)
            if extra.ndim != 2 or extra.shape[0] != n:
                raise ValueError(f"`extra` must have shape ({n}, k); got {extra.shape}.")
        if pooled is not None:
            pooled = np.asarray(pooled)
            if pooled.shape != (n, self.col_offsets[-1]):
                raise ValueError(f"`pooled` must have shape ({n}, {self.col_offsets[-1]}); got {pooled.shape}.")
        staged = self._staged(pooled, n) if self._stage is not None and pooled is not None and n else None
        if n == 0:
            return
        pool = ids3.shape[2]
        cols = {"ids": ids3, "labels": y}
        if extra is not None:
            cols["extra"] = extra
        if staged is not None:  # a reference to the rows, not the rows
            ref = np.empty((n, 3), np.int64)
            ref[:, 0], ref[:, 1], ref[:, 2] = staged[0], staged[1], np.arange(staged[2], staged[2] + n)
            cols["_stage"] = ref
            self._stage_tls.issued = None  # recorded: a second record of it is a caller bug
        elif pooled is not None:
            cols["pooled"] = pooled
            if self._stage is not None:
                cols["_stage"] = np.full((n, 3), -1, np.int64)
        with self._lock:
            if self._ring is None:  # thread mode: the first record fixes the layout
                cap = self.buffer_size
                self._ring = {"ids": np.zeros((cap, self.n_tables, pool), np.int64),
                              "labels": np.zeros(cap, np.float64)}
                if extra is not None:
                    self._ring["extra"] = np.zeros((cap, extra.shape[1]),
                                                   extra.dtype if extra.dtype.kind == "f" else np.float64)
                if pooled is not None:
                    self._ring["pooled"] = np.zeros((cap, self.col_offsets[-1]), self.dtype)
            ring = self._ring
            want_cols = set(ring) - ({"pooled"} if "_stage" in cols and "pooled" not in cols else set())
            if set(cols) != want_cols or any(v.shape[1:] != ring[k].shape[1:] for k, v in cols.items()):
                want = {k: v.shape[1:] for k, v in ring.items()}
                got = {k: v.shape[1:] for k, v in cols.items()}
                raise ValueError(f"every record must carry the same fields as the first (per-sample shapes {want}); "
                                 f"got {got}.")
            cap = self.buffer_size
            n_in = n
            if n > cap:  # only the newest cap samples can be kept
                self._ctr[3] += n - cap
                cols = {k: v[n - cap:] for k, v in cols.items()}
                n = cap
            self._write_ring([(ring[name], v) for name, v in cols.items()], n, n_in, queued)

    def _write_ring(self, pairs, n, n_in, queued=0):
        """Copy ``n`` samples into the ring (``pairs``: (ring column, source rows)), or
        shed them (``max_backlog``), and count ``n_in`` recorded; the caller holds the
        producers' lock.

        The single-producer side of a lock-free ring: claim, write, publish. The trainer
        (consumer) never takes this lock, so a preempted low-priority trainer can never
        block inference here (no priority inversion)."""
        cap = self.buffer_size
        w = int(self._ctr[5])
        unread = w - int(self._ctr[0])
        if self.max_backlog is not None and unread and self.running and (
                unread + n > self.max_backlog
                or queued and w - max(int(self._ctr[0]), int(self._ctr[10])) >= self._queue_reserve()):
            # the trainer is behind (max_backlog; an empty ring takes any record, so a record
            # longer than the cap still gets in), or requests wait while the trainer has its
            # next batches already: shed this record rather than copy it
            self._ctr[9] += n
            self._ctr[2] += n_in
            return
        self._ctr[7] = w + n  # claimed: slots being overwritten are visible to the reader
        fence()  # ... before any slot changes (Arm reorders stores; x86 does not)
        start = w % cap
        k = min(n, cap - start)
        for dst, src in pairs:
            _copy_rows(dst[start:start + k], src[:k])
            if k < n:
                _copy_rows(dst[:n - k], src[k:])
        fence()  # the slots are written before the count that publishes them
        self._ctr[5] = w + n  # published
        self._ctr[2] += n_in

    def _queue_reserve(self) -> int:
        """Samples not yet taken by the trainer above which a record made while requests
        wait is shed (``record(queued=...)``): four batches, at most half of
        ``max_backlog``, so the trainer never waits for records it would have had (with
        one batch the trained share fell 0.50 -> 0.45 in a same-run pair)."""
        return max(self.batch_size, min(4 * self.batch_size, self.max_backlog // 2))

    def _record_fast(self, batch, labels, extra, pooled, queued=0) -> bool:
        """record() without the general path's Python when the batch has exactly the
        ring's layout: int64 ids, float64 labels, pooled rows of the ring's dtype, all
        C-contiguous, no ``extra``, no staging buffers, at most a ring of samples: one
        check kernel, then :meth:`_write_ring` as the general path. Returns False
        (nothing done) for anything else, and for a bad batch, so that the general path
        raises its error. Saves the serving thread ~10 us per request."""
        ring = self._ring
        if (ring is None or extra is not None or self._stage is not None or type(batch) is not np.ndarray
                or type(labels) is not np.ndarray or batch.dtype != np.int64 or labels.dtype != np.float64
                or not batch.flags.c_contiguous or not labels.flags.c_contiguous
                or len(ring) != (2 if pooled is None else 3)):
            return False
        n = batch.shape[0]
        rid = ring["ids"]
        if batch.ndim == 2:
            batch = batch.reshape(n, batch.shape[1], 1)
        if batch.shape[1:] != rid.shape[1:] or labels.shape != (n,) or n == 0 or n > self.buffer_size:
            return False
        cols = [(rid, batch), (ring["labels"], labels)]
        if pooled is not None:
            rp = ring.get("pooled")
            if (rp is None or type(pooled) is not np.ndarray or pooled.dtype != rp.dtype
                    or pooled.shape != (n, rp.shape[1])):
                return False
            cols.append((rp, pooled))
        if first_bad_sample(batch, self.n_rows, labels)[0]:
            return False
        with self._lock:
            self._write_ring(cols, n, n, queued)
        return True

    def _pop(self, n):
        """Take up to n oldest unread samples as a dict of columns, or None.

        The consumer side of the ring: it reads the producer's counters, copies, then
        checks the claim counter: a record() that overwrote part of the copied slots
        meanwhile (the ring was full) makes that prefix invalid; it is discarded and
        counted as dropped, like samples overwritten before they were read.

        With ``max_backlog`` set, a record() never overwrites unread samples while the
        trainer runs, so contiguous samples are not copied: the columns are read-only
        views of the ring, and the read position moves past them only at
        :meth:`_release`, after the step (until then the producer counts them as
        unread, so it sheds rather than overwrite them). That spares the step a ~1.9 MB
        copy per 1024 samples of 26 x 16 pooled floats (~0.17 ms)."""
        cap = self.buffer_size
        r, w = int(self._ctr[0]), int(self._ctr[5])
        if w == r:
            return None
        fence()  # slots are read after the count that published them
        start = max(r, w - cap)
        if start > r:
            self._ctr[1] += start - r  # overwritten before they were read
        n = min(n, w - start)
        h = start % cap
        staged = "_stage" in self._ring
        if self.max_backlog is not None and not staged and h + n <= cap:
            fence()  # the claim counter is read after the counts
            lost = max(0, min(n, int(self._ctr[7]) - cap - start))  # claimed before this read: not ours
            if lost:
                self._ctr[1] += lost
            self._ctr[10] = start + n  # taken, released after the step (shared: a lost sidecar's batch is counted)
            if lost == n:
                self._release()
                return None
            out = {}
            for k, v in self._ring.items():
                view = v[h + lost:h + n]
                view.flags.writeable = False  # the ring's memory: loss_grad must not write it
                out[k] = view
            return out
        if h + n <= cap:
            out = {k: v[h:h + n].copy() for k, v in self._ring.items() if not (staged and k == "pooled")}
        else:
            sel = (h + np.arange(n)) % cap
            out = {k: v[sel] for k, v in self._ring.items() if not (staged and k == "pooled")}
        if staged:
            # staged samples' rows from their buffers, the others' from the ring
            out["pooled"] = gather_pooled(self._ring["pooled"], h, out["_stage"], self._stage)
        fence()  # the claim counter (and the buffers' generations) are read after the copy
        lost = min(n, int(self._ctr[7]) - cap - start)
        if staged:
            ref = out.pop("_stage")
            stale = (ref[:, 0] >= 0) & (self._stage_gen[np.maximum(ref[:, 0], 0)] != ref[:, 1])
            if stale.any():  # a buffer handed out again before its rows were read: drop them
                keep = ~stale
                keep[:max(lost, 0)] = False  # (those are counted as lost below)
                self._ctr[1] += int(stale[max(lost, 0):].sum())
                out = {k: v[keep] for k, v in out.items()}
                self._ctr[0] = start + n
                if lost > 0:
                    self._ctr[1] += lost
                return out if len(out["labels"]) else None
        self._ctr[0] = start + n
        if lost > 0:
            self._ctr[1] += lost
            if lost == n:
                return None
            out = {k: v[lost:] for k, v in out.items()}
        return out

    def _release(self):
        """Move the read position past the samples :meth:`_pop` handed out as views."""
        if self._ctr[10] > self._ctr[0]:
            self._ctr[0] = self._ctr[10]

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        if self.mode == "process":
            return self._pid is not None
        return self._thread is not None and self._thread.is_alive()

    def _busy(self) -> bool:
        if self.pause_in_flight == 1:
            return self.load.busy()
        return self.load.in_flight >= self.pause_in_flight or (not self.load.reporting() and self.load.fallback_busy())

    def _stopping(self) -> bool:
        if self._in_child:  # asked to stop, or orphaned (the serving process died)
            return bool(self._ctr[4]) or os.getppid() != self._parent_pid
        return self._stop.is_set()

    def _sleep(self, seconds):
        if self._in_child:
            time.sleep(seconds)
        else:
            self._stop.wait(seconds)

    def _current_p99(self):
        if self._in_child:
            v = float(self._p99[0])
            return v if v > 0 else None
        return self.load.p99()

    # -- the sidecar process ------------------------------------------------------------------

    def _start_process(self):
        if self.ladder is None and self.qos_request in ("auto", "resctrl", "cgroup"):
            self.ladder = _qos.probe_ladder()
        self._ctr[4] = 0
        self._parent_pid = os.getpid()
        recv_end, send_end = multiprocessing.get_context("fork").Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:  # the child: train, publish, never return into the caller's code
            code = 0
            try:
                recv_end.close()
                self._child_main(send_end)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        send_end.close()
        self._pid = pid
        self._receiver = threading.Thread(target=self._receive, args=(recv_end,), name="lukern-sidecar-recv",
                                          daemon=True)
        self._receiver.start()
        self.starts += 1
        return self

    def _child_main(self, conn):
        self._in_child = True
        flight, k = self._flight, self.pause_in_flight
        # the parent's serving threads do not exist here; only the in-flight counter in
        # shared memory tells the guard that inference is busy
        _set_timer_slack(1000)  # 1 us: the short sleeps below last what they ask for
        rest = [time.perf_counter()]

        if self.pause_wait == "spin":
            # spin on the counter (about 1 ms at a time, then a short sleep): resumes
            # within a microsecond of the last request finishing
            spin_while_busy(flight, k, 10)  # compiled before the first wait
            t0 = time.perf_counter()
            spin_while_busy(flight, flight[0] + 1, 100_000)
            iters = int(1e-3 / max((time.perf_counter() - t0) / 100_000, 1e-10))

            def wait(_seconds):
                if not spin_while_busy(flight, k, iters):
                    time.sleep(0.0001)
                return self._stopping()
        else:
            # sleep in 0.1 ms steps: the trainer's CPU goes idle while inference runs,
            # and an idle CPU at once pulls over whatever waits on the serving CPU's run
            # queue (another tenant, or the serving thread itself); a CPU kept busy,
            # even at SCHED_IDLE, is balanced only every few ms. Measured on the shared
            # 2-vCPU reference VM (python -m lukern.bench serving, hog / sleepyhog arms):
            # with the serving thread pinned, a SCHED_IDLE process spinning on the other
            # CPU doubled inference P50; unpinned, one that sleeps while requests run
            # never made it worse than no process at all.
            def wait(_seconds):
                time.sleep(0.0001)
                rest[0] = time.perf_counter()
                return self._stopping()

        breathe = self.breathe_every

        def busy():
            if flight[0] >= k:
                return True
            if breathe:  # after ~breathe_every s of unbroken work, idle the CPU briefly
                now = time.perf_counter()
                if now - rest[0] >= breathe:
                    time.sleep(0.00005)
                    rest[0] = time.perf_counter()
                    return flight[0] >= k
            return False

        self.guard = FastGuard(busy, enabled=self.pausing, clock=self.clock, wait=wait)
        last = [time.monotonic(), self.consumed]

        def send(kind):
            # on goodbye the whole training state (optimizer too): a later start() forks
            # the next sidecar from the parent's adapters, and Factors alone would restart
            # Adagrad from empty accumulators
            pack = _train_state if kind == "bye" else LoRAAdapter.export
            facts = [pack(a) if a is not None else None for a in self.adapters]
            conn.send((kind, facts, self._child_stats()))

        self._send = send

        def publish():
            now = time.monotonic()
            if now - last[0] >= self.publish_every and self.consumed != last[1]:
                last[0], last[1] = now, self.consumed
                send("factors")

        self._ready = threading.Event()
        self._run(publish=publish)
        send("bye")
        conn.close()

    def _child_stats(self):
        k = self.controller.knobs
        return {"steps": self.steps, "samples": self.samples, "consumed": self.consumed, "loss_errors": self.loss_errors,
                "rejected": self.rejected, "paused_s": self.guard.paused_time, "pauses": self.guard.pauses,
                "adapters": [None if a is None else {k: getattr(a, k) for k in _ADAPTER_COUNTERS} for a in self.adapters],
                "chunk_s": k.chunk_s, "max_rate": k.max_rate, "n_threads": k.n_threads, "qos": self.qos_level,
                "last_loss": self.last_loss, "last_error": self.last_error, "cpus": self.cpus_in_use}

    def _receive(self, conn):
        """Parent side: adopt each batch of published factors (each adapter swaps its state
        in one reference, so concurrent lookups stay consistent)."""
        if self.cpus:
            # adopting builds the served adapter's new arrays on this thread: first
            # touched on the tables' node, like the adapters built at construction
            pin_thread(self.cpus)
        start_cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
        gen = -1
        while True:
            try:
                kind, facts, st = conn.recv()
            except (EOFError, OSError):
                break
            if self._follow and start_cpus and st.get("qos") and self.load.serving_cpus_generation != gen:
                gen = self.load.serving_cpus_generation
                self.qos_level = st["qos"]  # the sidecar's level decides whether to follow
                self._follow_receiver(start_cpus)
            if kind == "bye":
                for a, f in zip(self.adapters, facts):
                    if a is not None and f is not None:
                        _adopt_train_state(a, f)
                facts = ()
            for a, f in zip(self.adapters, facts):
                if a is not None and f is not None and f.version != a.version:
                    # adopting takes ~0.2 ms of GIL per table: yield to requests in flight
                    # between tables (bounded, so a saturated server still gets updates)
                    for _ in range(20):
                        if self.load.in_flight == 0:
                            break
                        time.sleep(0.0005)
                    a.apply_factors(f)
                    a.version = f.version
                    time.sleep(0)  # hand the GIL to a serving thread that waits for it
            self._adopt_child_stats(st)
            p99 = self.load.p99()
            self._p99[0] = p99 if p99 is not None else 0.0
            if kind == "held":
                self._held_evt.set()
            if kind == "bye":
                conn.close()
                return
        conn.close()
        self._sidecar_lost()

    def _follow_receiver(self, start_cpus):
        """Put the receiver thread where ``follow_serving`` puts the trainer: on the
        serving threads' CPUs it cannot take the GIL while a request runs on another
        core, and it waits for the in-flight count to drop before adopting. It keeps its
        normal priority: at SCHED_IDLE it would compete with the sidecar for the idle
        CPU while holding the GIL a request waits for (three runs each way could not
        tell the two apart on the 2-core reference VM: P50 1.03-1.11x at SCHED_IDLE,
        1.07-1.19x at normal priority, A/A 0.96-1.04x)."""
        try:
            os.sched_setaffinity(threading.get_native_id(), self._followed_cpus(start_cpus))
        except (OSError, AttributeError):  # not permitted (or not Linux): stay where it is
            pass

    def _sidecar_lost(self):
        """The child closed its pipe without saying goodbye (it crashed or was killed):
        reap it, count the samples it had taken but not published as dropped (their
        training never reached the served adapters), say so in stats() and stop
        counting as running, so flush() and pause() return at once and start() can fork
        a fresh sidecar."""
        _, status = os.waitpid(self._pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with self._lock:
            self._release()  # it may have died stepping on views of the ring: those samples were taken
            lost = max(0, int(self._ctr[0]) - int(self._ctr[1]) - self.consumed)
            how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
            self.last_error = (f"the sidecar trainer exited unexpectedly ({how}); {lost} samples it had taken "
                               "were dropped; start() forks a new one")
            self._ctr[1] += lost
            self._pid = None
        log.error("lukern trainer: %s", self.last_error)

    def _adopt_child_stats(self, st):
        self.steps, self.samples, self.consumed = st["steps"], st["samples"], st["consumed"]
        self.loss_errors, self.rejected = st["loss_errors"], st["rejected"]
        self.guard.paused_time, self.guard.pauses = st["paused_s"], st["pauses"]
        self.controller.knobs.chunk_s, self.controller.knobs.max_rate = st["chunk_s"], st["max_rate"]
        self.qos_level, self.last_loss, self.last_error = st["qos"], st["last_loss"], st["last_error"]
        self.cpus_in_use = st["cpus"]
        for a, c in zip(self.adapters, st["adapters"]):
            if a is not None and c is not None:  # the child's counts, seen on the served adapters
                for k, v in c.items():
                    setattr(a, k, v)

    def _stop_process(self, timeout):
        if self._pid is None:
            return
        self._ctr[4] = 1
        self._receiver.join(timeout)
        if self._receiver.is_alive():
            raise TimeoutError(f"the sidecar trainer did not stop within {timeout} s.")
        if self._pid is not None:  # else the receiver reaped a sidecar that died meanwhile
            os.waitpid(self._pid, 0)
        self._pid = None
        self._receiver = None

    def start(self) -> "LiveUpdater":
        """Start the trainer thread (no-op when running). Probes the QoS ladder once."""
        if self.running:
            return self
        if self.switch_interval is not None and self._old_switch is None:
            self._old_switch = sys.getswitchinterval()
            sys.setswitchinterval(self.switch_interval)
        if self.mode == "process":
            return self._start_process()
        if self.ladder is None and self.qos_request in ("auto", "resctrl", "cgroup"):
            self.ladder = _qos.probe_ladder()
        self._stop.clear()
        self.guard.reset()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lukern-trainer", daemon=True)
        self._thread.start()
        self._ready.wait()
        self.starts += 1
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the trainer: a running step finishes (without pausing) and is committed,
        then the thread is joined. Samples still queued stay queued for the next start()."""
        if self.mode == "process":
            self._stop_process(timeout)
        else:
            t = self._thread
            if t is None:
                return
            self._stop.set()
            self.guard.wake()
            t.join(timeout)
            if t.is_alive():
                raise TimeoutError(f"the trainer thread did not stop within {timeout} s.")
            self._thread = None
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)
            self._old_switch = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def pause(self, wait: bool = True, timeout: float | None = 30.0) -> bool:
        """Hold the trainer after its current step until :meth:`resume` (the thread or
        sidecar stays alive; recording goes on and the ring keeps the newest samples).

        With ``wait`` (default) return once the trainer is held and, in process mode,
        its last factors are adopted here: after that nothing writes the adapters until
        :meth:`resume`. Returns False if that did not happen within ``timeout``."""
        self._held_evt.clear()
        self._ctr[6] = 1
        if not wait or not self.running:
            return True
        end = None if timeout is None else time.monotonic() + timeout
        while not (self._held_evt.is_set() if self.mode == "process" else self._ctr[8]):
            if not self.running or (end is not None and time.monotonic() > end):
                return False
            time.sleep(0.001)
        return True

    def resume(self) -> None:
        self._held_evt.clear()
        self._ctr[6] = 0

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued sample has been taken by a finished step (True; in
        process mode: and published) or the timeout ran out / the trainer is not running
        (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:  # one consistent view (a dying sidecar is settled under it)
                target = int(self._ctr[5])  # every written sample: trained, failed or dropped
                done = self.consumed + int(self._ctr[1]) >= target
                running = self.running
            if done:
                return True
            if not running or (end is not None and time.monotonic() > end):
                return False
            time.sleep(0.002)

    def stats(self) -> dict:
        """Counters: steps, samples trained, recorded, dropped (of which ``shed`` by
        :meth:`record` while the trainer was behind, see ``max_backlog``), pending, loss errors,
        rejected gradients, paused seconds, current threads, chunk rows, step-rate cap,
        QoS level, last loss."""
        k = self.controller.knobs
        with self._lock:
            pending, recorded, dropped, shed = self._count, int(self._ctr[2]), self._dropped, int(self._ctr[9])
        return {
            "mode": self.mode, "steps": self.steps, "samples": self.samples, "consumed": self.consumed,
            "recorded": recorded, "dropped": dropped, "shed": shed,
            "pending": pending, "held": bool(self._ctr[6]), "loss_errors": self.loss_errors, "rejected": self.rejected,
            "paused_s": self.guard.paused_time, "pauses": self.guard.pauses,
            "threads": k.n_threads if self.running else 0, "chunk_ms": k.chunk_s * 1e3, "max_rate": k.max_rate,
            "qos": self.qos_level, "node": self.node, "cpus": self.cpus_in_use if self.running else self.cpus,
            "last_loss": self.last_loss,
            "running": self.running, "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ the trainer thread

    def _setup_thread(self):
        tid = threading.get_native_id()
        self.load.exclude_tids.add(tid)
        self._start_cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else None
        self.cpus_in_use = self._start_cpus
        if self.cpus:
            self.cpus_in_use = pin_thread(self.cpus)
        self._follow_gen = -1
        req = self.qos_request
        level = _qos.cpu_level(self.ladder) if req == "auto" else req
        applied = []
        if req == "auto" and self.ladder is not None and self.ladder.level("resctrl").usable:
            try:
                applied.append(_qos.apply(self.ladder.level("resctrl"), tid))
            except OSError as exc:
                log.warning("lukern trainer: resctrl group not applied (%s)", exc)
        if level not in ("none", "cooperative"):
            try:
                applied.append(_qos.apply(self.ladder.level(level) if level in ("cgroup", "resctrl") else level, tid))
            except (OSError, ValueError) as exc:
                log.warning("lukern trainer: QoS level %s not applied (%s); pausing only", level, exc)
                level = "cooperative"
        self.qos_level = "+".join([a["level"] for a in applied if a["level"] == "resctrl"] + [level])
        self.qos_applied = applied
        return tid

    def _followed_cpus(self, start_cpus):
        """The CPUs a trainer-side thread that started on ``start_cpus`` should use: the
        serving threads' CPUs when ``follow_serving`` applies, else its own."""
        allowed = set(start_cpus or ())
        base = (set(self.cpus) & allowed if self.cpus else allowed) or allowed
        serving = self.load.serving_cpus()
        idle = any(lvl in (self.qos_level or "") for lvl in ("sched_idle", "cgroup"))
        use = sorted(serving & base) if idle and serving and not base <= serving else []
        return tuple(use or sorted(base))

    def _follow_serving_cpus(self):
        """Re-pin the trainer thread to the serving threads' CPUs (see ``follow_serving``),
        or back to its own CPUs when that does not apply."""
        self._follow_gen = self.load.serving_cpus_generation
        use = self._followed_cpus(self._start_cpus)
        if use and use != self.cpus_in_use:
            # not pin_thread: it intersects with this thread's current (followed) CPUs
            os.sched_setaffinity(threading.get_native_id(), use)
            self.cpus_in_use = use

    def _run(self, publish=None):
        tid = None
        try:
            tid = self._setup_thread()
        finally:
            self._ready.set()
        try:
            next_time = last_step = self.clock()
            idle = 0.0005
            while not self._stopping():
                if self._ctr[6]:  # held by pause(): not even the misbehaving setting steps
                    if not self._ctr[8]:
                        if self._in_child:  # last factors first, so the parent is current
                            self._send("held")
                        self._ctr[8] = 1
                    self._sleep(0.005)
                    continue
                if self._ctr[8]:
                    self._ctr[8] = 0
                self.guard.check()
                if self._follow and self.load.serving_cpus_generation != self._follow_gen:
                    self._follow_serving_cpus()
                if self.controller.due():
                    self.controller.update(self._current_p99())
                if publish is not None:
                    publish()
                rate = self.controller.knobs.max_rate
                if rate:
                    now = self.clock()
                    if now < next_time:
                        self._sleep(next_time - now)
                        continue
                    next_time = max(next_time + 1.0 / rate, now)
                if self._in_child and self._count < self.batch_size and self.clock() - last_step < self.batch_wait:
                    # the sidecar waits (polling in steps of a tenth of batch_wait, at most
                    # 5 ms) for a full batch: a step has a fixed cost of glue, so a trickle of
                    # small batches would spend the idle gaps on overhead. (Polling every 0.5
                    # ms, and every 1 ms when idle, kept an idle sidecar at 5% of a CPU.)
                    self._sleep(min(0.005, max(0.0005, 0.1 * self.batch_wait)))
                    continue
                batch = self._pop(self.batch_size)
                if batch is None:  # nothing queued: poll with back-off (record() never signals,
                    # so it never waits for the trainer): up to 50 ms in the sidecar (idle, it
                    # then uses 0.3% of a CPU, against 5% with a 1 ms cap), 10 ms for a thread
                    # (which the replay's fast-forwarded stream would see as staleness)
                    idle = min(0.05 if self._in_child else 0.01, idle * 2)
                    self._sleep(idle)
                    continue
                idle = 0.0005
                last_step = self.clock()
                try:
                    self._step(batch)
                except Exception as exc:  # a bug, not bad data (that is counted in _step): say why the trainer stopped
                    self.last_error = f"trainer stopped: {type(exc).__name__}: {exc}"
                    log.exception("lukern trainer stopped")
                    raise
                finally:
                    self.consumed += len(batch["labels"])
                    self._release()
        finally:
            if tid is not None:
                self.load.exclude_tids.discard(tid)

    def _lookup_args(self, ids):
        """(indices, offsets) of ids (n, T, L) in the TableBatch layout (table-major)."""
        n, T, L = ids.shape
        idx = np.ascontiguousarray(ids.transpose(1, 0, 2)).reshape(-1)
        off = np.arange(0, n * T * L + 1, L, dtype=np.int64)
        return idx, off

    def _forward(self, ids):
        n = ids.shape[0]
        pooled = np.empty((n, self.col_offsets[-1]), self.dtype)
        k = self.controller.knobs
        r0 = 0
        while r0 < n:
            rows = 32 if self._row_cost is None else int(k.chunk_s / self._row_cost)
            r1 = min(n, r0 + max(8, rows))
            idx, off = self._lookup_args(ids[r0:r1])
            t0 = time.perf_counter()
            self.tables.lookup(idx, off, out=pooled[r0:r1], adapters=self.adapters, unchecked=True,
                               n_threads=k.n_threads)
            per_row = max((time.perf_counter() - t0) / (r1 - r0), 1e-9)
            # an EMA, capped so that one slow chunk (first call, preemption) cannot
            # shrink the chunks for long
            self._row_cost = per_row if self._row_cost is None else \
                0.8 * self._row_cost + 0.2 * min(per_row, 4 * self._row_cost)
            r0 = r1
            if r0 < n:
                self.guard.check()
        return pooled

    def _step(self, cols):
        ids, y, extra = cols["ids"], cols["labels"], cols.get("extra")
        n, _, L = ids.shape
        if "pooled" in cols:
            pooled = cols["pooled"]
        else:
            pooled = self._forward(ids)
            self.guard.check()
        labels = y.astype(self.dtype)
        try:
            out = self.loss_grad(pooled, labels) if extra is None else self.loss_grad(pooled, labels, extra)
            loss, grad = out
            grad = np.asarray(grad)
        except Exception as exc:  # the model's bug must not kill the trainer
            self.loss_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.loss_errors <= 3 or self.loss_errors % 1000 == 0:
                log.exception("lukern trainer: loss_grad raised (%d so far); batch skipped, adapters untouched",
                              self.loss_errors)
            return
        if grad.shape != pooled.shape or not all_finite(grad):  # no temporary for contiguous float arrays
            self.rejected += 1
            self.last_error = (f"loss_grad returned grad of shape {grad.shape} (want {pooled.shape})"
                               if grad.shape != pooled.shape else "loss_grad returned a non-finite gradient")
            if self.rejected <= 3:
                log.warning("lukern trainer: %s; batch skipped, adapters untouched", self.last_error)
            return
        grad = grad.astype(self.dtype, copy=False)
        off = np.arange(0, n * L + 1, L, dtype=np.int64)
        batched = self._batched_trainers()
        if batched is not None:
            if not self._step_batched(batched, ids, off, grad):
                return
            self.steps += 1
            self.samples += n
            self.last_loss = float(loss)
            return
        touched = []
        try:
            for t in self._trained:
                a = self.adapters[t]
                c0, c1 = self.col_offsets[t], self.col_offsets[t + 1]
                # the sidecar cannot write the served tables: no folding there
                a.backward(np.ascontiguousarray(ids[:, t, :]).reshape(-1), off, grad[:, c0:c1],
                           table=None if self._in_child else self.tables.tables[t])
                touched.append(a)
                self.guard.check()
        except Exception as exc:
            for a in touched:
                a._clear_pending()  # uncommitted gradients of this batch: discard them
            self.loss_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("lukern trainer: adapter backward failed; batch skipped")
            return
        for t, a in zip(self._trained, touched):
            prior = None if self.prior_acc is None else self.prior_acc[t]
            if prior is not None:  # rows admitted by this backward start from their history
                rows, acc, _ = a.optimizer_state()
                fresh = rows[acc == 0]
                if fresh.size:
                    a.set_row_accumulators(fresh, prior[fresh])
            a.step()
            self.guard.check()  # ~0.05-0.1 ms per table: a request waits at most that long
        self.steps += 1
        self.samples += n
        self.last_loss = float(loss)

    # -- the table-batched step (lukern.lora_batch.BatchedTrainer) --------------------------

    def _batched_trainers(self):
        """A :class:`~lukern.lora_batch.BatchedTrainer` over the trained tables (one per
        table when their widths differ) as ``[(table ids, trainer)]``: backward, eviction
        and optimizer step in one kernel call per table instead of about 15 Python-level
        calls. None where its results would differ from
        ``backward`` + ``step``: an object that is not a plain ``LoRAAdapter``, an adapter with ``acc_a_init`` (the batched kernel does not
        seed from it) or, where rows are folded into the served tables (thread mode), an
        eviction policy other than ``StableLRU``. The guard is checked between tables (a
        request waits at most one table's step). Built in the trainer (thread or sidecar),
        on its first step."""
        if self._batched is None:
            # a wrapper with its own backward keeps the per-call path: the batched kernel
            # would bypass it
            ok = all(isinstance(self.adapters[t], LoRAAdapter) and self.adapters[t].acc_a_init is None
                     and (self._in_child or type(self.adapters[t].eviction) is StableLRU) for t in self._trained)
            # the sidecar cannot write the served tables: no eviction there (rows without a
            # free slot are dropped and counted, as backward(table=None) does)
            tables = {t: None if self._in_child else self.tables.tables[t] for t in self._trained}
            priors = self.prior_acc or [None] * self.n_tables
            if not ok:
                self._batched = False
            elif len({self.adapters[t].dim for t in self._trained}) == 1:
                # one trainer for every table (the batch validated once), the guard
                # checked between tables by train_step(between=...)
                self._batched = [(tuple(self._trained), BatchedTrainer([self.adapters[t] for t in self._trained],
                                                                       [tables[t] for t in self._trained],
                                                                       prior_acc=[priors[t] for t in self._trained]))]
            else:  # BatchedTrainer takes one width: a trainer per table
                self._batched = [((t,), BatchedTrainer([self.adapters[t]], [tables[t]], prior_acc=[priors[t]]))
                                 for t in self._trained]
        return self._batched or None

    def _step_batched(self, batched, ids, off, grad):
        """One step on every trained table, table by table with a guard check between.
        Returns False (counted, logged) when a table's call failed: the tables before it
        have stepped (the checks at record() leave nothing expected to fail here)."""
        try:
            n, n_t, L = ids.shape
            # every table's ids in one transposing copy, not one strided copy per table
            ids_t = np.ascontiguousarray(ids.transpose(1, 0, 2)).reshape(n_t, n * L)
            for tids, tr in batched:
                sel = list(tids)
                if sel == list(range(n_t)) and self.col_offsets[-1] == n_t * tr.dim:
                    # every table, one width: a strided view of the model's gradient
                    # (copying it cost ~0.15 ms and 1.7 MB of cache per 1024 x 416 batch)
                    g = grad.reshape(n, n_t, tr.dim).transpose(1, 0, 2)
                else:
                    g = np.stack([grad[:, self.col_offsets[t]:self.col_offsets[t + 1]] for t in tids])
                tr.train_step(ids_t[sel], off, g, between=self.guard.check)
        except Exception as exc:
            self.loss_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("lukern trainer: adapter step failed; the rest of the batch skipped")
            return False
        return True
