"""LoRAAdapter: fused lookup, backward, optimizers, eviction/fold, export/import, concurrency."""

import os
import warnings

import numpy as np
import pytest

import lukern
from lukern.testing import make_lookup_problem, reference_embedding_bag, reference_table_batch


def _trained(n_rows=500, dim=16, rank=4, capacity=200, dtype=np.float64, steps=6, seed=0, **kw):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_rows, dim)).astype(dtype)
    a = lukern.LoRAAdapter(n_rows, dim, rank=rank, capacity=capacity, dtype=dtype, lr_a=0.1, lr_b=0.05, seed=seed, **kw)
    for s in range(steps):
        p = make_lookup_problem(n_rows=n_rows, dim=dim, n_bags=16, pooling=(1, 6), dtype=dtype, table=W, seed=100 + s)
        assert a.train_step(W, p.indices, p.offsets, rng.standard_normal((16, dim)))
    return W, a


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_equals_dense_lookup(mode, dtype):
    W, a = _trained(dtype=dtype)
    assert a.n_active > 0
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=40, pooling=(0, 8), dtype=dtype, table=W, seed=7,
                            weighted=(mode == "sum"))
    dense = (W.astype(np.float64) + a.dense_delta()).astype(dtype)
    ref = reference_embedding_bag(dense, p.indices, p.offsets, p.weights, mode)
    for driver in ("serial", "prange"):
        got = lukern.embedding_bag(W, p.indices, p.offsets, weights=p.weights, mode=mode, adapter=a, driver=driver,
                                   n_threads=2)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


def test_inactive_ids_contribute_only_w():
    W, a = _trained()
    rows, _ = a.active_rows()
    inactive = np.setdiff1d(np.arange(500), rows)[:10]
    off = np.arange(11)
    assert np.array_equal(lukern.embedding_bag(W, inactive, off, adapter=a), W[inactive])


@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_table_batch_with_adapters(mode, weighted):
    W1, a1 = _trained(seed=1)
    W2, a2 = _trained(n_rows=300, dim=8, rank=2, capacity=100, seed=2)
    W3 = np.random.default_rng(5).standard_normal((200, 16))
    batch = lukern.TableBatch([W1, W2, W3])
    rng = np.random.default_rng(3)
    il = [rng.integers(0, n, 30) for n in (500, 300, 200)]
    ol = [np.array([0, 0, 4, 11, 30])] * 3  # an empty bag too
    idx, off = batch.pack(il, ol)
    w = rng.random(idx.size) if weighted else None
    got = batch.lookup(idx, off, weights=w, mode=mode, adapters=[a1, a2, None])
    ref = reference_table_batch([W1 + a1.dense_delta(), W2 + a2.dense_delta(), W3], idx, off, w, mode)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one adapter or None per table"):
        batch.lookup(idx, off, adapters=[a1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_table_batch_correction_kernel(dtype, mode, weighted):
    # one kernel call per width for every adapted table (lukern._kernels.lora_tbe): rank 8
    # (pooled in registers) and other ranks, two widths, tables without an adapter, empty
    # and long bags; it must agree with the per-table fused lookup and see every new state
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    specs = [(500, 16, 8), (300, 8, 3), (200, 16, None), (400, 16, 2), (350, 8, 8)]
    made = [_trained(n_rows=n, dim=d, rank=r, capacity=150, dtype=dtype, seed=i) if r else
            (np.random.default_rng(9).standard_normal((n, d)).astype(dtype), None) for i, (n, d, r) in enumerate(specs)]
    adapters = [a for _, a in made]
    batch = lukern.TableBatch([w for w, _ in made])
    tables = batch.tables  # views into the batch: evictions fold into what it serves
    rng = np.random.default_rng(4)
    ol = [np.array([0, 0, 1, 9, 9, 47, 60])] * len(specs)  # empty bags and a long one
    il = [np.concatenate([rng.integers(0, n, 30), adapters[t].active_rows()[0][:30] if adapters[t] else
                          rng.integers(0, n, 30)]) for t, (n, _, _) in enumerate(specs)]
    idx, off = batch.pack(il, ol)
    w = rng.random(idx.size).astype(dtype) if weighted else None

    def expected():
        dense = [tab + (a.dense_delta() if a is not None else 0) for tab, a in zip(tables, adapters)]
        return reference_table_batch(dense, idx, off, w, mode)

    got = batch.lookup(idx, off, weights=w, mode=mode, adapters=adapters, driver="serial")
    np.testing.assert_allclose(got, expected(), **tol)
    for driver in ("threads", "prange"):  # the correction split over the lookup's threads: same bits
        np.testing.assert_array_equal(batch.lookup(idx, off, weights=w, mode=mode, adapters=adapters, driver=driver,
                                                   n_threads=2), got)
    s = 0
    for t, a in enumerate(adapters):  # the single-table fused lookup of the same bags
        c0, c1 = batch.col_offsets[t], batch.col_offsets[t + 1]
        o_t = off[t * 6:(t + 1) * 6 + 1] - off[t * 6]
        e = s + int(o_t[-1])
        one = lukern.embedding_bag(tables[t], idx[s:e], o_t, weights=None if w is None else w[s:e], mode=mode,
                                   adapter=a)
        np.testing.assert_allclose(got[:, c0:c1], one, **tol)
        s = e
    # a step swaps adapter 0's state and changes A: the next lookup must see it, not the
    # arguments kept from the last call
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=8, pooling=(1, 4), dtype=dtype, table=tables[0], seed=5)
    assert adapters[0].train_step(tables[0], p.indices, p.offsets, np.ones((8, 16), dtype))
    np.testing.assert_allclose(batch.lookup(idx, off, weights=w, mode=mode, adapters=adapters), expected(), **tol)


def _dense_grads(a, W, p, G, mode):
    """dL/dA (dense, n_rows x r) and dL/dB of L = sum_b <G_b, y_b>, y the lookup of the
    dense table W + s A_dense B: the obviously correct formulation."""
    rows, slots = a.active_rows()
    A_dense = np.zeros((W.shape[0], a.rank))
    A_dense[rows] = a.A[slots]
    S = np.zeros(W.shape)  # sum over ids of f_b w_j e_{i_j} G_b^T
    for b in range(len(p.offsets) - 1):
        s_, e = p.offsets[b], p.offsets[b + 1]
        f = 1.0 / (e - s_) if mode == "mean" and e > s_ else 1.0
        for j in range(s_, e):
            S[p.indices[j]] += f * (1.0 if p.weights is None else p.weights[j]) * G[b]
    return A_dense, a.scale * S @ a.B.T, a.scale * A_dense.T @ S


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_backward_matches_hand_gradient_and_finite_differences(mode):
    W, a = _trained(steps=4, optimizer_a="sgd", optimizer_b="sgd")
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=12, pooling=(0, 5), dtype=np.float64, table=W, seed=11,
                            weighted=(mode == "sum"))
    G = np.random.default_rng(2).standard_normal((12, 16))
    assert a.backward(p.indices, p.offsets, G, weights=p.weights, mode=mode, table=W)
    A_dense, dA_dense, dB = _dense_grads(a, W, p, G, mode)
    rows, dA, dB_got = a.pending_gradients()
    np.testing.assert_allclose(dA, dA_dense[rows], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dB_got, dB, rtol=1e-10, atol=1e-12)
    assert set(rows) == set(np.unique(p.indices))  # every touched id was admitted
    s = a.scale

    def loss(Ad, B):  # finite differences of L in one A entry and one B entry
        y = reference_embedding_bag(W + s * Ad @ B, p.indices, p.offsets, p.weights, mode)
        return float((G * y).sum())

    eps = 1e-6
    r0 = rows[0]
    E = np.zeros_like(A_dense)
    E[r0, 1] = eps
    fd = (loss(A_dense + E, a.B) - loss(A_dense - E, a.B)) / (2 * eps)
    assert abs(fd - dA[0, 1]) < 1e-5 * max(1, abs(fd))
    EB = np.zeros_like(a.B)
    EB[2, 3] = eps
    fdB = (loss(A_dense, a.B + EB) - loss(A_dense, a.B - EB)) / (2 * eps)
    assert abs(fdB - dB_got[2, 3]) < 1e-5 * max(1, abs(fdB))


def test_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    W, a = _trained(steps=3, optimizer_a="sgd", optimizer_b="sgd")
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=10, pooling=(1, 5), dtype=np.float64, table=W, seed=21)
    G = np.random.default_rng(9).standard_normal((10, 16))
    rows0, slots0 = a.active_rows()
    # admit first (so that the torch model has the same rows), then compare gradients
    assert a.backward(p.indices, p.offsets, G, table=W)
    rows, dA, dB = a.pending_gradients()
    r_all, s_all = a.active_rows()
    A_dense = np.zeros((500, a.rank)); A_dense[r_all] = a.A[s_all]
    tA = torch.tensor(A_dense, requires_grad=True)
    tB = torch.tensor(a.B.astype(np.float64), requires_grad=True)
    tW = torch.tensor(W)
    emb = torch.nn.functional.embedding_bag(torch.from_numpy(p.indices), tW + a.scale * tA @ tB,
                                            torch.from_numpy(p.offsets), mode="sum", include_last_offset=True)
    np.testing.assert_allclose(emb.detach().numpy(), lukern.embedding_bag(W, p.indices, p.offsets, adapter=a),
                               rtol=1e-12, atol=1e-12)
    (emb * torch.from_numpy(G)).sum().backward()
    np.testing.assert_allclose(dA, tA.grad.numpy()[rows], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dB, tB.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_a,opt_b", [("sgd", "sgd"), ("rowwise_adagrad", "adagrad")])
def test_optimizer_updates(opt_a, opt_b):
    W, a = _trained(steps=2, optimizer_a=opt_a, optimizer_b=opt_b, weight_decay=0.01)
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=8, pooling=(1, 4), dtype=np.float64, table=W, seed=5)
    G = np.random.default_rng(1).standard_normal((8, 16))
    assert a.backward(p.indices, p.offsets, G, table=W)
    rows, dA, dB = a.pending_gradients()
    r_all, s_all = a.active_rows()
    slot_of = dict(zip(r_all, s_all))
    A0 = a.A.copy(); B0 = a.B.copy(); accA = a._state.acc_a.copy(); accB = a._state.acc_b.copy()
    assert a.step()
    wd = 0.01
    for i, r in enumerate(rows):
        sl = slot_of[r]
        g = dA[i] + wd * A0[sl]
        if opt_a == "sgd":
            exp = A0[sl] - 0.1 * g
        else:
            acc = accA[sl] + (g * g).mean()
            exp = A0[sl] - 0.1 * g / (np.sqrt(acc) + 1e-8)
        np.testing.assert_allclose(a.A[sl], exp, rtol=1e-10, atol=1e-12)
    gB = dB + wd * B0
    expB = B0 - 0.05 * gB if opt_b == "sgd" else B0 - 0.05 * gB / (np.sqrt(accB + gB * gB) + 1e-8)
    np.testing.assert_allclose(a.B, expB, rtol=1e-10, atol=1e-12)
    assert a.pending_gradients()[0].size == 0


def test_nan_gradient_rejected_nothing_written():
    W, a = _trained()
    before = (a.A.copy(), a.B.copy(), a.n_active, W.copy())
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=4, pooling=(1, 3), dtype=np.float64, table=W, seed=3)
    G = np.ones((4, 16)); G[2, 5] = np.nan
    with pytest.warns(RuntimeWarning, match="rejected"):
        assert not a.train_step(W, p.indices, p.offsets, G)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert not a.train_step(W, p.indices, p.offsets, G * np.inf)
    assert a.rejected_steps == 2
    assert np.array_equal(a.A, before[0]) and np.array_equal(a.B, before[1]) and a.n_active == before[2]
    assert np.array_equal(W, before[3])


def test_bad_inputs():
    W, a = _trained()
    off = np.array([0, 2])
    with pytest.raises(IndexError, match=r"\[0, 500\)"):
        a.backward(np.array([0, 500]), off, np.zeros((1, 16)))
    with pytest.raises(ValueError, match=r"`grad` must have shape \(n_bags, dim\) = \(1, 16\)"):
        a.backward(np.array([0, 1]), off, np.zeros((2, 16)))
    with pytest.raises(ValueError, match="non-decreasing"):
        a.backward(np.array([0, 1]), np.array([0, 2, 1, 2]), np.zeros((3, 16)))
    with pytest.raises(ValueError, match="`table` must have the adapter's shape \\(500, 16\\); got \\(10, 16\\)"):
        lukern.embedding_bag(np.zeros((10, 16)), np.array([0]), np.array([0, 1]), adapter=a)
    with pytest.raises(TypeError, match="adapter's dtype float64; got float32. Build the adapter with "
                                        "LoRAAdapter\\(..., dtype=np.float32\\)"):
        lukern.embedding_bag(W.astype(np.float32), np.array([0]), np.array([0, 1]), adapter=a)
    with pytest.raises(TypeError, match="`tables\\[0\\]` must have the adapter's dtype"):
        lukern.TableBatch([W.astype(np.float32)]).lookup(np.array([0]), np.array([0, 1]), adapters=[a])
    with pytest.raises(ValueError, match="mode 'sum' or 'mean'"):
        lukern.embedding_bag(W, np.array([0]), np.array([0, 1]), adapter=a, mode="max")
    with pytest.raises(TypeError, match="LoRAAdapter or None"):
        lukern.embedding_bag(W, np.array([0]), np.array([0, 1]), adapter="x")
    with pytest.raises(ValueError, match="`lr_a` must be a finite number"):
        lukern.LoRAAdapter(10, 4, lr_a=float("nan"))
    with pytest.raises(ValueError, match="`optimizer_a` must be one of"):
        lukern.LoRAAdapter(10, 4, optimizer_a="adam")


def test_capacity_eviction_folds_and_keeps_served_values():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((400, 8))
    a = lukern.LoRAAdapter(400, 8, rank=3, capacity=32, dtype=np.float64, lr_a=0.2, evict_fraction=0.25)
    for s in range(30):
        idx = rng.integers(0, 400, 40)
        off = np.arange(0, 41, 4)
        W_before, delta_before = W.copy(), a.dense_delta()
        served_before = W_before + delta_before
        assert a.backward(idx, off, rng.standard_normal((10, 8)), table=W)
        # eviction inside backward folded rows: what is served has not changed yet
        np.testing.assert_allclose(W + a.dense_delta(), served_before, atol=1e-12)
        assert a.step()
    assert a.evicted_rows > 0 and a.n_active <= 32


@pytest.mark.parametrize("policy", [lukern.LeastRecentlyUsed(), lukern.SmallestNorm()])
def test_eviction_policies(policy):
    W, a = _trained(capacity=200, eviction=policy)
    rows, slots = a.active_rows()
    chosen = policy.choose(a, 5)
    assert len(chosen) == 5 and set(chosen) <= set(slots)
    if isinstance(policy, lukern.SmallestNorm):
        norms = np.linalg.norm(a.A[slots], axis=1)
        assert np.linalg.norm(a.A[chosen], axis=1).max() <= np.sort(norms)[4] + 1e-15
    else:
        last = a._state.last_step[slots]
        assert a._state.last_step[chosen].max() <= np.sort(last)[4]
    served = W + a.dense_delta()
    a.evict(5, W)
    np.testing.assert_allclose(W + a.dense_delta(), served, atol=1e-12)
    assert a.n_active == len(rows) - 5


def test_fold_all_then_plain_equals_fused_before():
    W, a = _trained()
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=30, pooling=(1, 6), dtype=np.float64, table=W, seed=8)
    fused = lukern.embedding_bag(W, p.indices, p.offsets, adapter=a)
    B = a.B.copy()
    a.fold_all(W)
    assert a.n_active == 0 and np.array_equal(a.B, B)
    np.testing.assert_allclose(lukern.embedding_bag(W, p.indices, p.offsets), fused, atol=1e-12)


def test_resize_and_refactor_keep_values():
    W, a = _trained()
    served = a.dense_delta()
    a.resize(400)
    assert a.capacity == 400
    np.testing.assert_allclose(a.dense_delta(), served, atol=1e-12)
    rows, slots = a.active_rows()
    A2 = np.concatenate([a.A[slots], np.zeros((len(slots), 2))], axis=1)  # rank 4 -> 6, same product
    B2 = np.concatenate([a.B, np.ones((2, 16))], axis=0)
    a.refactor(A2, B2)
    assert a.rank == 6
    np.testing.assert_allclose(a.dense_delta(), served, atol=1e-12)
    with pytest.raises(ValueError, match="below the"):
        a.resize(3)


def test_memory_breakdown_under_budget():
    # d = 64, r = 8, 1% of rows active: adapter bytes < 2% of the table's
    n_rows = 200_000
    a = lukern.LoRAAdapter(n_rows, 64, rank=8, capacity=n_rows // 100)
    table_bytes = n_rows * 64 * 4
    rng = np.random.default_rng(0)
    idx = rng.choice(n_rows, n_rows // 100, replace=False)
    a.backward(idx, np.array([0, idx.size]), np.ones((1, 64), np.float32))
    a.step()
    assert a.n_active == n_rows // 100
    parts = a.nbytes_breakdown()
    assert a.nbytes == sum(parts.values()) and parts["bitmap"] == (n_rows + 63) // 64 * 8
    assert a.nbytes / table_bytes < 0.02, parts


def test_export_save_load_roundtrip_and_apply(tmp_path):
    W, a = _trained()
    f = a.export()
    assert f.row_ids.size == a.n_active and f.version == a.version
    path = tmp_path / "f.npz"
    lukern.save_factors(path, f)
    g = lukern.load_factors(path)
    for x, y in ((f.row_ids, g.row_ids), (f.A, g.A), (f.B, g.B)):
        assert np.array_equal(x, y)
    assert (g.scale, g.version) == (f.scale, f.version)
    # into another replica's table: plain lookup there == fused lookup here
    W2 = W.copy()
    other = lukern.LoRAAdapter(500, 16, rank=4, capacity=200, dtype=np.float64)
    other.apply_factors(g, table=W2)
    np.testing.assert_allclose(W2, W + a.dense_delta(), atol=1e-12)
    # adopted as another adapter's state
    other.apply_factors(g)
    np.testing.assert_allclose(other.dense_delta(), a.dense_delta(), atol=1e-12)


def test_corrupted_and_truncated_files_raise_and_change_nothing(tmp_path):
    W, a = _trained()
    path = tmp_path / "f.npz"
    lukern.save_factors(path, a.export())
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.npz: not a readable"):
        lukern.load_factors(tmp_path / "trunc.npz")
    # flip one byte inside A's payload: the checksum catches it
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["A"] = arrays["A"].copy(); arrays["A"][0, 0] += 1
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="checksum mismatch"):
        lukern.load_factors(tmp_path / "bad.npz")
    mismatched = lukern.Factors(np.array([1, 2]), np.ones((2, 4)), np.ones((4, 8)), 1.0, 0)  # d = 8
    before = (a.dense_delta(), W.copy())
    with pytest.raises(ValueError, match="do not fit a dim-16 adapter"):
        a.apply_factors(mismatched, table=W)
    with pytest.raises(IndexError, match=r"\[0, 500\)"):
        a.apply_factors(lukern.Factors(np.array([900]), np.ones((1, 4)), np.ones((4, 16)), 1.0, 0))
    assert np.array_equal(a.dense_delta(), before[0]) and np.array_equal(W, before[1])
    # a failed save leaves the previous file intact
    with pytest.raises(Exception):
        lukern.save_factors(path, lukern.Factors(np.array([1]), object(), np.ones((1, 1)), 1.0, 0))
    assert lukern.load_factors(path).row_ids.size == a.n_active
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_grad_window_hook_receives_pooled_gradients():
    W, a = _trained()
    seen = []

    class Window:
        def add(self, g):
            seen.append(g.shape)

    a.grad_window = Window()
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=5, pooling=(1, 3), dtype=np.float64, table=W, seed=1)
    a.train_step(W, p.indices, p.offsets, np.ones((5, 16)))
    assert seen == [(5, 16)]


def test_fused_generic_width_matches_dense():
    # d = 5 has no specialised kernel: the correction runs as a second pass
    W, a = _trained(dim=5, n_rows=300, capacity=100)
    p = make_lookup_problem(n_rows=300, dim=5, n_bags=20, pooling=(0, 6), dtype=np.float64, table=W, seed=2)
    ref = reference_embedding_bag(W + a.dense_delta(), p.indices, p.offsets, None, "mean")
    np.testing.assert_allclose(lukern.embedding_bag(W, p.indices, p.offsets, adapter=a, mode="mean"), ref,
                               rtol=1e-12, atol=1e-12)


# --- determinism and threads -------------------------------------------------------------

def test_parallel_backward_and_step_equal_serial_bit_for_bit():
    # 700 bags: backward chunks of 256 do not divide the work; 1, 2 and 3 threads
    rng = np.random.default_rng(4)
    W = rng.standard_normal((3000, 16)).astype(np.float32)
    p = make_lookup_problem(n_rows=3000, dim=16, n_bags=700, pooling=(0, 12), dtype=np.float32, table=W, seed=5,
                            distribution="zipf", weighted=True)
    G = rng.standard_normal((700, 16)).astype(np.float32)
    results = []
    for nt in (1, 2, 3):
        a = lukern.LoRAAdapter(3000, 16, rank=4, capacity=2000, seed=1)
        W2 = W.copy()
        for k in range(3):  # A non-zero after the first step, so dB and the pooled rows count
            assert a.train_step(W2, p.indices, p.offsets, G * (k + 1), weights=p.weights, n_threads=nt)
        assert a.backward(p.indices, p.offsets, G, weights=p.weights, n_threads=nt)
        results.append((a.pending_gradients(), a.A.copy(), a.B.copy()))
    (rows0, dA0, dB0), A0, B0 = results[0]
    for (rows, dA, dB), A, B in results[1:]:
        assert np.array_equal(rows, rows0) and np.array_equal(dA, dA0) and np.array_equal(dB, dB0)
        assert np.array_equal(A, A0) and np.array_equal(B, B0)


@pytest.mark.parametrize("driver", ["serial", "threads", "prange"])
def test_fused_drivers_agree(driver):
    W, a = _trained(dtype=np.float32)
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=97, pooling=(0, 9), dtype=np.float32, table=W, seed=12)
    ref = lukern.embedding_bag(W, p.indices, p.offsets, adapter=a, driver="serial")
    got = lukern.embedding_bag(W, p.indices, p.offsets, adapter=a, driver=driver, n_threads=2, chunk_size=7)
    assert np.array_equal(got, ref)  # every bag is pooled by one caller in the same order


# --- edge cases ----------------------------------------------------------------------------

def test_empty_bags_batches_and_int32_ids():
    W, a = _trained()
    idx = np.array([3, 3, 7], np.int32)
    off = np.array([0, 0, 3, 3], np.int32)  # empty, duplicates, empty
    got = lukern.embedding_bag(W, idx, off, adapter=a)
    ref = reference_embedding_bag(W + a.dense_delta(), idx, off)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert got[0].tolist() == [0.0] * 16 and got[2].tolist() == [0.0] * 16
    # an empty batch: nothing admitted, the step still counts
    n = a.n_active
    assert a.train_step(W, np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros((0, 16)))
    assert a.n_active == n
    assert lukern.embedding_bag(W, np.zeros(0, np.int64), np.zeros(1, np.int64), adapter=a).shape == (0, 16)
    # duplicates in a bag add their gradient twice
    b = lukern.LoRAAdapter(500, 16, rank=4, capacity=10, dtype=np.float64)
    b.backward(np.array([9, 9]), np.array([0, 2]), np.ones((1, 16)))
    c = lukern.LoRAAdapter(500, 16, rank=4, capacity=10, dtype=np.float64)
    c.backward(np.array([9]), np.array([0, 1]), np.ones((1, 16)))
    np.testing.assert_allclose(b.pending_gradients()[1], 2 * c.pending_gradients()[1])


def test_full_adapter_without_table_drops_admissions():
    a = lukern.LoRAAdapter(100, 8, rank=2, capacity=4, dtype=np.float64)
    assert a.backward(np.arange(6), np.array([0, 6]), np.ones((1, 8)))
    assert a.n_active == 4 and a.dropped_admissions == 2
    assert a.pending_gradients()[0].size == 4


def test_eviction_during_accumulation_keeps_other_pending_gradients():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((200, 8))
    a = lukern.LoRAAdapter(200, 8, rank=2, capacity=8, dtype=np.float64, evict_fraction=0.25)
    assert a.train_step(W, np.arange(6), np.array([0, 6]), np.ones((1, 8)))  # rows 0..5 active, older
    assert a.backward(np.array([6, 7]), np.array([0, 2]), np.ones((1, 8)), table=W)
    rows_before, dA_before, _ = a.pending_gradients()
    # two new rows and a full adapter: the policy folds two of rows 0..5, not 6 or 7
    assert a.backward(np.array([8, 9]), np.array([0, 2]), np.ones((1, 8)), table=W)
    rows, dA, _ = a.pending_gradients()
    assert set(rows) == {6, 7, 8, 9} and a.evicted_rows == 2
    keep = {int(r): g for r, g in zip(rows, dA)}
    for r, g in zip(rows_before, dA_before):
        np.testing.assert_array_equal(keep[int(r)], g)


@pytest.mark.parametrize("policy", [lukern.LeastRecentlyUsed(), lukern.SmallestNorm()])
def test_policies_spare_rows_admitted_by_the_current_batch(policy):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((100, 8))
    a = lukern.LoRAAdapter(100, 8, rank=2, capacity=6, dtype=np.float64, eviction=policy, evict_fraction=0.5)
    assert a.train_step(W, np.arange(4), np.array([0, 4]), rng.standard_normal((1, 8)))
    # rows 10, 11 fill the adapter (A = 0, the smallest norms), then 12 needs a slot
    assert a.backward(np.array([10, 11, 12]), np.array([0, 3]), np.ones((1, 8)), table=W)
    assert {10, 11, 12} <= set(a.active_rows()[0].tolist())


# --- merging factors --------------------------------------------------------------------------

def test_apply_factors_add_is_exact_and_checks_capacity():
    W, a = _trained(capacity=200)
    _, b = _trained(capacity=200, seed=9, rank=3)
    mine, theirs = a.dense_delta(), b.dense_delta()
    f = b.export()
    a.apply_factors(f, how="add")
    assert a.rank == 4 + 3
    np.testing.assert_allclose(a.dense_delta(), mine + theirs, atol=1e-12)
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=20, pooling=(1, 6), dtype=np.float64, table=W, seed=4)
    np.testing.assert_allclose(lukern.embedding_bag(W, p.indices, p.offsets, adapter=a),
                               reference_embedding_bag(W + mine + theirs, p.indices, p.offsets), atol=1e-12)
    small = lukern.LoRAAdapter(500, 16, rank=2, capacity=5, dtype=np.float64)
    with pytest.raises(ValueError, match="more than the capacity 5"):
        small.apply_factors(f, how="add")
    assert small.rank == 2 and small.n_active == 0
    with pytest.raises(ValueError, match="`how` must be one of"):
        small.apply_factors(f, how="average")
    bad = lukern.Factors(f.row_ids, np.full_like(f.A, np.nan), f.B, f.scale, 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        a.apply_factors(bad, table=W)


def test_load_factors_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "other.npz", row_ids=np.arange(3))
    with pytest.raises(ValueError, match="missing arrays"):
        lukern.load_factors(tmp_path / "other.npz")
    W, a = _trained()
    lukern.save_factors(tmp_path / "f.npz", a.export())
    with np.load(tmp_path / "f.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["format"] = np.array("lukern-factors-0")
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match="format"):
        lukern.load_factors(tmp_path / "old.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable"):
        lukern.load_factors(tmp_path / "junk.npz")


# --- memory, warm-up ---------------------------------------------------------------------------

def test_nbytes_at_bounds_nbytes_after_training():
    W, a = _trained(steps=8, capacity=150)
    assert a.nbytes <= a.nbytes_at()
    assert a.nbytes_at(capacity=300) > a.nbytes_at()
    grown = lukern.LoRAAdapter(500, 16, rank=4, capacity=150, dtype=np.float64)
    grown.backward(np.arange(150), np.array([0, 150]), np.ones((1, 16)))
    assert grown.nbytes <= grown.nbytes_at()


def test_warmup_compiles_without_touching_the_adapter():
    W, a = _trained(dtype=np.float32)
    before = (a.A.copy(), a.B.copy(), a.version, a.n_active)
    report = a.warmup(index_dtypes=("int64",), drivers=("serial",))
    assert "lookup int64 sum serial" in report["compiled"] and report["seconds"] >= 0
    # the table-batched correction (generated per width) is compiled too, not on a request
    from lukern._kernels.lora_tbe import tbe_correct_kernel
    assert "table-batched lookup int64" in report["compiled"] and tbe_correct_kernel(16, "float32").signatures
    assert np.array_equal(a.A, before[0]) and np.array_equal(a.B, before[1])
    assert (a.version, a.n_active) == before[2:]


# --- property test -------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as hs  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(seed=hs.integers(0, 2**31 - 1), n_bags=hs.integers(0, 30), max_len=hs.integers(0, 9),
       mode=hs.sampled_from(["sum", "mean"]), weighted=hs.booleans(), capacity=hs.integers(1, 40))
def test_property_fused_and_backward_match_dense(seed, n_bags, max_len, mode, weighted, capacity):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((60, 16))
    a = lukern.LoRAAdapter(60, 16, rank=3, capacity=capacity, dtype=np.float64, seed=seed % 7, lr_a=0.3)
    warm = make_lookup_problem(n_rows=60, dim=16, n_bags=8, pooling=(1, 5), dtype=np.float64, table=W, seed=seed)
    a.train_step(W, warm.indices, warm.offsets, rng.standard_normal((8, 16)))
    w = weighted and mode == "sum"
    p = make_lookup_problem(n_rows=60, dim=16, n_bags=n_bags, pooling=(0, max_len), dtype=np.float64, table=W,
                            seed=seed + 1, weighted=w)
    got = lukern.embedding_bag(W, p.indices, p.offsets, weights=p.weights, mode=mode, adapter=a)
    ref = reference_embedding_bag(W + a.dense_delta(), p.indices, p.offsets, p.weights, mode)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    G = rng.standard_normal((n_bags, 16))
    assert a.backward(p.indices, p.offsets, G, weights=p.weights, mode=mode)  # no table: full => dropped
    A_dense, dA_dense, dB = _dense_grads(a, W, p, G, mode)
    rows, dA, dB_got = a.pending_gradients()
    np.testing.assert_allclose(dA, dA_dense[rows], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dB_got, dB, rtol=1e-9, atol=1e-10)  # dropped rows have A = 0 in both


def test_bench_hot_rows_follow_zipf_ids():
    from lukern.bench.lora import _hot_rows
    from lukern.testing import zipf_ids

    ids = zipf_ids(np.random.default_rng(0), 20000, 10000)
    hot = _hot_rows(10000, 0.05)
    assert np.isin(ids, hot).mean() > 0.5  # the hottest 5% of rows draw most lookups


# --- the trainer's forward and its context ------------------------------------------------------

@pytest.mark.parametrize("mode,weighted", [("sum", True), ("mean", False)])
def test_forward_context_gives_the_same_bits_as_a_plain_backward(mode, weighted):
    rng = np.random.default_rng(6)
    W = rng.standard_normal((400, 16))
    runs = []
    for use_ctx in (False, True):
        a = lukern.LoRAAdapter(400, 16, rank=4, capacity=40, dtype=np.float64, evict_fraction=0.25, seed=2)
        W2 = W.copy()
        outs = []
        for k in range(6):  # the capacity runs out: evictions inside backward, stale slots
            p = make_lookup_problem(n_rows=400, dim=16, n_bags=10, pooling=(0, 6), dtype=np.float64, table=W2,
                                    seed=k, weighted=weighted)
            G = rng.standard_normal((10, 16)) if not use_ctx else runs[0][2][k]
            if use_ctx:
                y, ctx = a.forward(W2, p.indices, p.offsets, weights=p.weights, mode=mode)
                ref = lukern.embedding_bag(W2, p.indices, p.offsets, weights=p.weights, mode=mode, adapter=a)
                np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
                assert a.train_step(W2, p.indices, p.offsets, G, weights=p.weights, mode=mode, context=ctx)
            else:
                assert a.train_step(W2, p.indices, p.offsets, G, weights=p.weights, mode=mode)
            outs.append(G)
        runs.append((a.export(), W2, outs))
    (f0, W0, _), (f1, W1, _) = runs
    assert np.array_equal(f0.row_ids, f1.row_ids) and np.array_equal(f0.A, f1.A) and np.array_equal(f0.B, f1.B)
    assert np.array_equal(W0, W1)


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_forward_by_slot_gives_the_pipeline_bits(rank, dtype, mode, weighted):
    # forward() probes every id first once most ids had a row in its last call; both
    # paths must give the same output, slots and pooled rows, bit for bit, whatever the
    # share of ids with a row (none, some, all) and with empty bags
    from lukern._kernels import lora as LK

    W, a = _trained(dim=16, rank=rank, dtype=dtype, capacity=120, steps=8)
    st = a._state
    fused = LK.fused_kernels(16, dtype)
    active = a.active_rows()[0]
    rng = np.random.default_rng(4)
    for share in (0.0, 0.3, 1.0):
        p = make_lookup_problem(n_rows=500, dim=16, n_bags=64, pooling=(0, 9), dtype=dtype, table=W, seed=11,
                                weighted=weighted)
        idx = p.indices.copy()
        pick = rng.random(idx.size) < share
        idx[pick] = rng.choice(active, int(pick.sum()))
        if share == 0.0:
            idx = np.setdiff1d(np.arange(500), active)[idx % (500 - active.size)]
        n_bags = p.offsets.size - 1
        w = p.weights if weighted else np.empty(0, dtype)
        m = 1 if mode == "mean" else 0
        res = []
        for path in ("pipeline", "by_slot"):
            out = np.full((n_bags, 16), np.nan, dtype)
            slots = np.full(idx.size, -7, np.int64)
            P = np.full((n_bags, rank), np.nan, dtype)
            if path == "pipeline":
                fused.train(W, idx, p.offsets, w, weighted, m, out, 0, n_bags, st.keys, st.vals, st.mask, st.bitmap,
                            st.A, st.B, dtype(st.scale), slots, P)
            else:
                found = LK.find_slots(idx, st.keys, st.vals, st.mask, st.bitmap, slots)
                assert found == int((slots >= 0).sum())
                unbitten = np.full(idx.size, -7, np.int64)  # probing every id finds the same slots
                assert LK.find_slots(idx, st.keys, st.vals, st.mask, st.bitmap, unbitten, False) == found
                np.testing.assert_array_equal(unbitten, slots)
                fused.by_slot(W, idx, p.offsets, w, weighted, m, out, 0, n_bags, slots, st.A, st.B, dtype(st.scale),
                              P)
            res.append((out, slots, P))
        for x, y in zip(*res):
            np.testing.assert_array_equal(x, y)
        assert np.isin(idx[res[0][1] >= 0], active).all() and not np.isin(idx[res[0][1] < 0], active).any()
    # through forward(): the first call (no history) takes the pipeline, a second call on
    # ids that all have a row takes the by-slot pass; both equal the plain fused lookup
    b = lukern.LoRAAdapter(500, 16, rank=rank, capacity=120, dtype=dtype)
    b.apply_factors(a.export())
    idx = rng.choice(active, 200)
    off = np.arange(0, 201, 5)
    for _ in range(2):
        y, ctx = b.forward(W, idx, off, mode=mode)
        ref = lukern.embedding_bag(W, idx, off, mode=mode, adapter=b)
        np.testing.assert_array_equal(y, ref)
    assert b._forward_hits == 1.0


def test_forward_context_checks():
    W, a = _trained()
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=5, pooling=(1, 4), dtype=np.float64, table=W, seed=2)
    _, ctx = a.forward(W, p.indices, p.offsets)
    with pytest.raises(ValueError, match="another batch"):
        a.backward(p.indices.copy(), p.offsets, np.ones((5, 16)), context=ctx)
    with pytest.raises(TypeError, match="LoRAAdapter.forward"):
        a.backward(p.indices, p.offsets, np.ones((5, 16)), context=object())
    # a step between forward and backward makes the context stale: it is ignored
    q = make_lookup_problem(n_rows=500, dim=16, n_bags=5, pooling=(1, 4), dtype=np.float64, table=W, seed=3)
    a.train_step(W, q.indices, q.offsets, np.ones((5, 16)))
    b = lukern.LoRAAdapter(500, 16, rank=4, capacity=200, dtype=np.float64)
    b.apply_factors(a.export())
    assert a.backward(p.indices, p.offsets, np.ones((5, 16)), context=ctx)
    assert b.backward(p.indices, p.offsets, np.ones((5, 16)))
    np.testing.assert_array_equal(a.pending_gradients()[2], b.pending_gradients()[2])


def test_forward_generic_width():
    W, a = _trained(dim=5, n_rows=300, capacity=100)
    b = lukern.LoRAAdapter(300, 5, rank=4, capacity=100, dtype=np.float64)
    b.apply_factors(a.export())
    p = make_lookup_problem(n_rows=300, dim=5, n_bags=9, pooling=(0, 6), dtype=np.float64, table=W, seed=2)
    y, ctx = b.forward(W, p.indices, p.offsets, mode="mean")
    np.testing.assert_allclose(y, reference_embedding_bag(W + a.dense_delta(), p.indices, p.offsets, None, "mean"),
                               atol=1e-12)
    c = lukern.LoRAAdapter(300, 5, rank=4, capacity=100, dtype=np.float64)
    c.apply_factors(a.export())
    G = np.random.default_rng(1).standard_normal((9, 5))
    assert b.backward(p.indices, p.offsets, G, mode="mean", context=ctx)
    assert c.backward(p.indices, p.offsets, G, mode="mean")
    for x, z in zip(b.pending_gradients(), c.pending_gradients()):
        np.testing.assert_array_equal(x, z)


@pytest.mark.parametrize("rank", [4, 8])  # 8 has its own copy of the fused loop
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_fused_long_bags_and_dense_active_ids(mode, weighted, rank):
    # bags far longer than the kernel's lookahead, every id active, empty bags between:
    # the fused kernel's queue of active positions must hold a whole bag plus its lead
    rng = np.random.default_rng(11)
    n_rows, dim = 300, 16
    W = rng.standard_normal((n_rows, dim))
    a = lukern.LoRAAdapter(n_rows, dim, rank=rank, capacity=n_rows, dtype=np.float64)
    all_rows = np.arange(n_rows)
    assert a.backward(all_rows, np.array([0, n_rows]), np.zeros((1, dim))) and a.step()
    a.A[:] = rng.standard_normal(a.A.shape)
    lens = [0, 3000, 1, 0, 517, 64, 65, 2000]
    off = np.concatenate([[0], np.cumsum(lens)])
    idx = rng.integers(0, n_rows, off[-1])
    w = rng.random(idx.size) if weighted else None
    ref = reference_embedding_bag(W + a.dense_delta(), idx, off, w, mode)
    for driver in ("serial", "threads"):
        got = lukern.embedding_bag(W, idx, off, weights=w, mode=mode, adapter=a, driver=driver, n_threads=2)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    y, ctx = a.forward(W, idx, off, weights=w, mode=mode)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    assert (ctx.slots >= 0).all()
    P = np.zeros((len(lens), rank))
    np.add.at(P, np.repeat(np.arange(len(lens)), lens), a.A[ctx.slots] * (w[:, None] if weighted else 1))
    np.testing.assert_allclose(ctx.P, P, rtol=1e-10, atol=1e-10)  # the pooled A rows kept for the backward


@pytest.mark.parametrize("weighted", [False, True])
def test_serial_one_pass_backward_equals_the_split_passes(weighted, monkeypatch):
    # n_threads=1 after forward() takes the one-pass kernel (slots, admission, scatter);
    # n_threads=2 the split passes: the same admissions, pending order and bits
    from lukern._kernels import lora as LK

    calls = []
    one_pass = LK.assign_scatter
    monkeypatch.setattr(LK, "assign_scatter", lambda *a: calls.append(1) or one_pass(*a))
    rng = np.random.default_rng(9)
    W = rng.standard_normal((300, 16))
    results = []
    for nt in (1, 2):
        a = lukern.LoRAAdapter(300, 16, rank=4, capacity=120, dtype=np.float64, seed=3,
                               acc_a_init=lambda r: 0.01 * r)
        for k in range(4):
            p = make_lookup_problem(n_rows=300, dim=16, n_bags=12, pooling=(0, 7), dtype=np.float64, table=W,
                                    seed=20 + k, weighted=weighted)
            G = np.random.default_rng(k).standard_normal((12, 16))
            _, ctx = a.forward(W, p.indices, p.offsets, weights=p.weights)
            assert a.backward(p.indices, p.offsets, G, weights=p.weights, context=ctx, n_threads=nt)
            results.append((nt, k, a.pending_gradients(), a.optimizer_state()))
            assert a.step(n_threads=nt)
    assert len(calls) == 4  # the serial runs took the one-pass kernel
    for (_, _, g1, o1), (_, _, g2, o2) in zip(results[:4], results[4:]):
        for x, y in zip(g1 + o1, g2 + o2):
            assert np.array_equal(x, y)


def test_fused_lookup_sees_each_new_state_after_cached_arguments():
    # the serving path caches the kernel arguments per state: every state swap (step,
    # refactor with a new scale, resize) must be seen by the next lookup
    W, a = _trained(dtype=np.float32)
    p = make_lookup_problem(n_rows=500, dim=16, n_bags=30, pooling=(1, 8), dtype=np.float32, table=W, seed=11)

    def check():
        got = lukern.embedding_bag(W, p.indices, p.offsets, adapter=a, n_threads=1)
        ref = reference_embedding_bag((W.astype(np.float64) + a.dense_delta()).astype(np.float32), p.indices,
                                      p.offsets, None, "sum")
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        return got

    before = check()
    assert a.train_step(W, p.indices, p.offsets, np.ones((30, 16), np.float32))  # new B and A rows
    after_step = check()
    assert not np.array_equal(before, after_step)
    rows, acc_a, acc_b = a.optimizer_state()
    a.refactor(a.export().A * 2, a.B * 3, scale=a.scale / 5, acc_a=acc_a, acc_b=acc_b)
    assert not np.array_equal(after_step, check())
    a.resize(a.capacity + 50)
    check()


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("have_p,weighted", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("gdtype", [np.float32, np.float64])
def test_rank_specialised_backward_bags_equals_generic_bit_for_bit(mode, have_p, weighted, gdtype):
    from lukern._kernels import lora as LK

    rng = np.random.default_rng(4)
    r, d, n_bags, chunk = LK.FIXED_RANK, 24, 203, 64  # 203: chunks and 4-bag blocks with remainders
    off = np.r_[0, np.cumsum(rng.integers(0, 9, n_bags))]  # empty bags too
    n = int(off[-1])
    grad = rng.standard_normal((n_bags, d)).astype(gdtype)
    A = rng.standard_normal((50, r)).astype(np.float32)
    B = rng.standard_normal((r, d)).astype(np.float32)
    Bt = np.ascontiguousarray(B.T, dtype=np.float64)
    P = rng.standard_normal((n_bags, r)).astype(np.float32)
    P[::7] = 0  # rows that skip the B side
    slots = rng.integers(-1, 50, n)
    w = rng.random(n).astype(np.float32)
    n_chunks = -(-n_bags // chunk)
    outs = []
    for kernel in (LK.backward_bags, LK.backward_bags_kernel(r)):
        U = np.full((n_bags, r), np.nan)
        parts = np.full((n_chunks, r, d), np.nan)
        kernel(slots, off, w, weighted, mode, grad, A, B, Bt, 0.37, U, parts, chunk, 0, n_chunks, P, have_p)
        outs.append((U, parts))
    assert LK.backward_bags_kernel(r) is not LK.backward_bags
    assert LK.backward_bags_kernel(r + 1) is LK.backward_bags
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert np.isfinite(outs[1][0]).all() and np.isfinite(outs[1][1]).all()


def test_has_duplicate_matches_numpy_unique():
    from lukern._kernels.lora import has_duplicate

    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 3, 17, 1000):
        for _ in range(20):
            x = rng.integers(0, max(2 * n, 1), n).astype(np.int64)
            assert has_duplicate(x) == (np.unique(x).size != x.size)
    spaced = np.arange(0, 1 << 40, 1 << 28, dtype=np.int64)  # equal low bits: one chain with a weak hash
    assert not has_duplicate(spaced)
    assert has_duplicate(np.r_[spaced, spaced[7]])
