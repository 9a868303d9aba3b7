"""The replay's numpy DLRM: gradients by finite differences, training, save/load; synthetic stream."""

import numpy as np
import pytest

from lukern.replay.dlrm import DLRM, bce_with_logits
from lukern.replay.streams import Batch
from lukern.replay.synthetic import synthetic_stream


@pytest.fixture(scope="module")
def small():
    return synthetic_stream(n_events=3000, seed=0, n_users=50, n_items=40, new_items=60, n_categories=5, days=2)


def tiny_model(s, dtype=np.float64, seed=1):
    return DLRM(s.cat_sizes, s.n_dense, dim=4, bottom=(5,), top=(6,), seed=seed, dtype=dtype)


def numeric_grad(f, x, idx, eps=1e-6):
    old = x[idx]
    x[idx] = old + eps
    lp = f()
    x[idx] = old - eps
    lm = f()
    x[idx] = old
    return (lp - lm) / (2 * eps)


def test_forward_against_plain_numpy(small):
    m = tiny_model(small)
    b = small.batch(0, 7)
    logits, pooled = m.forward(b)
    emb = [m.table(t)[b.cat[:, t]] for t in range(3)]
    np.testing.assert_allclose(pooled, np.concatenate(emb, axis=1))
    p = m.params
    x0 = np.maximum(np.maximum(b.dense @ p["bottom0.W"] + p["bottom0.b"], 0) @ p["bottom1.W"] + p["bottom1.b"], 0)
    z = [x0, *emb]
    pairs = [np.sum(z[i] * z[j], axis=1) for i in range(4) for j in range(i)]
    h = np.concatenate([x0, np.stack(pairs, axis=1)], axis=1)
    want = (np.maximum(h @ p["top0.W"] + p["top0.b"], 0) @ p["top1.W"] + p["top1.b"])[:, 0]
    np.testing.assert_allclose(logits, want, rtol=1e-10)


def test_gradients_match_finite_differences(small):
    m = tiny_model(small)
    b = small.batch(100, 116)
    loss, grads, (rows, row_grads) = m.gradients(b, b.labels)
    assert loss == pytest.approx(bce_with_logits(m.forward(b)[0], b.labels))
    f = lambda: m.gradients(b, b.labels)[0]  # noqa: E731
    rng = np.random.default_rng(0)
    for k, g in grads.items():
        for _ in range(3):
            idx = tuple(int(rng.integers(0, s)) for s in g.shape)
            assert numeric_grad(f, m.params[k], idx) == pytest.approx(g[idx], abs=1e-8, rel=1e-5), k
    for r in range(0, len(rows), max(1, len(rows) // 5)):
        for j in range(4):
            num = numeric_grad(f, m.emb_buffer, (rows[r], j))
            assert num == pytest.approx(row_grads[r, j], abs=1e-8, rel=1e-5)


def test_grad_pooled_is_the_pooled_gradient(small):
    """d loss / d pooled, summed over the bags that share a row, is that row's gradient."""
    m = tiny_model(small)
    b = small.batch(0, 12)
    loss, gp = m.grad_pooled(b, b.labels)
    assert gp.shape == (12, 3 * 4)
    # moving a table row moves every pooled output that looked it up
    for bag, t, j in [(0, 0, 1), (5, 1, 3), (11, 2, 0)]:
        row = m.row_offsets[t] + b.cat[bag, t]
        num = numeric_grad(lambda: m.gradients(b, b.labels)[0], m.emb_buffer, (row, j))
        same = b.cat[:, t] == b.cat[bag, t]
        assert num == pytest.approx(gp[same, t * 4 + j].sum(), abs=1e-9, rel=1e-6)


def test_backward_pooled_reuses_forward(small):
    m = tiny_model(small)
    b = small.batch(0, 20)
    c = m.forward_cache(b)
    l1, g1 = m.backward_pooled(c, b.labels)
    l2, g2 = m.grad_pooled(b, b.labels)
    assert l1 == l2
    np.testing.assert_array_equal(g1, g2)


def test_training_lowers_loss_and_touches_only_batch_rows(small):
    m = DLRM(small.cat_sizes, small.n_dense, dim=8, seed=0)
    before = m.emb_buffer.copy()
    b = small.batch(0, 64)
    _, touched = m.train_step(b)
    changed = np.flatnonzero((m.emb_buffer != before).any(axis=1))
    np.testing.assert_array_equal(changed, np.unique(touched))
    losses = m.fit(small, 0, 2000, epochs=4, batch_size=128, seed=0)
    assert losses[-1] < losses[0]


def test_save_load_round_trip(small, tmp_path):
    m = DLRM(small.cat_sizes, small.n_dense, dim=8, seed=3)
    m.fit(small, 0, 500, epochs=1, batch_size=100)
    p = tmp_path / "model.npz"
    m.save(p)
    m2 = DLRM.load(p)
    assert m2.config == m.config and m2.adam_t == m.adam_t
    b = small.batch(500, 600)
    np.testing.assert_array_equal(m.forward(b)[0], m2.forward(b)[0])
    # training continues identically (optimizer state came along)
    m.train_step(b)
    m2.train_step(b)
    np.testing.assert_array_equal(m.emb_buffer, m2.emb_buffer)
    np.testing.assert_array_equal(m.params["top0.W"], m2.params["top0.W"])
    with np.load(p, allow_pickle=False) as z:  # no pickled objects inside
        assert all(z[k].dtype != object for k in z.files)
    m.save(p, optimizer=False)
    assert DLRM.load(p).adam_t == 0
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a lukern DLRM"):
        DLRM.load(tmp_path / "other.npz")


def test_copy_is_independent(small):
    m = DLRM(small.cat_sizes, small.n_dense, dim=8, seed=0)
    c = m.copy()
    c.train_step(small.batch(0, 50))
    assert not np.array_equal(c.emb_buffer, m.emb_buffer)
    c.load_state(m)
    np.testing.assert_array_equal(c.emb_buffer, m.emb_buffer)


def test_bad_batches_and_arguments(small):
    m = DLRM(small.cat_sizes, small.n_dense, dim=8)
    b = small.batch(0, 4)
    with pytest.raises(IndexError, match=r"batch.cat\[:, 1\]"):
        m.forward(Batch(b.t, b.dense, b.cat + np.array([0, 10**6, 0]), b.labels))
    with pytest.raises(ValueError, match="batch.dense"):
        m.forward(Batch(b.t, b.dense[:, :2], b.cat, b.labels))
    with pytest.raises(ValueError, match="labels"):
        m.grad_pooled(b, b.labels[:3])
    with pytest.raises(ValueError, match="cat_sizes"):
        DLRM([], 3)
    no_dense = DLRM([5], 0, dim=4)
    assert no_dense.forward(Batch(b.t, np.zeros((4, 0), np.float32), b.cat[:, :1] % 5, b.labels))[0].shape == (4,)


def test_synthetic_is_seeded_and_drifts():
    kw = dict(n_events=20_000, n_users=3000, n_items=1500, new_items=3000, days=7)
    a = synthetic_stream(seed=5, **kw)
    b = synthetic_stream(seed=5, **kw)
    c = synthetic_stream(seed=6, **kw)
    np.testing.assert_array_equal(a.cat, b.cat)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.cat, c.cat)
    assert (np.diff(a.t) >= 0).all()
    items = a.cat[:, 1]
    first, last = set(items[:5000].tolist()), set(items[-5000:].tolist())
    # new items appear: much of the late traffic goes to items never seen early
    assert np.isin(items[-5000:], list(first)).mean() < 0.7
    assert len(last - first) > 100
    assert 0.15 < a.labels.mean() < 0.6


def test_weighted_and_table_major_pooled_gradient(small):
    m = tiny_model(small)
    b = small.batch(0, 10)
    w = np.linspace(0.5, 2.0, 10)
    c = m.forward_cache(b)
    loss, g = m.backward_pooled(c, b.labels, weights=w, norm=7.0)
    z = c.logits
    assert loss == pytest.approx(float(np.sum(w * (np.logaddexp(0, z) - b.labels * z)) / 7.0))
    # weighted gradient = weights * per-row gradient of the unweighted mean loss, rescaled
    _, g1 = m.backward_pooled(c, b.labels)
    np.testing.assert_allclose(g, g1 * (w * 10 / 7.0)[:, None], rtol=1e-10)
    _, gt = m.backward_pooled(c, b.labels, table_major=True)
    assert gt.shape == (3, 10, 4) and gt[1].flags.c_contiguous
    np.testing.assert_array_equal(gt.transpose(1, 0, 2).reshape(10, -1), g1)


def test_concat_caches_equals_one_backward(small):
    m = tiny_model(small)
    b1, b2 = small.batch(0, 6), small.batch(6, 15)
    c = m.concat_caches([m.forward_cache(b1), m.forward_cache(b2)])
    _, g = m.backward_pooled(c, np.concatenate([b1.labels, b2.labels]))
    _, want = m.grad_pooled(small.batch(0, 15), small.batch(0, 15).labels)
    np.testing.assert_allclose(g, want, rtol=1e-12)
    # the lean join (z left in place, no loss) gives the same table-major gradient
    lean = m.concat_caches([m.forward_cache(b1), m.forward_cache(b2)], backward_only=True)
    assert isinstance(lean.z, list) and lean.pooled is None
    loss, gt = m.backward_pooled(lean, np.concatenate([b1.labels, b2.labels]), table_major=True, want_loss=False)
    assert loss is None
    np.testing.assert_allclose(gt.transpose(1, 0, 2).reshape(15, -1), want, rtol=1e-12)


@pytest.mark.parametrize("t0", [0, 1])
def test_interaction_backward_against_numpy(t0):
    from lukern._kernels.dlrm import interaction_backward

    rng = np.random.default_rng(0)
    n, k, d = 7, 5, 6
    z = rng.standard_normal((n, k, d))
    pi, pj = np.tril_indices(k, -1)
    gp = rng.standard_normal((n + 3, pi.size))
    S = np.zeros((n, k, k))
    S[:, pi, pj] = gp[3:]
    S = S + S.transpose(0, 2, 1)
    want = np.matmul(S, z).transpose(1, 0, 2)[t0:]  # d <z_i, z_j> / d z_t, table-major
    out = np.full((k - t0, n + 3, d), np.nan)
    interaction_backward(gp, pi, pj, z, t0, out, 3)  # rows 3.. of gp and out
    np.testing.assert_allclose(out[:, 3:], want, rtol=1e-12)
    assert np.isnan(out[:, :3]).all()  # rows before row0 untouched


def test_early_stopping_keeps_the_best_epoch(small):
    m = DLRM(small.cat_sizes, small.n_dense, dim=8, seed=0)
    info = m.fit_early_stopping(small, 0, 2000, max_epochs=3, batch_size=100)
    assert 1 <= info["epochs"] <= 3 and len(info["val_logloss"]) >= info["epochs"]
    assert info["epochs"] == int(np.argmin(info["val_logloss"])) + 1
    assert np.isfinite(m.evaluate(small, 2000, 2500))
    with pytest.raises(ValueError, match="too few rows"):
        m.fit_early_stopping(small, 0, 1, batch_size=10)
