"""Smoke tests of the rank measurement scripts (small shapes; real data only when present)."""

import json

import numpy as np
import pytest

import lukern
from lukern.bench import gradient_spectrum, rsvd


def _json_tail(text):
    return json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)


def test_rsvd_bench_rows_agree_with_numpy():
    rng = np.random.default_rng(0)
    M = (rng.standard_normal((3000, 24)) * 0.8 ** np.arange(24)).astype(np.float32)
    rows = rsvd.run_case("dense", M, None, [3], oversample=5, n_iter=2, repeats=1)
    (row,) = rows
    assert row["k"] == 3 and row["auto_method"] in ("gram", "randomized")
    assert row["lukern_randomized_ms"] > 0 and row["lukern_auto_ms"] > 0
    if rsvd._sklearn() is not None:
        assert row["sklearn_over_lukern_randomized"] > 0
        assert row["max_rel_diff_S_vs_sklearn"] < 1e-3
    S = np.linalg.svd(M.astype(np.float64), compute_uv=False)[:3]
    np.testing.assert_allclose(lukern.randomized_svd(M, 3, oversample=5, n_iter=2).S, S, rtol=1e-3)


def test_gradient_spectrum_skips_absent_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUKERN_DATA", str(tmp_path))
    assert gradient_spectrum.main([]) == 0
    err = capsys.readouterr().err
    assert "movielens" in err and "talkingdata" in err and "skipped" in err
    with pytest.raises(SystemExit):
        gradient_spectrum.main(["--data", "criteo"])


def test_gradient_spectrum_on_movielens_head(shared_data, monkeypatch, capsys):
    monkeypatch.setenv("LUKERN_DATA", str(shared_data))
    assert gradient_spectrum.main(["--data", "movielens", "--max-rows", "8000", "--budget", "0.05", "--json"]) == 0
    rep = _json_tail(capsys.readouterr().out)["movielens"]
    for row in rep["spectra"]:
        sh = row["median_share"]
        assert 0 < sh[0] <= sh[1] <= sh[2] <= 1 + 1e-9
    c = rep["controller"]["controlled"]
    assert c["max_adapter_bytes_share"] <= 0.05
    assert c["bound_share"] <= 0.05 and all(1 <= r <= 16 for r in c["final_ranks"])
    same = rep["controller"]["fixed_rank16_same_capacity"]
    assert same["final_capacities"] == c["final_capacities"] and same["final_ranks"] == [16] * len(c["final_ranks"])
    assert rep["controller"]["controlled_over_fixed_same_capacity"] == pytest.approx(
        c["test_logloss"] / same["test_logloss"])


def test_split_budget_water_fills():
    demand = np.array([10.0, 50.0, 1000.0, 20.0])
    shares = gradient_spectrum.split_budget(demand, 200.0)
    # small demands met in full, the rest split equally, nothing over the total
    np.testing.assert_allclose(shares[[0, 1, 3]], [10, 50, 20])
    assert shares[2] == pytest.approx(120.0, rel=1e-9) and shares.sum() <= 200.0 + 1e-9
    shares = gradient_spectrum.split_budget(demand, 3 * demand.sum())  # room to spare: in proportion
    np.testing.assert_allclose(shares, 3 * demand)
    shares = gradient_spectrum.split_budget(demand, 20.0)  # everyone capped at the same level
    np.testing.assert_allclose(shares, [5, 5, 5, 5], rtol=1e-9)
