"""The replay's lukern update path: per-id gradient sums, B from the first trainer step,
which tables get a rank controller."""

import numpy as np
import pytest

from lukern._kernels.dlrm import sum_by_id
from lukern.replay.dlrm import DLRM
from lukern.replay.strategies import adapter_available
from lukern.replay.synthetic import synthetic_stream

needs_adapter = pytest.mark.skipif(not adapter_available(), reason="lukern.LoRAAdapter not available")


@pytest.fixture(scope="module")
def tiny():
    return synthetic_stream(n_events=6000, seed=3, n_users=300, n_items=200, new_items=400, days=4)


def _scratch(n):
    m = 1 << max(4, int(2 * n - 1).bit_length())
    return np.empty(m, np.int64), np.empty(m, np.int64)


@pytest.mark.parametrize("n_rows", [1, 7, 50, 1 << 40])
def test_sum_by_id_matches_numpy(n_rows):
    rng = np.random.default_rng(n_rows % 97)
    n, d = 300, 5
    ids = rng.integers(0, n_rows, (3, n))
    g = rng.standard_normal((3, n, d)).astype(np.float32)
    g0 = g.copy()
    out = np.full_like(ids, -9)
    counts = np.empty(3, np.int64)
    sum_by_id(ids, g, out, counts, *_scratch(n))
    for t in range(3):
        uniq, first = np.unique(ids[t], return_index=True)
        order = np.argsort(first)  # first-appearance order
        assert counts[t] == uniq.size
        np.testing.assert_array_equal(out[t, :counts[t]], uniq[order])
        ref = np.zeros((uniq.size, d))
        np.add.at(ref, np.searchsorted(uniq, ids[t]), g0[t].astype(np.float64))
        np.testing.assert_allclose(g[t, :counts[t]], ref[order], rtol=1e-5, atol=1e-5)


def test_sum_by_id_all_distinct_keeps_rows():
    ids = np.arange(64, dtype=np.int64)[None, ::-1].copy()
    g = np.arange(64 * 3, dtype=np.float32).reshape(1, 64, 3)
    g0 = g.copy()
    out = np.empty_like(ids)
    counts = np.empty(1, np.int64)
    sum_by_id(ids, g, out, counts, *_scratch(64))
    assert counts[0] == 64
    np.testing.assert_array_equal(out, ids)
    np.testing.assert_array_equal(g, g0)


@needs_adapter
def test_summed_rows_train_like_the_bags():
    """One id per bag, sum pooling: a step on the distinct ids with summed gradients moves
    A and B as a step on the bags does (no eviction: same admissions)."""
    import lukern
    from lukern.lora_batch import BatchedTrainer, StableLRU

    rng = np.random.default_rng(0)
    n_rows, d, n = 40, 8, 256
    table = rng.standard_normal((n_rows, d)).astype(np.float32)
    kw = dict(rank=2, capacity=n_rows, eviction=StableLRU(), lr_a=0.3, lr_b=0.01, seed=1)
    bags, summed = lukern.LoRAAdapter(n_rows, d, **kw), lukern.LoRAAdapter(n_rows, d, **kw)
    tb, ts = BatchedTrainer([bags], [table.copy()]), BatchedTrainer([summed], [table.copy()])
    for step in range(4):
        ids = rng.integers(0, n_rows, (1, n))
        g = rng.standard_normal((1, n, d)).astype(np.float32) * 0.1
        tb.train_step(ids, np.arange(n + 1, dtype=np.int64), g.copy())
        out, counts = np.empty_like(ids), np.empty(1, np.int64)
        gs = g.copy()
        sum_by_id(ids, gs, out, counts, *_scratch(n))
        u = int(counts[0])
        ts.train_step(out[:, :u], np.arange(u + 1, dtype=np.int64), np.ascontiguousarray(gs[:, :u]))
    rb, sb = bags.active_rows()
    rs, ss = summed.active_rows()
    ob, os_ = np.argsort(rb), np.argsort(rs)
    np.testing.assert_array_equal(rb[ob], rs[os_])
    np.testing.assert_allclose(bags.A[sb[ob]], summed.A[ss[os_]], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bags.B, summed.B, rtol=1e-4, atol=1e-6)


@needs_adapter
def test_b_starts_at_the_first_steps_gradient_directions(tiny):
    from lukern.replay.strategies import LukernStrategy

    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    m0.fit(tiny, 0, 3000, epochs=1, batch_size=200)
    s = LukernStrategy(m0.copy(), rank=2, budget_pct=5.0, demand=[50, 50, 5], rank_control=False,
                       train_batch=400, init_b="served")
    assert s.init_on_first_step and s.init_captured is None
    batches = [tiny.batch(a, a + 200) for a in (3000, 3200)]
    gram = [np.zeros((8, 8)) for _ in s.adapters]
    for b in batches:
        np.testing.assert_array_equal(s.predict(b, 0.0), m0.predict(b))  # nothing learned yet
        _, g = m0.backward_pooled(m0.forward_cache(b), b.labels, table_major=True, want_loss=False)
        for t in range(len(gram)):
            gram[t] += g[t].astype(np.float64).T @ g[t].astype(np.float64)
        s.learn(b)  # the second one triggers the first trainer step
    assert not s.init_on_first_step and s.init_captured is not None
    for t, a in enumerate(s.adapters):
        if a is None:
            continue
        w, v = np.linalg.eigh(gram[t])
        B0 = np.linalg.qr(a.B.astype(np.float64).T)[0]  # B's span after one step stays close
        top = v[:, -2:]
        assert np.linalg.norm(top.T @ B0) == pytest.approx(np.sqrt(2), abs=1e-2)
        assert s.init_captured[t] == pytest.approx(w[-2:].sum() / w.sum(), rel=1e-3)


@needs_adapter
def test_init_directions_cancels_the_first_step_init(tiny):
    from lukern.replay.strategies import LukernStrategy

    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    s = LukernStrategy(m0, rank=2, budget_pct=5.0, demand=[50, 50, 5], rank_control=False, train_batch=200,
                       init_b="served")
    assert s.init_on_first_step
    s.init_directions([tiny.batch(0, 500)])
    B = [None if a is None else a.B.copy() for a in s.adapters]
    assert not s.init_on_first_step
    b = tiny.batch(500, 700)
    s.predict(b, 0.0)
    s.learn(b)
    # one Adagrad step of B from its set directions, not a re-initialisation
    for a, b0 in zip(s.adapters, B):
        if a is not None:
            assert np.abs(a.B - b0).max() < 0.05
    with pytest.raises(ValueError, match="init_b"):
        LukernStrategy(m0, init_b="random")
    assert not LukernStrategy(m0).init_on_first_step  # direct users (replicas) keep B as built


@needs_adapter
def test_rank_controllers_only_where_the_window_fits(tiny):
    pytest.importorskip("lukern.rank")
    from lukern.replay.strategies import LukernStrategy

    m0 = DLRM(tiny.cat_sizes, tiny.n_dense, dim=8, seed=0)
    kw = dict(rank=2, demand=[50, 50, 5], train_batch=200)
    s = LukernStrategy(m0, budget_pct=30.0, **kw)
    big = [t for t, a in enumerate(s.adapters) if a is not None]
    row_bytes = 8 * 4
    for t in big:
        fits = s.share_bytes[t] / 4 >= 2 * 8 * row_bytes
        assert (s.controllers[t] is not None) == fits
    # a budget too small for any 16-row window: fixed rank everywhere, recorded
    s = LukernStrategy(m0, budget_pct=2.0, **kw)
    assert all(c is None for c in s.controllers)
    assert s.settings()["fixed_rank_tables"] == [s.model_names[t] for t, a in enumerate(s.adapters) if a is not None]
    # rank_min_window=1: every adapter gets its controller again
    s = LukernStrategy(m0, budget_pct=2.0, rank_min_window=1, **kw)
    assert all((c is None) == (a is None) for a, c in zip(s.adapters, s.controllers))


def test_bars_separate_the_point_difference_from_the_interval():
    from lukern.replay.runner import _bars

    out = {"lukern": {"adapter_mem_pct_max": 0.5}}
    comps = {"lukern_vs_delta": {"auc_diff": 0.001, "ci95": [-0.002, 0.004], "bytes_ratio": float("inf"),
                                 "cpu_ratio": 2.5},
             "lukern_vs_stale": {"auc_diff": 0.01, "ci95": [0.001, 0.02], "bytes_ratio": None, "cpu_ratio": None}}
    bars = _bars(out, comps)
    assert bars["auc_beats_delta"] and not bars["auc_beats_delta_ci"]
    assert bars["auc_beats_stale"] and bars["auc_beats_stale_ci"]
    assert bars["cpu_2x_below_delta"] and bars["adapter_mem_below_1pct_goal"]
