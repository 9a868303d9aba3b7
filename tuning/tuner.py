"""A tuning session: for each case (family x shape) build the data, measure the built-in
heuristic, search the space, choose, confirm against the heuristic, and finally turn the
results into a profile.

Choosing: among the candidates whose median is within ``noise`` of the fastest, the one
with the fewest threads wins (DESIGN section 6: memory-bound kernels often run as fast
on fewer threads, and the threads left over serve inference), then the fastest.

Confirming: the choice and the heuristic are timed again, interleaved (ABBA), so drift
from other load on the host hits both alike. If the choice is slower than the heuristic
beyond noise there, or is neither faster beyond noise nor as fast on fewer threads, the
heuristic's plan is kept and the report says so: a profile never makes a bucket slower
than no profile, and changes a plan only for a measured reason.

Budget: the session has a deadline; each case gets an equal share of the time left when
it starts (cases that finish early leave more to the rest). Building data, compiling
(inside each candidate's warm-up) and confirming all count.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Callable

import numpy as np

from .families import Family, Workspace
from .search import Budget, SearchContext, Trial, summarize
from .space import candidate_key, thread_scope
from .strategies import get_strategy

__all__ = ["Tuner", "build_profile", "select_best"]

#: the smallest and largest time one candidate is measured for
MIN_CANDIDATE_S = 0.02
MAX_CANDIDATE_S = 2.0


def select_best(trials, noise: float, prefer: dict | None = None) -> Trial | None:
    """Fewest threads among the trials within ``noise`` (relative) of the fastest median;
    among those, the ``prefer``-red plan (the heuristic's: no change without a measured
    reason), else the fastest. Failed and wrong trials never win."""
    ok = [t for t in trials if t.ok]
    if not ok:
        return None
    fastest = min(t.median_s for t in ok)
    near = [t for t in ok if t.median_s <= fastest * (1.0 + noise)]
    fewest = min(t.plan["n_threads"] for t in near)
    near = [t for t in near if t.plan["n_threads"] == fewest]
    for t in near:
        if prefer is not None and t.plan == prefer:
            return t
    return min(near, key=lambda t: t.median_s)


def plan_text(plan: dict | None) -> str:
    if not plan:
        return "-"
    nt = plan["n_threads"]
    s = f"{nt} thread{'s' if nt > 1 else ''} {plan['driver']}"
    if plan["driver"] == "prange":
        s += f" chunk {plan['chunk_size']}"
    return s


class Tuner:
    """Runs the cases of ``families`` on this host within a deadline.

    Parameters
    ----------
    families : list of Family
    topology : lukern.topology.Topology
    runner : object with ``measure(case, plan, time_s)`` and ``compare(case, a, b, time_s)``
    budget_s : float
        Seconds for the whole session (ignored when ``deadline`` is given).
    deadline : float, optional
        Absolute time on ``clock`` by which tuning must end.
    strategy : str
        Registered strategy name (``auto``, ``brute_force``, ``random_sample``).
    journal : Journal, optional
        Trials are appended to it; trials and finished cases already in it are reused.
    noise : float
        Relative difference treated as noise when choosing and confirming.
    """

    def __init__(self, families: list[Family], topology, runner, *, budget_s: float = 60.0, deadline: float | None = None,
                 strategy: str = "auto", journal=None, seed: int = 0, noise: float = 0.05, dims=None,
                 clock: Callable[[], float] = time.perf_counter, workspace: Workspace | None = None,
                 allowed_cpus=None, on_trial=None, on_case=None):
        self.families = list(families)
        self.topology = topology
        self.runner = runner
        self.clock = clock
        self.deadline = deadline if deadline is not None else clock() + budget_s
        self.strategy_name = strategy
        self.strategy = get_strategy(strategy)
        self.journal = journal
        self.seed = seed
        self.noise = noise
        self.dims = dims
        self.ws = workspace if workspace is not None else Workspace(seed)
        self.allowed_cpus = allowed_cpus
        self.on_trial = on_trial or (lambda case, trial: None)
        self.on_case = on_case or (lambda event, info: None)

    def cases(self) -> list[tuple[Family, dict]]:
        return [(f, s) for f in self.families for s in f.shapes_for(self.dims)]

    def run(self) -> list[dict]:
        todo = self.cases()
        results: list[dict | None] = [None] * len(todo)
        pending = []
        for i, (fam, shape) in enumerate(todo):
            done = self.journal.finished(fam.op, shape["label"]) if self.journal is not None else None
            if done is not None and done.get("status") == "tuned":
                results[i] = dict(done, resumed=True)
                self.on_case("resumed", results[i])
            else:
                pending.append(i)
        for k, i in enumerate(pending):
            fam, shape = todo[i]
            left = self.deadline - self.clock()
            if left <= 0:
                results[i] = {"op": fam.op, "case": shape["label"], "status": "skipped", "shape": shape,
                              "note": "budget spent before this case started"}
                self.on_case("skipped", results[i])
                continue
            share = left / (len(pending) - k)
            results[i] = self.tune_case(fam, shape, self.clock() + share)
            if self.journal is not None:
                self.journal.add_case(fam.op, shape["label"], results[i])
            self.on_case("done", results[i])
        return [r for r in results if r is not None]

    # -- one case ----------------------------------------------------------------------------
    def tune_case(self, fam: Family, shape: dict, case_deadline: float) -> dict:
        clock = self.clock
        t_start = clock()
        label = shape["label"]
        self.on_case("build", {"op": fam.op, "case": label})
        try:
            case = fam.build(shape, self.ws)
        except Exception as exc:  # e.g. MemoryError on a small host: the other cases go on
            return {"op": fam.op, "case": label, "status": "failed", "shape": _jsonable_shape(shape), "plan": None,
                    "n_trials": 0, "note": f"building the data failed: {type(exc).__name__}: {exc}",
                    "seconds": clock() - t_start}
        space = fam.space(self.topology, case.n_items, allowed=self.allowed_cpus)
        prior = self.journal.trials(fam.op, label) if self.journal is not None else {}
        measured: dict[str, Trial] = {}
        t_compile = clock()
        self._compile(fam, case, space)
        compile_s = clock() - t_compile

        left = max(0.0, case_deadline - clock())
        confirm_s = min(3.0, max(0.1, 0.15 * left))
        search_s = max(0.0, left - confirm_s - 0.05 * left)
        per_candidate = min(MAX_CANDIDATE_S, max(MIN_CANDIDATE_S, 0.75 * search_s / (len(space) + 1)))
        budget = Budget(search_s, clock, hint=per_candidate * 1.2)
        self.on_case("start", {"op": fam.op, "case": label, "bucket": case.bucket, "space": len(space)})

        def measure_plan(params: dict, plan: dict) -> Trial:
            plan = fam.normalize(plan, case.n_items)
            key = candidate_key(plan)
            if key in measured:
                return dataclasses.replace(measured[key], params=params, cached=True)
            if key in prior:
                trial = dataclasses.replace(prior[key], params=params, cached=True)
                measured[key] = trial
                self.on_trial(case, trial)
                return trial
            t0 = clock()
            status, times, error = self.runner.measure(case, plan, per_candidate)
            med, spread = summarize(times)
            trial = Trial(params, plan, status, med, list(times), spread, error, clock() - t0)
            measured[key] = trial
            if self.journal is not None:
                self.journal.add_trial(fam.op, label, case.bucket, trial)
            self.on_trial(case, trial)
            return trial

        heur_plan = fam.normalize(case.heuristic_plan(), case.n_items)
        t0 = clock()
        heur = measure_plan({"heuristic": True}, heur_plan)
        if not heur.cached:
            budget.charge(clock() - t0)
        rng = np.random.default_rng([self.seed, *label.encode()])
        ctx = SearchContext(space, lambda p: measure_plan(p, fam.to_plan(p, case.n_items)), budget, rng)
        self.strategy(ctx)
        trials = list(measured.values())
        failures = [{"plan": t.plan, "status": t.status, "error": t.error} for t in trials if not t.ok]
        result = {
            "op": fam.op, "case": label, "bucket": list(case.bucket), "shape": _jsonable_shape(shape),
            "n_work": int(case.n_work), "n_items": int(case.n_items), "space": space.describe(),
            "strategy": ctx.chosen or self.strategy_name, "n_trials": len(trials), "n_failed": len(failures),
            "failures": failures[:20], "heuristic": {"plan": heur_plan, "median_s": heur.median_s},
            "compile_s": round(compile_s, 3),
        }
        best = select_best(trials, self.noise, prefer=heur_plan)
        if best is None:
            result.update(status="failed", plan=None, note="every candidate failed; see failures",
                          seconds=clock() - t_start)
            return result
        chosen, speedup, confirm, note, noise = best, None, None, "", self.noise
        if best.plan == heur_plan:
            fastest = min(t.median_s for t in trials if t.ok)
            speedup = 1.0
            note = ("the heuristic's plan is the best" if best.median_s <= fastest else
                    f"the heuristic's plan is within noise of the fastest ({best.median_s / fastest:.2f}x its time): kept")
        elif not heur.ok:
            note = f"the heuristic's plan {heur.status}: {heur.error}"
        else:
            secs = max(0.1, min(confirm_s, case_deadline - clock()))
            ta, tb = self.runner.compare(case, best.plan, heur_plan, secs)
            ma, sa = summarize(ta)
            mb, sb = summarize(tb)
            # the noise of a ratio of medians: the relative spreads shrink with sqrt(n)
            est = sum((s or 0.0) / math.sqrt(max(1, len(t))) for s, t in ((sa, ta), (sb, tb)))
            noise = max(self.noise, 2.0 * est)
            ratio = mb / ma
            confirm = {"n": len(ta), "tuned_median_s": ma, "heuristic_median_s": mb, "ratio": ratio}
            slower, faster = ratio < 1.0 - noise, ratio >= 1.0 + noise
            fewer_threads = best.plan["n_threads"] < heur_plan["n_threads"]
            # a different plan must earn its place: faster beyond noise, or as fast on fewer threads
            if slower or not (faster or fewer_threads):
                more = best.plan["n_threads"] > heur_plan["n_threads"]
                why = "slower" if slower else "no faster beyond noise" + (", with more threads" if more else "")
                note = (f"search picked {plan_text(best.plan)} but interleaved it ran at {ratio:.2f}x the "
                        f"heuristic's speed ({why}): heuristic kept")
                chosen = dataclasses.replace(heur, median_s=mb)
                speedup = 1.0
            else:
                chosen = dataclasses.replace(best, median_s=ma)
                speedup = ratio
                if best.plan["n_threads"] < heur_plan["n_threads"]:
                    note = "fewer threads than the heuristic at equal speed within noise: the rest serve inference"
        result.update(
            status="tuned", plan=chosen.plan, median_s=chosen.median_s, speedup=speedup, noise=noise,
            confirm=confirm, note=note, seconds=clock() - t_start,
            thread_scope=thread_scope(self.topology, chosen.plan["n_threads"], self.allowed_cpus),
        )
        if confirm is not None:
            result["heuristic"]["median_s"] = confirm["heuristic_median_s"]
        return result


    @staticmethod
    def _compile(fam: Family, case, space) -> None:
        """Run each driver of the space once, so that compilation (seconds per kernel) is
        paid here and not inside the first candidates, where it would distort the budget's
        estimate of what one measurement costs. Failures surface in the measurements."""
        seen = set()
        for params in space:
            plan = fam.to_plan(params, case.n_items)
            if plan["driver"] in seen:
                continue
            seen.add(plan["driver"])
            try:
                case.call(plan, 0)
            except Exception:
                pass


def _jsonable_shape(shape: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in shape.items()}


def op_best(entries: list[dict]) -> dict | None:
    """The plan chosen in most buckets of an op (ties: the bucket with most work)."""
    if not entries:
        return None
    counts = Counter(candidate_key(e["plan"]) for e in entries)
    top = max(counts.values())
    winners = [e for e in entries if counts[candidate_key(e["plan"])] == top]
    return dict(max(winners, key=lambda e: e.get("n_work", 0))["plan"])


def build_profile(results: list[dict], topology, families: dict[str, Family], meta: dict,
                  previous: dict | None = None) -> dict:
    """The profile dict of a session; ops not tuned now are kept from ``previous`` when it
    belongs to the same host."""
    import lukern

    ops: dict = {}
    if previous and previous.get("fingerprint") == topology.fingerprint():
        ops.update(previous.get("ops", {}))
    by_op: dict[str, list] = {}
    for r in results:
        if r.get("status") != "tuned":
            continue
        entries = by_op.setdefault(r["op"], [])
        if any(e["bucket"] == r["bucket"] for e in entries):
            continue  # two shapes in one bucket: the first tuned one stands
        entries.append({k: v for k, v in r.items() if k not in ("op", "status", "resumed")})
    for op, entries in by_op.items():
        fam = families.get(op)
        ops[op] = {"bucket_axes": list(fam.bucket_axes) if fam else [], "best": op_best(entries), "buckets": entries}
    return {
        "format": "lukern-profile",
        "version": 1,
        "fingerprint": topology.fingerprint(),
        "host": topology.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lukern_version": lukern.__version__,
        "tuner": meta,
        "ops": ops,
    }
