"""The replay loop: train an initial DLRM on the start of a stream, then serve the rest
prequentially under every strategy and collect per-window metrics.

``run_replay(stream, ReplayConfig(...))`` returns the report as a plain dict (the JSON
that ``lukern replay --json`` writes; see :mod:`lukern.replay.report`). In ``sim`` mode the
same seed gives the same numbers, except the measured CPU-seconds and wall times.
A KeyboardInterrupt stops the loop and the report holds the windows finished so far
(``"interrupted": true``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import __version__
from .._kernels._codegen import cache_is_cold
from ..plan import thread_limit
from .dlrm import DLRM
from .strategies import (Bandwidth, ClusterTrainer, DeltaSync, FullSync, LukernStrategy, PriorityDelta, Stale,
                         adapter_available)

__all__ = ["ALL_STRATEGIES", "ReplayConfig", "auc", "bootstrap_ci", "initial_model", "logloss", "run_replay",
           "window_bootstrap_auc_diff"]

ALL_STRATEGIES = ("stale", "full", "delta", "priority", "lukern")

#: fields of the report that are measured (time), hence not reproducible across runs.
MEASURED_FIELDS = ("update_cpu_s", "elapsed_s", "train_s", "p50_ms", "p99_ms", "cpu_ratio", "cpu_2x_below_delta",
                   "live")


@dataclass
class ReplayConfig:
    """Settings of one replay (the ``lukern replay`` flags)."""

    windows: int = 10
    train_frac: float = 0.5
    batch_size: int = 256          # serving batch: rows scored per request batch
    train_batch: int = 1024        # rows per trainer step, for every strategy that learns
    epochs: int = 0                # initial training passes; 0: early stopping on the last 10% (max 4)
    dim: int = 64
    bottom: tuple = (32,)          # hidden widths of the bottom MLP
    top: tuple = (64, 32)          # hidden widths of the top MLP
    seed: int = 0
    every: int = 1                 # T, in windows
    priority_pct: float = 20.0
    prod_table_tb: float = 200.0
    prod_link_gbps: float = 100.0
    rows_per_second: float = 75.0  # clock of streams without one (Criteo's ~45M rows / 7 days)
    rank: int = 4
    alpha: float | None = None
    lr_a: float = 0.3
    lr_b: float = 0.001
    budget_pct: float = 1.0
    rank_control: bool = True
    rank_energy: float = 0.999
    rank_every_windows: float = 2.0  # the rank controllers decide every this many windows of rows
    qos: str = "auto"              # live mode: the trainer thread's CPU priority
    target_p99_ms: float | None = None  # live mode: inference P99 the trainer steers against
    # live mode: "thread" (default here: evicted rows fold into the served tables and the
    # rank controller can act) or "process" (LiveUpdater's sidecar: no folding, rows that
    # find no free slot are dropped, so a 1 % budget learns little)
    trainer: str = "thread"
    min_rank: int = 2
    min_rows_for_adapter: int = 64  # smaller tables get no adapter
    optimizer_a: str = "rowwise_adagrad"
    optimizer_b: str = "adagrad"
    eviction: str = "lru"
    # B's start: "gradients" (the top directions of recent embedding gradients: here those
    # of lukern's first trainer step, which it computes anyway; the replicas of
    # lukern.distributed take the training side's last window), "window" (the training
    # side's last window here too: an extra forward and backward, charged to lukern) or
    # "none" (the adapters' own random B)
    init_b: str = "gradients"
    prior_acc: bool = True
    lr_emb: float = 0.05
    lr_dense: float = 1e-3
    strategies: tuple = ALL_STRATEGIES
    bootstrap: int = 2000
    extra: dict = field(default_factory=dict)

    def check(self):
        if self.windows < 1:
            raise ValueError(f"`windows` must be >= 1; got {self.windows}.")
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"`train_frac` must be in (0, 1); got {self.train_frac}.")
        if not self.rank_every_windows > 0:
            raise ValueError(f"`rank_every_windows` must be > 0; got {self.rank_every_windows}.")
        if self.batch_size < 1 or self.train_batch < 1 or self.epochs < 0 or self.every < 1:
            raise ValueError(f"`batch_size`, `train_batch` and `every` must be >= 1 and `epochs` >= 0; got "
                             f"{self.batch_size}, {self.train_batch}, {self.every}, {self.epochs}.")
        if self.init_b not in ("gradients", "window", "none"):
            raise ValueError(f"`init_b` must be 'gradients', 'window' or 'none'; got {self.init_b!r}.")
        unknown = [s for s in self.strategies if s not in ALL_STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"`strategies` must be a non-empty subset of {ALL_STRATEGIES}; got {list(self.strategies)}.")


# --------------------------------------------------------------------------- metrics


def auc(labels, scores) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half; NaN when one
    class is missing.

    Examples
    --------
    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = float(avg_rank[inv.reshape(-1)][y == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(labels, probs) -> float:
    """Mean binary log loss with probabilities clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if y.size else float("nan")


def bootstrap_ci(values, *, n_boot=2000, seed=0, level=0.95):
    """Mean of ``values`` (NaN dropped) and its percentile bootstrap interval.

    Returns (mean, low, high); NaNs when fewer than 2 values.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        m = float(v.mean()) if v.size else float("nan")
        return m, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _pair_counts(labels_w, scores_w):
    """C[i, j]: pairs (positive of window i, negative of window j) ranked correctly (ties
    half), with the positives P[i] and negatives N[j] per window."""
    pos = [np.asarray(s, np.float64)[np.asarray(y) == 1] for y, s in zip(labels_w, scores_w)]
    neg = [np.sort(np.asarray(s, np.float64)[np.asarray(y) != 1]) for y, s in zip(labels_w, scores_w)]
    k = len(pos)
    c = np.zeros((k, k))
    for j in range(k):
        if neg[j].size:
            for i in range(k):
                if pos[i].size:
                    c[i, j] = 0.5 * (np.searchsorted(neg[j], pos[i], "left").sum()
                                     + np.searchsorted(neg[j], pos[i], "right").sum())
    return c, np.array([p.size for p in pos], np.float64), np.array([n.size for n in neg], np.float64)


def window_bootstrap_auc_diff(labels_w, scores_a_w, scores_b_w, *, n_boot=2000, seed=0, level=0.95):
    """Overall AUC of ``a`` minus overall AUC of ``b`` over the concatenated windows, and
    its percentile interval from a block bootstrap that resamples whole windows.

    Resampling windows (not samples) keeps the time dependence inside a window; both
    strategies get the same draws (a paired interval). The overall AUC of a draw is
    exact: it counts correctly ranked (positive, negative) pairs across the drawn
    windows, with a window drawn m times weighted m. Returns (diff, low, high); NaN bounds
    when fewer than 2 windows hold both classes.

    Examples
    --------
    >>> y = [np.array([0, 1, 1]), np.array([1, 0, 0])]
    >>> d, lo, hi = window_bootstrap_auc_diff(y, [np.array([.1, .9, .8]), np.array([.7, .2, .3])],
    ...                                       [np.array([.5, .4, .6]), np.array([.2, .3, .1])], n_boot=100)
    >>> round(d, 3)
    0.667
    """
    k = len(labels_w)
    if not (len(scores_a_w) == len(scores_b_w) == k):
        raise ValueError(f"`labels_w`, `scores_a_w` and `scores_b_w` must list the same windows; got "
                         f"{k}, {len(scores_a_w)} and {len(scores_b_w)}.")
    ca, pos, neg = _pair_counts(labels_w, scores_a_w)
    cb, _, _ = _pair_counts(labels_w, scores_b_w)
    ones = np.ones(k)
    denom = (ones @ pos) * (ones @ neg)
    diff = float((ones @ (ca - cb) @ ones) / denom) if denom else float("nan")
    if int(((pos > 0) & (neg > 0)).sum()) < 2:
        return diff, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    w = np.zeros((int(n_boot), k))
    draws = rng.integers(0, k, size=(int(n_boot), k))
    np.add.at(w, (np.arange(int(n_boot))[:, None], draws), 1.0)
    d = np.einsum("bi,ij,bj->b", w, ca - cb, w)
    den = (w @ pos) * (w @ neg)
    ok = den > 0
    boot = d[ok] / den[ok]
    a = (1 - level) / 2
    return diff, float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))


# --------------------------------------------------------------------------- the loop


def _clock(stream, rows_per_second):
    """Stream time in seconds; streams without a usable clock get ``row / rows_per_second``."""
    t = stream.t
    if stream.format == "criteo" or len(t) < 2 or t[-1] <= t[0]:
        return t[0] + np.arange(len(t), dtype=np.float64) / float(rows_per_second), "rows/%g per s" % rows_per_second
    return t, "timestamps"


@contextlib.contextmanager
def _single_threaded():
    """One BLAS thread and one lukern thread: reproducible numbers and CPU-seconds that
    belong to the strategy being measured."""
    with thread_limit(1):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
            return
        with threadpool_limits(1):
            yield


def initial_model(stream, cfg: ReplayConfig, n_train: int, *, progress=None):
    """The model every strategy starts from, trained on rows ``0:n_train``: ``cfg.epochs``
    passes, or early stopping on the most recent 10 % when ``cfg.epochs`` is 0.
    Returns (model, info dict)."""
    m0 = DLRM(stream.cat_sizes, stream.n_dense, dim=cfg.dim, bottom=cfg.bottom, top=cfg.top, seed=cfg.seed,
              lr_emb=cfg.lr_emb, lr_dense=cfg.lr_dense)
    if cfg.epochs:
        info = {"epochs": cfg.epochs, "train_loss": m0.fit(stream, 0, n_train, epochs=cfg.epochs,
                                                            batch_size=cfg.batch_size, seed=cfg.seed,
                                                            progress=progress)}
    else:
        info = m0.fit_early_stopping(stream, 0, n_train, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    return m0, info


def _make_strategies(cfg: ReplayConfig, m0: DLRM, demand=None, window_rows=None, live=False):
    bw = Bandwidth(cfg.prod_table_tb * 1e12, cfg.prod_link_gbps * 1e9)
    out = {}
    trainer = None
    pending = []
    for name in cfg.strategies:
        if name == "stale":
            out[name] = Stale(m0.copy())
        elif name in ("full", "delta", "priority"):
            if trainer is None:
                trainer = ClusterTrainer(m0.copy(), train_batch=cfg.train_batch)
            if name == "full":
                out[name] = FullSync(m0.copy(), trainer, every=cfg.every, bandwidth=bw)
            elif name == "delta":
                out[name] = DeltaSync(m0.copy(), trainer, every=cfg.every, bandwidth=bw)
            else:
                out[name] = PriorityDelta(m0.copy(), trainer, every=cfg.every, bandwidth=bw, pct=cfg.priority_pct)
        elif name == "lukern":
            if not adapter_available():
                pending.append("lukern (lukern.LoRAAdapter is not available in this build)")
                continue
            kw = dict(rank=cfg.rank, alpha=cfg.alpha, lr_a=cfg.lr_a, lr_b=cfg.lr_b, budget_pct=cfg.budget_pct,
                      rank_control=cfg.rank_control, demand=demand, optimizer_a=cfg.optimizer_a,
                      optimizer_b=cfg.optimizer_b, eviction=cfg.eviction, train_batch=cfg.train_batch,
                      rank_energy=cfg.rank_energy, min_rank=cfg.min_rank,
                      min_rows_for_adapter=cfg.min_rows_for_adapter,
                      init_b="served" if cfg.init_b == "gradients" else "none")
            if live:
                from .live import LiveLukern

                out[name] = LiveLukern(m0.copy(), prior_acc=cfg.prior_acc, rank_every=1, qos=cfg.qos,
                                       target_p99_ms=cfg.target_p99_ms, trainer=cfg.trainer, **kw)
            else:
                out[name] = LukernStrategy(m0.copy(), prior_acc=cfg.prior_acc,
                                           rank_every=max(1, int(cfg.rank_every_windows * (window_rows or cfg.train_batch))
                                                          // cfg.train_batch),
                                           **kw)
    return out, trainer, bw, pending


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="batch", dynamic_ncols=True, leave=False)


def run_replay(stream, cfg: ReplayConfig | None = None, *, progress=True, on_window=None, mode="sim",
               command=None) -> dict:
    """Run the replay on ``stream`` and return the report dict.

    Parameters
    ----------
    stream : lukern.replay.Stream
    cfg : ReplayConfig
    progress : bool
        tqdm bar on stderr.
    on_window : callable(report_so_far), optional
        Called after every window (the CLI uses it to keep the JSON current).
    mode : "sim" or "live"
        ``live``: lukern's adapters are trained by a :class:`lukern.LiveUpdater` thread
        and the report adds inference latency with the trainer on and off
        (see :mod:`lukern.replay.live`).

    Examples
    --------
    >>> from lukern.replay.synthetic import synthetic_stream
    >>> s = synthetic_stream(n_events=4000, seed=0)
    >>> cfg = ReplayConfig(windows=2, strategies=("stale", "delta"), epochs=1, bootstrap=10)
    >>> r = run_replay(s, cfg, progress=False)
    >>> sorted(r["strategies"]), len(r["windows"])
    (['delta', 'stale'], 2)
    """
    cfg = cfg or ReplayConfig()
    cfg.check()
    n = len(stream)
    n_train = int(n * cfg.train_frac)
    if n_train < 1 or n - n_train < cfg.windows:
        raise ValueError(f"the stream has {n} rows: too few for train_frac={cfg.train_frac} and "
                         f"{cfg.windows} windows. Use a longer stream or fewer windows.")
    t_clock, clock_kind = _clock(stream, cfg.rows_per_second)
    edges = np.linspace(n_train, n, cfg.windows + 1).astype(np.int64)
    start = time.perf_counter()
    report = {
        "lukern_version": __version__,
        "command": command,
        "mode": mode,
        "seed": cfg.seed,
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "stream": {"name": stream.name, "format": stream.format, "source": stream.source, "rows": n,
                   "train_rows": n_train, "positives": float(stream.labels.mean()),
                   "tables": dict(zip(stream.cat_names, stream.cat_sizes)), "dense": stream.dense_names,
                   "bad_lines_skipped": stream.n_skipped, "clock": clock_kind,
                   "t_start": float(t_clock[0]), "t_train_end": float(t_clock[n_train - 1]),
                   "t_end": float(t_clock[-1])},
        "windows": [],
        "strategies": {},
        "pending": [],
        "interrupted": False,
    }
    serve_batches = sum(-(-int(b - a) // cfg.batch_size) for a, b in zip(edges[:-1], edges[1:]))
    train_batches = (cfg.epochs or 3) * -(-n_train // cfg.batch_size)
    bar = _progress(train_batches + serve_batches, progress)
    if bar is not None and cache_is_cold():
        bar.write("lukern: the first run of this build compiles its kernels (about a minute on 2 cores); later "
                  "runs load them from the cache.", file=sys.stderr)
    series = {}
    preds = {}
    strategies = {}
    try:
        with _single_threaded():
            if bar is not None:
                bar.set_description("initial training")
            t0 = time.perf_counter()
            m0, fit = initial_model(stream, cfg, n_train,
                                    progress=(lambda k: bar.update(1)) if bar is not None else None)
            if bar is not None:  # early stopping may have run fewer epochs than the bar assumed
                bar.total = bar.n + serve_batches
                bar.refresh()
            report["initial_model"] = {**fit, "train_s": time.perf_counter() - t0,
                                       "table_bytes": m0.table_nbytes, "dense_bytes": m0.dense_nbytes}
            # ids seen at least twice per table over the last window's worth of training
            # rows: how many adapter slots each table can use
            w_rows = int(edges[1] - edges[0])
            recent = stream.cat[max(0, n_train - w_rows):n_train]
            demand = [int((np.unique(recent[:, t], return_counts=True)[1] >= 2).sum()) for t in range(stream.n_cat)]
            strategies, trainer, bw, pending = _make_strategies(cfg, m0, demand, w_rows, live=mode == "live")
            if "lukern" in strategies and strategies["lukern"].rank_control_note:
                pending.append(f"rank control: {strategies['lukern'].rank_control_note}")
            report["pending"] = pending
            lk = strategies.get("lukern")
            # the live trainer steps outside flush(): it starts B from the training window
            if lk is not None and (cfg.init_b == "window" or (cfg.init_b == "gradients" and mode == "live")):
                c0 = time.process_time()
                # in the trainer's mini-batches: the gradients summed are the same
                init = strategies["lukern"].init_directions(stream.batches(cfg.train_batch, max(0, n_train - w_rows),
                                                                           n_train))
                strategies["lukern"].stats.update_cpu_s += time.process_time() - c0
                report["lukern_init"] = {"b_from": "gradients of the last training window",
                                         "energy_captured": init}
            report["bandwidth"] = bw.describe()
            for name, s in strategies.items():
                series[name] = {k: [] for k in ("auc", "logloss", "bytes_shipped", "update_cpu_s",
                                                "adapter_mem_pct", "rank", "rank_decisions", "evictions")}
                preds[name] = []
            report["settings"] = {name: s.settings() for name, s in strategies.items()}
            shipping = [s for s in strategies.values() if hasattr(s, "trainer")]
            for w in range(cfg.windows):
                a0, a1 = int(edges[w]), int(edges[w + 1])
                if bar is not None:
                    bar.set_description(f"window {w + 1}/{cfg.windows}")
                wpred = {name: np.empty(a1 - a0) for name in strategies}
                for a in range(a0, a1, cfg.batch_size):
                    b = stream.batch(a, min(a1, a + cfg.batch_size))
                    now = float(t_clock[a])
                    for name, s in strategies.items():
                        wpred[name][a - a0:a - a0 + len(b)] = s.predict(b, now)
                    for s in strategies.values():
                        s.learn(b)
                    if trainer is not None:
                        trainer.learn(b)
                    if bar is not None:
                        bar.update(1)
                now = float(t_clock[a1 - 1])
                for s in strategies.values():
                    s.flush()
                if trainer is not None:
                    trainer.flush()
                for s in strategies.values():
                    s.end_window(w, now)
                train_cpu = trainer.take_cpu() if trainer is not None else 0.0
                y = stream.labels[a0:a1]
                for name, s in strategies.items():
                    st = s.take_stats()
                    cpu = st.update_cpu_s + (train_cpu if s in shipping else 0.0)
                    ser = series[name]
                    ser["auc"].append(auc(y, wpred[name]))
                    ser["logloss"].append(logloss(y, wpred[name]))
                    ser["bytes_shipped"].append(int(st.bytes_shipped))
                    ser["update_cpu_s"].append(cpu)
                    ser["adapter_mem_pct"].append(st.adapter_mem_pct)
                    ser["rank"].append(st.rank)
                    ser["rank_decisions"].append(st.rank_decisions)
                    ser["evictions"].append(st.evictions)
                    preds[name].append(wpred[name])
                if lk is not None and "lukern_init" not in report and lk.init_captured is not None:
                    report["lukern_init"] = {"b_from": "gradients of lukern's first trainer step",
                                             "energy_captured": lk.init_captured}
                report["windows"].append({"index": w, "rows": a1 - a0, "positives": int(y.sum()),
                                          "t_start": float(t_clock[a0]), "t_end": float(t_clock[a1 - 1])})
                _summarise(report, stream, edges, series, preds, strategies, cfg)
                report["elapsed_s"] = time.perf_counter() - start
                if on_window is not None:
                    on_window(report)
    except KeyboardInterrupt:
        report["interrupted"] = True
        if series:
            _summarise(report, stream, edges, series, preds, strategies, cfg)
    finally:
        if bar is not None:
            bar.close()
        live = strategies.get("lukern") if mode == "live" else None
        if live is not None:
            live.stop()
    if live is not None and series:
        _live_latency(report, stream, live, edges, cfg)
    report["elapsed_s"] = time.perf_counter() - start
    return report


def _live_latency(report, stream, live, edges, cfg):
    """Serve the same requests again with the trainer stopped; record P50/P99 on and off."""
    from .live import latency_summary

    k = report.get("windows_done", 0)
    spans = [(a, min(int(edges[w + 1]), a + cfg.batch_size)) for w in range(k)
             for a in range(int(edges[w]), int(edges[w + 1]), cfg.batch_size)]
    on = latency_summary(live.latencies[:len(spans)])
    with _single_threaded():
        off = latency_summary(live.serve_again(stream, spans))
    stats = live.updater.stats()
    report["live"] = {"on": on, "off": off, "trainer": {k_: stats.get(k_) for k_ in (
        "mode", "steps", "samples", "recorded", "dropped", "pauses", "paused_s", "qos", "node", "cpus",
        "loss_errors", "rejected")}}
    report["live"]["trainer"]["dropped_admissions"] = int(sum(
        a.dropped_admissions for a in live.adapters if a is not None))
    lk = report["strategies"].get("lukern")
    if lk is not None:
        lk["p50_ms"] = {"on": on["p50_ms"], "off": off["p50_ms"]}
        lk["p99_ms"] = {"on": on["p99_ms"], "off": off["p99_ms"]}


def _summarise(report, stream, edges, series, preds, strategies, cfg):
    """Overall numbers from the finished windows (called after every window)."""
    k = min(len(v["auc"]) for v in series.values()) if series else 0
    y = stream.labels[int(edges[0]):int(edges[k])]
    out = {}
    for name, ser in series.items():
        p = np.concatenate(preds[name][:k]) if k else np.zeros(0)
        mem = [m for m in ser["adapter_mem_pct"][:k] if m is not None]
        s = strategies[name]
        out[name] = {
            "auc": auc(y, p),
            "logloss": logloss(y, p),
            "auc_window_mean": float(np.nanmean(ser["auc"][:k])) if k and np.isfinite(ser["auc"][:k]).any() else float("nan"),
            "bytes_shipped": int(sum(ser["bytes_shipped"][:k])),
            "update_cpu_s": float(sum(ser["update_cpu_s"][:k])),
            "adapter_mem_pct_max": max(mem) if mem else None,
            "settings": s.settings(),
            "syncs": getattr(s, "syncs", []),
            "windows": {key: v[:k] for key, v in ser.items()},
        }
    report["strategies"] = out
    report["windows_done"] = k
    comps = {}
    y_w = [stream.labels[int(edges[w]):int(edges[w + 1])] for w in range(k)]
    if "lukern" in series:
        for other in series:
            if other == "lukern":
                continue
            # the bar's interval: the overall AUC difference under a block bootstrap over
            # windows; beside it the mean per-window difference and its interval (every
            # window weighted alike, however few positives it holds)
            _, lo, hi = window_bootstrap_auc_diff(y_w, preds["lukern"][:k], preds[other][:k],
                                                  n_boot=cfg.bootstrap, seed=cfg.seed)
            diff = np.asarray(series["lukern"]["auc"][:k]) - np.asarray(series[other]["auc"][:k])
            m, wlo, whi = bootstrap_ci(diff, n_boot=cfg.bootstrap, seed=cfg.seed)
            comp = {"auc_diff": out["lukern"]["auc"] - out[other]["auc"], "ci95": [lo, hi],
                    "window_auc_diff_mean": m, "window_ci95": [wlo, whi], "windows": int(np.isfinite(diff).sum())}
            ob, oc = out[other]["bytes_shipped"], out[other]["update_cpu_s"]
            lb, lc = out["lukern"]["bytes_shipped"], out["lukern"]["update_cpu_s"]
            comp["bytes_ratio"] = (ob / lb) if lb else (float("inf") if ob else None)
            comp["cpu_ratio"] = (oc / lc) if lc > 0 else None
            comps[f"lukern_vs_{other}"] = comp
    report["comparisons"] = comps
    report["bars"] = _bars(out, comps)


def _bars(out, comps):
    """The issue's acceptance bars, evaluated on this run's own numbers."""
    if "lukern" not in out:
        return {}
    bars = {}
    for other in ("stale", "delta", "priority"):
        c = comps.get(f"lukern_vs_{other}")
        if c is not None:
            bars[f"auc_beats_{other}"] = bool(c["auc_diff"] > 0)
            # the overall difference alone can be noise: also whether its bootstrap
            # interval over windows stays above zero
            bars[f"auc_beats_{other}_ci"] = bool(np.isfinite(c["ci95"][0]) and c["ci95"][0] > 0)
    d = comps.get("lukern_vs_delta")
    if d is not None:
        bars["bytes_2x_below_delta"] = bool(d["bytes_ratio"] is not None and d["bytes_ratio"] >= 2)
        bars["cpu_2x_below_delta"] = bool(d["cpu_ratio"] is not None and d["cpu_ratio"] >= 2)
    mem = out["lukern"]["adapter_mem_pct_max"]
    bars["adapter_mem_below_2pct"] = bool(mem is not None and mem < 2.0)
    bars["adapter_mem_below_1pct_goal"] = bool(mem is not None and mem < 1.0)
    return bars
