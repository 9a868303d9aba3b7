"""Embedding-gradient spectra on real logs, and a training run with the rank controller.

    python -m lukern.bench gradient_spectrum                  # both data sets
    python -m lukern.bench gradient_spectrum --data movielens --max-rows 30000

Part 1 (spectra): a DLRM with d = 64 is trained online, in time order, on MovieLens
ml-latest-small (label rating >= 4) and the TalkingData AdTracking sample (label
is_attributed); every batch's embedding gradient (one row per touched row of a table) is
kept, and for windows of 1 and of 50 batches the script reports the share of the
gradient energy held by the top 1%, 5% and 10% of the d singular directions (1, 3 and 6
of 64; a Gaussian matrix of the same shape would hold about 1.6%, 4.7% and 9.4%).

Part 2 (controller): a DLRM (``--dim``, default 64) is trained on the first 60% of the
log and frozen; LoRA adapters (one per table) then learn from the next 30% as a
co-located trainer would (gradient of the loss with respect to the pooled embeddings),
and the last 10% is the test set. Four runs per seed:

- ``controlled``: adapters under :class:`lukern.RankController`, starting like the
  reference (rank 16, LoRAAdapter's default capacity), with one budget for all tables:
  adapters' bytes, the controllers' gradient windows and row bookkeeping stay under
  ``--budget`` (1%) of the model's embedding bytes at every step (checked after every
  step; the controllers also keep the worst-case bound). The budget is water-filled over
  what each table would need to hold all its rows at rank 16 (``split_budget``);
- ``fixed_rank16``: rank-16 adapters with LoRAAdapter's defaults (capacity 1% of rows,
  at least 64), the bar's reference; its own memory is reported (it is not held to the
  budget: on MovieLens it takes 2.3% of the tables);
- ``fixed_rank16_same_capacity``: rank-16 adapters with the controlled run's final
  capacities (fair on rows; memory reported, usually over the budget);
- ``fixed_rank16_all_rows``: room for every row (about half the tables' bytes; context).

``--seeds N`` repeats them with N seeds and prints the ratios' mean and standard error,
paired by seed (the TalkingData sample has about 20 positives in its test tenth, so one
seed cannot resolve a 0.5% difference).

    python -m lukern.bench gradient_spectrum --skip-spectra --seeds 8

Measured (8 seeds, mean +- s.e. of the paired ratio of test log losses; memory = the
largest share of the tables' bytes after any step, adapters + windows + bookkeeping):

- TalkingData: controlled / fixed rank-16 0.855 +- 0.017 (8 of 8 seeds within 0.5%);
  controlled / fixed rank-16 at the controlled run's capacities 1.009 +- 0.007 (3 of 8
  within 0.5%: the reference has the final capacities from step 0, the controller
  finds them after 60-200 steps). Memory: controlled 0.72% (bound 0.97%), fixed
  rank-16 0.84% (bound 1.20%). The controllers keep rank 16, fold the ip table to 475
  rows and give the 130-161-row tables every row.
- MovieLens: 0.876 +- 0.017 (8 of 8) and 0.916 +- 0.019; memory 0.92% against 2.29%
  for the fixed rank-16 adapters, which make the model worse than the frozen one
  (1.13x its test log loss): at 1% the controllers keep rank 1 and 32-60 rows, close
  to frozen.
- RankController's own defaults (``--energy 0.95 --shrink-after 0 --ties rows``,
  TalkingData, 6 seeds): 0.930 +- 0.026 and 1.134 +- 0.019 at equal capacities; the
  energy shrink takes every table to rank 1-3.

Data: ``/work/shared/data`` (or ``$LUKERN_DATA``); a data set whose file is absent is
skipped with a message (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from .. import GradientWindow, LoRAAdapter, RankController, probe_rank
from ..rank import _TRACK_ROWS, adapter_bytes
from ..replay.dlrm import DLRM, bce_with_logits
from ..replay.streams import read_movielens, read_talkingdata

_FILES = {
    "movielens": ("ml-latest-small_ratings.csv.gz", read_movielens),
    "talkingdata": ("talkingdata_adtracking_train_sample.csv.gz", read_talkingdata),
}
SHARES = (0.01, 0.05, 0.10)
_WINDOW_ROWS = 16  # gradient-window rows per controlled table


def _data_dir():
    env = os.environ.get("LUKERN_DATA")
    if env:
        return pathlib.Path(env)
    return pathlib.Path("/work/shared/data")


def _top_counts(d):
    return [max(1, int(round(p * d))) for p in SHARES]


def _shares(M, counts):
    p = probe_rank(np.ascontiguousarray(M, dtype=np.float64))
    if p.total_energy == 0:
        return None
    cum = np.cumsum(p.spectrum ** 2) / p.total_energy
    return [float(cum[min(k, cum.size) - 1]) for k in counts]


def gradient_spectra(stream, *, dim=64, batch_size=256, windows=(1, 50), seed=0):
    """Share of embedding-gradient energy in the top 1/5/10% directions, per table."""
    model = DLRM(stream.cat_sizes, stream.n_dense, dim=dim, seed=seed)
    counts = _top_counts(dim)
    per = {(t, w): [] for t in range(model.n_tables) for w in windows}
    energy = {(t, w): [] for t in range(model.n_tables) for w in windows}
    pending = {t: [] for t in range(model.n_tables)}
    n_batches = 0
    for b in stream.batches(batch_size):
        loss, grads, (rows, g) = model.gradients(b, b.labels)
        model.apply_gradients(grads, (rows, g))
        n_batches += 1
        tab = np.searchsorted(model.row_offsets, rows, side="right") - 1
        for t in range(model.n_tables):
            Gt = g[tab == t].astype(np.float64)
            pending[t].append(Gt)
            for w in windows:
                if n_batches % w == 0:
                    M = np.concatenate(pending[t][-w:])
                    if M.shape[0] >= dim:  # fewer rows than d: the spectrum is trivially short
                        s = _shares(M, counts)
                        if s is not None:
                            per[(t, w)].append(s)
                            energy[(t, w)].append(float(np.sum(M * M)))
            keep = max(windows)
            if len(pending[t]) > keep:
                pending[t] = pending[t][-keep:]
    out = []
    for (t, w), vals in per.items():
        if not vals:
            continue
        v = np.asarray(vals)
        e = np.asarray(energy[(t, w)])
        out.append({"table": stream.cat_names[t], "rows": stream.cat_sizes[t], "window_batches": w,
                    "n_windows": len(vals), "directions": counts,
                    "median_share": np.median(v, axis=0).round(4).tolist(),
                    "energy_weighted_share": (e @ v / e.sum()).round(4).tolist()})
    return out


def _split(n):
    return int(0.6 * n), int(0.9 * n)


def _test_loss(model, stream, start, adapters=None, batch_size=4096):
    tot, cnt = 0.0, 0
    for b in stream.batches(batch_size, start):
        logits = model.forward(b, adapters=adapters)[0]
        tot += bce_with_logits(logits, b.labels) * len(b)
        cnt += len(b)
    return tot / max(cnt, 1)


def split_budget(demand, total):
    """Water-filling: every table gets ``min(demand, level)`` with the level chosen so the
    shares sum to ``total`` (a table asking less than its fair part gets all it asks; the
    rest share what remains equally). When everything fits, shares grow in proportion."""
    demand = np.asarray(demand, np.float64)
    if demand.sum() <= total:
        return demand * (total / demand.sum())
    lo, hi = 0.0, float(demand.max())
    for _ in range(200):
        level = 0.5 * (lo + hi)
        lo, hi = (lo, level) if np.minimum(demand, level).sum() > total else (level, hi)
    return np.minimum(demand, lo)


def _train_adapters(model, stream, adapters, ctls, tables, start, stop, batch_size):
    T, dim = model.n_tables, model.dim
    worst = 0.0
    prog, cnt = 0.0, 0
    t0 = time.perf_counter()
    for b in stream.batches(batch_size, start, stop):
        loss, g = model.grad_pooled(b, b.labels, adapters=adapters)
        prog += loss * len(b)
        cnt += len(b)
        g = g.reshape(len(b), T, dim)
        off = np.arange(len(b) + 1, dtype=np.int64)
        for t, a in enumerate(adapters):
            a.train_step(tables[t], np.ascontiguousarray(b.cat[:, t], dtype=np.int64), off,
                         np.ascontiguousarray(g[:, t, :]))
        for c in ctls:
            c.step()
        used = (sum(a.nbytes for a in adapters) + sum(c.window.nbytes + c.scratch_nbytes for c in ctls)) \
            / model.table_nbytes
        worst = max(worst, used)
    return dict(progressive_logloss=prog / max(cnt, 1), max_adapter_bytes_share=worst,
                seconds=time.perf_counter() - t0)


def controller_run(stream, *, dim=64, batch_size=64, budget_total=0.01, every=20, energy=0.95, seed=0, lr_a=0.05,
                   lr_b=0.01, grow_threshold=0.9, shrink_after=0, max_rank=16, ties="rows"):
    """Fixed rank-16 adapters against controller-managed ones; losses and memory."""
    kw = dict(lr_a=lr_a, lr_b=lr_b)
    n = len(stream)
    n_pre, n_upd = _split(n)
    base = DLRM(stream.cat_sizes, stream.n_dense, dim=dim, seed=seed)
    base.fit(stream, 0, n_pre, epochs=1, batch_size=256, seed=seed)
    res = {"rows": n, "pretrain_rows": n_pre, "update_rows": n_upd - n_pre, "test_rows": n - n_upd,
           "frozen_test_logloss": _test_loss(base, stream, n_upd), "table_bytes": base.table_nbytes}
    T = base.n_tables
    # the controlled run goes first: the capacity-matched reference copies its capacities
    for variant in ("controlled", "fixed_rank16", "fixed_rank16_same_capacity", "fixed_rank16_all_rows"):
        model = base.copy()
        tables = [model.table(t) for t in range(T)]
        ctls = []
        if variant == "fixed_rank16":  # the bar's reference: LoRAAdapter's defaults, no controller
            adapters = [LoRAAdapter(s, dim, rank=16, seed=seed + t, **kw) for t, s in enumerate(stream.cat_sizes)]
        elif variant == "fixed_rank16_same_capacity":  # fair on rows: the controlled run's final capacities
            if "final_capacities" not in res["controlled"]:
                continue
            adapters = [LoRAAdapter(s, dim, rank=16, capacity=res["controlled"]["final_capacities"][t], seed=seed + t,
                                    **kw) for t, s in enumerate(stream.cat_sizes)]
        elif variant == "fixed_rank16_all_rows":  # context: room for every row, no budget
            adapters = [LoRAAdapter(s, dim, rank=16, capacity=s, seed=seed + t, **kw)
                        for t, s in enumerate(stream.cat_sizes)]
        else:
            # One budget for all tables: the adapters' total bytes (with their gradient
            # windows) stay under budget_total of the model's embedding bytes. A table's
            # own 1% cannot hold even a rank-1 adapter when the table is small (the hash,
            # bitmap and B's optimizer state do not shrink with it), so the budget is
            # water-filled over what each table would need to hold all its rows at
            # max_rank: small tables get all they ask, the large one the rest. The
            # controlled adapters start like the reference (rank max_rank, LoRAAdapter's
            # default capacity); the controllers move rank and capacity from there.
            limit = 0.99 * budget_total * model.table_nbytes
            window_bytes = GradientWindow(dim, _WINDOW_ROWS).nbytes  # counts against the budget
            adapters = [LoRAAdapter(sz, dim, rank=max_rank, seed=seed + t, **kw)
                        for t, sz in enumerate(stream.cat_sizes)]
            # (scratch: the controller's row bookkeeping, RankController.scratch_nbytes:
            # 8 bytes and up to 64 filter bits a tracked id, at most 512 ids and 1/16 of
            # the budget)
            def scratch(n_rows, nbytes):
                k = int(max(1, min(n_rows, _TRACK_ROWS, nbytes // 256)))
                return 8 * k + -(-min(n_rows, 64 * k) // 8)
            demand = [adapter_bytes(a, a.n_rows, max_rank) + window_bytes + scratch(a.n_rows, np.inf)
                      for a in adapters]
            shares = split_budget(demand, limit)
            least = np.array([adapter_bytes(a, 1, 1) + window_bytes + scratch(a.n_rows, sh)
                              for a, sh in zip(adapters, shares)], np.float64)
            if np.any(shares < least):
                # a rank-1 adapter with one slot and its window does not fit in some
                # table's share: there is nothing for a controller to control
                res[variant] = {"infeasible": [f"{stream.cat_names[t]}: {shares[t]:.0f} < {least[t]:.0f} bytes"
                                               for t in np.flatnonzero(shares < least)]}
                continue
            for t, a in enumerate(adapters):
                ctls.append(RankController(a, tables[t], budget=shares[t] / tables[t].nbytes, energy=energy,
                                           max_rank=max_rank, every=every, window=GradientWindow(dim, _WINDOW_ROWS),
                                           grow_threshold=grow_threshold, shrink_after=shrink_after, ties=ties))
            for c in ctls:
                c.step()  # first call: fit the budget before any training step
        r = _train_adapters(model, stream, adapters, ctls, tables, n_pre, n_upd, batch_size)
        res[variant] = {
            "test_logloss": _test_loss(model, stream, n_upd, adapters),
            **r,
            # worst-case bytes (pending-gradient buffers at their largest) at the end
            "bound_share": (sum(adapter_bytes(a, a.capacity, a.rank) for a in adapters)
                            + sum(c.window.nbytes + c.scratch_nbytes for c in ctls)) / model.table_nbytes,
            "final_ranks": [a.rank for a in adapters],
            "final_capacities": [a.capacity for a in adapters],
        }
        if ctls:
            res[variant]["decisions"] = sum(len(c.log) for c in ctls)
            res[variant]["actions"] = sorted({x["action"] for c in ctls for d in c.log for x in d["actions"]})
            res[variant]["last_decisions"] = [
                {k: v for k, v in c.log[-1].items() if k != "actions"} | {"actions": [x["action"] for x in
                                                                                   c.log[-1]["actions"]]}
                for c in ctls if c.log]
    if "test_logloss" in res["controlled"]:
        k = res["controlled"]["test_logloss"]
        res["controlled_over_fixed"] = k / res["fixed_rank16"]["test_logloss"]
        res["controlled_over_fixed_same_capacity"] = k / res["fixed_rank16_same_capacity"]["test_logloss"]
        res["controlled_over_fixed_all_rows"] = k / res["fixed_rank16_all_rows"]["test_logloss"]
    return res


def _stats(x):
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max())}


def _summary(runs):
    """Ratios controlled / fixed rank-16 over seeds (paired by seed), and memory."""
    ok = [c for c in runs if "controlled_over_fixed" in c]
    if not ok:
        return None
    test = np.array([c["controlled_over_fixed"] for c in ok])
    same = np.array([c["controlled_over_fixed_same_capacity"] for c in ok])
    prog = np.array([c["controlled"]["progressive_logloss"] / c["fixed_rank16"]["progressive_logloss"] for c in ok])
    # the spread of the reference itself against the frozen model says how much is noise
    fixed_vs_frozen = np.array([c["fixed_rank16"]["test_logloss"] / c["frozen_test_logloss"] for c in ok])
    mem = {v: float(max(c[v]["max_adapter_bytes_share"] for c in ok))
           for v in ("controlled", "fixed_rank16", "fixed_rank16_same_capacity")}
    bound = {v: float(max(c[v]["bound_share"] for c in ok))
             for v in ("controlled", "fixed_rank16", "fixed_rank16_same_capacity")}
    return {"seeds": len(ok), "test_ratio": _stats(test), "test_ratio_same_capacity": _stats(same),
            "progressive_ratio": _stats(prog), "fixed_over_frozen_test": _stats(fixed_vs_frozen),
            "seeds_within_0.5pct": int(np.sum(test <= 1.005)),
            "seeds_within_0.5pct_same_capacity": int(np.sum(same <= 1.005)),
            "max_adapter_bytes_share": mem["controlled"], "max_bytes_share": mem, "bound_share": bound,
            "final_ranks": [c["controlled"]["final_ranks"] for c in ok],
            "final_capacities": [c["controlled"]["final_capacities"] for c in ok]}


def _summary_line(name, s):
    def f(x):
        return f"{x['mean']:.4f} +- {x['se']:.4f} (min {x['min']:.4f}, max {x['max']:.4f})"
    m, b = s["max_bytes_share"], s["bound_share"]
    return (f"{name:<12} over {s['seeds']} seeds (mean +- s.e., paired by seed): controlled / fixed rank-16 test "
            f"log loss {f(s['test_ratio'])} ({s['seeds_within_0.5pct']} seeds within 0.5%); controlled / fixed "
            f"rank-16 at the controlled run's capacities {f(s['test_ratio_same_capacity'])} "
            f"({s['seeds_within_0.5pct_same_capacity']} within 0.5%); progressive {f(s['progressive_ratio'])}; "
            f"fixed / frozen test {f(s['fixed_over_frozen_test'])}. Max bytes at any step (adapters + windows, % of "
            f"the tables): controlled {100 * m['controlled']:.3f}% (worst-case bound at the end "
            f"{100 * b['controlled']:.3f}%), fixed rank-16 {100 * m['fixed_rank16']:.3f}% "
            f"({100 * b['fixed_rank16']:.3f}%), fixed rank-16 same capacities "
            f"{100 * m['fixed_rank16_same_capacity']:.3f}% ({100 * b['fixed_rank16_same_capacity']:.3f}%)")


def _controller_line(name, c, budget):
    k = c["controlled"]
    if k.get("infeasible"):
        return (f"{name:<12} controlled: infeasible at a {100 * budget:g}% budget (a table's share below a rank-1 "
                f"one-slot adapter and its window: {'; '.join(k['infeasible'])})")

    def v(key):
        x = c[key]
        return (f"{x['test_logloss']:.5f} (max {100 * x['max_adapter_bytes_share']:.3f}% of tables, bound "
                f"{100 * x['bound_share']:.3f}%)")
    return (f"{name:<12} frozen model test log loss {c['frozen_test_logloss']:.5f}; fixed rank-16 (default capacity): "
            f"{v('fixed_rank16')}; fixed rank-16 (controlled run's capacities {k['final_capacities']}): "
            f"{v('fixed_rank16_same_capacity')}; fixed rank-16 (all rows): {v('fixed_rank16_all_rows')}; "
            f"controlled: {v('controlled')}, ranks {k['final_ranks']}, capacities {k['final_capacities']}, "
            f"{k['decisions']} decisions {k['actions']}; controlled / fixed {c['controlled_over_fixed']:.4f}, "
            f"/ same capacities {c['controlled_over_fixed_same_capacity']:.4f}, / all rows "
            f"{c['controlled_over_fixed_all_rows']:.4f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lukern.bench gradient_spectrum", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="movielens,talkingdata")
    p.add_argument("--max-rows", type=int, default=None, help="read only the first rows of each file")
    p.add_argument("--skip-spectra", action="store_true")
    p.add_argument("--skip-controller", action="store_true")
    p.add_argument("--dim", type=int, default=64, help="embedding width of the controller run")
    p.add_argument("--batch", type=int, default=64, help="adapter training batch of the controller run")
    p.add_argument("--every", type=int, default=20, help="controller period (training steps)")
    p.add_argument("--budget", type=float, default=0.01,
                   help="controlled adapters' bytes (with their gradient windows) as a share of the tables' bytes")
    # defaults: the controller settings that did best on TalkingData (RankController's own
    # defaults, energy 0.95, shrink_after 0, ties "rows", are reported in the docstring)
    p.add_argument("--energy", type=float, default=1.0, help="the controllers' energy share")
    p.add_argument("--grow-threshold", type=float, default=0.9,
                   help="the controllers' grow_threshold (residual gradient energy that adds rank)")
    p.add_argument("--lr-a", type=float, default=0.05, help="adapters' learning rate of A (LoRAAdapter's default)")
    p.add_argument("--lr-b", type=float, default=0.01, help="adapters' learning rate of B (LoRAAdapter's default)")
    p.add_argument("--shrink-after", type=int, default=100,
                   help="the controllers' shrink_after (adapter steps before the first shrink)")
    p.add_argument("--ties", default="rank", choices=("rows", "rank"),
                   help="the controllers' ties (budget choice when folding and lowering the rank lose the same)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and adapters")
    p.add_argument("--seeds", type=int, default=1, help="controller runs with seeds seed, seed + 1, ... (a summary)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    names = a.data.split(",")
    unknown = [n for n in names if n not in _FILES]
    if unknown:
        p.error(f"--data takes a comma-separated subset of {sorted(_FILES)}; got {unknown}")
    folder = _data_dir()
    report = {}
    for name in names:
        fname, reader = _FILES[name]
        path = folder / fname
        if not path.is_file():  # the data is not redistributable: skip, do not fail
            print(f"{name}: {path} is absent (set LUKERN_DATA to the folder holding it); skipped", file=sys.stderr)
            continue
        stream = reader(path, max_rows=a.max_rows)
        print(stream.describe(), file=sys.stderr, flush=True)
        r = {}
        if not a.skip_spectra:
            r["spectra"] = gradient_spectra(stream)
            for row in r["spectra"]:
                print(f"{name:<12} {row['table']:<8} rows {row['rows']:<7} window {row['window_batches']:>3} batches "
                      f"({row['n_windows']} windows): top {row['directions']} of 64 directions hold "
                      f"median {row['median_share']}, energy-weighted {row['energy_weighted_share']}", flush=True)
        if not a.skip_controller:
            runs = []
            for seed in range(a.seed, a.seed + a.seeds):
                c = controller_run(stream, dim=a.dim, batch_size=a.batch, budget_total=a.budget, every=a.every,
                                   energy=a.energy, seed=seed, lr_a=a.lr_a, lr_b=a.lr_b,
                                   grow_threshold=a.grow_threshold, shrink_after=a.shrink_after, ties=a.ties)
                runs.append(c)
                print(("" if a.seeds == 1 else f"seed {seed} ") + _controller_line(name, c, a.budget), flush=True)
            r["controller"] = runs[0] if a.seeds == 1 else runs
            if a.seeds > 1:
                r["controller_summary"] = summary = _summary(runs)
                if summary:
                    print(_summary_line(name, summary), flush=True)
        report[name] = r
    if a.json:
        print(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
