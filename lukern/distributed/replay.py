"""The replay across replicas: ``lukern replay --replicas N [--exchange-every T]
[--split user|random] [--backend inproc|ray]``.

Every replica starts from the same initial model (trained on the start of the stream,
as for the single-node strategies) and gets a share of the served part: by user (a
hash of the ``user`` feature, or of the first categorical feature when there is none)
or at random. A replica scores each of its batches before learning from it with its
own co-located LoRA trainer. Two arms run on the same split:

- **isolated**: the replicas never exchange;
- **exchanging**: every T windows the replicas publish their compact factors and adopt
  the product-correct merge (:mod:`lukern.distributed.replica`).

Reported per window and arm: AUC and log loss over all the window's rows (each scored
by the replica that served it); per exchange period: the bytes the exchange moved
(every snapshot uploaded once and downloaded by each peer) and the bytes a delta
strategy would have shipped for the same period (the rows the replicas changed,
``k (8 + 4 d)``, uploads only: the comparison favours delta).
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from ..replay.runner import ReplayConfig, _single_threaded, auc, bootstrap_ci, initial_model, logloss
from ..replay.strategies import ID_BYTES

__all__ = ["print_replicated", "replica_owner", "run_replicated"]

ARMS = ("isolated", "exchanging")


def _split_feature(stream) -> int:
    names = [str(n).lower() for n in stream.cat_names]
    return names.index("user") if "user" in names else 0


def replica_owner(stream, replicas: int, split: str = "user", seed: int = 0) -> np.ndarray:
    """The replica (0..replicas-1) of every row of ``stream``.

    ``user``: a multiplicative hash of the user id (all of a user's rows go to one
    replica, as a sticky load balancer would send them); ``random``: uniform, seeded.

    Examples
    --------
    >>> from lukern.replay.synthetic import synthetic_stream
    >>> s = synthetic_stream(n_events=2000, seed=0)
    >>> o = replica_owner(s, 2)
    >>> bool(((o == 0) | (o == 1)).all()), bool(len(set(zip(s.cat[:, 0], o))) == len(set(s.cat[:, 0])))
    (True, True)
    """
    if int(replicas) < 1:
        raise ValueError(f"`replicas` must be >= 1; got {replicas}.")
    if split == "user":
        key = stream.cat[:, _split_feature(stream)].astype(np.uint64)
        h = (key * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
        return (h % np.uint64(replicas)).astype(np.int64)
    if split == "random":
        return np.random.default_rng(seed).integers(0, int(replicas), len(stream)).astype(np.int64)
    raise ValueError(f"`split` must be 'user' or 'random'; got {split!r}.")


def _take(stream, rows):
    from ..replay.streams import Batch

    return Batch(stream.t[rows], stream.dense[rows], stream.cat[rows], stream.labels[rows])


def _strategy_kw(cfg, stream, owner, n_train, w_rows, replicas):
    """One LukernStrategy setting per replica: the single-node lukern's, with the slot
    demand (ids seen twice in the last training window) of the replica's own share."""
    recent = np.arange(max(0, n_train - w_rows), n_train)
    out = []
    for i in range(replicas):
        cat = stream.cat[recent[owner[recent] == i]]
        demand = [int((np.unique(cat[:, t], return_counts=True)[1] >= 2).sum()) for t in range(stream.n_cat)]
        out.append(dict(rank=cfg.rank, alpha=cfg.alpha, lr_a=cfg.lr_a, lr_b=cfg.lr_b, budget_pct=cfg.budget_pct,
                        rank_control=cfg.rank_control, demand=demand, optimizer_a=cfg.optimizer_a,
                        optimizer_b=cfg.optimizer_b, eviction=cfg.eviction, train_batch=cfg.train_batch,
                        rank_energy=cfg.rank_energy, min_rank=cfg.min_rank, prior_acc=cfg.prior_acc,
                        rank_every=max(1, (w_rows // replicas) // cfg.train_batch)))
    return out


@contextlib.contextmanager
def _backend(backend, replicas):
    """Ray for the ``ray`` backend: the caller's if it runs, else a private one."""
    if backend != "ray":
        yield None
        return
    from .ray_backend import RayCluster, _ray

    ray = _ray()
    if ray.is_initialized():
        yield None
        return
    with RayCluster(num_cpus=max(2, replicas)) as cluster:
        yield cluster


def run_replicated(stream, cfg: ReplayConfig | None = None, *, replicas: int = 2, exchange_every: int = 1,
                   split: str = "user", backend: str = "inproc", pin=None, arms=ARMS, model=None,
                   merge: str = "fold", rows: str = "mean", on_exchange=None, progress: bool = False) -> dict:
    """Run the isolated and the exchanging arm on ``stream``; return the report dict.

    Parameters
    ----------
    stream : lukern.replay.Stream
    cfg : ReplayConfig
        The single-node replay's settings (windows, batch sizes, adapter settings).
    replicas, exchange_every, split :
        N, T (in windows) and how rows are assigned (see :func:`replica_owner`).
    backend : {"inproc", "ray"}
        Replicas in this process, or as Ray actors (on the running Ray, else on a
        private loopback one started and stopped here).
    pin : None, "spread" or list of node ids
        Ray only: where the replica actors run (see ``RayReplicaSet``).
    arms : tuple
        Subset of ("isolated", "exchanging").
    model : DLRM, optional
        The initial model (default: trained here like the single-node replay's).
    merge, rows :
        What a replica does with the merged correction ("fold" or "adopt") and how rows
        several replicas changed combine ("mean" or "sum"); see
        :class:`~lukern.distributed.replica.Replica`.
    on_exchange : callable(arm, window, replica_set), optional
        Called between the publish and the merge phase of every exchange (failure drills
        kill a replica there).

    Examples
    --------
    >>> from lukern.replay.synthetic import synthetic_stream
    >>> s = synthetic_stream(n_events=6000, seed=0)
    >>> r = run_replicated(s, ReplayConfig(windows=2, epochs=1, bootstrap=10), replicas=2)
    >>> sorted(r["arms"]), len(r["arms"]["exchanging"]["auc"])
    (['exchanging', 'isolated'], 2)
    """
    cfg = cfg or ReplayConfig()
    cfg.check()
    if isinstance(replicas, bool) or int(replicas) < 1:
        raise ValueError(f"`replicas` must be >= 1; got {replicas}.")
    _periods(exchange_every)
    if backend not in ("inproc", "ray"):
        raise ValueError(f"`backend` must be 'inproc' or 'ray'; got {backend!r}.")
    if merge not in ("fold", "adopt"):
        raise ValueError(f"`merge` must be 'fold' or 'adopt'; got {merge!r}.")
    if rows not in ("mean", "sum"):
        raise ValueError(f"`rows` must be 'mean' or 'sum'; got {rows!r}.")
    if not arms or any(a not in ARMS for a in arms):
        raise ValueError(f"`arms` must be a non-empty subset of {ARMS}; got {arms!r}.")
    replicas = int(replicas)
    n = len(stream)
    n_train = int(n * cfg.train_frac)
    if n_train < 1 or n - n_train < cfg.windows:
        raise ValueError(f"the stream has {n} rows: too few for train_frac={cfg.train_frac} and {cfg.windows} "
                         "windows. Use a longer stream or fewer windows.")
    owner = replica_owner(stream, replicas, split, cfg.seed)
    edges = np.linspace(n_train, n, cfg.windows + 1).astype(np.int64)
    w_rows = int(edges[1] - edges[0])
    start = time.perf_counter()
    with _single_threaded():
        m0 = model if model is not None else initial_model(stream, cfg, n_train)[0]
    kws = _strategy_kw(cfg, stream, owner, n_train, w_rows, replicas)
    init = list(stream.batches(cfg.batch_size, max(0, n_train - w_rows), n_train)) \
        if cfg.init_b == "gradients" else None
    row_bytes = ID_BYTES + m0.dim * np.dtype(m0.dtype).itemsize
    report = {"replicas": replicas, "exchange_every": exchange_every, "split": split, "merge": merge,
              "merge_rows": rows,
              "split_feature": stream.cat_names[_split_feature(stream)] if split == "user" else None,
              "backend": backend, "stream": stream.name, "rows": n, "train_rows": n_train,
              "rows_per_replica": np.bincount(owner[n_train:], minlength=replicas).tolist(), "arms": {}}
    rkw = {"merge": merge, "rows": rows}
    with _backend(backend, replicas) as cluster, _single_threaded():
        t0 = time.perf_counter()
        if backend == "ray":
            from .ray_backend import RayReplicaSet

            rs = RayReplicaSet(replicas, m0, kws, init_batches=init, replica_kw=rkw, pin=pin)
        else:
            from .replica import LocalReplicaSet

            rs = LocalReplicaSet(replicas, m0, kws, init_batches=init, replica_kw=rkw)
        report["start_s"] = time.perf_counter() - t0
        try:
            for k, arm in enumerate(arms):
                if k:
                    rs.reset()  # the same replicas (and processes), back at the initial model
                report["arms"][arm] = _run_arm(rs, arm, stream, cfg, owner, edges, replicas, exchange_every,
                                               on_exchange, row_bytes, progress)
        finally:
            if cluster is not None:
                cluster.track()  # the actors' processes, before they go
            rs.close()
        if cluster is not None:
            report["ray"] = {"processes_started": len(cluster.processes)}
    if cluster is not None:
        report["ray"]["processes_left"] = len(cluster.alive_processes())
        report["ray"]["killed_after_shutdown"] = len(cluster.killed)
    _summary(report, stream, edges, cfg)
    report["elapsed_s"] = time.perf_counter() - start
    return report


def _periods(exchange_every):
    """(windows per exchange, exchanges per window) from T."""
    T = float(exchange_every)
    if not np.isfinite(T) or T <= 0:
        raise ValueError(f"`exchange_every` must be > 0 (windows); got {exchange_every}.")
    if T >= 1:
        if T != int(T):
            raise ValueError(f"`exchange_every` must be a whole number of windows, or 1/k of one (0.5, 0.25, ...); "
                             f"got {exchange_every}.")
        return int(T), 1
    k = round(1.0 / T)
    if abs(1.0 / T - k) > 1e-6:
        raise ValueError(f"`exchange_every` below 1 must be 1/k of a window (0.5, 0.25, 0.1, ...); got {exchange_every}.")
    return 1, int(k)


def _serve_range(rs, stream, owner, a0, a1, batch_size, replicas):
    """Serve rows a0:a1 (each replica its rows of every serving batch, in order); rows of
    a lost replica, including those it was serving when it died, go to the survivors."""
    pred = np.full(a1 - a0, np.nan)
    todo = np.arange(a0, a1)
    for _attempt in range(replicas):
        alive = rs.alive()
        if not alive or todo.size == 0:
            break
        own = owner[todo]
        lost = ~np.isin(own, alive)
        own[lost] = np.asarray(alive)[own[lost] % len(alive)]
        parts, where = {}, {}
        for i in alive:
            idx = todo[own == i]
            if idx.size == 0:
                continue
            cuts = np.searchsorted(idx, np.arange(a0, a1, batch_size)[1:])
            parts[i] = [_take(stream, c) for c in np.split(idx, cuts) if c.size]
            where[i] = idx
        for i, p in rs.serve(parts).items():
            pred[where[i] - a0] = p
        todo = np.flatnonzero(np.isnan(pred)) + a0
    return pred


def _exchange(rs, arm, w, on_exchange, row_bytes):
    """One exchange period's end: both phases, and what a delta would have shipped."""
    changed = rs.changed_rows()
    rec = {"window": w, "changed_rows": int(changed), "delta_bytes": int(changed * row_bytes), "published": 0,
           "bytes_exchanged": 0, "dropped_energy": 0.0, "folded_rows": 0, "merge_s": 0.0, "failed": [],
           "replicas": len(rs.alive())}
    if not rs.alive():
        return rec
    pub = rs.publish()
    if on_exchange is not None:
        on_exchange(arm, w, rs)
    mer = rs.merge()
    rec["published"] = int(sum(p["sent"] for p in pub.values()))
    rec["bytes_exchanged"] = rec["published"] + int(sum(m["received"] for m in mer.values()))
    for m in mer.values():
        rec["dropped_energy"] = max(rec["dropped_energy"], m["dropped_energy"])
        rec["folded_rows"] += m["folded_rows"]
        rec["merge_s"] = max(rec["merge_s"], m["merge_s"])
        rec["failed"] += [{"replica": m["replica"], "peer": p} for p in m["failed"]]
    return rec


def _run_arm(rs, arm, stream, cfg, owner, edges, replicas, exchange_every, on_exchange, row_bytes, progress):
    t0 = time.perf_counter()
    every_w, per_w = _periods(exchange_every)
    ser = {k: [] for k in ("auc", "logloss", "bytes_exchanged", "delta_bytes", "alive", "unserved_rows")}
    ser["exchanges"] = []
    preds = []
    try:
        for w in range(cfg.windows):
            a0, a1 = int(edges[w]), int(edges[w + 1])
            # period ends on the serving-batch grid: the batches are the same for every T
            b = cfg.batch_size
            cuts = np.unique(np.r_[a0 + (np.linspace(0, a1 - a0, per_w + 1)[1:-1] // b).astype(np.int64) * b, a0, a1])
            pred, moved, delta = [], 0, 0
            for c0, c1 in zip(cuts[:-1], cuts[1:]):
                pred.append(_serve_range(rs, stream, owner, int(c0), int(c1), cfg.batch_size, replicas))
                if arm == "exchanging" and (w + 1) % every_w == 0:
                    rec = _exchange(rs, arm, w, on_exchange, row_bytes)
                    ser["exchanges"].append(rec)
                    moved += rec["bytes_exchanged"]
                    delta += rec["delta_bytes"]
            if arm == "isolated":
                delta = int(rs.changed_rows() * row_bytes)
            pred = np.concatenate(pred)
            y = stream.labels[a0:a1]
            ok = ~np.isnan(pred)
            ser["auc"].append(auc(y[ok], pred[ok]))
            ser["logloss"].append(logloss(y[ok], pred[ok]))
            ser["bytes_exchanged"].append(int(moved))
            ser["delta_bytes"].append(int(delta))
            ser["alive"].append(len(rs.alive()))
            ser["unserved_rows"].append(int((~ok).sum()))
            preds.append(pred)
            if progress:
                print(f"replicas, {arm}: window {w + 1}/{cfg.windows}, AUC {ser['auc'][-1]:.4f}", file=sys.stderr)
        ser["final"] = rs.stats()
    finally:
        ser["lost"] = list(rs.lost)
    p = np.concatenate(preds)
    y = stream.labels[int(edges[0]):int(edges[-1])]
    ok = ~np.isnan(p)
    ser["auc_overall"] = auc(y[ok], p[ok])
    ser["logloss_overall"] = logloss(y[ok], p[ok])
    ser["elapsed_s"] = time.perf_counter() - t0
    return ser


def _summary(report, stream, edges, cfg):
    arms = report["arms"]
    summ = {}
    if "exchanging" in arms:
        # one period per exchange; the last may have no exchange after it (T > 1)
        ex = [e for e in arms["exchanging"]["exchanges"] if e["bytes_exchanged"]]
        ratios = [e["delta_bytes"] / e["bytes_exchanged"] for e in ex]
        like = [e["delta_bytes"] / e["published"] for e in ex]
        summ.update({
            "exchanges": len(ex),
            "bytes_exchanged_per_period": float(np.median([e["bytes_exchanged"] for e in ex])) if ex else 0.0,
            "bytes_published_per_period": float(np.median([e["published"] for e in ex])) if ex else 0.0,
            "delta_bytes_per_period": float(np.median([e["delta_bytes"] for e in ex])) if ex else 0.0,
            "delta_over_exchanged_median": float(np.median(ratios)) if ratios else None,
            "delta_over_exchanged_min": float(min(ratios)) if ratios else None,
            "delta_over_published_median": float(np.median(like)) if like else None,
            "max_dropped_energy": float(max((e["dropped_energy"] for e in ex), default=0.0)),
        })
    if len(arms) == 2:
        iso, exa = arms["isolated"], arms["exchanging"]
        diff = np.asarray(exa["auc"]) - np.asarray(iso["auc"])
        m, lo, hi = bootstrap_ci(diff, n_boot=cfg.bootstrap, seed=cfg.seed)
        summ.update({"auc_isolated": iso["auc_overall"], "auc_exchanging": exa["auc_overall"],
                     "auc_gain": exa["auc_overall"] - iso["auc_overall"], "window_auc_gain_mean": m,
                     "window_auc_gain_ci95": [lo, hi]})
        report["bars"] = {
            "exchanging_auc_at_least_isolated": bool(summ["auc_gain"] >= 0),
            "exchange_bytes_5x_below_delta": bool(summ["delta_over_exchanged_min"] is not None
                                                  and summ["delta_over_exchanged_min"] >= 5.0),
        }
    report["summary"] = summ


def print_replicated(report, file=None, single=None) -> None:
    """The replicas' part of the ``lukern replay`` report (``single``: the single-node
    report, whose lukern and delta AUC are printed beside)."""
    f = file or sys.stdout
    arms = report["arms"]
    split = report["split"] + (f" ({report['split_feature']})" if report.get("split_feature") else "")
    print(f"\nreplicas: {report['replicas']} on {report['backend']}, split by {split}, rows per replica "
          f"{report['rows_per_replica']}, exchange every {report['exchange_every']} window(s), merge "
          f"{report.get('merge')} ({report.get('merge_rows')} per row)", file=f)
    names = [a for a in ARMS if a in arms]
    ex = arms.get("exchanging")
    head = "".join(f"{a + ' AUC':>16}" for a in names)
    print(f"{'window':>6}{head}" + (f"{'exchanged':>13}{'delta ships':>14}" if ex else ""), file=f)
    for w in range(len(arms[names[0]]["auc"])):
        cols = "".join(f"{arms[a]['auc'][w]:>16.4f}" for a in names)
        if ex is not None:
            cols += f"{ex['bytes_exchanged'][w] / 1e3:>10.1f} kB{ex['delta_bytes'][w] / 1e3:>11.1f} kB"
        print(f"{w:>6}{cols}", file=f)
    for a in names:
        print(f"{a:<14} overall AUC {arms[a]['auc_overall']:.4f}  logloss {arms[a]['logloss_overall']:.4f}", file=f)
    if single is not None:
        for name in ("lukern", "delta"):
            st = single.get("strategies", {}).get(name)
            if st is not None:
                print(f"{'single ' + name:<14} overall AUC {st['auc']:.4f}  (one node, all the traffic)", file=f)
    s = report.get("summary") or {}
    if "auc_gain" in s:
        lo, hi = s["window_auc_gain_ci95"]
        print(f"exchanging - isolated: overall AUC {s['auc_gain']:+.4f}; per window {s['window_auc_gain_mean']:+.4f} "
              f"(95% CI {lo:+.4f}, {hi:+.4f})", file=f)
    if s.get("delta_over_exchanged_median") is not None:
        print(f"per exchange period (median of {s['exchanges']}): exchanged {s['bytes_exchanged_per_period'] / 1e3:.1f} "
              f"kB (published {s['bytes_published_per_period'] / 1e3:.1f} kB + downloads); delta would ship "
              f"{s['delta_bytes_per_period'] / 1e3:.1f} kB (changed rows, uploads only): "
              f"{s['delta_over_exchanged_median']:.1f}x (min {s['delta_over_exchanged_min']:.1f}x; uploads vs "
              f"uploads {s['delta_over_published_median']:.1f}x); largest dropped energy "
              f"{100 * s['max_dropped_energy']:.2f}%", file=f)
    if report.get("bars"):
        print("bars: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in report["bars"].items()), file=f)
    for a in names:
        for lost in arms[a]["lost"]:
            print(f"{a}: replica {lost['replica']} was lost during {lost['phase']} ({lost['error']}); its rows "
                  "went to the others", file=f)
        fails = [x for e in arms[a].get("exchanges", []) for x in e["failed"]]
        if fails:
            print(f"{a}: {len(fails)} snapshot(s) could not be fetched and were skipped", file=f)
    if "ray" in report:
        r = report["ray"]
        print(f"ray: {r['processes_started']} processes started, {r.get('processes_left', 0)} left after shutdown",
              file=f)
    print(f"elapsed {report['elapsed_s']:.1f} s", file=f)
