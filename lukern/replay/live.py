"""``lukern replay --mode live``: lukern's strategy with the real co-located trainer.

The served model's adapters are trained by a :class:`lukern.LiveUpdater` (a thread by
default here, or its sidecar process with ``--trainer process``; pinned, low priority,
pausing while requests are in flight) from the labelled samples the serving loop records,
instead of synchronously after each batch as in ``sim`` mode. The
serving forward hands the trainer its pooled embeddings, so the trainer runs a backward
but no second forward. Every request's latency is measured; after the stream, the same
requests are served again with the trainer stopped, so the report holds inference
P50/P99 with the trainer on and off over identical work.

Live numbers depend on thread timing: they are not reproducible bit for bit, unlike
``sim`` mode.
"""

from __future__ import annotations

import time

import numpy as np

from .dlrm import _sigmoid
from .strategies import LukernStrategy

__all__ = ["LiveLukern", "latency_summary", "run_live"]


def _process_cpu(pid) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (0 if unreadable)."""
    import os

    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def _thread_cpu(thread) -> float:
    """CPU seconds used so far by ``thread`` (0 when it is not running)."""
    if thread is None or thread.ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, AttributeError, ProcessLookupError):
        return 0.0


def latency_summary(seconds) -> dict:
    """P50 / P99 / mean in milliseconds of request latencies (seconds)."""
    x = np.asarray(seconds, dtype=np.float64) * 1e3
    if x.size == 0:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "requests": 0}
    return {"p50_ms": float(np.percentile(x, 50)), "p99_ms": float(np.percentile(x, 99)),
            "mean_ms": float(x.mean()), "requests": int(x.size)}


class LiveLukern(LukernStrategy):
    """:class:`LukernStrategy` whose adapters are trained by a :class:`lukern.LiveUpdater`.

    ``predict`` is one inference request (counted as in flight for the trainer's guard and
    timed); ``learn`` records the labelled rows with the pooled embeddings and dense
    features; ``flush`` (every window end) waits until the trainer has caught up, then
    lets the rank controllers decide while the trainer is idle (the trainer is the only
    writer of the adapters, so structural changes happen between its steps).

    Parameters
    ----------
    model : DLRM
    qos : str
        The trainer's CPU priority (see :class:`lukern.LiveUpdater`).
    target_p99_ms : float, optional
        Inference P99 the trainer's slow controller steers against.
    pin : bool
        Pin the trainer thread to the tables' NUMA node.
    **kwargs
        As :class:`LukernStrategy` (rank, budget, learning rates, ...).
    """

    name = "lukern"

    def __init__(self, model, *, qos="auto", target_p99_ms=None, pin=True, flush_timeout=120.0, trainer=None,
                 **kwargs):
        kwargs.setdefault("rank_every", 1)
        import os

        if trainer is None:
            trainer = "process" if hasattr(os, "fork") else "thread"  # LiveUpdater's own default
        if trainer not in ("thread", "process"):
            raise ValueError(f"`trainer` must be 'thread' or 'process'; got {trainer!r}.")
        if trainer == "process" and kwargs.get("rank_control", True):
            # The sidecar child owns the adapters' training state and publishes factors
            # back every 0.2 s: a rank change made here would be overwritten.
            kwargs["rank_control"] = False
            self._rank_note = "rank control runs with --trainer thread only (the sidecar owns the factors)"
        else:
            self._rank_note = None
        super().__init__(model, **kwargs)
        if self._rank_note:
            self.rank_control_note = self._rank_note
        from .. import LiveUpdater

        self.latencies = []
        self.requests = []  # (start, stop) rows of every request, re-served with the trainer off
        self.flush_timeout = float(flush_timeout)
        # rows admitted into an adapter start from their rows' Adagrad history, as in sim mode
        ro = self.model.row_offsets
        priors = None if self.prior_acc is None else [
            None if a is None else np.ascontiguousarray(self.prior_acc[ro[t]:ro[t + 1]], dtype=a.dtype)
            for t, a in enumerate(self.adapters)]
        extra = dict(extra_width=self.model.n_dense, record_pooled=True) if trainer == "process" else {}
        self.trainer_mode = trainer
        self.updater = LiveUpdater(self.model.tables, self.model.loss_grad_pooled, adapters=self.adapters,
                                   prior_acc=priors, batch_size=self.train_batch, qos=qos, pin=pin, mode=trainer,
                                   target_p99=None if target_p99_ms is None else target_p99_ms * 1e-3, **extra)
        self.updater.start()
        self._cpu_mark = self._trainer_cpu()

    def _trainer_cpu(self) -> float:
        u = self.updater
        if self.trainer_mode == "process":
            return _process_cpu(getattr(u, "_pid", None))
        return _thread_cpu(getattr(u, "_thread", None))

    def predict(self, batch, now):
        with self.updater.serving():
            t0 = time.perf_counter()
            c = self.model.forward_cache(batch, adapters=self.adapters)
            p = _sigmoid(c.logits.astype(np.float64))
            self.latencies.append(time.perf_counter() - t0)
        self._cache = c
        return p

    def learn(self, batch):
        c = self._cache
        if c is None or c.n != len(batch):
            raise RuntimeError("LiveLukern.learn() must follow predict() on the same batch.")
        self._cache = None
        self.updater.record(batch.cat, batch.labels, extra=batch.dense, pooled=c.pooled)

    def flush(self):
        if not self.updater.flush(timeout=self.flush_timeout):
            raise RuntimeError(f"the live trainer did not catch up within {self.flush_timeout} s "
                               f"({self.updater.stats()}).")
        cpu = self._trainer_cpu()
        self.stats.update_cpu_s += max(cpu - self._cpu_mark, 0.0)
        c0 = time.process_time()  # rank decisions run on this thread, between trainer steps
        self._rank_step()
        self.stats.update_cpu_s += time.process_time() - c0
        self._cpu_mark = self._trainer_cpu()
        self._note_memory()

    def stop(self):
        self.updater.stop(timeout=self.flush_timeout)

    def serve_again(self, stream, spans):
        """Serve the requests ``spans`` (row ranges) again with the trainer stopped; returns
        their latencies (seconds)."""
        out = []
        for a, b in spans:
            batch = stream.batch(a, b)
            with self.updater.serving():
                t0 = time.perf_counter()
                c = self.model.forward_cache(batch, adapters=self.adapters)
                _sigmoid(c.logits.astype(np.float64))
                out.append(time.perf_counter() - t0)
        return out

    def settings(self):
        return {**super().settings(), "trainer": f"LiveUpdater ({self.trainer_mode})"}


def run_live(stream, cfg=None, *, progress=True, on_window=None, command=None) -> dict:
    """The replay with lukern's live trainer; adds inference latency with the trainer on
    and off (``report["live"]`` and ``p50_ms`` / ``p99_ms`` under the lukern strategy)."""
    from .runner import run_replay

    return run_replay(stream, cfg, progress=progress, on_window=on_window, mode="live", command=command)
