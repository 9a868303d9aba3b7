"""randomized_svd, probe_rank, GradientWindow and RankController against numpy references."""

import numpy as np
import pytest

import lukern
from lukern.rank import adapter_bytes


def _with_spectrum(n, d, s, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    V = np.linalg.qr(rng.standard_normal((d, len(s))))[0]
    return np.ascontiguousarray(((U * s) @ V.T).astype(dtype))


# --- randomized_svd -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["auto", "randomized", "gram"])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_decaying_spectrum_top_k_within_1_percent(method, k):
    d = 96
    s = 0.85 ** np.arange(d) * 10
    M = _with_spectrum(4000, d, s)
    res = lukern.randomized_svd(M, k, method=method)  # default oversample and n_iter
    ref = np.linalg.svd(M.astype(np.float64), compute_uv=False)[:k]
    assert res.method in ("randomized", "gram")
    np.testing.assert_allclose(res.S, ref, rtol=1e-2)
    U, S, Vt = res
    assert U.shape == (4000, k) and S.shape == (k,) and Vt.shape == (k, d)
    assert U.dtype == np.float32 and Vt.dtype == np.float32
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(k), atol=1e-4)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=2e-3)
    # the rank-k approximation is as good as the optimal one (Eckart-Young) up to 1%
    err = np.linalg.norm(M - (U * S) @ Vt)
    best = np.sqrt(np.sum(np.linalg.svd(M.astype(np.float64), compute_uv=False)[k:] ** 2))
    assert err <= best * 1.01 + 1e-3


def test_flat_spectrum():
    d = 64
    M = _with_spectrum(3000, d, np.ones(d), dtype=np.float64)
    for method in ("randomized", "gram"):
        S = lukern.randomized_svd(M, 8, method=method).S
        # Ritz values never exceed the true ones; on a flat spectrum they are all ~1
        assert np.all(S <= 1 + 1e-9)
        np.testing.assert_allclose(S, 1.0, rtol=1e-6 if method == "gram" else 2e-2)


def test_wide_input_goes_through_transpose():
    M = _with_spectrum(20, 300, 2.0 ** -np.arange(20), dtype=np.float64)
    U, S, Vt = lukern.randomized_svd(M, 4)
    np.testing.assert_allclose(S, np.linalg.svd(M, compute_uv=False)[:4], rtol=1e-8)
    np.testing.assert_allclose((U * S) @ Vt, M, atol=2 * 2.0 ** -4)


def test_deterministic_and_seeded():
    M = _with_spectrum(2000, 40, 0.7 ** np.arange(40))
    a = lukern.randomized_svd(M, 5, method="randomized")
    b = lukern.randomized_svd(M, 5, method="randomized")
    assert np.array_equal(a.U, b.U) and np.array_equal(a.S, b.S) and np.array_equal(a.Vt, b.Vt)
    c = lukern.randomized_svd(M, 5, method="randomized", rng=np.random.default_rng(7))
    np.testing.assert_allclose(c.S, a.S, rtol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_gathered_rows_equal_dense(dtype, method):
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((5000, 24)) * 0.8 ** np.arange(24)).astype(dtype)
    ids = rng.choice(5000, 1500, replace=False).astype(np.int32)  # > one block of rows
    ids[:10] = ids[0]  # duplicates are rows like any other
    g = lukern.GatheredRows(table, ids)
    a = lukern.randomized_svd(g, 6, method=method)
    b = lukern.randomized_svd(np.ascontiguousarray(table[ids]), 6, method=method)
    assert a.method == b.method == method
    np.testing.assert_array_equal(a.S, b.S)
    np.testing.assert_array_equal(a.U, b.U)
    np.testing.assert_array_equal(a.Vt, b.Vt)
    assert np.array_equal(g.to_dense(), table[ids])


def test_low_rank_rows_exact():
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((300, 6)).astype(np.float32), rng.standard_normal((6, 20)).astype(np.float32)
    op = lukern.LowRankRows(A, B, 0.25)
    ref = np.linalg.svd(0.25 * A.astype(np.float64) @ B, compute_uv=False)[:4]
    for method in ("auto", "randomized", "gram"):
        res = lukern.randomized_svd(op, 4, method=method)
        assert res.method == ("qr" if method == "auto" else method)
        np.testing.assert_allclose(res.S, ref, rtol=1e-4)
    U, S, Vt = lukern.randomized_svd(op, 6)
    np.testing.assert_allclose((U.astype(np.float64) * S) @ Vt, op.to_dense(), atol=1e-4)


def test_randomized_svd_rejects_bad_inputs():
    M = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="`k`"):
        lukern.randomized_svd(M, 5)
    with pytest.raises(ValueError, match="`k`"):
        lukern.randomized_svd(M, 0)
    with pytest.raises(ValueError, match="method"):
        lukern.randomized_svd(M, 2, method="lanczos")
    with pytest.raises(ValueError, match="n_iter"):
        lukern.randomized_svd(M, 2, n_iter=-1)
    with pytest.raises(TypeError, match="float32 or float64"):
        lukern.randomized_svd(np.ones((10, 4), np.int64), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        lukern.randomized_svd(np.ones((4, 10), np.float32).T, 2)
    with pytest.raises(TypeError, match="GatheredRows"):
        lukern.randomized_svd([[1.0]], 1)
    with pytest.raises(IndexError, match=r"`row_ids` values must be in \[0, 10\)"):
        lukern.GatheredRows(M, np.array([0, 10]))
    with pytest.raises(ValueError, match="agree on r"):
        lukern.LowRankRows(np.ones((3, 2)), np.ones((3, 4)))


# --- probe_rank --------------------------------------------------------------------------------

@pytest.mark.parametrize("true_rank", [1, 3, 7, 12])
def test_probe_rank_finds_planted_rank(true_rank):
    rng = np.random.default_rng(true_rank)
    n, d = 3000, 48
    # signal directions of comparable strength (each well above 1 - energy of the total)
    signal = _with_spectrum(n, d, np.linspace(1.2, 1.0, true_rank), seed=true_rank, dtype=np.float64)
    noise = rng.standard_normal((n, d))
    noise *= 0.15 * np.linalg.norm(signal) / np.linalg.norm(noise)  # ~2% of the energy
    M = (signal + noise).astype(np.float32)
    p = lukern.probe_rank(M, energy=0.95)
    assert p.rank == true_rank, p
    assert p.energy_kept >= 0.95
    assert p.spectrum.shape == (d,) and np.all(np.diff(p.spectrum) <= 1e-9)
    np.testing.assert_allclose(p.total_energy, np.sum(M.astype(np.float64) ** 2), rtol=1e-5)
    # the same answer from the spectrum alone and from gathered rows
    assert lukern.probe_rank(np.linalg.svd(M, compute_uv=False)).rank == true_rank
    assert lukern.probe_rank(lukern.GatheredRows(M, np.arange(n))).rank == true_rank


def test_probe_rank_cap_and_edge_cases():
    p = lukern.probe_rank(np.array([4.0, 3.0, 2.0, 1.0]), energy=0.99, max_rank=2)
    assert p.rank == 2 and p.energy_kept == pytest.approx(25 / 30)
    z = lukern.probe_rank(np.zeros(3))
    assert z.rank == 0 and z.total_energy == 0
    with pytest.raises(ValueError, match="energy"):
        lukern.probe_rank(np.ones(3), energy=1.5)
    with pytest.raises(ValueError, match="spectrum"):
        lukern.probe_rank(np.array([1.0, -1.0]))


# --- gradient window ---------------------------------------------------------------------------

def test_gradient_window_ring_and_residual():
    w = lukern.GradientWindow(4, 6, per_add=4)
    w.add(np.arange(40, dtype=np.float64).reshape(10, 4))  # 10 rows -> 4 evenly spaced
    assert w.n == 4 and w.n_seen == 10
    np.testing.assert_array_equal(w.rows()[:, 0], [4, 12, 24, 32])  # rows 1, 3, 6, 8
    w.add(np.ones((3, 4)))  # wraps around the ring
    assert w.n == 6 and w.nbytes == 6 * 4 * 4
    w.clear()
    w.add(np.diag([3.0, 4.0, 0.0, 0.0]))
    assert w.residual_energy(np.array([[1.0, 0, 0, 0]])) == pytest.approx(16 / 25)
    assert w.residual_energy(np.array([[0, 2.0, 0, 0], [5.0, 0, 0, 0]])) == pytest.approx(0.0)
    dirs, share = w.top_directions(2, exclude=np.array([[0, 1.0, 0, 0]]))
    assert dirs.shape == (1, 4)  # only one direction of energy is left outside B
    np.testing.assert_allclose(np.abs(dirs[0]), [1, 0, 0, 0], atol=1e-12)
    assert share[0] == pytest.approx(9 / 25)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        w.add(np.ones((2, 3)))


# --- rank controller ---------------------------------------------------------------------------

def _scratch(n_rows):
    # RankController.scratch_nbytes at most: 8 bytes a tracked id, a bit filter of folded rows
    k = min(n_rows, 512)
    return 8 * k + -(-min(n_rows, 64 * k) // 8)


def _adapter_with_planted(n, d, rank, n_active, true_rank, noise, seed=0, capacity=None):
    rng = np.random.default_rng(seed)
    a = lukern.LoRAAdapter(n, d, rank=rank, capacity=capacity or 2 * n_active, seed=seed)
    ids = rng.choice(n, n_active, replace=False)
    a.backward(ids, np.arange(n_active + 1), np.zeros((n_active, d), np.float32))
    a.step()
    _, slots = a.active_rows()
    low = rng.standard_normal((n_active, true_rank)) @ rng.standard_normal((true_rank, rank))
    a.A[slots] = (low + noise * rng.standard_normal((n_active, rank))).astype(np.float32)
    return a, rng


def test_shrink_changes_outputs_no_more_than_dropped_energy():
    n, d = 5000, 16
    a, rng = _adapter_with_planted(n, d, 16, 600, 4, 0.05)
    table = rng.standard_normal((n, d)).astype(np.float32)
    active = a.active_rows()[0]
    idx = np.concatenate([rng.choice(active, 3000), rng.integers(0, n, 1000)])
    rng.shuffle(idx)
    off = np.concatenate([[0], np.sort(rng.choice(np.arange(1, idx.size), 199, replace=False)), [idx.size]])
    before = lukern.embedding_bag(table, idx, off, adapter=a).astype(np.float64)
    delta_before = a.dense_delta()
    ctl = lukern.RankController(a, table, budget=1.0, energy=0.95, every=1)
    _, S, _ = ctl.spectrum()
    acc_before = a._state.acc_a[a.active_rows()[1]].copy()
    d0 = ctl.step()
    # the row-wise optimizer memory survives the re-factor, row by row
    np.testing.assert_array_equal(a._state.acc_a[a.active_rows()[1]], acc_before)
    assert d0 is not None and d0["actions"][0]["action"] == "shrink"
    r = a.rank
    assert d0["old_rank"] == 16 and r == lukern.probe_rank(S, energy=0.95).rank and r <= 5
    dropped = float(np.sum(S[r:] ** 2))
    assert d0["energy_kept"] == pytest.approx(1 - dropped / np.sum(S ** 2))
    # the correction moved by exactly the dropped energy (Frobenius) ...
    moved = a.dense_delta() - delta_before
    assert np.sum(moved ** 2) == pytest.approx(dropped, rel=1e-3)
    # ... and no pooled output by more than ||counts of the bag's active rows|| * S[r]
    after = lukern.embedding_bag(table, idx, off, adapter=a).astype(np.float64)
    change = np.linalg.norm(after - before, axis=1)
    bound = np.empty(off.size - 1)
    for b in range(off.size - 1):
        _, counts = np.unique(idx[off[b]:off[b + 1]], return_counts=True)
        bound[b] = np.linalg.norm(counts) * S[r]
    assert np.all(change <= bound * (1 + 1e-3) + 1e-4)
    assert np.all(change <= bound.max() / S[r] * np.sqrt(dropped) + 1e-4)


def test_budget_respected_while_training():
    n, d = 20000, 16
    a, rng = _adapter_with_planted(n, d, 8, 1500, 8, 0.0, capacity=2000)
    table = rng.standard_normal((n, d)).astype(np.float32)
    ctl = lukern.RankController(a, table, budget=0.03, every=3)
    limit = 0.03 * table.nbytes
    assert a.nbytes > limit
    first = ctl.step()
    assert first is not None and first["bytes_after"] <= limit
    assert first["actions"][-1]["action"].startswith("budget")
    for _ in range(10):
        idx = rng.integers(0, n, 2048)
        off = np.arange(0, 2049, 8)
        a.train_step(table, idx, off, rng.standard_normal((256, d)).astype(np.float32) * 0.1)
        ctl.step()
        assert a.nbytes + ctl.window.nbytes <= adapter_bytes(a, a.capacity, a.rank) + ctl.window.nbytes <= limit
    assert all(e["bytes_bound"] <= e["limit_bytes"] for e in ctl.log)


def test_budget_picks_cheaper_loss():
    n, d = 20000, 16
    # nearly rank-1 correction: dropping ranks costs little, folding rows costs a lot
    a, rng = _adapter_with_planted(n, d, 8, 1500, 1, 1e-3, capacity=1600)
    table = np.zeros((n, d), np.float32)
    window = lukern.GradientWindow(d, 16)
    limit = (0.9 * adapter_bytes(a, a.capacity, a.rank) + window.nbytes + _scratch(n)) / table.nbytes
    ctl = lukern.RankController(a, table, budget=limit, energy=1.0, every=1, window=window)
    dec = ctl.step()
    assert [x["action"] for x in dec["actions"]] == ["budget_rank"]
    assert a.n_active == 1500 and a.rank < 8 and dec["energy_kept"] > 0.999
    # too small for rank 1 at this capacity: rows are folded into the table, served values kept
    idx, off = a.active_rows()[0][:64], np.arange(65)
    before = lukern.embedding_bag(table, idx, off, adapter=a)
    ctl.budget = (0.5 * adapter_bytes(a, a.capacity, 1) + window.nbytes + _scratch(n)) / table.nbytes
    dec = ctl.decide()
    assert any(x["action"].endswith("evict") for x in dec["actions"])
    assert a.nbytes + ctl.window.nbytes <= ctl.budget * table.nbytes and a.capacity < 1600
    np.testing.assert_allclose(lukern.embedding_bag(table, idx, off, adapter=a), before, atol=1e-4)
    with pytest.raises(ValueError, match="raise `budget`"):
        ctl.budget = 1e-9
        ctl.decide()


def test_grow_seeds_from_residual_directions():
    n, d = 5000, 16
    a = lukern.LoRAAdapter(n, d, rank=2, capacity=500, seed=3, lr_b=0.0)  # B fixed: a known residual
    rng = np.random.default_rng(3)
    table = rng.standard_normal((n, d)).astype(np.float32)
    ctl = lukern.RankController(a, table, budget=1.0, every=1, grow_threshold=0.5, grow_step=2, max_rank=8)
    assert a.grad_window is ctl.window
    # gradients live in a 2-D subspace far from B's row space
    basis = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    basis -= (basis @ np.linalg.pinv(a.B.astype(np.float64))) @ a.B  # orthogonal to B
    basis = np.linalg.qr(basis.T)[0].T
    for _ in range(4):
        idx = rng.integers(0, n, 512)
        off = np.arange(0, 513, 4)
        g = (rng.standard_normal((128, 2)) * [3.0, 1.0]) @ basis
        a.backward(idx, off, g.astype(np.float32), table=table)
        a.step()
    B_old = a.B.copy()
    ids = a.active_rows()[0][:50]
    before = lukern.embedding_bag(table, ids, np.arange(51), adapter=a)
    dec = ctl.step()
    assert dec is not None and [x["action"] for x in dec["actions"]] == ["grow"]
    assert a.rank == 4 and dec["actions"][0]["residual_energy"] > 0.9
    np.testing.assert_array_equal(a.B[:2], B_old)
    new = a.B[2:].astype(np.float64)
    # the new rows span the gradients' subspace
    proj = new @ basis.T @ basis
    np.testing.assert_allclose(proj, new, atol=1e-5 * np.abs(new).max())
    assert np.linalg.matrix_rank(new, tol=1e-6 * np.abs(new).max()) == 2
    after = lukern.embedding_bag(table, ids, np.arange(51), adapter=a)
    np.testing.assert_array_equal(after, before)  # new A columns are zero
    assert ctl.window.residual_energy(a.B) < 1e-6


def test_controller_rejects_bad_arguments():
    a = lukern.LoRAAdapter(100, 8, rank=2)
    with pytest.raises(ValueError, match="budget"):
        lukern.RankController(a, np.zeros((100, 8), np.float32), budget=0)
    with pytest.raises(ValueError, match="shape"):
        lukern.RankController(a, np.zeros((50, 8), np.float32))
    with pytest.raises(TypeError, match="LoRAAdapter"):
        lukern.RankController(object(), np.zeros((100, 8), np.float32))


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_parallel_equals_serial_bitwise(method):
    # 6000 rows = 3 lanes of partial sums: the reduction order is fixed by the shape, so
    # every thread count gives the same bits, for dense and gathered operands
    M = _with_spectrum(6000, 32, 0.8 ** np.arange(32))
    rng = np.random.default_rng(5)
    table = np.ascontiguousarray(np.vstack([M, rng.standard_normal((1000, 32)).astype(np.float32)]))
    g = lukern.GatheredRows(table, rng.permutation(table.shape[0])[:6000])
    for op in (M, g):
        one = lukern.randomized_svd(op, 4, method=method, n_threads=1)
        for nt in (2, 3):
            par = lukern.randomized_svd(op, 4, method=method, n_threads=nt)
            assert par.method == one.method == method
            for x, y in zip(par, one):
                np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="n_threads"):
        lukern.randomized_svd(M, 4, n_threads=0)


def test_shrink_keeps_directions_gradients_point_along():
    n, d = 5000, 16
    a, rng = _adapter_with_planted(n, d, 8, 600, 2, 0.0)
    table = np.zeros((n, d), np.float32)
    ctl = lukern.RankController(a, table, budget=1.0, energy=0.95, every=1)
    _, S, Vt = ctl.spectrum()
    assert lukern.probe_rank(S, energy=0.95).rank <= 2
    # recent gradients point along a direction the correction barely holds yet: the 4th
    # right singular vector of the correction (the correction is rank 2, so any vector
    # orthogonal to the first two inside B's row space qualifies)
    Q = np.linalg.qr(a.B.astype(np.float64).T)[0]  # basis of B's row space (d x 8)
    v = Q[:, 5] - Vt[:2].T @ (Vt[:2] @ Q[:, 5])
    v /= np.linalg.norm(v)
    ctl.window.add(np.outer(rng.standard_normal(200), v))
    dec = ctl.step()
    assert dec is not None and a.rank >= 3  # kept a direction covering v
    assert ctl.window.residual_energy(a.B) < 0.05


def _train(a, table, rng, ids, steps, bag=1):
    d = a.dim
    for _ in range(steps):
        idx = rng.choice(ids, 64 * bag)
        off = np.arange(0, idx.size + 1, bag)
        a.train_step(table, idx, off, rng.standard_normal((64, d)).astype(np.float32) * 0.1)


def test_capacity_grows_when_hot_rows_are_folded():
    n, d = 400, 8
    rng = np.random.default_rng(1)
    table = rng.standard_normal((n, d)).astype(np.float32)
    a = lukern.LoRAAdapter(n, d, rank=4, capacity=32, seed=1)
    # 150 rows in constant use: 32 slots thrash (every folded row was touched a step ago)
    hot = rng.choice(n, 150, replace=False)
    ctl = lukern.RankController(a, table, budget=10.0, energy=1.0, every=5)  # room for every row
    ctl.step()
    caps = [a.capacity]
    for _ in range(10):  # the first re-admissions are seen once folded rows were noted
        _train(a, table, rng, hot, 5)
        for _ in range(5):
            ctl.step()
        caps.append(a.capacity)
        used = adapter_bytes(a, a.capacity, a.rank) + ctl.window.nbytes + ctl.scratch_nbytes
        assert used <= ctl.budget * table.nbytes
    grew = [x for d_ in ctl.log for x in d_["actions"] if x["action"] == "grow_capacity"]
    # doubling at most, or the whole table once doubling would hold three quarters of it
    assert grew and all(x["new_capacity"] <= 2 * x["old_capacity"] or x["new_capacity"] == n for x in grew)
    assert caps[0] == 32 and caps[-1] >= 150 and caps == sorted(caps)
    # served values are kept by the resize: fused lookups equal table + s A B rows
    rows, slots = a.active_rows()
    want = table[rows] + a.scale * (a.A[slots].astype(np.float64) @ a.B)
    got = lukern.embedding_bag(table, rows, np.arange(rows.size + 1), adapter=a)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_capacity_does_not_grow_for_cold_folds_or_past_the_budget():
    n, d = 5000, 8
    rng = np.random.default_rng(2)
    table = rng.standard_normal((n, d)).astype(np.float32)
    # a long tail: a row is seen once, so no folded row comes back
    a = lukern.LoRAAdapter(n, d, rank=4, capacity=64, seed=2)
    ctl = lukern.RankController(a, table, budget=1.0, every=10)
    ctl.step()
    for s in range(60):
        idx = np.arange(s * 64, (s + 1) * 64) % n
        a.train_step(table, idx, np.arange(65), rng.standard_normal((64, d)).astype(np.float32))
        ctl.step()
    assert a.evicted_rows > 0 and a.capacity == 64
    # hot rows folded, but no room in the budget: the capacity stays
    b = lukern.LoRAAdapter(n, d, rank=4, capacity=32, seed=2)
    w = lukern.GradientWindow(d, 4)
    ctl = lukern.RankController(b, table, budget=1.0, energy=1.0, every=5, window=w)
    ctl.budget = (adapter_bytes(b, 33, 4) - 1 + w.nbytes + ctl.scratch_nbytes) / table.nbytes  # 33 slots: no
    ctl.step()
    _train(b, table, rng, rng.choice(n, 100, replace=False), 10)
    for _ in range(5):
        ctl.step()
    assert b.evicted_rows > 0 and b.capacity == 32 and b.rank == 4
    c = lukern.LoRAAdapter(n, d, rank=4, capacity=32, seed=2)
    ctl = lukern.RankController(c, table, budget=1.0, energy=1.0, every=5, grow_capacity=False)
    ctl.step()
    _train(c, table, rng, rng.choice(n, 100, replace=False), 10)
    for _ in range(5):
        ctl.step()
    assert c.evicted_rows > 0 and c.capacity == 32


def test_no_shrink_before_shrink_after_steps():
    n, d = 5000, 16
    a, rng = _adapter_with_planted(n, d, 8, 600, 2, 0.0)
    table = np.zeros((n, d), np.float32)
    ctl = lukern.RankController(a, table, budget=1.0, energy=0.95, every=1, shrink_after=3)
    assert a.step_count == 1 and ctl.step() is None and a.rank == 8
    a.step_count = 3  # (the count the controller reads; no gradients needed here)
    dec = ctl.step()
    assert dec is not None and dec["actions"][0]["action"] == "shrink" and a.rank <= 3
    with pytest.raises(ValueError, match="shrink_after"):
        lukern.RankController(a, table, shrink_after=-1)


def test_budget_folds_cold_rows_before_lowering_rank():
    n, d = 20000, 16
    # a full-rank correction: lowering the rank drops energy, folding cold rows drops none
    a, rng = _adapter_with_planted(n, d, 8, 1500, 8, 0.0, capacity=1600)
    table = np.zeros((n, d), np.float32)
    a.step_count = 100  # every row was last touched 99 steps ago: cold
    window = lukern.GradientWindow(d, 16)
    limit = (0.8 * adapter_bytes(a, a.capacity, a.rank) + window.nbytes + _scratch(n)) / table.nbytes
    ctl = lukern.RankController(a, table, budget=limit, energy=1.0, every=10, window=window)
    idx, off = a.active_rows()[0][:64], np.arange(65)
    before = lukern.embedding_bag(table, idx, off, adapter=a)
    dec = ctl.step()
    assert [x["action"] for x in dec["actions"]] == ["budget_evict"] and a.rank == 8 and a.capacity < 1600
    np.testing.assert_allclose(lukern.embedding_bag(table, idx, off, adapter=a), before, atol=1e-4)
    # the same adapter with hot rows: lowering the rank loses less than folding them
    b, _ = _adapter_with_planted(n, d, 8, 1500, 8, 0.0, capacity=1600)
    b.A[:] *= np.linspace(0.1, 1, 8)[::-1].astype(np.float32)  # a decaying spectrum: the last rank is cheap
    ctl = lukern.RankController(b, table, budget=limit, energy=1.0, every=10, window=lukern.GradientWindow(d, 16))
    dec = ctl.step()
    assert [x["action"] for x in dec["actions"]] == ["budget_rank"] and b.rank < 8 and b.capacity == 1600


def test_ties_choose_rank_or_rows_and_budget_may_exceed_the_table():
    n, d = 3000, 16
    table = np.zeros((n, d), np.float32)
    for ties, want in (("rows", "budget_rank"), ("rank", "budget_evict")):
        a = lukern.LoRAAdapter(n, d, rank=8, capacity=200)  # nothing learned: every option loses 0
        w = lukern.GradientWindow(d, 4)
        ctl = lukern.RankController(a, table, ties=ties, window=w)
        ctl.budget = (0.7 * adapter_bytes(a, 200, 8) + w.nbytes + ctl.scratch_nbytes) / table.nbytes
        dec = ctl.step()
        assert [x["action"] for x in dec["actions"]] == [want]
        assert (a.rank, a.capacity == 200) == ((a.rank, True) if ties == "rows" else (8, False))
    small = np.zeros((100, d), np.float32)
    a = lukern.LoRAAdapter(100, d, rank=16, capacity=100)
    ctl = lukern.RankController(a, small, budget=8.0)  # more than the table: allowed (a global budget's share)
    assert ctl.step() is None and a.rank == 16
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="budget"):
            lukern.RankController(a, small, budget=bad)
    with pytest.raises(ValueError, match="ties"):
        lukern.RankController(a, small, ties="both")
