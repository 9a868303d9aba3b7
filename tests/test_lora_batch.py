"""BatchedTrainer against per-table LoRAAdapter.backward + step: the same slots, admissions
and evictions, the same values up to float rounding (the batched kernel sums each row's
gradient before multiplying by B)."""

import warnings

import numpy as np
import pytest

import lukern
from lukern.lora_batch import BatchedTrainer, StableLRU
from lukern.testing import zipf_ids

STATE = ("keys", "vals", "bitmap", "A", "B", "slot_row", "acc_a", "acc_b", "last_step")
EXACT = ("keys", "vals", "bitmap", "slot_row", "last_step")


def _close(x, y, err_msg=""):
    # rounding only: float32 state within ~1e-5 relative, float64 within ~1e-12
    tol = 2e-5 if x.dtype == np.float32 else 1e-11
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=err_msg)


def _build(sizes, dim, *, rank=3, capacity=(6, 5, 40), dtype=np.float32, seed=0, **kw):
    rng = np.random.default_rng(seed)
    tables = [rng.standard_normal((n, dim)).astype(dtype) for n in sizes]
    adapters = [lukern.LoRAAdapter(n, dim, rank=rank, capacity=c, dtype=dtype, seed=seed + t, eviction=StableLRU(),
                                   **kw) for t, (n, c) in enumerate(zip(sizes, capacity))]
    return tables, adapters


def _reference_step(adapters, tables, idx, off, grad, priors, mode):
    """What LukernStrategy did per table: backward, seed fresh slots' accumulators, step."""
    out = []
    for t, a in enumerate(adapters):
        if a is None:
            out.append(None)
            continue
        ok = a.backward(idx[t], off, grad[t], table=tables[t], mode=mode)
        if ok:
            if priors is not None:
                st = a._state
                fresh = np.flatnonzero((st.acc_a == 0) & (st.slot_row >= 0))
                st.acc_a[fresh] = priors[t][st.slot_row[fresh]]
            ok = a.step()
        out.append(ok)
    return out


def _assert_same(a, b, ta, tb, exact=False):
    for name in STATE:
        check = np.testing.assert_array_equal if exact or name in EXACT else _close
        check(getattr(a._state, name), getattr(b._state, name), err_msg=name)
    assert a._state.scale == b._state.scale
    assert a._n_free == b._n_free
    np.testing.assert_array_equal(a._free[:a._n_free], b._free[:b._n_free])
    for name in ("step_count", "version", "evicted_rows", "dropped_admissions", "rejected_steps", "nbytes", "n_active"):
        assert getattr(a, name) == getattr(b, name), name
    (np.testing.assert_array_equal if exact else _close)(ta, tb)


def _batch(rng, sizes, n_bags, per_bag=1):
    # Zipf-like ids: a hot head plus a long tail, so slots are reused and evicted
    n_ids = n_bags * per_bag
    idx = np.stack([np.minimum((rng.pareto(1.2, n_ids) * n / 20).astype(np.int64), n - 1) for n in sizes])
    if per_bag == 1:
        off = np.arange(n_bags + 1, dtype=np.int64)
    else:
        cuts = np.sort(rng.integers(0, n_ids + 1, n_bags - 1))
        off = np.concatenate(([0], cuts, [n_ids])).astype(np.int64)
    return idx, off


@pytest.mark.parametrize("dtype,mode,per_bag,n_bags,kw", [
    (np.float32, "sum", 1, 50, {}),
    (np.float64, "mean", 3, 51, {"weight_decay": 0.01}),
    (np.float32, "sum", 2, 50, {"optimizer_a": "sgd", "optimizer_b": "sgd", "lr_a": 0.02}),
    (np.float32, "mean", 2, 301, {"rank": 6}),  # two chunks of B's gradient, odd bags, r > 4
    # rank 8: the adapters' own backward takes its rank-8 kernel
    (np.float32, "sum", 1, 50, {"rank": 8}),
    (np.float32, "mean", 2, 301, {"rank": 8}),
    (np.float64, "sum", 3, 51, {"rank": 8, "weight_decay": 0.01}),
])
@pytest.mark.parametrize("use_prior", [False, True])
@pytest.mark.parametrize("path", ["auto", "row", "bag"])
def test_batched_matches_per_table(dtype, mode, per_bag, n_bags, kw, use_prior, path):
    sizes, dim = (300, 40, 2000), 8
    tr, ar = _build(sizes, dim, dtype=dtype, **kw)
    tb, ab = _build(sizes, dim, dtype=dtype, **kw)
    rng = np.random.default_rng(1)
    priors = [rng.random(n).astype(dtype) * (rng.random(n) < 0.7) for n in sizes] if use_prior else None
    trainer = BatchedTrainer(ab, tb, prior_acc=priors, backward=path)
    for _ in range(12):
        idx, off = _batch(rng, sizes, n_bags, per_bag)
        grad = (0.3 * rng.standard_normal((len(sizes), n_bags, dim))).astype(dtype)
        want = _reference_step(ar, tr, idx, off, grad, priors, mode)
        got = trainer.train_step(idx, off, grad, mode=mode)
        assert got == want
        for a, b, ta, tb_ in zip(ar, ab, tr, tb):
            _assert_same(a, b, ta, tb_, exact=path == "bag")  # by bag: the adapter's own kernel, the same bits
    assert sum(a.evicted_rows for a in ab) > 0  # the eviction path ran
    assert ab[2].n_active > 0 and np.abs(ab[2].A).sum() > 0


def test_none_adapter_and_rejected_table():
    sizes, dim = (100, 60, 80), 8
    tr, ar = _build(sizes, dim)
    tb, ab = _build(sizes, dim)
    ar[1] = ab[1] = None
    trainer = BatchedTrainer(ab, tb)
    rng = np.random.default_rng(3)
    idx, off = _batch(rng, sizes, 20)
    grad = rng.standard_normal((3, 20, dim)).astype(np.float32)
    grad[2, 4, 1] = np.nan
    b2_before = ab[2]._state.B.copy()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        want = _reference_step(ar, tr, idx, off, grad, None, "sum")
        got = trainer.train_step(idx, off, grad)
    assert got == want == [True, None, False]
    assert ab[2].rejected_steps == 1 and ab[2].n_active == 0
    np.testing.assert_array_equal(ab[2]._state.B, b2_before)
    for t in (0, 2):
        _assert_same(ar[t], ab[t], tr[t], tb[t])


@pytest.mark.parametrize("dtype,mode,per_bag", [(np.float32, "sum", 1), (np.float64, "mean", 3)])
def test_no_table_drops_like_backward_without_a_table(dtype, mode, per_bag):
    # tables[t] None: no eviction, rows without a free slot dropped and counted, as
    # backward(table=None) + step does; any eviction policy is accepted (none runs)
    sizes, dim = (300, 40, 2000), 8
    rng = np.random.default_rng(6)
    ar = [lukern.LoRAAdapter(n, dim, rank=3, capacity=c, dtype=dtype, seed=t)
          for t, (n, c) in enumerate(zip(sizes, (6, 5, 40)))]
    ab = [lukern.LoRAAdapter(n, dim, rank=3, capacity=c, dtype=dtype, seed=t)
          for t, (n, c) in enumerate(zip(sizes, (6, 5, 40)))]
    trainer = BatchedTrainer(ab, [None, None, None])
    for _ in range(8):
        idx, off = _batch(rng, sizes, 50, per_bag)
        grad = (0.3 * rng.standard_normal((len(sizes), 50, dim))).astype(dtype)
        want = [a.backward(idx[t], off, grad[t], table=None, mode=mode) and a.step() for t, a in enumerate(ar)]
        assert trainer.train_step(idx, off, grad, mode=mode) == want == [True] * 3
        for a, b in zip(ar, ab):
            for name in STATE:
                check = np.testing.assert_array_equal if name in EXACT else _close
                check(getattr(a._state, name), getattr(b._state, name), err_msg=name)
            for name in ("step_count", "version", "evicted_rows", "dropped_admissions", "n_active"):
                assert getattr(a, name) == getattr(b, name), name
    assert all(b.evicted_rows == 0 for b in ab) and ab[0].dropped_admissions > 0
    assert ab[2].n_active > 0 and np.abs(ab[2].A).sum() > 0


def test_between_runs_after_each_adapted_table():
    # the co-located trainer's pause check: after every table that has an adapter, in
    # order, each time with that table stepped and the next one not yet
    sizes, dim = (100, 60, 80), 8
    tables, adapters = _build(sizes, dim)
    adapters[1] = None
    trainer = BatchedTrainer(adapters, tables)
    rng = np.random.default_rng(5)
    idx, off = _batch(rng, sizes, 20)
    grad = rng.standard_normal((3, 20, dim)).astype(np.float32)
    seen = []
    trainer.train_step(idx, off, grad, between=lambda: seen.append((adapters[0].step_count, adapters[2].step_count)))
    assert seen == [(1, 0), (1, 1)]


def test_stable_lru_choose_matches_kernel():
    from lukern._kernels.lora_batch import stable_lru

    rng = np.random.default_rng(5)
    a = lukern.LoRAAdapter(1000, 4, rank=2, capacity=64, eviction=StableLRU())
    W = np.zeros((1000, 4), np.float32)
    for _ in range(6):
        ids = rng.integers(0, 1000, 20)
        a.train_step(W, ids, np.arange(21), np.ones((20, 4), np.float32))
    st = a._state
    for n in (1, 5, 17, 40, 64, 100):
        np.testing.assert_array_equal(np.unique(a.eviction.choose(a, n)),
                                      stable_lru(st.slot_row, st.last_step, a.step_count, n))
    # a numpy oracle: the n smallest (last_step, slot) among the older slots
    active = np.flatnonzero(st.slot_row >= 0)
    older = active[st.last_step[active] < a.step_count]
    want = np.sort(older[np.lexsort((older, st.last_step[older]))][:7])
    np.testing.assert_array_equal(a.eviction.choose(a, 7), want)


def test_bad_input_is_rejected_and_writes_nothing():
    sizes, dim = (50, 30), 4
    tables, adapters = _build(sizes, dim, capacity=(5, 5))
    trainer = BatchedTrainer(adapters, tables)
    off = np.arange(3, dtype=np.int64)
    grad = np.ones((2, 2, dim), np.float32)
    with pytest.raises(IndexError, match=r"indices\[1, 0\]` = 30 is outside table 1"):
        trainer.train_step(np.array([[1, 2], [30, 0]]), off, grad)
    with pytest.raises(TypeError, match="int64"):
        trainer.train_step(np.array([[1, 2], [3, 0]], np.int32), off, grad)
    with pytest.raises(ValueError, match="one row per table"):
        trainer.train_step(np.array([[1, 2]]), off, grad)
    with pytest.raises(ValueError, match="grad"):
        trainer.train_step(np.array([[1, 2], [3, 0]]), off, grad[:, :1])
    assert all(a.n_active == 0 and a.step_count == 0 for a in adapters)
    with pytest.raises(TypeError, match="StableLRU"):
        BatchedTrainer([lukern.LoRAAdapter(50, dim, rank=2)], tables[:1])
    with pytest.raises(ValueError, match="prior_acc"):
        BatchedTrainer(adapters, tables, prior_acc=[np.zeros(3, np.float32), None])
    with pytest.raises(ValueError, match="backward"):
        BatchedTrainer(adapters, tables, backward="bags")
    adapters[0].backward(np.array([1]), np.array([0, 1]), np.ones((1, dim), np.float32))
    with pytest.raises(RuntimeError, match="pending"):
        trainer.train_step(np.array([[1, 2], [3, 0]]), off, grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_rows_matches_numpy(dtype):
    # the prefetching fold (shared by the adapter and the batched trainer) folds what the
    # numpy formula says; free slots (row -1) and zero A rows are skipped
    from lukern._kernels.lora import FOLD_AHEAD, fold_rows

    rng = np.random.default_rng(3)
    n, d, r, cap = 500, 24, 3, 60
    table = rng.standard_normal((n, d)).astype(dtype)
    A = rng.standard_normal((cap, r)).astype(dtype)
    A[::5] = 0
    B = rng.standard_normal((r, d)).astype(dtype)
    slot_row = rng.choice(n, cap, replace=False).astype(np.int64)
    slot_row[::7] = -1
    slots = np.sort(rng.choice(cap, 3 * FOLD_AHEAD, replace=False)).astype(np.int64)
    scale = dtype(0.75)
    got = table.copy()
    fold_rows(got, A, B, scale, slot_row, slots)
    ref = table.copy()
    live = slots[slot_row[slots] >= 0]
    ref[slot_row[live]] += scale * (A[live] @ B)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    untouched = np.setdiff1d(np.arange(n), slot_row[live])
    np.testing.assert_array_equal(got[untouched], table[untouched])


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r, kernel", [(5, "generic"), (8, "generic"), (8, "fixed")])
def test_row_grads_matches_the_bag_formula(mode, dtype, r, kernel):
    # the by-row backward against the by-bag formulas of DESIGN section 2, in numpy:
    # G_i = sum over ids j of row i of s f_b g_b B^T, dB = s sum_b f_b P_b^T g_b
    from lukern._kernels.lora_batch import row_grads, row_grads_kernel

    if kernel == "fixed":
        row_grads = row_grads_kernel(r)  # noqa: F811 - the rank-specialised twin, same contract
    rng = np.random.default_rng(8)
    d, n_u, cap = 16, 6, 20
    off = np.array([0, 1, 1, 4, 5, 8, 8, 9, 12], np.int64)  # empty and multi-id bags
    n_bags, n_ids = len(off) - 1, off[-1]
    pend = rng.integers(-1, n_u, n_ids).astype(np.int32)  # -1: an id without a slot
    pend[:n_u] = np.arange(n_u)  # every pending row is used
    uniq = rng.choice(cap, n_u, replace=False).astype(np.int64)
    A = rng.standard_normal((cap, r)).astype(dtype)
    A[uniq[2]] = 0  # a row admitted by this batch
    B = rng.standard_normal((r, d)).astype(dtype)
    grad = rng.standard_normal((n_bags, d)).astype(dtype)
    scale = 0.5
    G = np.full((n_u + 2, r), 7.0, dtype)
    dB = np.ones((r, d))
    row_grads(pend, off, mode, grad, A, uniq, B, scale, n_u, G, dB)
    bag = np.repeat(np.arange(n_bags), np.diff(off))
    f = np.array([scale / max(off[b + 1] - off[b], 1) if mode else scale for b in range(n_bags)])
    U = f[:, None] * (grad.astype(np.float64) @ B.T.astype(np.float64))
    want_G = np.zeros((n_u, r))
    P = np.zeros((n_bags, r))
    for j in range(n_ids):
        if pend[j] >= 0:
            want_G[pend[j]] += U[bag[j]]
            P[bag[j]] += A[uniq[pend[j]]]
    want_dB = 1 + (f[:, None] * P).T @ grad.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(G[:n_u], want_G, rtol=tol, atol=tol)
    np.testing.assert_array_equal(G[n_u:], 7.0)  # rows past the pending ones untouched
    np.testing.assert_allclose(dB, want_dB, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank8_row_grads_equals_the_generic_kernel(dtype):
    # the generated rank-8 kernel on the trainer's batches (Zipf ids, one-id bags, dB
    # zeroed as train_table passes it): B's gradient summed in the generic kernel's order
    # (the same bits); A's within float64 rounding (both may reassociate the d-long dot)
    from lukern._kernels.lora_batch import row_grads, row_grads_kernel

    rng = np.random.default_rng(3)
    n, d, r, cap = 2048, 16, 8, 600
    ids = zipf_ids(rng, n, cap)
    uniq, pend = np.unique(ids, return_inverse=True)
    pend = pend.astype(np.int32)
    pend[::17] = -1  # ids that found no slot
    off = np.arange(n + 1, dtype=np.int64)
    A = rng.standard_normal((cap, r)).astype(dtype)
    B = rng.standard_normal((r, d)).astype(dtype)
    grad = rng.standard_normal((n, d)).astype(dtype)
    out = []
    for k in (row_grads, row_grads_kernel(8)):
        G, dB = np.zeros((uniq.size, r), dtype), np.zeros((r, d))
        k(pend, off, 0, grad, A, uniq.astype(np.int64), B, 0.25, uniq.size, G, dB)
        out.append((G, dB))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_strided_gradient_equals_contiguous():
    # a (n_bags, n_tables * dim) model gradient passed as a transposed view: no copy, the
    # same steps as its contiguous (n_tables, n_bags, dim) copy
    sizes, dim = (300, 40, 2000), 8
    ta, aa = _build(sizes, dim)
    tb, ab = _build(sizes, dim)
    rng = np.random.default_rng(9)
    for _ in range(4):
        idx, off = _batch(rng, sizes, 50)
        flat = (0.3 * rng.standard_normal((50, len(sizes) * dim))).astype(np.float32)
        view = flat.reshape(50, len(sizes), dim).transpose(1, 0, 2)
        assert not view.flags.c_contiguous
        got = BatchedTrainer(ab, tb).train_step(idx, off, view)
        want = BatchedTrainer(aa, ta).train_step(idx, off, np.ascontiguousarray(view))
        assert got == want == [True] * 3
    for a, b, x, y in zip(aa, ab, ta, tb):
        for name in STATE:
            np.testing.assert_array_equal(getattr(a._state, name), getattr(b._state, name), err_msg=name)
        np.testing.assert_array_equal(x, y)
    flat[7, 2 * dim + 1] = np.nan  # table 2 of the view: only it is rejected
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert BatchedTrainer(ab, tb).train_step(idx, off, view) == [True, True, False]
    assert ab[2].rejected_steps == 1 and ab[0].rejected_steps == ab[1].rejected_steps == 0
    bad = np.ones((3, 50, 2 * dim), np.float32)[:, :, ::2]  # rows not contiguous: refused, nothing written
    before = [b._state.A.copy() for b in ab]
    with pytest.raises(TypeError, match="contiguous rows"):
        BatchedTrainer(ab, tb).train_step(idx, off, bad)
    for b, A0 in zip(ab, before):
        np.testing.assert_array_equal(b._state.A, A0)


def test_state_replace_keeps_every_other_field():
    # the trainer's state swap (spelt out for speed) carries every field it does not replace
    a = lukern.LoRAAdapter(50, 4, rank=2, capacity=8)
    st = a._state
    st.lookup_args(), st.tbe_args()  # caches filled: the new state must not inherit them
    B, acc = np.ones_like(st.B), np.ones_like(st.acc_b)
    new = st.replace(B=B, acc_b=acc)
    for name in type(st)._FIELDS:
        assert getattr(new, name) is {"B": B, "acc_b": acc}.get(name, getattr(st, name)), name
    assert new._lookup is None and new._tbe is None
