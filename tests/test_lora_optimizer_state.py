"""LoRAAdapter's public optimizer state: optimizer_state, set_row_accumulators,
refactor with accumulators, and the acc_a_init hook for admitted rows."""

import numpy as np
import pytest

import lukern


def _adapter(n_rows=50, dim=8, rank=3, capacity=20, **kw):
    a = lukern.LoRAAdapter(n_rows, dim, rank=rank, capacity=capacity, dtype=np.float64, lr_a=0.1, lr_b=0.05, **kw)
    rng = np.random.default_rng(0)
    for ids in ([1, 4, 4, 9], [9, 12, 30], [2, 1]):
        idx = np.array(ids)
        assert a.train_step(None, idx, np.array([0, idx.size]), rng.standard_normal((1, dim)))
    return a


def _private(a):
    st = a._state
    slots = np.flatnonzero(st.slot_row >= 0)
    return st.slot_row[slots], st.acc_a[slots], st.acc_b


def test_optimizer_state_matches_the_adapter_and_is_a_copy():
    a = _adapter()
    rows, acc_a, acc_b = a.optimizer_state()
    prow, pacc, pacc_b = _private(a)
    assert np.array_equal(rows, prow) and np.array_equal(acc_a, pacc) and np.array_equal(acc_b, pacc_b)
    assert np.array_equal(rows, a.active_rows()[0])
    assert (acc_a > 0).all() and (acc_b > 0).all()  # Adagrad has accumulated
    acc_a[:] = -1
    acc_b[:] = -1
    assert (a.optimizer_state()[1] > 0).all() and (a.optimizer_state()[2] > 0).all()


def test_set_row_accumulators_by_row_id():
    a = _adapter()
    rows, acc0, _ = a.optimizer_state()
    a.set_row_accumulators([rows[2], rows[0]], [7.0, 5.0])
    _, acc1, _ = a.optimizer_state()
    expect = acc0.copy()
    expect[0], expect[2] = 5.0, 7.0
    assert np.array_equal(acc1, expect)
    assert a.set_row_accumulators(rows, 0.5) == rows.size  # one value for all
    assert np.array_equal(a.optimizer_state()[1], np.full(rows.size, 0.5))
    # the next step uses them: row-wise Adagrad divides by sqrt(acc + g^2 / r)
    a.set_row_accumulators(rows, 1e12)
    A0 = a.A.copy()
    a.train_step(None, rows, np.array([0, rows.size]), np.ones((1, 8)))
    assert np.abs(a.A - A0).max() < 1e-5


def test_set_row_accumulators_missing_rows():
    a = _adapter()
    rows, acc0, _ = a.optimizer_state()
    inactive = np.setdiff1d(np.arange(50), rows)[:2]
    with pytest.raises(KeyError, match="not active"):
        a.set_row_accumulators(np.concatenate([rows[:1], inactive]), 3.0)
    assert np.array_equal(a.optimizer_state()[1], acc0)  # nothing written
    assert a.set_row_accumulators(np.concatenate([rows[:1], inactive]), 3.0, missing="ignore") == 1
    assert a.optimizer_state()[1][0] == 3.0


@pytest.mark.parametrize("row_ids,acc,exc,match", [
    ([1.5], [1.0], TypeError, "integers"),
    ([[1]], [1.0], TypeError, "1-D"),
    ([50], [1.0], IndexError, r"\[0, 50\)"),
    ([-1], [1.0], IndexError, r"\[0, 50\)"),
    ([1, 1], [1.0, 2.0], ValueError, "unique"),
    ([1, 4], [1.0], ValueError, "one per row id"),
    ([1], [-1.0], ValueError, ">= 0"),
    ([1], [np.nan], ValueError, "finite"),
    ([1], ["x"], ValueError, "dtype"),
])
def test_set_row_accumulators_bad_input_changes_nothing(row_ids, acc, exc, match):
    a = _adapter()
    before = a.optimizer_state()
    with pytest.raises(exc, match=match):
        a.set_row_accumulators(row_ids, acc)
    after = a.optimizer_state()
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    with pytest.raises(ValueError, match="missing"):
        a.set_row_accumulators([1], [1.0], missing="skip")


def test_refactor_carries_accumulators():
    a = _adapter()
    rows, acc_a, acc_b = a.optimizer_state()
    W = np.zeros((50, 8))
    before = lukern.embedding_bag(W, rows, np.arange(rows.size + 1), adapter=a)
    # rank 3 -> 2 with the same served values: A B = (A M) (M^-1 B) on a kept subspace
    A, B = a.A[a.active_rows()[1]], a.B
    U, S, Vt = np.linalg.svd(A @ B, full_matrices=False)
    A2, B2 = U[:, :2] * S[:2], Vt[:2]
    acc_b2 = acc_b[:2] * 2
    a.refactor(A2, B2, acc_a=acc_a, acc_b=acc_b2)
    rows2, acc_a2, acc_b_new = a.optimizer_state()
    assert a.rank == 2 and np.array_equal(rows2, rows)
    assert np.array_equal(acc_a2, acc_a) and np.array_equal(acc_b_new, acc_b2)
    acc_b2[:] = 0  # refactor kept a copy
    assert (a.optimizer_state()[2] > 0).all()
    after = lukern.embedding_bag(W, rows, np.arange(rows.size + 1), adapter=a)
    np.testing.assert_allclose(after, before, atol=np.sqrt(np.sum(S[2:] ** 2)) * a.scale + 1e-12)
    # without accumulators the optimizer restarts
    a.refactor(A2, B2)
    assert not a.optimizer_state()[1].any() and not a.optimizer_state()[2].any()


@pytest.mark.parametrize("kw,match", [
    (dict(acc_a=np.ones(2)), "acc_a"),
    (dict(acc_a=-np.ones(99)), "acc_a"),
    (dict(acc_b=np.ones((3, 8))), "acc_b"),
    (dict(acc_b=np.full((2, 8), np.inf)), "acc_b"),
    (dict(scale=np.nan), "scale"),
])
def test_refactor_bad_accumulators_change_nothing(kw, match):
    a = _adapter()
    k = a.n_active
    if "acc_a" in kw and kw["acc_a"].size == 99:
        kw = dict(acc_a=-np.ones(k))
    before = (a.A.copy(), a.B.copy(), *a.optimizer_state(), a.version)
    with pytest.raises(ValueError, match=match):
        a.refactor(np.ones((k, 2)), np.ones((2, 8)), **kw)
    after = (a.A, a.B, *a.optimizer_state(), a.version)
    assert all(np.array_equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("init", ["scalar", "array", "callable"])
def test_acc_a_init_seeds_admitted_rows_only(init):
    prior = np.arange(50, dtype=np.float64) / 10
    value = {"scalar": 2.5, "array": prior, "callable": lambda r: prior[r]}[init]
    a = lukern.LoRAAdapter(50, 4, rank=2, capacity=6, dtype=np.float64, acc_a_init=value)
    assert a.backward(np.array([3, 7, 3]), np.array([0, 3]), np.zeros((1, 4)))
    rows, acc, _ = a.optimizer_state()
    expect = np.full(2, 2.5) if init == "scalar" else prior[rows]
    assert np.array_equal(acc, expect)
    a.step()
    a.set_row_accumulators([3], 100.0)
    assert a.backward(np.array([3, 11]), np.array([0, 2]), np.zeros((1, 4)))  # 3 is active: not re-seeded
    rows, acc, _ = a.optimizer_state()
    assert acc[rows == 3][0] == 100.0
    assert acc[rows == 11][0] == (2.5 if init == "scalar" else prior[11])


def test_acc_a_init_after_eviction_and_attribute():
    W = np.zeros((50, 4))
    a = lukern.LoRAAdapter(50, 4, rank=2, capacity=2, dtype=np.float64, evict_fraction=0.5)
    for r in (1, 2):
        a.train_step(W, np.array([r]), np.array([0, 1]), np.ones((1, 4)))
    a.acc_a_init = lambda r: np.full(r.size, 9.0)
    a.backward(np.array([5]), np.array([0, 1]), np.zeros((1, 4)), table=W)  # evicts to admit 5
    rows, acc, _ = a.optimizer_state()
    assert 5 in rows and acc[rows == 5][0] == 9.0


@pytest.mark.parametrize("value,exc", [(-1.0, ValueError), (np.nan, ValueError), ("x", TypeError),
                                       (np.ones(3), ValueError), (-np.ones(50), ValueError), (True, TypeError)])
def test_acc_a_init_bad_values(value, exc):
    with pytest.raises(exc, match="acc_a_init"):
        lukern.LoRAAdapter(50, 4, acc_a_init=value)
    a = lukern.LoRAAdapter(50, 4)
    with pytest.raises(exc, match="acc_a_init"):
        a.acc_a_init = value
    assert a.acc_a_init is None


def test_acc_a_init_callable_returning_bad_values_raises():
    a = lukern.LoRAAdapter(50, 4, acc_a_init=lambda r: -np.ones(r.size))
    with pytest.raises(ValueError, match="acc_a_init"):
        a.backward(np.array([1]), np.array([0, 1]), np.zeros((1, 4)))
    a.acc_a_init = lambda r: np.ones(r.size + 1)
    with pytest.raises(ValueError, match="one number per row"):
        a.backward(np.array([2]), np.array([0, 1]), np.zeros((1, 4)))
