"""The replay across replicas: ``lukern replay --replicas N [--exchange-every T]``.

The stream after the initial training is split over N replicas (by user, i.e. the first
categorical feature, or at random). Each replica serves and learns its share with its
own co-located LoRA trainer. Two arms run on the same split: *isolated* replicas never
exchange; *exchanging* replicas merge their compact factors every T windows. Reported
per window: AUC over all rows (each scored by the replica that served it), bytes moved
by the exchange (uploads + downloads), and the bytes a delta strategy would have shipped
for the rows the replicas changed in the same period (``k (8 + 4 d)`` per replica).
"""

from __future__ import annotations

import time

import numpy as np

from ..replay.runner import ReplayConfig, auc, bootstrap_ci, logloss
from .exchange import InProcessExchange
from .replica import Replica

__all__ = ["print_replicated", "run_replicated"]


def _assign(stream, n_train, replicas, split, seed):
    rows = np.arange(n_train, len(stream))
    if split == "user":
        key = stream.cat[rows, 0].astype(np.uint64)
        return ((key * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)).astype(np.int64) % replicas
    if split == "random":
        return np.random.default_rng(seed).integers(0, replicas, rows.size)
    raise ValueError(f"`split` must be 'user' or 'random'; got {split!r}.")


def _initial_model(stream, cfg, n_train):
    from ..replay.runner import initial_model

    return initial_model(stream, cfg, n_train)[0]


class _Local:
    """In-process backend: replicas are objects, the exchange a dict."""

    def __init__(self, n, m0, kw):
        self.replicas = {i: Replica(i, m0, kw) for i in range(n)}
        self.exchange_board = InProcessExchange()
        self.lost = []

    def serve(self, parts):
        return {i: self.replicas[i].serve(b) for i, b in parts.items() if i in self.replicas}

    def exchange(self):
        return [self.replicas[i].exchange(self.exchange_board) for i in sorted(self.replicas)]

    def changed_rows(self):
        return sum(r.changed_rows() for r in self.replicas.values())

    def alive(self):
        return sorted(self.replicas)

    def close(self):
        pass


class _RayBackend:
    """Ray backend: one actor per replica, a board actor for the exchange. A replica whose
    actor dies is reported and dropped; the others keep serving and learning."""

    def __init__(self, n, m0, kw):
        from .ray_backend import RayExchange, replica_actor

        import ray

        self.ray = ray
        model_ref = ray.put(m0)  # shared read-only through the object store; each actor copies it
        self.actors = {i: replica_actor(i, model_ref, kw) for i in range(n)}
        self.exchange_board = RayExchange()
        self.lost = []

    def _call(self, calls):
        out = {}
        for i, ref in calls.items():
            try:
                out[i] = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorDiedError) as e:
                self.lost.append({"replica": i, "error": type(e).__name__})
                self.actors.pop(i, None)
                self.exchange_board.forget(i)
        return out

    def serve(self, parts):
        return self._call({i: self.actors[i].serve.remote(b) for i, b in parts.items() if i in self.actors})

    def exchange(self):
        res = self._call({i: a.exchange.remote(self.exchange_board.board) for i, a in self.actors.items()})
        return [res[i] for i in sorted(res)]

    def changed_rows(self):
        return sum(self._call({i: a.changed_rows.remote() for i, a in self.actors.items()}).values())

    def alive(self):
        return sorted(self.actors)

    def kill(self, i):
        """Kill replica ``i``'s actor (tests of failure handling)."""
        self.ray.kill(self.actors[i])

    def close(self):
        for a in self.actors.values():
            self.ray.kill(a)
        self.actors = {}


def run_replicated(stream, cfg: ReplayConfig | None = None, *, replicas: int = 2, exchange_every: int = 1,
                   split: str = "user", backend: str = "inproc", on_window=None) -> dict:
    """Run the isolated and the exchanging arm on ``stream``; return the report dict.

    ``backend`` is ``"inproc"`` or ``"ray"`` (the caller starts Ray, e.g. with
    :class:`lukern.distributed.ray_backend.RayCluster`). ``on_window(arm, w, backend)``
    is called after each window (tests use it to kill a replica mid-run).
    """
    cfg = cfg or ReplayConfig()
    cfg.check()
    if replicas < 1:
        raise ValueError(f"`replicas` must be >= 1; got {replicas}.")
    if exchange_every < 1:
        raise ValueError(f"`exchange_every` must be >= 1; got {exchange_every}.")
    if backend not in ("inproc", "ray"):
        raise ValueError(f"`backend` must be 'inproc' or 'ray'; got {backend!r}.")
    n = len(stream)
    n_train = int(n * cfg.train_frac)
    edges = np.linspace(n_train, n, cfg.windows + 1).astype(np.int64)
    start = time.perf_counter()
    m0 = _initial_model(stream, cfg, n_train)
    owner = _assign(stream, n_train, replicas, split, cfg.seed)
    kw = dict(rank=cfg.rank, alpha=cfg.alpha, lr_a=cfg.lr_a, lr_b=cfg.lr_b, budget_pct=cfg.budget_pct,
              rank_control=False)
    report = {"replicas": replicas, "exchange_every": exchange_every, "split": split, "backend": backend,
              "stream": stream.name, "rows": n, "train_rows": n_train, "arms": {}}
    for arm in ("isolated", "exchanging"):
        be = (_Local if backend == "inproc" else _RayBackend)(replicas, m0, kw)
        ser = {"auc": [], "logloss": [], "bytes_exchanged": [], "delta_bytes": [], "dropped_energy": [],
               "alive": []}
        try:
            for w in range(cfg.windows):
                a0, a1 = int(edges[w]), int(edges[w + 1])
                pred = np.full(a1 - a0, np.nan)
                for a in range(a0, a1, cfg.batch_size):
                    b1 = min(a1, a + cfg.batch_size)
                    own = owner[a - n_train:b1 - n_train]
                    alive = be.alive()
                    # rows of a lost replica go to the survivors
                    own = np.where(np.isin(own, alive), own, np.asarray(alive)[own % len(alive)])
                    parts, where = {}, {}
                    for i in alive:
                        sel = np.flatnonzero(own == i)
                        if sel.size:
                            rows = a + sel
                            parts[i] = _take(stream, rows)
                            where[i] = sel
                    for i, p in be.serve(parts).items():
                        pred[a - a0 + where[i]] = p
                changed = be.changed_rows()
                moved, dropped = 0, 0.0
                if arm == "exchanging" and (w + 1) % exchange_every == 0:
                    for r in be.exchange():
                        moved += r["sent"] + r["received"]
                        dropped = max(dropped, r["dropped_energy"])
                y = stream.labels[a0:a1]
                ok = ~np.isnan(pred)
                ser["auc"].append(auc(y[ok], pred[ok]))
                ser["logloss"].append(logloss(y[ok], pred[ok]))
                ser["bytes_exchanged"].append(int(moved))
                ser["delta_bytes"].append(int(changed * (8 + 4 * m0.dim)))
                ser["dropped_energy"].append(dropped)
                ser["alive"].append(len(be.alive()))
                if on_window is not None:
                    on_window(arm, w, be)
        finally:
            ser["lost"] = list(be.lost)
            be.close()
        y_all = stream.labels[int(edges[0]):int(edges[-1])]
        ser["auc_mean"] = float(np.nanmean(ser["auc"]))
        report["arms"][arm] = ser
        del y_all
    iso, ex = report["arms"]["isolated"], report["arms"]["exchanging"]
    diff = np.array(ex["auc"]) - np.array(iso["auc"])
    _, lo, hi = bootstrap_ci(diff, n_boot=cfg.bootstrap, seed=cfg.seed)
    periods = [i for i, b in enumerate(ex["bytes_exchanged"]) if b > 0]
    ratio = (float(np.mean([ex["delta_bytes"][i] / ex["bytes_exchanged"][i] for i in periods]))
             if periods else float("nan"))
    report["summary"] = {"auc_gain_mean": float(diff.mean()), "auc_gain_ci95": [lo, hi],
                         "delta_over_exchanged_bytes": ratio,
                         "bytes_exchanged_per_period": float(np.mean([ex["bytes_exchanged"][i] for i in periods]))
                         if periods else 0.0}
    report["elapsed_s"] = time.perf_counter() - start
    return report


def _take(stream, rows):
    from ..replay.streams import Batch

    return Batch(stream.t[rows], stream.dense[rows], stream.cat[rows], stream.labels[rows])


def print_replicated(report, file=None) -> None:
    import sys

    f = file or sys.stdout
    iso, ex = report["arms"]["isolated"], report["arms"]["exchanging"]
    print(f"\nreplicas: {report['replicas']} ({report['backend']}, split by {report['split']}), exchange every "
          f"{report['exchange_every']} window(s)", file=f)
    print(f"{'window':>6} {'isolated AUC':>13} {'exchanging AUC':>15} {'exchanged':>11} {'delta would ship':>17}",
          file=f)
    for w in range(len(iso["auc"])):
        print(f"{w:>6} {iso['auc'][w]:>13.4f} {ex['auc'][w]:>15.4f} {ex['bytes_exchanged'][w] / 1e3:>8.1f} kB "
              f"{ex['delta_bytes'][w] / 1e3:>14.1f} kB", file=f)
    s = report["summary"]
    print(f"exchanging - isolated AUC per window: {s['auc_gain_mean']:+.4f} (95% CI {s['auc_gain_ci95'][0]:+.4f}, "
          f"{s['auc_gain_ci95'][1]:+.4f}); delta / exchanged bytes: {s['delta_over_exchanged_bytes']:.1f}x", file=f)
    for arm in ("isolated", "exchanging"):
        for lost in report["arms"][arm]["lost"]:
            print(f"{arm}: replica {lost['replica']} was lost ({lost['error']}); its rows went to the others", file=f)
