"""The replay loop, its metrics, the report and the ``lukern replay`` command."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lukern.cli import main
from lukern.replay.dlrm import DLRM
from lukern.replay.report import format_report, to_json
from lukern.replay.runner import (MEASURED_FIELDS, ReplayConfig, auc, bootstrap_ci, logloss, run_replay,
                                  window_bootstrap_auc_diff)
from lukern.replay.strategies import Bandwidth, ClusterTrainer, DeltaSync, PriorityDelta, adapter_available
from lukern.replay.synthetic import synthetic_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPING = ("stale", "full", "delta", "priority")


@pytest.fixture(scope="module")
def tiny():
    return synthetic_stream(n_events=6000, seed=3, n_users=300, n_items=200, new_items=400, days=4)


def tiny_cfg(**kw):
    base = dict(windows=3, epochs=1, batch_size=200, dim=8, bootstrap=50,
                strategies=SHIPPING + (("lukern",) if adapter_available() else ()))
    base.update(kw)
    return ReplayConfig(**base)


def strip_measured(x):
    if isinstance(x, dict):
        return {k: strip_measured(v) for k, v in x.items() if k not in MEASURED_FIELDS}
    if isinstance(x, list):
        return [strip_measured(v) for v in x]
    return x


def test_auc_against_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    want = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(want, abs=1e-12)
    assert np.isnan(auc(np.ones(4), np.arange(4.0)))
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))


def test_bootstrap_ci_brackets_the_mean():
    m, lo, hi = bootstrap_ci([0.01, 0.02, 0.015, 0.03, float("nan")], n_boot=500, seed=1)
    assert lo <= m <= hi and m == pytest.approx(0.01875)
    assert np.isnan(bootstrap_ci([0.1])[1])


def test_window_bootstrap_of_the_overall_auc_difference():
    rng = np.random.default_rng(2)
    ys = [(rng.random(n) < 0.2).astype(float) for n in (50, 80, 40, 120, 60)]
    a = [np.round(y + rng.normal(0, 1, y.size), 1) for y in ys]  # ties across windows too
    b = [np.round(0.3 * y + rng.normal(0, 1, y.size), 1) for y in ys]
    d, lo, hi = window_bootstrap_auc_diff(ys, a, b, n_boot=400, seed=0)
    # the point estimate is the difference of the overall AUCs of the concatenated windows
    want = auc(np.concatenate(ys), np.concatenate(a)) - auc(np.concatenate(ys), np.concatenate(b))
    assert d == pytest.approx(want, abs=1e-12)
    assert lo <= d <= hi and lo > 0  # a is the better score by a wide margin
    # a draw's AUC is the pooled AUC of the drawn windows, a window drawn twice counted twice
    d2, _, _ = window_bootstrap_auc_diff(ys[:2] + ys[:1], a[:2] + a[:1], b[:2] + b[:1], n_boot=10)
    y3, a3, b3 = (np.concatenate(v[:2] + v[:1]) for v in (ys, a, b))
    assert d2 == pytest.approx(auc(y3, a3) - auc(y3, b3), abs=1e-12)
    # identical scores: zero difference, a degenerate interval
    assert window_bootstrap_auc_diff(ys, a, a, n_boot=50) == (0.0, 0.0, 0.0)
    # fewer than two windows with both classes: no interval
    assert np.isnan(window_bootstrap_auc_diff([ys[0], np.zeros(5)], [a[0], np.zeros(5)], [b[0], np.zeros(5)])[1])
    with pytest.raises(ValueError, match="same windows"):
        window_bootstrap_auc_diff(ys, a, b[:2])


def test_bandwidth_matches_the_production_example():
    bw = Bandwidth()  # 200 TB over 100 GbE: 10 % takes > 26 min
    assert bw.seconds(0.1, table_bytes=1.0) / 60 == pytest.approx(26.67, abs=0.01)


def test_delta_and_priority_ship_rows_and_arrive_later(tiny):
    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    trainer = ClusterTrainer(m0.copy())
    bw = Bandwidth()
    delta = DeltaSync(m0.copy(), trainer, every=1, bandwidth=bw)
    prio = PriorityDelta(m0.copy(), trainer, every=1, bandwidth=bw, pct=10)
    b = tiny.batch(0, 500)
    trainer.learn(b)
    touched = np.flatnonzero((trainer.model.emb_buffer != m0.emb_buffer).any(axis=1))
    now = float(tiny.t[499])
    delta.end_window(0, now)
    prio.end_window(0, now)
    sd, sp = delta.take_stats(), prio.take_stats()
    row_bytes = 8 + 8 * 4
    assert sd.bytes_shipped == touched.size * row_bytes + m0.dense_nbytes
    k = int(np.ceil(touched.size * 0.1))
    assert sp.bytes_shipped == k * row_bytes + m0.dense_nbytes
    arrival = delta.pending[0].arrival
    assert arrival == pytest.approx(now + bw.seconds(sd.bytes_shipped, table_bytes=m0.table_nbytes))
    delta.predict(b, arrival - 1)  # not yet arrived: still the old model
    np.testing.assert_array_equal(delta.model.emb_buffer, m0.emb_buffer)
    delta.predict(b, arrival)
    np.testing.assert_array_equal(delta.model.emb_buffer, trainer.model.emb_buffer)
    prio.predict(b, prio.pending[0].arrival)
    got = np.flatnonzero((prio.model.emb_buffer != m0.emb_buffer).any(axis=1))
    gap = np.linalg.norm(trainer.model.emb_buffer[touched] - m0.emb_buffer[touched], axis=1)
    np.testing.assert_array_equal(got, np.sort(touched[np.argsort(-gap)[:k]]))
    assert prio.candidates.sum() == touched.size - k  # the rest wait for the next sync


def test_replay_runs_and_is_deterministic(tiny):
    r1 = run_replay(tiny, tiny_cfg(), progress=False)
    r2 = run_replay(tiny, tiny_cfg(), progress=False)
    assert r1["windows_done"] == 3 and not r1["interrupted"]
    assert json.loads(to_json(strip_measured(r1))) == json.loads(to_json(strip_measured(r2)))
    s = r1["strategies"]
    assert s["stale"]["bytes_shipped"] == 0
    assert s["full"]["bytes_shipped"] == 3 * (r1["initial_model"]["table_bytes"] + r1["initial_model"]["dense_bytes"])
    assert 0 < s["priority"]["bytes_shipped"] < s["delta"]["bytes_shipped"] < s["full"]["bytes_shipped"]
    for name in ("full", "delta", "priority"):
        assert s[name]["update_cpu_s"] > 0
        assert len(s[name]["windows"]["auc"]) == 3
    text = format_report(r1)
    assert "AUC per window" in text and "delta" in text
    r3 = run_replay(tiny, tiny_cfg(seed=1), progress=False)
    assert r3["strategies"]["delta"]["auc"] != s["delta"]["auc"]


def test_interrupt_keeps_finished_windows(tiny):
    def stop_after_two(report):
        if report["windows_done"] == 2:
            raise KeyboardInterrupt

    r = run_replay(tiny, tiny_cfg(windows=4), progress=False, on_window=stop_after_two)
    assert r["interrupted"] and r["windows_done"] == 2
    assert all(len(v["windows"]["auc"]) == 2 for v in r["strategies"].values())
    assert "interrupted" in format_report(r)


def test_bad_config(tiny):
    with pytest.raises(ValueError, match="strategies"):
        run_replay(tiny, ReplayConfig(strategies=("stale", "magic")), progress=False)
    with pytest.raises(ValueError, match="too few"):
        run_replay(synthetic_stream(n_events=10, seed=0, n_users=10, n_items=10, new_items=0, days=1),
                   ReplayConfig(windows=8), progress=False)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    p = tmp_path / "ratings.csv"
    rng = np.random.default_rng(0)
    rows = [f"{rng.integers(0, 40)},{rng.integers(0, 80)},{rng.integers(1, 11) / 2},{1_000_000 + 60 * i}"
            for i in range(3000)]
    p.write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    code = main(["replay", "--data", str(p), "--json", str(out), "--plot", str(png), "--windows", "3",
                 "--epochs", "1", "--dim", "8", "--no-progress", "--strategies", ",".join(SHIPPING)])
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["stream"]["format"] == "movielens" and rep["windows_done"] == 3
    for name in SHIPPING:
        for key in ("auc", "logloss", "bytes_shipped", "update_cpu_s", "adapter_mem_pct_max", "windows"):
            assert key in rep["strategies"][name]
    assert png.exists() and png.stat().st_size > 1000
    assert "strategy" in capsys.readouterr().out


def test_cli_bad_input_exit_code(tmp_path, capsys):
    p = tmp_path / "ratings.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,2,3\n")
    assert main(["replay", "--data", str(p), "--no-progress"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["replay", "--data", str(tmp_path / "nope.csv"), "--format", "movielens"]) == 2


def test_cli_sigint_writes_finished_windows(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "lukern.cli", "replay", "--events", "150000", "--windows", "40",
                             "--epochs", "1", "--json", str(out), "--no-progress", "--strategies", "stale,delta"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    rep = json.loads(out.read_text())
    assert rep["interrupted"] and 1 <= rep["windows_done"] < 40
    assert "interrupted" in stdout


needs_adapter = pytest.mark.skipif(not adapter_available(), reason="lukern.LoRAAdapter not in this build")


@needs_adapter
def test_water_fill_meets_small_demands_first():
    import lukern
    from lukern.rank import adapter_bytes
    from lukern.replay.strategies import _fit_capacity, _water_fill

    m = DLRM([600, 20000, 5000], 2, dim=16)
    probes = {t: lukern.LoRAAdapter(n, 16, rank=4, capacity=1) for t, n in enumerate(m.cat_sizes)}
    budget = 0.03 * m.table_nbytes
    out = _water_fill(probes, m, [0, 1, 2], [40, 3000, 3000], budget)
    assert out[0] >= adapter_bytes(probes[0], 40, 4)  # the busy small table gets at least its demand
    assert sum(out) <= budget * (1 + 1e-9)
    assert out[1] == pytest.approx(out[2])
    big = _water_fill(probes, m, [0, 1, 2], [40, 3000, 3000], 10 * m.table_nbytes)
    assert big[0] == adapter_bytes(probes[0], 600, 4)  # capped at an adapter over all its rows
    cap = _fit_capacity(probes[1], 20000, out[1])
    assert adapter_bytes(probes[1], cap, 4) <= out[1] < adapter_bytes(probes[1], cap + 1, 4)


@needs_adapter
def test_lukern_learns_in_place_within_budget(tiny):
    from lukern.replay.strategies import LukernStrategy

    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    m0.fit(tiny, 0, 3000, epochs=1, batch_size=200)
    s = LukernStrategy(m0, rank=2, budget_pct=20.0, train_batch=400, demand=[50, 50, 5],  # tiny tables
                       rank_control=False)
    assert s.adapter_nbytes <= 0.2 * m0.table_nbytes
    b = tiny.batch(3000, 3200)
    base = m0.predict(b)
    np.testing.assert_allclose(s.predict(b, 0.0), base, rtol=1e-6)  # empty adapters serve the base model
    table_before = s.model.emb_buffer.copy()
    s.learn(b)
    s.predict(tiny.batch(3200, 3400), 0.0)
    s.learn(tiny.batch(3200, 3400))  # 400 rows: one trainer step
    assert any(a is not None and a.n_active > 0 for a in s.adapters)
    assert not np.allclose(s.predict(b, 0.0), base)
    for t, a in enumerate(s.adapters):
        if a is not None:
            rows, slots = a.active_rows()
            # fresh slots started from their rows' Adagrad history, then took one step
            prior = m0.emb_acc[m0.row_offsets[t] + rows]
            assert (a._state.acc_a[slots] >= prior - 1e-12).all()
    st = s.take_stats()
    assert st.bytes_shipped == 0 and st.update_cpu_s > 0 and 0 < st.adapter_mem_pct <= 20.0
    np.testing.assert_array_equal(s.model.emb_buffer, table_before)  # nothing evicted yet: W untouched
    s.learn(b)  # pairs with the predict(b) above
    with pytest.raises(RuntimeError, match="must follow predict"):
        s.learn(b)


@needs_adapter
def test_batched_trainer_path_equals_the_per_table_path(tiny):
    """The strategy's one-call-per-batch trainer and the adapters' own backward + seeding +
    step give the same adapters, tables and predictions (rank control on, evictions)."""
    from lukern.replay.strategies import LukernStrategy

    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    m0.fit(tiny, 0, 3000, epochs=1, batch_size=200)
    kw = dict(rank=2, budget_pct=10.0, train_batch=400, demand=[50, 50, 5], rank_every=3)
    fast, slow = LukernStrategy(m0.copy(), **kw), LukernStrategy(m0.copy(), **kw)
    assert fast._batched is not None
    slow._batched = None  # the per-table fallback (other eviction policies use it)
    for a in range(3000, 5400, 200):
        b = tiny.batch(a, a + 200)
        np.testing.assert_array_equal(fast.predict(b, 0.0), slow.predict(b, 0.0))
        fast.learn(b)
        slow.learn(b)
    np.testing.assert_array_equal(fast.model.emb_buffer, slow.model.emb_buffer)
    for fa, sa in zip(fast.adapters, slow.adapters):
        if fa is not None:
            assert fa.evicted_rows == sa.evicted_rows and fa.step_count == sa.step_count == 6
            for name in ("A", "B", "acc_a", "slot_row"):
                np.testing.assert_array_equal(getattr(fa._state, name), getattr(sa._state, name))
    assert sum(a.evicted_rows for a in fast.adapters if a is not None) > 0
    assert fast.take_stats().rank_decisions == slow.take_stats().rank_decisions


@needs_adapter
def test_b_starts_at_the_gradient_directions(tiny):
    from lukern.replay.strategies import LukernStrategy

    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    s = LukernStrategy(m0, rank=2, budget_pct=5.0, demand=[50, 50, 5], rank_control=False)
    batches = list(tiny.batches(500, 0, 1000))
    captured = s.init_directions(batches)
    for t, a in enumerate(s.adapters):
        if a is None:
            continue
        gram = np.zeros((8, 8))
        for b in batches:
            g = m0.grad_pooled(b, b.labels)[1][:, t * 8:(t + 1) * 8].astype(np.float64)
            gram += g.T @ g
        w, v = np.linalg.eigh(gram)
        top = v[:, -2:]
        B = a.B.astype(np.float64)
        np.testing.assert_allclose(B @ B.T, np.eye(2), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(top.T @ B.T), np.sqrt(2), atol=1e-4)  # same span
        assert captured[t] == pytest.approx(w[-2:].sum() / w.sum(), rel=1e-6)


@needs_adapter
def test_rank_control_keeps_served_values_and_budget(tiny):
    from lukern.replay.strategies import LukernStrategy

    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    m0.fit(tiny, 0, 3000, epochs=1, batch_size=200)
    s = LukernStrategy(m0, rank=4, budget_pct=30.0, train_batch=200, demand=[80, 80, 5], rank_every=2,
                       rank_energy=0.9, min_rank=1)
    assert any(c is not None for c in s.controllers)
    probe = tiny.batch(4500, 4700)
    for a in range(3000, 4400, 200):
        b = tiny.batch(a, a + 200)
        s.predict(b, 0.0)
        before = s.predict(probe, 0.0)
        s.predict(b, 0.0)
        s.learn(b)
    st = s.take_stats()
    decisions = [d for d in st.rank_decisions if d.get("actions")]
    assert decisions, "the controller decided nothing in 7 steps"
    for d in decisions:
        assert d["bytes_after"] <= d["limit_bytes"]
        assert {"table", "old_rank", "new_rank", "actions"} <= set(d)
    for t, a in enumerate(s.adapters):
        if a is not None:
            assert a.nbytes <= s.controllers[t].limit_bytes
            np.testing.assert_allclose(np.linalg.norm(a.B.astype(np.float64), axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(before).all()


needs_live = pytest.mark.skipif(not adapter_available() or not hasattr(__import__("lukern"), "LiveUpdater"),
                                reason="lukern.LiveUpdater not in this build")


@needs_live
def test_live_mode_reports_latency_on_and_off(tiny, tmp_path):
    from lukern.replay.live import run_live

    r = run_live(tiny, tiny_cfg(strategies=("stale", "lukern"), train_batch=400, budget_pct=20.0),
                 progress=False)
    lk = r["strategies"]["lukern"]
    assert r["mode"] == "live" and r["windows_done"] == 3
    for key in ("p50_ms", "p99_ms"):
        assert lk[key]["on"] > 0 and lk[key]["off"] > 0
    live = r["live"]
    n_served = sum(w["rows"] for w in r["windows"])
    assert live["trainer"]["recorded"] == n_served and live["trainer"]["samples"] == n_served
    assert live["on"]["requests"] == live["off"]["requests"] > 0
    assert lk["update_cpu_s"] > 0 and lk["auc"] > r["strategies"]["stale"]["auc"] - 0.05
    assert "live inference latency" in format_report(r)


def test_cli_live_mode(tmp_path, capsys):
    import lukern

    out = tmp_path / "live.json"
    code = main(["replay", "--mode", "live", "--events", "6000", "--windows", "2", "--epochs", "1", "--dim", "8",
                 "--train-batch", "400", "--budget-pct", "20", "--no-progress", "--strategies", "stale,lukern",
                 "--json", str(out)])
    if not hasattr(lukern, "LiveUpdater"):
        assert code == 2 and "LiveUpdater" in capsys.readouterr().err
        return
    assert code == 0
    rep = json.loads(out.read_text())
    assert set(rep["strategies"]["lukern"]["p99_ms"]) == {"on", "off"}


@needs_live
def test_live_mode_with_the_sidecar_trainer(tiny):
    from lukern.replay.live import run_live

    r = run_live(tiny, tiny_cfg(strategies=("lukern",), train_batch=400, budget_pct=20.0, trainer="process"),
                 progress=False)
    assert r["live"]["trainer"]["mode"] == "process"
    assert r["live"]["trainer"]["samples"] == sum(w["rows"] for w in r["windows"])
    assert any("rank control" in p for p in r["pending"])
    assert r["strategies"]["lukern"]["p99_ms"]["on"] > 0
