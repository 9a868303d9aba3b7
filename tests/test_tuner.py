"""The autotuner (lukern_tuning) and the profile reader (lukern.profile), without timing.

Strategies and sessions run against a scripted fake runner on a fake clock: the
"measured" time of each plan is a table lookup, so the tests are exact and fast.

``lukern_tuning`` is the installed name of the top-level ``tuning/`` folder (see
pyproject.toml). CI installs the project, so ``import lukern_tuning`` works there; in a
checkout that is not installed the folder is loaded under that name here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import lukern
from lukern import plan as lplan
from lukern import profile as lprofile
from lukern.topology import CpuModel, read_topology

ROOT = Path(__file__).resolve().parents[1]
try:
    import lukern_tuning
except ImportError:  # running from a checkout: load tuning/ under its installed name
    spec = importlib.util.spec_from_file_location(
        "lukern_tuning", ROOT / "tuning" / "__init__.py", submodule_search_locations=[str(ROOT / "tuning")])
    lukern_tuning = importlib.util.module_from_spec(spec)
    sys.modules["lukern_tuning"] = lukern_tuning
    spec.loader.exec_module(lukern_tuning)

from lukern_tuning import cli, families, journal as jmod, strategies, tuner as tmod  # noqa: E402
from lukern_tuning.runner import Case  # noqa: E402
from lukern_tuning.search import Budget, SearchContext, Trial  # noqa: E402
from lukern_tuning.space import SearchSpace, candidate_key, lookup_space, thread_ladder, thread_scope  # noqa: E402

TREES = Path(__file__).parent / "fixtures" / "sysfs"
FAKE_CPU = CpuModel("Fake CPU 9000", ("avx2",), "x86_64", "test")
TOPO64 = read_topology(TREES / "two_node_64cpu", cpu=FAKE_CPU, threading_layer="omp")
ALL64 = set(range(64))
N_ITEMS = 4096


# -- fakes ------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def plan_of(nt, driver, cpt=4):
    return families.chunked_plan({"n_threads": nt, "driver": driver, "chunks_per_thread": cpt}, N_ITEMS)


class ScriptedRunner:
    """``times``: candidate_key(plan) -> seconds; others take ``default`` seconds.
    Each measurement costs ``cost`` seconds of the fake clock."""

    def __init__(self, clock, times=None, default=1.0, cost=1.0, fail=(), wrong=(), fn=None):
        self.clock, self.times, self.default, self.cost = clock, dict(times or {}), default, cost
        self.fail = {candidate_key(p) for p in fail}
        self.wrong = {candidate_key(p) for p in wrong}
        self.fn = fn
        self.measured = []

    def time_of(self, plan):
        if self.fn is not None:
            return self.fn(plan)
        return self.times.get(candidate_key(plan), self.default)

    def measure(self, case, plan, time_s):
        self.measured.append(dict(plan))
        self.clock.advance(self.cost)
        key = candidate_key(plan)
        if key in self.fail:
            return "failed", [], "RuntimeError: scripted failure"
        if key in self.wrong:
            return "wrong", [], "max abs error 1 vs reference"
        return "ok", [self.time_of(plan)] * 5, None

    def compare(self, case, a, b, time_s):
        self.clock.advance(time_s)
        return [self.time_of(a)] * 9, [self.time_of(b)] * 9


class FakeCase(Case):
    heuristic = None

    def heuristic_plan(self):
        # default: "all CPUs", as lukern's heuristic does for big calls
        return self.heuristic or plan_of(64, "prange")


def fake_family(op="fake_op", labels=("shape a",), heuristic=None):
    def build(shape, ws):
        case = FakeCase(op, shape["label"], ("float32", 64, 4, 12), 100_000, N_ITEMS, lambda plan, i: None, None)
        case.heuristic = heuristic
        return case

    return families.Family(
        op, "scripted", ("dtype", "d", "log2_pooling", "log2_bags"), tuple({"label": lb} for lb in labels), build,
        estimate=lambda s: {"n_items": N_ITEMS, "n_work": 100_000, "bucket": ("float32", 64, 4, 12)},
        space=lambda topo, n_items, **kw: lookup_space(TOPO64, n_items, allowed=ALL64, max_prange_threads=64))


def make_tuner(runner, clock, budget_s=1e6, journal=None, fams=None, strategy="auto", noise=0.05):
    return tmod.Tuner(fams or [fake_family()], TOPO64, runner, budget_s=budget_s, clock=clock, journal=journal,
                      strategy=strategy, noise=noise, allowed_cpus=ALL64)


def space64():
    return lookup_space(TOPO64, N_ITEMS, allowed=ALL64, max_prange_threads=64)


# -- search space ------------------------------------------------------------------------------

def test_thread_ladder_one_node_first_then_across():
    assert thread_ladder(TOPO64, ALL64) == [1, 2, 4, 8, 16, 32, 64]
    topo4 = read_topology(TREES / "four_node_memonly", cpu=FAKE_CPU, threading_layer="omp")
    # nodes of 8 and 4 online CPUs, two memory-only nodes that add nothing
    assert thread_ladder(topo4, set(range(16))) == [1, 2, 4, 8, 12]
    assert thread_scope(topo4, 8, set(range(16))) == "1 node" and thread_scope(topo4, 12, set(range(16))) == "2 nodes"
    # the process affinity restricts the ladder: 3 CPUs of node 0 allowed
    assert thread_ladder(TOPO64, {0, 1, 2}) == [1, 2, 3]
    one = read_topology(TREES / "one_node_2cpu", cpu=FAKE_CPU, threading_layer="omp")
    assert thread_ladder(one, {0, 1}) == [1, 2]


def test_lookup_space_restrictions_and_order():
    s = space64()
    cands = list(s)
    assert all((c["n_threads"] == 1) == (c["driver"] == "serial") for c in cands)
    assert all(c["driver"] == "prange" or c["chunks_per_thread"] == 4 for c in cands)
    assert len(cands) == 1 + 6 + 6 * 6  # serial, threads x 6 counts, prange x 6 counts x 6 chunkings
    threads = [c["n_threads"] for c in cands]
    assert threads == sorted(threads)  # one-node thread counts come first
    capped = lookup_space(TOPO64, N_ITEMS, allowed=ALL64, max_prange_threads=2)
    assert max(c["n_threads"] for c in capped if c["driver"] == "prange") == 2
    assert max(c["n_threads"] for c in lookup_space(TOPO64, 5, allowed=ALL64, max_prange_threads=64)) == 4


def test_neighbours_skip_invalid_values():
    s = space64()
    c = {"n_threads": 2, "driver": "prange", "chunks_per_thread": 4}
    nb = s.neighbours(c, "n_threads")
    assert [x["n_threads"] for x in nb] == [4]  # 1 thread is serial-only: no prange neighbour below
    nb = s.neighbours({"n_threads": 8, "driver": "prange", "chunks_per_thread": 1}, "chunks_per_thread")
    assert [x["chunks_per_thread"] for x in nb] == [2]
    with pytest.raises(ValueError, match="n_threads"):
        SearchSpace({"n_threads": []})


def test_plan_mapping_and_normalisation():
    assert plan_of(4, "prange", 16) == {"n_threads": 4, "chunk_size": 64, "driver": "prange"}
    assert plan_of(1, "serial")["driver"] == "serial"
    # plans that behave the same get one spelling: drivers other than prange ignore the chunk
    assert families.normalize_plan({"n_threads": 2, "chunk_size": 7, "driver": "threads"}, N_ITEMS) == \
        families.normalize_plan({"n_threads": 2, "chunk_size": 999, "driver": "threads"}, N_ITEMS)
    assert families.normalize_plan({"n_threads": 1, "chunk_size": 7, "driver": "prange"}, N_ITEMS)["driver"] == "serial"


# -- strategies ---------------------------------------------------------------------------------

def _ctx(space, runner, clock, seconds=1e9, seed=0):
    def measure(params):
        p = families.chunked_plan(params, N_ITEMS)
        status, times, err = runner.measure(None, p, 0.1)
        return Trial(params, p, status, times[0] if times else None, times, 0.0, err)

    return SearchContext(space, measure, Budget(seconds, clock), np.random.default_rng(seed))


def test_brute_force_finds_scripted_optimum():
    clock = FakeClock()
    best = plan_of(8, "prange", 16)
    runner = ScriptedRunner(clock, {candidate_key(best): 0.25}, fail=[plan_of(16, "threads")])
    ctx = _ctx(space64(), runner, clock)
    strategies.get_strategy("brute_force")(ctx)
    assert len(ctx.trials) == len(space64())  # everything, once
    assert len(runner.measured) == len({candidate_key(p) for p in runner.measured})
    assert ctx.best().plan == best
    failed = [t for t in ctx.trials.values() if t.status == "failed"]
    assert len(failed) == 1 and "scripted failure" in failed[0].error  # recorded, not dropped


def test_sampler_respects_budget():
    clock = FakeClock()
    runner = ScriptedRunner(clock, cost=1.0, fn=lambda p: 1.0 / p["n_threads"])
    ctx = _ctx(space64(), runner, clock, seconds=10.0)
    strategies.get_strategy("random_sample")(ctx)
    assert len(runner.measured) == 10
    assert clock() <= 10.0
    assert ctx.stopped  # it stopped because of the budget, not because it ran out of ideas


def test_budget_never_starts_what_it_cannot_finish():
    clock = FakeClock()
    runner = ScriptedRunner(clock, cost=3.0)
    ctx = _ctx(space64(), runner, clock, seconds=10.0)
    strategies.get_strategy("brute_force")(ctx)
    assert len(runner.measured) == 3 and clock() == 9.0  # a 4th would end at 12 s


def test_sampling_then_coordinate_descent_reaches_smooth_optimum():
    import math

    def landscape(p):  # convex in (log2 threads, log2 chunk): best at 16 threads, chunk 32
        return 1.0 + (math.log2(p["n_threads"]) - 4) ** 2 + 0.1 * (math.log2(p["chunk_size"]) - 5) ** 2 + \
            (0.0 if p["driver"] == "prange" else 5.0)

    clock = FakeClock()
    runner = ScriptedRunner(clock, fn=landscape, cost=0.0)
    ctx = _ctx(space64(), runner, clock)
    strategies.get_strategy("random_sample")(ctx)
    assert ctx.best().plan == {"n_threads": 16, "chunk_size": 32, "driver": "prange"}
    assert len(ctx.trials) < len(space64())


def test_auto_chooses_by_size_and_budget():
    clock = FakeClock()
    small = lookup_space(TOPO64, N_ITEMS, allowed={0, 1}, max_prange_threads=64)
    ctx = _ctx(small, ScriptedRunner(clock, cost=0.0), clock)
    strategies.get_strategy("auto")(ctx)
    assert ctx.chosen == "brute_force" and len(ctx.trials) == len(small)
    ctx = _ctx(space64(), ScriptedRunner(clock, cost=1.0), clock, seconds=20.0)
    ctx.budget.hint = 1.0  # 43 candidates at 1 s do not fit 20 s
    strategies.get_strategy("auto")(ctx)
    assert ctx.chosen == "random_sample"
    with pytest.raises(ValueError, match="strategy"):
        strategies.get_strategy("annealing")


# -- choosing ------------------------------------------------------------------------------------

def _trial(nt, median, status="ok"):
    p = plan_of(nt, "serial" if nt == 1 else "prange")
    return Trial({}, p, status, median if status == "ok" else None)


def test_fewest_threads_within_noise():
    trials = [_trial(8, 1.00), _trial(4, 1.03), _trial(2, 1.20), _trial(1, 0.5, status="wrong")]
    assert tmod.select_best(trials, 0.05).plan["n_threads"] == 4
    assert tmod.select_best(trials, 0.0).plan["n_threads"] == 8
    assert tmod.select_best([_trial(2, 1.0, "failed")], 0.05) is None
    # at equal threads within noise, the heuristic's plan is kept (no change without reason)
    other = Trial({}, plan_of(4, "prange", 16), "ok", 0.99)
    assert tmod.select_best(trials + [other], 0.05).plan == other.plan
    assert tmod.select_best(trials + [other], 0.05, prefer=plan_of(4, "prange")).plan == plan_of(4, "prange")


# -- sessions ------------------------------------------------------------------------------------

def test_session_tunes_to_scripted_optimum_and_reports_speedup():
    clock = FakeClock()
    best = plan_of(8, "prange", 16)
    runner = ScriptedRunner(clock, {candidate_key(best): 0.5, candidate_key(plan_of(64, "prange")): 0.8},
                            cost=0.01, fail=[plan_of(2, "threads")], wrong=[plan_of(4, "threads")])
    results = make_tuner(runner, clock).run()
    (r,) = results
    assert r["status"] == "tuned" and r["plan"] == best
    assert r["speedup"] == pytest.approx(0.8 / 0.5)
    assert r["heuristic"]["plan"] == plan_of(64, "prange")
    assert r["n_failed"] == 2 and {f["status"] for f in r["failures"]} == {"failed", "wrong"}
    assert r["thread_scope"] == "1 node"


def test_session_keeps_heuristic_when_confirmation_disagrees():
    clock = FakeClock()
    best, heur = plan_of(8, "prange", 16), plan_of(64, "prange")
    calls = {"n": 0}

    def drifting(p):  # the search sees 8 threads fastest; interleaved it is 20% slower
        return 0.5 if p == best else 0.8

    runner = ScriptedRunner(clock, fn=drifting, cost=0.01)
    runner.compare = lambda case, a, b, t: (calls.__setitem__("n", calls["n"] + 1) or ([1.0] * 9, [0.8] * 9))
    (r,) = make_tuner(runner, clock).run()
    assert calls["n"] == 1
    assert r["plan"] == heur and r["speedup"] == 1.0 and "heuristic kept" in r["note"]


def test_session_keeps_heuristic_when_more_threads_buy_nothing():
    clock = FakeClock()
    many = plan_of(64, "prange")
    # the heuristic says 8 threads; the search sees 64 threads 10% faster, but interleaved
    # they are within noise (3%): the extra threads buy nothing, the heuristic stays
    runner = ScriptedRunner(clock, fn=lambda p: 0.9 if p == many else 1.0, cost=0.01)
    runner.compare = lambda case, a, b, t: ([0.97] * 9, [1.0] * 9)
    (r,) = make_tuner(runner, clock, fams=[fake_family(heuristic=plan_of(8, "prange"))]).run()
    assert r["plan"] == plan_of(8, "prange") and "more threads" in r["note"] and r["speedup"] == 1.0
    # same threads, another chunking, within noise interleaved: no reason to change either
    other = plan_of(64, "prange", 16)
    runner = ScriptedRunner(clock, fn=lambda p: 0.9 if p == other else 1.0, cost=0.01)
    runner.compare = lambda case, a, b, t: ([0.98] * 9, [1.0] * 9)
    (r,) = make_tuner(runner, clock).run()
    assert r["plan"] == plan_of(64, "prange") and "no faster beyond noise" in r["note"]
    # fewer threads at equal speed is a reason
    runner = ScriptedRunner(clock, fn=lambda p: 0.9 if p == plan_of(16, "prange") else 1.0, cost=0.01)
    runner.compare = lambda case, a, b, t: ([1.0] * 9, [0.99] * 9)
    (r,) = make_tuner(runner, clock).run()
    assert r["plan"] == plan_of(16, "prange") and r["speedup"] == pytest.approx(0.99)


def test_session_respects_deadline():
    clock = FakeClock()
    runner = ScriptedRunner(clock, cost=1.0, fn=lambda p: 1.0 / p["n_threads"])
    fams = [fake_family(labels=("a", "b", "c"))]
    results = make_tuner(runner, clock, budget_s=20.0, fams=fams).run()
    assert clock() <= 20.0 + 1.0  # at most one measurement (a case's heuristic) beyond
    assert sum(r["n_trials"] for r in results if r["status"] == "tuned") == len(runner.measured)
    assert len(runner.measured) < 3 * len(space64())


def test_every_failure_gives_no_plan():
    clock = FakeClock()
    everything = [families.chunked_plan(c, N_ITEMS) for c in space64()] + [plan_of(64, "prange")]
    runner = ScriptedRunner(clock, cost=0.0, fail=everything)
    (r,) = make_tuner(runner, clock).run()
    assert r["status"] == "failed" and r["plan"] is None and r["n_failed"] == r["n_trials"]


def test_a_case_that_cannot_be_built_is_recorded_and_the_rest_go_on():
    clock = FakeClock()
    good = fake_family(op="good")

    def explode(shape, ws):
        raise MemoryError("no room for the table")

    bad = families.Family("bad", "fails", good.bucket_axes, ({"label": "x"},), explode)
    results = make_tuner(ScriptedRunner(clock, cost=0.0), clock, fams=[bad, good]).run()
    assert [r["status"] for r in results] == ["failed", "tuned"]
    assert "MemoryError: no room" in results[0]["note"]


# -- journal -------------------------------------------------------------------------------------

def test_journal_truncated_mid_line_resumes(tmp_path):
    path = tmp_path / "j.jsonl"
    clock = FakeClock()
    best = plan_of(8, "prange", 16)
    runner = ScriptedRunner(clock, {candidate_key(best): 0.5}, cost=0.01)
    with jmod.Journal.start(path, "fp1") as j:
        make_tuner(runner, clock, journal=j).run()
    n_first = len(runner.measured)
    lines = path.read_text().splitlines()
    # a session killed while writing: the case line and the last trials are lost, the
    # last kept line is cut in the middle
    kept = [ln for ln in lines if json.loads(ln)["kind"] != "case"][:20]
    path.write_text("\n".join(kept[:-1]) + "\n" + kept[-1][: len(kept[-1]) // 2])
    j = jmod.Journal.resume(path, "fp1")
    assert j.dropped_tail and len(j.records) == 18  # header + 18 whole trials; the torn one dropped
    assert path.read_text().endswith("\n")  # cut back to the last whole line
    runner2 = ScriptedRunner(clock, {candidate_key(best): 0.5}, cost=0.01)
    with j:
        (r,) = make_tuner(runner2, clock, journal=j).run()
    assert r["plan"] == best
    assert len(runner2.measured) == n_first - 18  # journaled trials were not measured again
    for line in path.read_text().splitlines():  # the file is clean JSONL again
        json.loads(line)
    # a finished case is not tuned again at all
    runner3 = ScriptedRunner(clock, cost=0.01)
    with jmod.Journal.resume(path, "fp1") as j3:
        (r3,) = make_tuner(runner3, clock, journal=j3).run()
    assert runner3.measured == [] and r3["resumed"] and r3["plan"] == best


def test_journal_refuses_foreign_host_and_garbage(tmp_path):
    path = tmp_path / "j.jsonl"
    jmod.Journal.start(path, "aaaa").close()
    with pytest.raises(jmod.JournalError, match="recorded on host aaaa"):
        jmod.Journal.resume(path, "bbbb")
    (tmp_path / "x.jsonl").write_text("hello\n")
    with pytest.raises(jmod.JournalError, match="not a lukern-tune journal"):
        jmod.Journal.resume(tmp_path / "x.jsonl", "aaaa")
    with pytest.raises(jmod.JournalError, match="no journal"):
        jmod.Journal.resume(tmp_path / "missing.jsonl", "aaaa")


# -- profiles at call time ------------------------------------------------------------------------

def _profile(fingerprint, buckets, op="embedding_bag", best=None):
    return {"format": "lukern-profile", "version": 1, "fingerprint": fingerprint, "host": {"cpu": {"brand": "X"}},
            "ops": {op: {"bucket_axes": ["dtype", "d", "log2_pooling", "log2_bags"], "best": best,
                         "buckets": [{"bucket": list(b), "plan": p} for b, p in buckets]}}}


P1 = {"n_threads": 1, "chunk_size": 16, "driver": "serial"}
P2 = {"n_threads": 2, "chunk_size": 128, "driver": "prange"}


@pytest.fixture
def restore_profile():
    yield
    lprofile.use_profile(None)


def test_profile_index_exact_nearest_best():
    idx = lprofile.ProfileIndex(_profile("f", [(("float32", 64, 4, 11), P2), (("float32", 64, 1, 7), P1),
                                               (("float64", 64, 4, 9), P1)], best=P2))
    assert idx.lookup("embedding_bag", ("float32", 64, 4, 11)) == (2, 128, "prange", "profile exact bucket")
    near = idx.lookup("embedding_bag", ("float32", 64, 4, 9))  # same dtype beats the float64 exact-shape one
    assert near[:3] == (2, 128, "prange") and "nearest" in near[3]
    assert idx.lookup("embedding_bag", ("float32", 32, 1, 6))[:3] == (1, 16, "serial")
    assert idx.lookup("embedding_bag", None)[3] == "profile op best"
    assert idx.lookup("other_op", ("float32", 64, 4, 11)) is None
    first = idx.lookup("embedding_bag", ("float32", 16, 2, 3))
    assert idx.lookup("embedding_bag", ("float32", 16, 2, 3)) is first  # memoised: O(1) after the first call


def test_profile_write_is_atomic_and_validated(tmp_path):
    path = tmp_path / "sub" / "profile.json"
    prof = _profile("f", [(("float32", 64, 4, 11), P2)])
    lprofile.write_profile(prof, path)
    assert lprofile.read_profile(path) == prof
    assert [p.name for p in path.parent.iterdir()] == ["profile.json"]  # no temporary left behind
    bad = _profile("f", [(("float32", 64, 4, 11), {"n_threads": 0, "chunk_size": 1, "driver": "prange"})])
    with pytest.raises(lprofile.ProfileError, match="n_threads"):
        lprofile.write_profile(bad, path)
    assert lprofile.read_profile(path) == prof  # untouched
    path.write_text('{"format": "lukern-profile", "vers')
    with pytest.raises(lprofile.ProfileError, match="not valid JSON"):
        lprofile.read_profile(path)


def test_foreign_profile_ignored_with_one_warning(tmp_path, restore_profile):
    path = tmp_path / "foreign.json"
    lprofile.write_profile(_profile("0000000000000000", [(("float32", 8, 1, 2), P1)]), path)
    lprofile._warned.clear()
    table = np.ones((10, 8), np.float32)
    idx, off = np.array([1, 2, 3, 4, 5]), np.array([0, 2, 5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lprofile.use_profile(path) is None
        for _ in range(3):
            lukern.embedding_bag(table, idx, off, driver="serial")
            p = lplan.resolve_plan("embedding_bag", 5, bucket=("float32", 8, 1, 2))
    foreign = [w for w in caught if issubclass(w.category, lprofile.ProfileWarning)]
    assert len(foreign) == 1 and "0000000000000000" in str(foreign[0].message)
    assert "heuristic" in p.source
    assert lprofile.status()["reason"] == "tuned on another host"


def test_own_profile_is_used_by_resolve_plan(tmp_path, restore_profile):
    path = tmp_path / "mine.json"
    fp = read_topology().fingerprint()
    lprofile.write_profile(_profile(fp, [(("float32", 8, 1, 2), P1), (("float32", 8, 4, 11), P2)], best=P2), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching profile never warns
        assert lprofile.use_profile(path) is not None
    p = lplan.resolve_plan("embedding_bag", 100000, bucket=("float32", 8, 4, 11))
    assert p.source == "threads: profile exact bucket" and p.chunk_size == 128
    assert "profile" in str(p)
    assert lplan.resolve_plan("embedding_bag", 10, bucket=("float32", 8, 1, 3)).source.startswith("threads: profile nearest")
    assert lplan.resolve_plan("embedding_bag", 10, bucket=("float32", 8, 1, 2), n_threads=2).source == "threads: argument"
    with lprofile.disabled():
        assert "heuristic" in lplan.resolve_plan("embedding_bag", 100000, bucket=("float32", 8, 4, 11)).source
    assert lprofile.status()["used"]


def test_missing_profile(tmp_path, restore_profile):
    with pytest.warns(lprofile.ProfileWarning, match="does not exist"):
        assert lprofile.use_profile(tmp_path / "none.json") is None  # named explicitly: warns
    assert lprofile.lookup("embedding_bag", ("float32", 8, 1, 2)) is None


def test_no_profile_env(tmp_path, monkeypatch, restore_profile):
    path = tmp_path / "mine.json"
    lprofile.write_profile(_profile(read_topology().fingerprint(), [(("float32", 8, 1, 2), P1)]), path)
    monkeypatch.setattr(lprofile._config, "NO_PROFILE", True)
    monkeypatch.setattr(lprofile._config, "PROFILE_PATH", str(path))
    lprofile.use_profile(None)
    assert lprofile.lookup("embedding_bag", ("float32", 8, 1, 2)) is None
    assert "LUKERN_NO_PROFILE" in lprofile.status()["reason"]


def test_build_profile_merges_other_ops_of_same_host():
    fam = fake_family()
    res = {"op": "fake_op", "case": "a", "status": "tuned", "bucket": ["float32", 64, 4, 12], "plan": P2,
           "n_work": 10, "median_s": 1.0, "speedup": 1.2}
    small = dict(res, case="b", bucket=["float32", 64, 1, 7], plan=P1, n_work=1)
    prev = _profile(TOPO64.fingerprint(), [(("float32", 64, 4, 11), P1)], op="table_batch")
    prof = tmod.build_profile([res, small], TOPO64, {"fake_op": fam}, {"budget_s": 1}, previous=prev)
    assert set(prof["ops"]) == {"fake_op", "table_batch"}
    assert prof["ops"]["fake_op"]["best"] == P2  # a tie: the bucket with more work decides
    assert lprofile.ProfileIndex(prof).lookup("fake_op", ("float32", 64, 1, 7))[:3] == (1, 16, "serial")
    foreign = dict(prev, fingerprint="zzz")
    assert set(tmod.build_profile([res], TOPO64, {"fake_op": fam}, {}, previous=foreign)["ops"]) == {"fake_op"}


# -- real families (tiny shapes) -----------------------------------------------------------------

def test_real_case_bucket_matches_wrapper_and_verifies(monkeypatch):
    ws = families.Workspace(seed=1, n_rows=2048, n_batches=2)
    seen = []
    monkeypatch.setattr(lplan, "profile_lookup", lambda op, bucket: seen.append((op, bucket)))
    for op, shape in [("embedding_bag", {"label": "t", "n_bags": 16, "pooling": (1, 4), "d": 8, "dtype": "float32"}),
                      ("table_batch", {"label": "u", "n_tables": 3, "n_bags": 8, "pooling": (2, 6), "d": 8,
                                       "dtype": "float32"})]:
        case = families.FAMILIES[op].build(shape, ws)
        seen.clear()
        out = case.call({}, 0)  # no plan arguments: the wrapper asks the profile hook
        assert seen == [(op, case.bucket)]
        assert case.verify(out) is None
        assert "max abs error" in case.verify(out + 1)
        # the heuristic the tuner compares against is the plan the wrapper resolves by itself
        resolved = []
        real = lukern.embedding.resolve_plan
        monkeypatch.setattr(lukern.embedding, "resolve_plan", lambda *a, **k: resolved.append(real(*a, **k)) or resolved[-1])
        with lprofile.disabled():
            for n_threads in (1, 2):  # also as a big call would resolve it, on 2 CPUs
                monkeypatch.setattr(lplan, "_PARALLEL_MIN_WORK", 0 if n_threads == 2 else 1 << 40)
                monkeypatch.setattr(lplan, "available_cpus", lambda: 2)
                resolved.clear()
                case.call({}, 0)
                p = resolved[0]
                assert p.n_threads == n_threads
                assert case.heuristic_plan() == {"n_threads": p.n_threads, "chunk_size": p.chunk_size,
                                                 "driver": p.driver}
        monkeypatch.setattr(lukern.embedding, "resolve_plan", real)


# -- the command --------------------------------------------------------------------------------

@pytest.fixture
def fake_cli(monkeypatch, tmp_path):
    fam = fake_family(labels=("a", "b"))
    monkeypatch.setattr(families, "FAMILIES", {"fake_op": fam})
    best = {"n_threads": 2, "chunk_size": 2048, "driver": "prange"}
    monkeypatch.setattr(cli, "_runner", lambda: ScriptedRunner(FakeClock(), {candidate_key(best): 0.5}, cost=0.0))
    return tmp_path, best


def test_cli_tunes_writes_profile_and_resumes(fake_cli, capsys, restore_profile):
    tmp, best = fake_cli
    prof_path, jpath = tmp / "p.json", tmp / "j.jsonl"
    args = ["--budget-s", "5", "--profile", str(prof_path), "--journal", str(jpath)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "host fingerprint" in out and "QoS" in out and "speed-up" in out
    prof = lprofile.read_profile(prof_path)
    assert prof["fingerprint"] == read_topology().fingerprint()
    (b1,) = prof["ops"]["fake_op"]["buckets"]  # both shapes fall in one bucket: the first stands
    assert b1["plan"] == best and b1["speedup"] == pytest.approx(1.0 / 0.5)
    # the next process (here: a reload) picks it up
    assert lprofile.use_profile(prof_path).lookup("fake_op", ("float32", 64, 4, 12))[:3] == (2, 2048, "prange")
    assert cli.main(["--report", "--profile", str(prof_path)]) == 0
    assert "fake_op" in capsys.readouterr().out
    assert cli.main(args + ["--resume"]) == 0
    assert "from the journal" in capsys.readouterr().err


def test_cli_resume_refuses_foreign_journal(fake_cli, capsys):
    tmp, _ = fake_cli
    jmod.Journal.start(tmp / "j.jsonl", "ffffffffffffffff").close()
    code = cli.main(["--resume", "--profile", str(tmp / "p.json"), "--journal", str(tmp / "j.jsonl")])
    assert code == 2 and "ffffffffffffffff" in capsys.readouterr().err
    assert not (tmp / "p.json").exists()


def test_cli_info_dry_run_and_errors(fake_cli, capsys):
    tmp, _ = fake_cli
    assert cli.main(["--info", "--profile", str(tmp / "p.json")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["topology"]["fingerprint"] == read_topology().fingerprint()
    assert "fake_op" in info["families"] and info["profile"]["exists"] is False
    assert cli.main(["--dry-run", "--profile", str(tmp / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "dry run: 2 cases" in out and "fake_op" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--ops", "nope"])
    assert exc.value.code == 2 and "unknown family" in capsys.readouterr().err
    assert cli.main(["--budget-s", "0"]) == 2
    assert cli.main(["--report", "--profile", str(tmp / "missing.json")]) == 1
