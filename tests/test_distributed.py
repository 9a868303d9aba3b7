"""Scale-out: merging factors, the exchange protocol, replicas, and the Ray backend."""

import subprocess

import numpy as np
import pytest

import lukern
from lukern.distributed import InProcessExchange, merge_factors
from lukern.replay.runner import ReplayConfig
from lukern.replay.synthetic import synthetic_stream


def _factors(rows, rank, d=8, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    return lukern.Factors(np.asarray(rows, np.int64), rng.standard_normal((len(rows), rank)),
                          rng.standard_normal((rank, d)), scale, 1)


def _dense(f, n_rows=50):
    out = np.zeros((n_rows, f.B.shape[1]))
    out[f.row_ids] = f.scale * f.A @ f.B
    return out


def test_merge_is_the_mean_of_products_exact_at_full_rank():
    a = _factors([1, 2, 3, 7], 3, seed=1)
    b = _factors([3, 7, 9], 2, seed=2)
    res = merge_factors([a, b], rank=5)
    da, db = _dense(a), _dense(b)
    touched = (np.abs(da).sum(1) > 0).astype(int) + (np.abs(db).sum(1) > 0).astype(int)
    expected = (da + db) / np.maximum(touched, 1)[:, None]
    np.testing.assert_allclose(_dense(res.factors), expected, atol=1e-10)
    assert res.dropped_energy < 1e-12 and res.rank_before == 5
    # not the same as averaging A and B separately
    assert list(res.factors.row_ids) == [1, 2, 3, 7, 9]


def test_merge_truncation_error_matches_dropped_energy():
    a = _factors(range(20), 4, seed=3)
    b = _factors(range(10, 30), 4, seed=4)
    full = merge_factors([a, b], rank=8)
    cut = merge_factors([a, b], rank=3)
    exact = _dense(full.factors)
    err = np.linalg.norm(_dense(cut.factors) - exact) ** 2 / np.linalg.norm(exact) ** 2
    assert cut.dropped_energy > 0
    assert abs(err - cut.dropped_energy) < 1e-9  # Eckart-Young: the error is exactly the dropped energy


def test_merge_weights_and_sums():
    a = _factors([1, 2], 2, seed=5)
    res = merge_factors([a, a], rank=4, weights=[1.0, -1.0], average_rows=False)
    assert np.abs(_dense(res.factors)).max() < 1e-10
    with pytest.raises(ValueError, match="one number per contribution"):
        merge_factors([a], rank=2, weights=[1, 2])
    with pytest.raises(ValueError, match="width"):
        merge_factors([a, _factors([1], 1, d=4)], rank=2)
    with pytest.raises(ValueError, match="at least one"):
        merge_factors([], rank=2)


def test_merged_lookup_equals_mean_of_adapters_corrections():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((400, 16))
    adapters = []
    for s in range(2):
        a = lukern.LoRAAdapter(400, 16, rank=4, capacity=200, dtype=np.float64, lr_a=0.1, seed=s)
        for k in range(4):
            idx = rng.integers(0, 400, 60)
            a.train_step(W, idx, np.arange(0, 61, 6), rng.standard_normal((10, 16)))
        adapters.append(a)
    res = merge_factors([a.export() for a in adapters], rank=8)
    merged = lukern.LoRAAdapter(400, 16, rank=8, capacity=400, dtype=np.float64)
    merged.apply_factors(res.factors)
    d0, d1 = adapters[0].dense_delta(), adapters[1].dense_delta()
    cnt = (np.abs(d0).sum(1) > 0).astype(int) + (np.abs(d1).sum(1) > 0).astype(int)
    expected = (d0 + d1) / np.maximum(cnt, 1)[:, None]
    idx = rng.integers(0, 400, 50)
    off = np.arange(0, 51, 5)
    got = lukern.embedding_bag(W, idx, off, adapter=merged)
    ref = lukern.embedding_bag(W + expected, idx, off)
    np.testing.assert_allclose(got, ref, atol=1e-9)


def test_in_process_exchange_versions():
    ex = InProcessExchange()
    ex.publish(0, 2, ["a"])
    ex.publish(0, 1, ["old"])  # older versions are ignored
    ex.publish(1, 1, ["b"])
    assert ex.collect(1) == {0: (2, ["a"])}
    assert ex.collect(1, seen={0: 2}) == {}
    ex.forget(0)
    assert ex.collect(1) == {}


@pytest.fixture(scope="module")
def small_stream():
    return synthetic_stream(n_events=20_000, seed=1)


def test_replicated_replay_in_process(small_stream):
    from lukern.distributed.replay import run_replicated

    cfg = ReplayConfig(windows=3, epochs=1, bootstrap=50)
    r = run_replicated(small_stream, cfg, replicas=2, exchange_every=1)
    iso, ex = r["arms"]["isolated"], r["arms"]["exchanging"]
    assert len(iso["auc"]) == len(ex["auc"]) == 3
    assert sum(iso["bytes_exchanged"]) == 0 and all(b > 0 for b in ex["bytes_exchanged"])
    assert all(0.5 < a <= 1 for a in ex["auc"])
    assert r["summary"]["delta_over_exchanged_bytes"] > 1
    with pytest.raises(ValueError, match="`split` must be"):
        run_replicated(small_stream, cfg, replicas=2, split="zone")


def _ray_processes():
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "raylet" in line or "gcs_server" in line]


@pytest.mark.slow
def test_ray_replicas_survive_a_killed_peer_and_stop_cleanly(small_stream):
    pytest.importorskip("ray")
    from lukern.distributed.ray_backend import RayCluster
    from lukern.distributed.replay import run_replicated

    before = _ray_processes()
    cfg = ReplayConfig(windows=3, epochs=1, bootstrap=50)
    killed = []

    def kill_one(arm, w, backend):
        if arm == "exchanging" and w == 0:
            backend.kill(1)  # dies before the next exchange
            killed.append(1)

    with RayCluster(num_cpus=2):
        r = run_replicated(small_stream, cfg, replicas=2, exchange_every=1, backend="ray", on_window=kill_one)
    ex = r["arms"]["exchanging"]
    assert killed == [1]
    assert [x["replica"] for x in ex["lost"]] == [1]
    assert ex["alive"][-1] == 1 and all(np.isfinite(ex["auc"]))  # the survivor served everything
    assert len(r["arms"]["isolated"]["auc"]) == 3
    assert _ray_processes() == before  # every Ray process it started is gone
