"""Embedding-gradient spectra on real logs, and a training run with the rank controller.

    python -m lukern.bench gradient_spectrum                  # both data sets
    python -m lukern.bench gradient_spectrum --data movielens --max-rows 30000

Part 1 (spectra): a DLRM with d = 64 is trained online, in time order, on MovieLens
ml-latest-small (label rating >= 4) and the TalkingData AdTracking sample (label
is_attributed); every batch's embedding gradient (one row per touched row of a table) is
kept, and for windows of 1 and of 50 batches the script reports the share of the
gradient energy held by the top 1%, 5% and 10% of the d singular directions (1, 3 and 6
of 64; a Gaussian matrix of the same shape would hold about 1.6%, 4.7% and 9.4%).

Part 2 (controller): a d = 16 DLRM is trained on the first 60% of the log and frozen;
LoRA adapters (one per table) then learn from the next 30% as a co-located trainer would
(gradient of the loss with respect to the pooled embeddings), and the last 10% is the
test set. Two runs: fixed rank-16 adapters with room for every row, and adapters under
:class:`lukern.RankController` with the adapters' total bytes kept under 1% of the
model's embedding bytes (adapters' ``nbytes`` plus the controllers' gradient windows,
checked after every step). Prints the final log losses; the bar's reference is the
fixed rank-16 adapter with LoRAAdapter's default capacity (1% of rows, at least 64),
the all-rows one (64% of the table bytes) is shown for context.

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
from ..rank import adapter_bytes
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


def controller_run(stream, *, dim=64, batch_size=64, budget_total=0.01, every=20, seed=0):
    """Fixed rank-16 adapters against controller-managed ones; losses and memory."""
    n = len(stream)
    n_pre, n_upd = _split(n)
    base = DLRM(stream.cat_sizes, stream.n_dense, dim=dim, seed=seed)
    base.fit(stream, 0, n_pre, epochs=1, batch_size=256, seed=seed)
    res = {"rows": n, "pretrain_rows": n_pre, "update_rows": n_upd - n_pre, "test_rows": n - n_upd,
           "frozen_test_logloss": _test_loss(base, stream, n_upd), "table_bytes": base.table_nbytes}
    T = base.n_tables
    for variant in ("fixed_rank16", "fixed_rank16_all_rows", "controlled"):
        model = base.copy()
        tables = [model.table(t) for t in range(T)]
        if variant == "fixed_rank16":  # the bar's reference: default capacity, no controller
            adapters = [LoRAAdapter(s, dim, rank=16, seed=seed + t) for t, s in enumerate(stream.cat_sizes)]
            ctls = []
        elif variant == "fixed_rank16_all_rows":  # context: room for every row, no budget
            adapters = [LoRAAdapter(s, dim, rank=16, capacity=s, seed=seed + t) for t, s in enumerate(stream.cat_sizes)]
            ctls = []
        else:
            # one budget for all tables: total adapter bytes stay under budget_total of
            # the model's embedding bytes. A table's own 1% cannot hold even a rank-1
            # adapter when the table is small (610 users x 64 floats = 156 KB; the
            # adapter's hash and bookkeeping cost ~100 bytes per slot), so the budget is
            # split in proportion to what each default-capacity adapter needs at rank 1.
            limit = 0.99 * budget_total * model.table_nbytes
            window_bytes = GradientWindow(dim, _WINDOW_ROWS).nbytes  # counts against the budget
            need = np.array([adapter_bytes(LoRAAdapter(sz, dim, rank=1), max(64, sz // 100), 1) + window_bytes
                             for sz in stream.cat_sizes], np.float64)
            shares = limit * need / need.sum()
            least = np.array([adapter_bytes(LoRAAdapter(sz, dim, rank=1), 1, 1) + window_bytes
                              for sz in stream.cat_sizes], np.float64)
            room = np.minimum(shares, [tb.nbytes for tb in tables])  # a budget is at most the table's bytes
            if np.any(room < least):
                # a rank-1 adapter with one slot and its window does not fit in some
                # table's share: there is nothing for a controller to control
                res[variant] = {"infeasible": [f"{stream.cat_names[t]}: {room[t]:.0f} < {least[t]:.0f} bytes"
                                               for t in np.flatnonzero(room < least)]}
                continue
            adapters, ctls = [], []
            for t, sz in enumerate(stream.cat_sizes):
                a = LoRAAdapter(sz, dim, rank=8, seed=seed + t)  # default capacity: 1% of rows, >= 64
                ctls.append(RankController(a, tables[t], budget=min(1.0, shares[t] / tables[t].nbytes), energy=0.95,
                                           max_rank=16, every=every, window=GradientWindow(dim, _WINDOW_ROWS)))
                adapters.append(a)
            for c in ctls:
                c.step()  # first call: fit the budget before any training step
        worst = 0.0
        prog, cnt = 0.0, 0
        t0 = time.perf_counter()
        for b in stream.batches(batch_size, n_pre, n_upd):
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
            used = (sum(a.nbytes for a in adapters) + sum(c.window.nbytes for c in ctls)) / model.table_nbytes
            worst = max(worst, used)
        res[variant] = {
            "test_logloss": _test_loss(model, stream, n_upd, adapters),
            "progressive_logloss": prog / max(cnt, 1),
            "max_adapter_bytes_share": worst,  # adapters' nbytes + gradient windows, over all tables
            "final_ranks": [a.rank for a in adapters],
            "final_capacities": [a.capacity for a in adapters],
            "seconds": time.perf_counter() - t0,
        }
        if ctls:
            res[variant]["decisions"] = sum(len(c.log) for c in ctls)
            res[variant]["bound_share"] = sum(adapter_bytes(a, a.capacity, a.rank) for a in adapters) / model.table_nbytes
            res[variant]["last_decisions"] = [
                {k: v for k, v in c.log[-1].items() if k != "actions"} | {"actions": [x["action"] for x in
                                                                                   c.log[-1]["actions"]]}
                for c in ctls if c.log]
            # context: could a fixed rank-16 adapter (one slot, same window) fit the same shares?
            res[variant]["rank16_fits_budget"] = bool(all(
                adapter_bytes(a, 1, 16) + c.window.nbytes <= c.budget * c.table.nbytes for a, c in zip(adapters, ctls)))
    if "test_logloss" in res["controlled"]:
        res["controlled_over_fixed"] = res["controlled"]["test_logloss"] / res["fixed_rank16"]["test_logloss"]
        res["controlled_over_fixed_all_rows"] = (res["controlled"]["test_logloss"]
                                                 / res["fixed_rank16_all_rows"]["test_logloss"])
    return res


def _controller_line(name, c, budget):
    line = (f"{name:<12} frozen model test log loss {c['frozen_test_logloss']:.5f}; "
            f"fixed rank-16 (default capacity): {c['fixed_rank16']['test_logloss']:.5f} "
            f"(max adapter bytes {100 * c['fixed_rank16']['max_adapter_bytes_share']:.2f}% of tables); "
            f"fixed rank-16 (all rows): {c['fixed_rank16_all_rows']['test_logloss']:.5f} "
            f"({100 * c['fixed_rank16_all_rows']['max_adapter_bytes_share']:.1f}%); ")
    k = c["controlled"]
    if k.get("infeasible"):
        return line + (f"controlled: infeasible at a {100 * budget:g}% budget (the share of a table, capped at the "
                       f"table's bytes, below a rank-1 one-slot adapter and its window: {'; '.join(k['infeasible'])})")
    return line + (f"controlled: {k['test_logloss']:.5f} (max {100 * k['max_adapter_bytes_share']:.3f}% of tables at "
                   f"any step, ranks {k['final_ranks']}, capacities {k['final_capacities']}, {k['decisions']} "
                   f"decisions; rank 16 fits the budget: {k['rank16_fits_budget']}); "
                   f"controlled / fixed {c['controlled_over_fixed']:.4f}, / all-rows "
                   f"{c['controlled_over_fixed_all_rows']:.4f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lukern.bench gradient_spectrum", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="movielens,talkingdata")
    p.add_argument("--max-rows", type=int, default=None, help="read only the first rows of each file")
    p.add_argument("--skip-spectra", action="store_true")
    p.add_argument("--skip-controller", action="store_true")
    p.add_argument("--dim", type=int, default=64, help="embedding width of the controller run")
    p.add_argument("--batch", type=int, default=64, help="adapter training batch of the controller run")
    p.add_argument("--every", type=int, default=20, help="controller period (training steps)")
    p.add_argument("--budget", type=float, default=0.01,
                   help="controlled adapters' bytes (with their gradient windows) as a share of the tables' bytes")
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
            c = controller_run(stream, dim=a.dim, batch_size=a.batch, budget_total=a.budget, every=a.every)
            r["controller"] = c
            print(_controller_line(name, c, a.budget), flush=True)
        report[name] = r
    if a.json:
        print(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
