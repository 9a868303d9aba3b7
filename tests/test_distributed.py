"""Scale-out without Ray: the product-correct merge, the exchange protocol, replicas and
the replay across replicas (tests/test_distributed_ray.py covers the Ray backend)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lukern
from lukern.distributed import InProcessExchange, LocalReplicaSet, Replica, Snapshot, merge_factors
from lukern.replay.dlrm import DLRM
from lukern.replay.runner import ReplayConfig
from lukern.replay.synthetic import synthetic_stream

N_ROWS = 60


def _factors(rows, rank, d=8, seed=0, scale=0.5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return lukern.Factors(np.asarray(rows, np.int64), rng.standard_normal((len(rows), rank)).astype(dtype),
                          rng.standard_normal((rank, d)).astype(dtype), scale, 1)


def _dense(f, n_rows=N_ROWS):
    """The oracle: the correction as a dense (n_rows, d) float64 matrix."""
    out = np.zeros((n_rows, f.B.shape[1]))
    out[f.row_ids] = f.scale * (f.A.astype(np.float64) @ f.B.astype(np.float64))
    return out


def _held(f, n_rows=N_ROWS):
    m = np.zeros(n_rows, bool)
    m[f.row_ids] = True
    return m


# --------------------------------------------------------------------------- merge


def test_merge_is_the_mean_of_products_exact_at_full_rank():
    a = _factors([1, 2, 3, 7], 3, seed=1)
    b = _factors([3, 7, 9], 2, seed=2, scale=2.0)
    res = merge_factors([a, b], rank=5)
    cnt = _held(a).astype(int) + _held(b)
    expected = (_dense(a) + _dense(b)) / np.maximum(cnt, 1)[:, None]
    np.testing.assert_allclose(_dense(res.factors), expected, atol=1e-12)
    assert res.factors.row_ids.tolist() == [1, 2, 3, 7, 9]
    assert res.dropped_energy < 1e-12 and res.rank_before == 5
    assert res.energy == pytest.approx(np.sum(expected ** 2))
    # averaging the factors instead is not averaging the products
    c, e = _factors([3, 7], 2, seed=11), _factors([3, 7], 2, seed=12)
    naive = 0.5 * (c.A + e.A) @ (0.5 * (c.B + e.B)) * 0.5
    right = merge_factors([c, e], rank=4).factors
    assert not np.allclose(naive, _dense(right)[[3, 7]], atol=1e-3)
    np.testing.assert_allclose(_dense(right), (_dense(c) + _dense(e)) / 2, atol=1e-12)


def test_merge_sum_mode_and_weights():
    a = _factors([1, 2, 5], 2, seed=3)
    b = _factors([2, 5, 8], 3, seed=4, scale=0.25)
    res = merge_factors([a, b], rank=5, mode="sum")
    np.testing.assert_allclose(_dense(res.factors), _dense(a) + _dense(b), atol=1e-12)
    zero = merge_factors([a, a], rank=2, mode="sum", weights=[1.0, -1.0])
    assert np.abs(_dense(zero.factors)).max() < 1e-12 and zero.energy < 1e-20


def test_touched_rows_decide_the_mean():
    # row 2 is held by both but touched only by b: it takes b's correction, not the mean
    a = _factors([1, 2], 2, seed=5)
    b = _factors([2, 3], 2, seed=6)
    res = merge_factors([a, b], rank=4, touched=[np.array([True, False]), None])
    got = _dense(res.factors)
    np.testing.assert_allclose(got[1], _dense(a)[1], atol=1e-12)
    np.testing.assert_allclose(got[2], _dense(b)[2], atol=1e-12)
    np.testing.assert_allclose(got[3], _dense(b)[3], atol=1e-12)
    # a row nobody touched gets the mean of its holders
    res = merge_factors([a, b], rank=4, touched=[np.array([True, False]), np.array([False, True])])
    np.testing.assert_allclose(_dense(res.factors)[2], (_dense(a)[2] + _dense(b)[2]) / 2, atol=1e-12)


def test_truncation_error_is_exactly_the_dropped_energy():
    a = _factors(range(20), 4, seed=7)
    b = _factors(range(10, 30), 4, seed=8)
    exact = _dense(merge_factors([a, b], rank=8).factors)
    for r in (1, 3, 6):
        cut = merge_factors([a, b], rank=r)
        err = np.sum((_dense(cut.factors) - exact) ** 2) / np.sum(exact ** 2)
        assert cut.dropped_energy > 0
        assert err == pytest.approx(cut.dropped_energy, rel=1e-9, abs=1e-12)  # Eckart-Young


def test_merged_b_rows_are_orthogonal_and_padding_keeps_values():
    a = _factors([4], 1, seed=9)  # a rank-1 correction merged to rank 4: 3 padded directions
    prefer = np.random.default_rng(1).standard_normal((2, 8))
    res = merge_factors([a], rank=4, b_row_norm=2.0, pad_with=prefer)
    B = res.factors.B
    np.testing.assert_allclose(B @ B.T, 4.0 * np.eye(4), atol=1e-12)
    np.testing.assert_allclose(res.factors.A[:, 1:], 0.0)  # padded directions carry nothing yet
    np.testing.assert_allclose(_dense(res.factors), _dense(a), atol=1e-12)
    # the first padded row lies in the span of the kept direction and `pad_with`
    span = np.vstack([B[:1], prefer])
    coef, *_ = np.linalg.lstsq(span.T, B[1], rcond=None)
    np.testing.assert_allclose(span.T @ coef, B[1], atol=1e-10)


def test_merge_handles_empty_and_zero_contributions():
    d = 8
    empty = lukern.Factors(np.zeros(0, np.int64), np.zeros((0, 2)), np.ones((2, d)), 1.0, 0)
    res = merge_factors([empty, None], rank=2)
    assert res.factors.row_ids.size == 0 and res.factors.A.shape == (0, 2) and res.dropped_energy == 0
    zero = lukern.Factors(np.array([3]), np.zeros((1, 2)), np.ones((2, d)), 1.0, 0)
    res = merge_factors([zero], rank=2)
    assert np.abs(_dense(res.factors)).max() == 0 and np.isfinite(res.factors.B).all()
    assert np.linalg.matrix_rank(res.factors.B) == 2  # still a basis the adapter can learn on


@pytest.mark.parametrize("bad, exc, match", [
    (dict(contributions=[]), ValueError, "at least one"),
    (dict(contributions=["x"]), TypeError, "lukern.Factors"),
    (dict(rank=0), ValueError, "`rank` must be an integer in"),
    (dict(rank=9), ValueError, "`rank` must be an integer in"),
    (dict(mode="median"), ValueError, "`mode` must be"),
    (dict(weights=[1.0]), ValueError, "one finite number per contribution"),
    (dict(touched=[np.ones(3)]), ValueError, "one entry per contribution"),
    (dict(touched=[np.ones(2), None]), ValueError, "must be a bool array"),
    (dict(scale=0.0), ValueError, "non-zero"),
    (dict(b_row_norm=-1.0), ValueError, "b_row_norm"),
    (dict(pad_with=np.ones((2, 3))), ValueError, "pad_with"),
])
def test_merge_rejects_bad_input(bad, exc, match):
    kw = dict(contributions=[_factors([1, 2], 2, seed=1), _factors([2, 3], 2, seed=2)], rank=2)
    kw.update(bad)
    with pytest.raises(exc, match=match):
        merge_factors(kw.pop("contributions"), **kw)


@pytest.mark.parametrize("broken, match", [
    (lambda f: lukern.Factors(f.row_ids, f.A, np.ones((2, 4)), f.scale, 0), "width"),
    (lambda f: lukern.Factors(np.array([1, 1]), f.A, f.B, f.scale, 0), "unique"),
    (lambda f: lukern.Factors(f.row_ids, f.A[:1], f.B, f.scale, 0), "inconsistent"),
    (lambda f: lukern.Factors(f.row_ids, f.A * np.nan, f.B, f.scale, 0), "NaN"),
    (lambda f: lukern.Factors(f.row_ids.astype(float), f.A, f.B, f.scale, 0), "integers"),
])
def test_merge_rejects_broken_contributions(broken, match):
    good = _factors([1, 2], 2, seed=1)
    with pytest.raises((ValueError, TypeError), match=match):
        merge_factors([good, broken(_factors([1, 2], 2, seed=2))], rank=2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sets(st.integers(0, N_ROWS - 1), max_size=12), st.integers(1, 3),
                          st.floats(0.1, 3.0), st.booleans()), min_size=1, max_size=4),
       st.sampled_from(["mean", "sum"]), st.integers(0, 2 ** 31 - 1))
def test_merge_matches_the_dense_oracle(specs, mode, seed):
    contribs, touched = [], []
    rng = np.random.default_rng(seed)
    for k, (rows, r, s, partial) in enumerate(specs):
        rows = np.array(sorted(rows), np.int64)
        contribs.append(_factors(rows, r, seed=seed + k, scale=s))
        touched.append(rng.random(rows.size) < 0.5 if partial else None)
    r_cat = sum(c.A.shape[1] for c in contribs)
    res = merge_factors(contribs, rank=min(8, r_cat), touched=touched, mode=mode)
    # oracle, row by row
    dense = [_dense(c) for c in contribs]
    held = [_held(c) for c in contribs]
    tmask = []
    for c, t in zip(contribs, touched):
        m = np.zeros(N_ROWS, bool)
        m[c.row_ids[t] if t is not None else c.row_ids] = True
        tmask.append(m)
    expected = np.zeros((N_ROWS, 8))
    for u in range(N_ROWS):
        if mode == "sum":
            expected[u] = sum(D[u] for D in dense)
            continue
        who = [i for i in range(len(contribs)) if tmask[i][u]] or [i for i in range(len(contribs)) if held[i][u]]
        if who:
            expected[u] = np.mean([dense[i][u] for i in who], axis=0)
    got = _dense(res.factors)
    energy = np.sum(expected ** 2)
    err = np.sum((got - expected) ** 2)
    assert err <= res.dropped_energy * energy * (1 + 1e-8) + 1e-18 * max(energy, 1.0)
    if r_cat <= 8:
        np.testing.assert_allclose(got, expected, atol=1e-9 * max(1.0, np.abs(expected).max()))


def _trained_adapter(seed, W, rank=4):
    rng = np.random.default_rng(seed)
    a = lukern.LoRAAdapter(W.shape[0], W.shape[1], rank=rank, capacity=W.shape[0], dtype=np.float64, lr_a=0.1,
                           lr_b=0.05, seed=seed, optimizer_a="sgd", optimizer_b="sgd")
    for _ in range(5):
        idx = rng.integers(0, W.shape[0] // 2 + 100 * seed, 60) % W.shape[0]
        a.train_step(W, idx, np.arange(0, 61, 6), rng.standard_normal((10, W.shape[1])))
    return a


@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("rank", [8, 5, 2])
def test_merged_adapter_lookup_equals_the_corrections_within_dropped_energy(mode, rank):
    """The issue's bar: merging two adapters' factors and looking up gives the sum (or
    the per-row mean) of their corrections, within the energy the re-compression dropped."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((300, 16))
    a0, a1 = _trained_adapter(1, W), _trained_adapter(2, W)
    res = merge_factors([a0.export(), a1.export()], rank=rank, mode=mode)
    merged = lukern.LoRAAdapter(300, 16, rank=rank, capacity=300, dtype=np.float64)
    merged.apply_factors(res.factors)
    d0, d1 = a0.dense_delta(), a1.dense_delta()
    if mode == "sum":
        expected = d0 + d1
    else:
        cnt = (np.abs(d0).sum(1) > 0).astype(int) + (np.abs(d1).sum(1) > 0)
        expected = (d0 + d1) / np.maximum(cnt, 1)[:, None]
    # one bag per row: the fused lookup serves W + the merged correction row by row
    ids = np.arange(300)
    got = lukern.embedding_bag(W, ids, np.arange(301), adapter=merged) - W
    err = np.sum((got - expected) ** 2) / np.sum(expected ** 2)
    assert err == pytest.approx(res.dropped_energy, abs=1e-10)
    if rank == 8:  # target rank >= the sum of the ranks: exact
        np.testing.assert_allclose(got, expected, atol=1e-10)
    else:
        assert res.dropped_energy > 0
    # and bags of several rows: the error is the pooled error of its rows
    idx = rng.integers(0, 300, 40)
    off = np.arange(0, 41, 4)
    ref = lukern.embedding_bag(W + expected, idx, off)
    got_bags = lukern.embedding_bag(W, idx, off, adapter=merged)
    bound = np.sqrt(res.dropped_energy * np.sum(expected ** 2)) * 4  # |sum of 4 rows| <= 4 max row error
    assert np.abs(got_bags - ref).max() <= bound + 1e-10


# --------------------------------------------------------------------------- protocol


def test_snapshot_packs_touched_rows_and_checks_shapes():
    f = _factors([3, 5, 9], 2, dtype=np.float32)
    s = Snapshot.build(0, 4, [f, None], [np.array([True, False, True]), None])
    assert s.touched_mask(0).tolist() == [True, False, True] and s.touched_mask(1) is None
    assert s.nbytes == f.nbytes + 1
    with pytest.raises(ValueError, match="bool array of length 3"):
        Snapshot.build(0, 1, [f], [np.array([True])])
    with pytest.raises(ValueError, match="one entry per table"):
        Snapshot.build(0, 1, [f], [None, None])
    with pytest.raises(TypeError, match="Factors or None"):
        Snapshot.build(0, 1, ["f"])


def test_in_process_exchange_skips_stale_versions():
    ex = InProcessExchange()
    ex.publish(0, Snapshot(0, 2, (), ()))
    ex.publish(0, Snapshot(0, 1, (), ()))  # older: ignored
    ex.publish(1, Snapshot(1, 1, (), ()))
    assert {k: s.version for k, s in ex.collect(1).items()} == {0: 2}
    assert ex.collect(1, seen={0: 2}) == {}
    assert ex.versions() == {0: 2, 1: 1}
    ex.forget(0)
    assert ex.collect(1) == {}
    with pytest.raises(ValueError, match="must match"):
        ex.publish(3, Snapshot(0, 5, (), ()))
    with pytest.raises(TypeError, match="Snapshot"):
        ex.publish(0, "factors")
    assert isinstance(ex, lukern.distributed.FactorExchange)


# --------------------------------------------------------------------------- replicas


@pytest.fixture(scope="module")
def tiny():
    stream = synthetic_stream(n_events=3000, seed=3)
    model = DLRM(stream.cat_sizes, stream.n_dense, dim=8, bottom=(8,), top=(8,), seed=0)
    # capacity for every row: no eviction, so tables stay equal across replicas
    kw = dict(rank=2, lr_a=0.3, lr_b=0.01, budget_pct=60.0, rank_control=False, train_batch=128)
    return stream, model, kw


def _serve_split(rs, stream, lo, hi, owner):
    return rs.serve({i: [_batch(stream, np.flatnonzero(owner[lo:hi] == i) + lo)] for i in rs.alive()})


def _batch(stream, rows):
    from lukern.replay.streams import Batch

    return Batch(stream.t[rows], stream.dense[rows], stream.cat[rows], stream.labels[rows])


@pytest.mark.parametrize("rows_mode", ["mean", "sum"])
def test_fold_exchange_gives_every_replica_the_merged_corrections(tiny, rows_mode):
    stream, model, kw = tiny
    rs = LocalReplicaSet(2, model, kw, replica_kw={"merge": "fold", "rows": rows_mode})
    owner = np.arange(len(stream)) % 2
    _serve_split(rs, stream, 0, 1500, owner)
    reps = [rs.replicas[i] for i in (0, 1)]
    before = []
    for r in reps:
        r.strategy.flush()
        before.append([None if a is None else a.dense_delta() for a in r.adapters])
    tables0 = [reps[0].model.table(t).copy() for t in range(len(stream.cat_sizes))]
    touched = [[m.copy() for m in r._touched] for r in reps]
    pub = rs.publish()
    mer = rs.merge()
    assert all(p["sent"] > 0 for p in pub.values()) and [m["peers"] for m in mer.values()] == [[1], [0]]
    for t, a in enumerate(reps[0].adapters):
        if a is None:
            continue
        D0, D1 = before[0][t], before[1][t]
        T0, T1 = touched[0][t], touched[1][t]
        if rows_mode == "sum":
            exp = D0 + D1
        else:
            cnt = T0.astype(int) + T1
            exp = (D0 * T0[:, None] + D1 * T1[:, None]) / np.maximum(cnt, 1)[:, None]
        for r in reps:
            # the adapters restarted at A = 0: the table now serves the merged correction
            assert np.abs(r.adapters[t].dense_delta()).max() == 0
            np.testing.assert_allclose(r.model.table(t), tables0[t] + exp, atol=2e-5)
        np.testing.assert_array_equal(reps[0].model.table(t), reps[1].model.table(t))
        np.testing.assert_array_equal(reps[0].adapters[t].B, reps[1].adapters[t].B)
    # the replicas go on serving and learning after the merge
    p = _serve_split(rs, stream, 1500, 2200, owner)
    assert all(np.isfinite(v).all() for v in p.values())
    assert all(s["finite"] and s["merges"] == 1 for s in rs.stats().values())


def test_adopt_exchange_keeps_the_merge_in_the_adapters(tiny):
    stream, model, kw = tiny
    rs = LocalReplicaSet(2, model, kw, replica_kw={"merge": "adopt"})
    owner = np.arange(len(stream)) % 2
    _serve_split(rs, stream, 0, 1500, owner)
    reps = [rs.replicas[i] for i in (0, 1)]
    for r in reps:
        r.strategy.flush()
    expected = {}
    for t, a in enumerate(reps[0].adapters):
        if a is not None:
            res = merge_factors([reps[0].adapters[t].export(), reps[1].adapters[t].export()], a.rank,
                                touched=[r._touched[t][r.adapters[t].export().row_ids] for r in reps])
            expected[t] = (_dense(res.factors, a.n_rows), res.dropped_energy)
    tables0 = [reps[0].model.table(t).copy() for t in range(len(stream.cat_sizes))]
    rs.publish()
    mer = rs.merge()
    for t, (exp, dropped) in expected.items():
        for r in reps:
            got = r.adapters[t].dense_delta()
            np.testing.assert_allclose(got, exp, atol=1e-5)
            np.testing.assert_array_equal(r.model.table(t), tables0[t])  # capacity suffices: nothing folded
        assert max(m["dropped_energy"] for m in mer.values()) >= dropped - 1e-9


def test_a_bad_peer_snapshot_changes_nothing(tiny):
    stream, model, kw = tiny
    ex = InProcessExchange()
    r = Replica(0, model, kw)
    r.serve_batches([_batch(stream, np.arange(0, 400))])
    r.strategy.flush()
    snap = r.snapshot()
    wrong = Snapshot.build(1, 1, [None if f is None else lukern.Factors(f.row_ids, f.A, np.ones((f.B.shape[0], 3),
                                                                                                  f.B.dtype),
                                                                         f.scale, 1) for f in snap.factors])
    ex.publish(1, wrong)
    state = [None if a is None else a.dense_delta() for a in r.adapters]
    tables = r.model.emb_buffer.copy()
    with pytest.raises(ValueError, match="width"):
        r.merge_from(ex)
    np.testing.assert_array_equal(r.model.emb_buffer, tables)
    for a, s in zip(r.adapters, state):
        if a is not None:
            np.testing.assert_array_equal(a.dense_delta(), s)
    assert r.merges == 0 and r.seen == {}


def test_replica_model_shares_the_mlp_read_only(tiny):
    stream, model, kw = tiny
    r = Replica(0, model, kw)
    k = next(iter(model.params))
    assert not r.model.params[k].flags.writeable and np.shares_memory(r.model.params[k], model.params[k])
    assert r.model.table(0).flags.writeable and not np.shares_memory(r.model.emb_buffer, model.emb_buffer)
    with pytest.raises(ValueError, match="`merge` must be"):
        Replica(0, model, kw, merge="average")


# --------------------------------------------------------------------------- replay


@pytest.fixture(scope="module")
def small_stream():
    return synthetic_stream(n_events=16_000, seed=1)


def test_replicated_replay_in_process(small_stream):
    from lukern.distributed.replay import run_replicated

    cfg = ReplayConfig(windows=3, epochs=1, bootstrap=50)
    r = run_replicated(small_stream, cfg, replicas=2, exchange_every=1)
    iso, ex = r["arms"]["isolated"], r["arms"]["exchanging"]
    assert len(iso["auc"]) == len(ex["auc"]) == 3
    assert sum(iso["bytes_exchanged"]) == 0 and all(b > 0 for b in ex["bytes_exchanged"])
    assert all(0.5 < a <= 1 for a in ex["auc"] + iso["auc"])
    assert sum(iso["unserved_rows"]) == sum(ex["unserved_rows"]) == 0
    assert iso["auc"][0] == ex["auc"][0]  # nothing exchanged before the end of window 0
    assert r["summary"]["delta_over_exchanged_min"] > 1 and len(ex["exchanges"]) == 3
    assert sum(r["rows_per_replica"]) == len(small_stream) - r["train_rows"]
    # four exchanges per window with T = 1/4
    r4 = run_replicated(small_stream, cfg, replicas=2, exchange_every=0.25, arms=("exchanging",))
    assert len(r4["arms"]["exchanging"]["exchanges"]) == 12 and "bars" not in r4


@pytest.mark.parametrize("kw, match", [
    (dict(split="zone"), "`split` must be"),
    (dict(replicas=0), "`replicas` must be >= 1"),
    (dict(exchange_every=0.3), "1/k of a window"),
    (dict(exchange_every=1.5), "whole number"),
    (dict(exchange_every=0), "must be > 0"),
    (dict(backend="mpi"), "`backend` must be"),
    (dict(arms=("both",)), "`arms` must be"),
    (dict(merge="average"), "`merge` must be"),
    (dict(rows="max"), "`rows` must be"),
])
def test_replicated_replay_rejects_bad_settings(small_stream, kw, match):
    from lukern.distributed.replay import run_replicated

    with pytest.raises(ValueError, match=match):
        run_replicated(small_stream, ReplayConfig(windows=2, epochs=1), **kw)


def test_user_split_keeps_each_user_on_one_replica(small_stream):
    from lukern.distributed.replay import replica_owner

    o = replica_owner(small_stream, 3, "user")
    users = small_stream.cat[:, 0]
    for u in np.unique(users)[:50]:
        assert np.unique(o[users == u]).size == 1
    assert set(np.unique(o)) == {0, 1, 2}
    r = replica_owner(small_stream, 3, "random", seed=1)
    assert np.array_equal(r, replica_owner(small_stream, 3, "random", seed=1))


def test_cli_replay_with_replicas(tmp_path, capsys):
    import json

    from lukern.cli import main

    out = tmp_path / "r.json"
    rc = main(["replay", "--events", "8000", "--windows", "2", "--epochs", "1", "--strategies", "lukern",
               "--replicas", "2", "--exchange-every", "0.5", "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "replicas: 2 on inproc" in text and "exchanging - isolated" in text and "single lukern" in text
    rep = json.loads(out.read_text())["replicas"]
    assert len(rep["arms"]["exchanging"]["exchanges"]) == 4


class _LossyExchange(InProcessExchange):
    """An exchange that could not fetch replica 2's snapshot (as RayExchange reports a
    snapshot whose owner died)."""

    def collect(self, replica_id, seen=None):
        out = super().collect(replica_id, seen)
        self.failed = [(2, "OwnerDiedError")] if out.pop(2, None) is not None else []
        return out


def test_unfetchable_peer_snapshots_are_skipped_and_reported(tiny):
    stream, model, kw = tiny
    ex = _LossyExchange()
    reps = [Replica(i, model, kw) for i in range(3)]
    for i, r in enumerate(reps):
        r.serve_batches([_batch(stream, np.arange(400 * i, 400 * (i + 1)))])
        r.publish(ex)
    rep = reps[0].merge_from(ex)
    assert rep["peers"] == [1] and rep["failed"] == [2]
    assert reps[0].seen == {1: 1}  # replica 2's snapshot stays new: it is merged once it can be fetched
    assert reps[0].stats()["finite"]


class _FlakySet:
    """Replica 1 dies during its first serve call; replica 0 serves (score = row id)."""

    def __init__(self):
        self.live, self.lost, self.calls = [0, 1], [], []

    def alive(self):
        return list(self.live)

    def serve(self, parts):
        self.calls.append({i: sum(len(b) for b in bs) for i, bs in parts.items()})
        if 1 in parts and 1 in self.live:
            self.live.remove(1)
            self.lost.append({"replica": 1})
        return {i: np.concatenate([b.t for b in bs]).astype(float) for i, bs in parts.items() if i in self.live}


def test_rows_of_a_replica_lost_while_serving_go_to_the_survivors(small_stream):
    from lukern.distributed.replay import _serve_range

    rs = _FlakySet()
    owner = np.arange(len(small_stream)) % 2
    pred = _serve_range(rs, small_stream, owner, 100, 400, 64, 2)
    np.testing.assert_array_equal(pred, small_stream.t[100:400])  # every row scored, in place
    assert rs.calls == [{0: 150, 1: 150}, {0: 150}]
