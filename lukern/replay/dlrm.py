"""A small DLRM in numpy on lukern's table-batched lookup.

Architecture (Naumov et al. 2019, the MLPerf reference at toy size): a bottom MLP maps the
dense features to a d-vector ``x0``; every categorical feature looks up one row of its own
``d``-wide table (pooling 1, all tables in one :class:`lukern.TableBatch`); the
interaction is the dot product of every pair among ``[x0, e_1, ..., e_F]`` concatenated
with ``x0``; a top MLP maps that to one logit; the loss is binary cross-entropy.

Training is full: embeddings by row-wise Adagrad on the touched rows only (sparse, the
DLRM standard), MLP weights by Adam. :meth:`DLRM.grad_pooled` gives the loss and its
gradient with respect to the pooled embeddings, which is all a co-located LoRA trainer
needs from the model (it learns adapters, not the model). Models save to ``.npz``
without pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .._io import atomic_write

from .._kernels.dlrm import interaction_backward as _interaction_backward
from ..embedding import TableBatch

__all__ = ["DLRM", "ForwardCache", "bce_with_logits"]

_FORMAT_VERSION = 1


def bce_with_logits(logits, labels) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against ``labels`` in {0, 1}, stable.

    Examples
    --------
    >>> round(bce_with_logits(np.array([0.0]), np.array([1.0])), 4)
    0.6931
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z)) if z.size else 0.0


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form


@dataclass
class ForwardCache:
    """Activations of one forward pass, enough for either backward."""

    n: int
    dense_in: np.ndarray
    bottom_acts: list      # inputs of each bottom layer, then its output x0
    pooled: np.ndarray     # (n, F*d) as returned by the lookup
    z: np.ndarray          # (n, K, d) stacked [x0, e_1..e_F]
    top_acts: list         # inputs of each top layer
    logits: np.ndarray
    rows: np.ndarray       # (n*F,) global buffer rows, table-major (t*n + b)


class DLRM:
    """Bottom MLP, one embedding table per categorical feature, dot interaction, top MLP.

    Parameters
    ----------
    cat_sizes : sequence of int
        Rows of each embedding table (one table per categorical feature).
    n_dense : int
        Number of dense features (0 is allowed: a constant input is used).
    dim : int
        Embedding width d, also the bottom MLP's output width.
    bottom, top : tuple of int
        Hidden widths of the bottom and top MLPs (ReLU).
    lr_dense : float
        Adam learning rate of the MLP weights.
    lr_emb : float
        Row-wise Adagrad learning rate of the embedding rows.
    seed : int
    dtype : numpy float dtype (float32 by default; float64 for gradient checks)

    Examples
    --------
    >>> from lukern.replay.synthetic import synthetic_stream
    >>> s = synthetic_stream(n_events=2000, seed=0)
    >>> m = DLRM(s.cat_sizes, s.n_dense, dim=8, seed=0)
    >>> logits, pooled = m.forward(s.batch(0, 4))
    >>> logits.shape, pooled.shape == (4, 8 * s.n_cat)
    ((4,), True)
    """

    def __init__(self, cat_sizes, n_dense, *, dim=16, bottom=(32,), top=(64, 32), lr_dense=1e-3, lr_emb=0.05,
                 seed=0, dtype=np.float32, _empty=False):
        sizes = [int(s) for s in cat_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"`cat_sizes` must list at least one table of >= 1 row; got {sizes}.")
        if int(n_dense) < 0:
            raise ValueError(f"`n_dense` must be >= 0; got {n_dense}.")
        if int(dim) < 1:
            raise ValueError(f"`dim` must be >= 1; got {dim}.")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"`dtype` must be float32 or float64; got {self.dtype}.")
        self.cat_sizes = sizes
        self.n_dense = int(n_dense)
        self.dim = int(dim)
        self.bottom_sizes = tuple(int(h) for h in bottom)
        self.top_sizes = tuple(int(h) for h in top)
        self.lr_dense = float(lr_dense)
        self.lr_emb = float(lr_emb)
        self.seed = int(seed)
        self.n_tables = len(sizes)
        self.row_offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        k = self.n_tables + 1
        self.n_pairs = k * (k - 1) // 2
        self._tri = np.tril_indices(k, -1)
        rng = np.random.default_rng(seed)
        total = int(self.row_offsets[-1])
        d = self.dim
        if _empty:
            buf = np.zeros((total, d), self.dtype)
        else:
            # DLRM reference init: U(-1/sqrt(n), 1/sqrt(n)) per table, here with a floor so
            # that the huge hashed tables do not start at ~0 (dot products would vanish).
            buf = np.empty((total, d), self.dtype)
            for t, n in enumerate(sizes):
                a = max(1.0 / np.sqrt(n), 0.05)
                buf[self.row_offsets[t]:self.row_offsets[t + 1]] = rng.uniform(-a, a, (n, d))
        self._set_buffer(buf)
        self.emb_acc = np.zeros(total, dtype=self.dtype)
        n_in = max(self.n_dense, 1)
        self.params = {}
        widths = [n_in, *self.bottom_sizes, d]
        for i in range(len(widths) - 1):
            self._init_layer(rng, f"bottom{i}", widths[i], widths[i + 1])
        widths = [d + self.n_pairs, *self.top_sizes, 1]
        for i in range(len(widths) - 1):
            self._init_layer(rng, f"top{i}", widths[i], widths[i + 1])
        self.n_bottom = len(self.bottom_sizes) + 1
        self.n_top = len(self.top_sizes) + 1
        self.adam_m = {k_: np.zeros_like(v) for k_, v in self.params.items()}
        self.adam_v = {k_: np.zeros_like(v) for k_, v in self.params.items()}
        self.adam_t = 0
        self._offsets_cache = {}

    # ------------------------------------------------------------------ structure

    def _init_layer(self, rng, name, n_in, n_out):
        scale = np.sqrt(2.0 / (n_in + n_out))  # Glorot normal, as the DLRM reference
        self.params[f"{name}.W"] = (rng.standard_normal((n_in, n_out)) * scale).astype(self.dtype)
        self.params[f"{name}.b"] = (rng.standard_normal(n_out) * np.sqrt(1.0 / n_out)).astype(self.dtype)

    def _set_buffer(self, buf):
        self.emb_buffer = buf
        self.tables = TableBatch.from_buffer(buf, self.cat_sizes)

    @property
    def config(self) -> dict:
        return {"cat_sizes": self.cat_sizes, "n_dense": self.n_dense, "dim": self.dim,
                "bottom": list(self.bottom_sizes), "top": list(self.top_sizes), "lr_dense": self.lr_dense,
                "lr_emb": self.lr_emb, "seed": self.seed, "dtype": self.dtype.name}

    @property
    def table_nbytes(self) -> int:
        """Bytes of all embedding tables (the denominator of adapter memory %)."""
        return int(self.emb_buffer.nbytes)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the MLP weights (what a delta ships besides rows)."""
        return int(sum(v.nbytes for v in self.params.values()))

    def table(self, t: int) -> np.ndarray:
        """Writable view of table ``t`` (rows of feature ``t``)."""
        return self.tables.tables[t]

    def copy(self) -> "DLRM":
        """An independent deep copy (weights, optimizer state)."""
        m = DLRM(self.cat_sizes, self.n_dense, dim=self.dim, bottom=self.bottom_sizes, top=self.top_sizes,
                 lr_dense=self.lr_dense, lr_emb=self.lr_emb, seed=self.seed, dtype=self.dtype, _empty=True)
        m.load_state(self)
        return m

    def load_state(self, other: "DLRM", *, tables=True, dense=True, optimizer=True):
        """Copy weights (and optimizer state) from a model of the same shape, in place."""
        if other.config["cat_sizes"] != self.cat_sizes or other.dim != self.dim or \
                other.params.keys() != self.params.keys():
            raise ValueError("`other` must have the same tables and layer shapes as this model.")
        if tables:
            np.copyto(self.emb_buffer, other.emb_buffer)
            if optimizer:
                np.copyto(self.emb_acc, other.emb_acc)
        if dense:
            for k, v in other.params.items():
                np.copyto(self.params[k], v)
            if optimizer:
                for k in self.params:
                    np.copyto(self.adam_m[k], other.adam_m[k])
                    np.copyto(self.adam_v[k], other.adam_v[k])
                self.adam_t = other.adam_t

    # ------------------------------------------------------------------ forward

    def _check_batch(self, batch):
        cat, dense = batch.cat, batch.dense
        if cat.ndim != 2 or cat.shape[1] != self.n_tables:
            raise ValueError(f"`batch.cat` must have shape (n, {self.n_tables}); got {cat.shape}.")
        if dense.ndim != 2 or dense.shape != (cat.shape[0], self.n_dense):
            raise ValueError(f"`batch.dense` must have shape ({cat.shape[0]}, {self.n_dense}); got {dense.shape}.")
        if cat.size and (cat.min() < 0 or (cat >= np.asarray(self.cat_sizes)).any()):
            t = int(np.flatnonzero(((cat < 0) | (cat >= np.asarray(self.cat_sizes))).any(axis=0))[0])
            raise IndexError(f"`batch.cat[:, {t}]` must be in [0, {self.cat_sizes[t]}); got values "
                             f"{int(cat[:, t].min())}..{int(cat[:, t].max())}.")

    def _offsets(self, n):
        off = self._offsets_cache.get(n)
        if off is None:
            off = np.arange(n * self.n_tables + 1, dtype=np.int64)
            self._offsets_cache = {n: off}  # one size at a time: batches are mostly equal
        return off

    def lookup_args(self, batch):
        """(indices, offsets) of ``batch`` in the TableBatch layout (table-major, pooling 1)."""
        n = batch.cat.shape[0]
        return np.ascontiguousarray(batch.cat.T).reshape(-1), self._offsets(n)

    def forward_cache(self, batch, *, adapters=None) -> ForwardCache:
        """Forward pass keeping the activations (see :meth:`backward_pooled`, :meth:`train_step`).

        ``adapters``: optional list (one per table, None for none) of LoRA adapters for the
        fused lookup ``W[i] + s * A[slot(i)] @ B``.
        """
        self._check_batch(batch)
        n = batch.cat.shape[0]
        idx, off = self.lookup_args(batch)
        if adapters is None:
            pooled = self.tables.lookup(idx, off, unchecked=True)
        else:
            pooled = self.tables.lookup(idx, off, adapters=list(adapters), unchecked=True)
        rows = idx + np.repeat(self.row_offsets[:-1], n)
        return self._forward_pooled(pooled, batch.dense, rows)

    def _forward_pooled(self, pooled, dense, rows=None) -> ForwardCache:
        """Everything after the lookup: bottom MLP, interaction, top MLP."""
        n = pooled.shape[0]
        p = self.params
        h = dense.astype(self.dtype, copy=False) if self.n_dense else np.ones((n, 1), self.dtype)
        bottom_acts = [h]
        for i in range(self.n_bottom):
            h = np.maximum(h @ p[f"bottom{i}.W"] + p[f"bottom{i}.b"], 0)
            bottom_acts.append(h)
        x0 = h
        z = np.concatenate([x0[:, None, :], pooled.reshape(n, self.n_tables, self.dim)], axis=1)
        inter = np.matmul(z, z.transpose(0, 2, 1))[:, self._tri[0], self._tri[1]]
        h = np.concatenate([x0, inter], axis=1)
        top_acts = []
        for i in range(self.n_top):
            top_acts.append(h)
            h = h @ p[f"top{i}.W"] + p[f"top{i}.b"]
            if i < self.n_top - 1:
                h = np.maximum(h, 0)
        rows = np.zeros(0, np.int64) if rows is None else rows
        return ForwardCache(n, bottom_acts[0], bottom_acts, pooled, z, top_acts, h[:, 0], rows)

    def loss_grad_pooled(self, pooled, labels, dense):
        """``(loss, d loss / d pooled)`` for given pooled embeddings ``(n, n_tables * dim)``
        and dense features: the ``loss_grad`` callback of :class:`lukern.LiveUpdater`
        (records carry the dense features as ``extra``)."""
        pooled = np.asarray(pooled)
        if pooled.ndim != 2 or pooled.shape[1] != self.n_tables * self.dim:
            raise ValueError(f"`pooled` must have shape (n, {self.n_tables * self.dim}); got {pooled.shape}.")
        dense = np.asarray(dense)
        if dense.shape != (pooled.shape[0], self.n_dense):
            raise ValueError(f"`dense` must have shape ({pooled.shape[0]}, {self.n_dense}); got {dense.shape}.")
        return self.backward_pooled(self._forward_pooled(pooled.astype(self.dtype, copy=False), dense), labels)

    def forward(self, batch, *, adapters=None):
        """Logits ``(n,)`` and pooled embeddings ``(n, n_tables * dim)`` of ``batch``."""
        c = self.forward_cache(batch, adapters=adapters)
        return c.logits, c.pooled

    def predict(self, batch, *, adapters=None) -> np.ndarray:
        """Click probabilities ``(n,)``."""
        return _sigmoid(self.forward(batch, adapters=adapters)[0].astype(np.float64))

    # ------------------------------------------------------------------ backward

    def _check_labels(self, labels, n):
        y = np.asarray(labels)
        if y.shape != (n,):
            raise ValueError(f"`labels` must have shape ({n},); got {y.shape}.")
        return y.astype(self.dtype, copy=False)

    def _backward_top(self, c: ForwardCache, labels, want_weights: bool, weights=None, norm=None, tables_only=False,
                      want_loss=True):
        """Back through loss, top MLP and interaction. Returns loss, dz, dx0_direct, grads.

        ``dz`` is table-major: ``(k, n, d)`` with slot 0 the bottom MLP's output ``x0``
        and slot t the pooled embedding of table t. ``tables_only`` computes just what
        a learner of the embeddings needs (frozen MLPs): ``dz`` holds the tables' slots
        only ``(k - 1, n, d)`` and ``dx0`` is None (the top MLP's first layer is back-
        propagated to the interaction inputs alone). ``want_loss=False`` returns loss None.

        The loss is ``sum_i w_i l_i / norm`` (defaults: w = 1, norm = n)."""
        y = self._check_labels(labels, c.n)
        p = self.params
        norm = float(max(c.n, 1) if norm is None else norm)
        r = _sigmoid(c.logits.astype(np.float64)) - y
        loss = None
        if weights is None:
            if want_loss:
                loss = bce_with_logits(c.logits, y)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (c.n,):
                raise ValueError(f"`weights` must have shape ({c.n},); got {w.shape}.")
            if want_loss:
                z = c.logits.astype(np.float64)
                loss = float(np.sum(w * (np.logaddexp(0.0, z) - y * z)) / norm)
            r = r * w
        g = (r / norm).astype(self.dtype)[:, None]
        grads = {}
        d = self.dim
        dx0 = None
        for i in reversed(range(self.n_top)):
            if want_weights:
                a = c.top_acts[i]
                grads[f"top{i}.W"] = a.T @ g
                grads[f"top{i}.b"] = g.sum(axis=0)
            W = p[f"top{i}.W"]
            if i == 0 and tables_only:
                g = g @ W[d:].T  # the interaction inputs only: x0 feeds a frozen bottom MLP
            else:
                g = g @ W.T
            if i > 0:
                g = g * (c.top_acts[i] > 0)
        if not tables_only:
            dx0 = g[:, :d]
            g = g[:, d:]
        k = self.n_tables + 1
        t0 = 1 if tables_only else 0
        dz = np.empty((k - t0, c.n, d), self.dtype)
        gp = np.ascontiguousarray(g, dtype=self.dtype)
        if isinstance(c.z, list):  # the forward passes' z, not joined (concat_caches(backward_only=True))
            row0 = 0
            for z in c.z:
                _interaction_backward(gp, self._tri[0], self._tri[1], z, t0, dz, row0)
                row0 += z.shape[0]
        else:
            _interaction_backward(gp, self._tri[0], self._tri[1], c.z, t0, dz, 0)
        return loss, dz, dx0, grads

    @staticmethod
    def concat_caches(caches, *, backward_only=False) -> ForwardCache:
        """One cache for several forward passes (enough for :meth:`backward_pooled`):
        a trainer can collect the serving passes of a few requests and run one backward.
        ``backward_only``: join only what :meth:`backward_pooled` reads (the top MLP's
        inputs after its first layer, the logits); ``z`` stays the list of the passes'
        arrays (the backward reads them in place) and the other fields are None."""
        caches = list(caches)
        if len(caches) == 1:
            return caches[0]
        cat = np.concatenate
        if backward_only:
            # what backward_pooled reads: z, the logits and the top MLP's inputs after
            # the first (the first layer's input is not needed to back-propagate)
            return ForwardCache(n=sum(c.n for c in caches), dense_in=None, bottom_acts=None, pooled=None,
                                z=[c.z for c in caches],
                                top_acts=[None] + [cat(a) for a in zip(*(c.top_acts[1:] for c in caches))],
                                logits=cat([c.logits for c in caches]), rows=None)
        return ForwardCache(n=sum(c.n for c in caches), dense_in=cat([c.dense_in for c in caches]),
                            bottom_acts=[cat(a) for a in zip(*(c.bottom_acts for c in caches))],
                            pooled=cat([c.pooled for c in caches]), z=cat([c.z for c in caches]),
                            top_acts=[cat(a) for a in zip(*(c.top_acts for c in caches))],
                            logits=cat([c.logits for c in caches]),
                            rows=np.zeros(0, np.int64))  # table-major rows do not concatenate; unused here

    def backward_pooled(self, cache: ForwardCache, labels, *, weights=None, norm=None, table_major=False,
                        want_loss=True):
        """Loss and d loss / d pooled embeddings ``(n, n_tables * dim)`` from a kept forward.

        The co-located trainer calls this on the activations the serving forward already
        computed, so learning costs a backward pass but no second forward. ``weights``
        and ``norm`` give the weighted loss ``sum_i w_i l_i / norm`` (e.g. importance weights).
        With ``table_major=True`` the gradient comes as ``(n_tables, n, dim)`` so that each
        table's slice is contiguous. ``want_loss=False`` skips the loss (returned as None).
        """
        loss, dz, _, _ = self._backward_top(cache, labels, want_weights=False, weights=weights, norm=norm,
                                            tables_only=True, want_loss=want_loss)
        if table_major:
            return loss, dz
        return loss, np.ascontiguousarray(dz.transpose(1, 0, 2).reshape(cache.n, -1))

    def grad_pooled(self, batch, labels, *, adapters=None):
        """Loss and its gradient with respect to the pooled embeddings of ``batch``.

        This is the loss-gradient callback of the co-located trainer: the adapter's
        backward takes ``d loss / d pooled`` and the lookup's (indices, offsets).

        Returns
        -------
        loss : float
        grad : ndarray (n, n_tables * dim)
        """
        return self.backward_pooled(self.forward_cache(batch, adapters=adapters), labels)

    def gradients(self, batch, labels, cache=None):
        """Full gradients: loss, dict of MLP weight grads, and (unique global rows, row grads)."""
        c = self.forward_cache(batch) if cache is None else cache
        loss, dz, dx0, grads = self._backward_top(c, labels, want_weights=True)
        p = self.params
        g = dx0 + dz[0]
        for i in reversed(range(self.n_bottom)):
            g = g * (c.bottom_acts[i + 1] > 0)
            a = c.bottom_acts[i]
            grads[f"bottom{i}.W"] = a.T @ g
            grads[f"bottom{i}.b"] = g.sum(axis=0)
            if i > 0:
                g = g @ p[f"bottom{i}.W"].T
        # d pooled in table-major order matches c.rows (t*n + b).
        demb = dz[1:].reshape(-1, self.dim)
        # Sum the gradients of repeated rows: sort, then one segmented sum (about 4x
        # faster than np.add.at at batch 256 x 5 tables; the training side deserves a
        # fair implementation since its CPU time is what lukern is compared with).
        order = np.argsort(c.rows, kind="stable")
        sr = c.rows[order]
        starts = np.flatnonzero(np.concatenate(([True], sr[1:] != sr[:-1]))) if sr.size else np.zeros(0, np.int64)
        rows = sr[starts]
        row_grads = np.add.reduceat(demb[order], starts, axis=0) if sr.size else np.zeros((0, self.dim), self.dtype)
        return loss, grads, (rows, row_grads)

    def apply_gradients(self, grads, emb, *, dense=True):
        """One optimizer step: Adam on the MLP weights, row-wise Adagrad on the rows."""
        if dense:
            self.adam_t += 1
            b1, b2, eps = 0.9, 0.999, 1e-8
            c1 = 1 - b1 ** self.adam_t
            c2 = 1 - b2 ** self.adam_t
            for k, g in grads.items():
                m, v = self.adam_m[k], self.adam_v[k]
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * (g * g)
                self.params[k] -= (self.lr_dense / c1) * m / (np.sqrt(v / c2) + eps)
        rows, g = emb
        if rows.size:
            acc = self.emb_acc[rows] + np.mean(g * g, axis=1)
            self.emb_acc[rows] = acc
            self.emb_buffer[rows] -= (self.lr_emb / (np.sqrt(acc) + 1e-8))[:, None].astype(self.dtype) * g

    def train_step(self, batch, labels=None, *, dense=True, cache=None):
        """One mini-batch step on ``batch`` (labels default to ``batch.labels``).

        Returns the loss before the step and the global rows it touched.
        """
        y = batch.labels if labels is None else labels
        loss, grads, emb = self.gradients(batch, y, cache=cache)
        self.apply_gradients(grads, emb, dense=dense)
        return loss, emb[0]

    def fit(self, stream, start=0, stop=None, *, epochs=1, batch_size=256, seed=0, shuffle=True, progress=None):
        """Train on rows ``start:stop`` of ``stream`` for ``epochs`` (shuffled mini-batches).

        Returns the mean training loss of each epoch.
        """
        stop = len(stream) if stop is None else stop
        rng = np.random.default_rng(seed)
        losses = []
        for _ in range(int(epochs)):
            order = rng.permutation(np.arange(start, stop)) if shuffle else np.arange(start, stop)
            total, count = 0.0, 0
            for a in range(0, order.shape[0], batch_size):
                sel = order[a:a + batch_size]
                b = _take(stream, sel)
                loss, _ = self.train_step(b)
                total += loss * len(sel)
                count += len(sel)
                if progress is not None:
                    progress(len(sel))
            losses.append(total / max(count, 1))
        return losses

    def fit_early_stopping(self, stream, start=0, stop=None, *, max_epochs=4, val_frac=0.1, batch_size=256, seed=0,
                           progress=None):
        """Train on ``start:stop`` until the log loss on its most recent ``val_frac`` stops
        improving (at most ``max_epochs``), keep the best epoch, then learn the held-out
        rows once, so the model has seen everything up to ``stop``.

        Click models overfit their embeddings after one or two passes; the right count
        depends on the log, so it is measured rather than fixed.

        Returns ``{"epochs": best, "val_logloss": [...], "train_loss": [...]}``.
        """
        stop = len(stream) if stop is None else stop
        split = stop - max(1, int(val_frac * (stop - start)))
        if split <= start:
            raise ValueError(f"too few rows ({stop - start}) to hold out {val_frac:.0%} for early stopping.")
        val, train_loss, best, best_state = [], [], np.inf, None
        for e in range(int(max_epochs)):
            train_loss += self.fit(stream, start, split, epochs=1, batch_size=batch_size, seed=seed + e,
                                   progress=progress)
            ll = self.evaluate(stream, split, stop, batch_size=4 * batch_size)
            val.append(ll)
            if ll < best:
                best, best_state = ll, self.copy()
            else:
                break
        self.load_state(best_state)
        self.fit(stream, split, stop, epochs=1, batch_size=batch_size, seed=seed + 1000, progress=progress)
        return {"epochs": int(np.argmin(val)) + 1, "val_logloss": val, "train_loss": train_loss}

    def evaluate(self, stream, start=0, stop=None, *, batch_size=1024) -> float:
        """Mean log loss of the model on rows ``start:stop``."""
        stop = len(stream) if stop is None else stop
        total = 0.0
        for a in range(start, stop, batch_size):
            b = stream.batch(a, min(stop, a + batch_size))
            total += bce_with_logits(self.forward(b)[0], b.labels) * len(b)
        return total / max(stop - start, 1)

    # ------------------------------------------------------------------ persistence

    def save(self, path, *, optimizer=True):
        """Write the model to ``path`` (.npz, no pickle), atomically (temp file + rename).

        Examples
        --------
        >>> import os, tempfile
        >>> m = DLRM([5, 7], 2, dim=4)
        >>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
        >>> m.save(p)
        >>> m2 = DLRM.load(p)
        >>> bool((m2.emb_buffer == m.emb_buffer).all())
        True
        """
        arrays = {"config": np.array(json.dumps({**self.config, "format_version": _FORMAT_VERSION})),
                  "emb_buffer": self.emb_buffer}
        for k, v in self.params.items():
            arrays[f"param/{k}"] = v
        if optimizer:
            arrays["emb_acc"] = self.emb_acc
            arrays["adam_t"] = np.array(self.adam_t, dtype=np.int64)
            for k in self.params:
                arrays[f"adam_m/{k}"] = self.adam_m[k]
                arrays[f"adam_v/{k}"] = self.adam_v[k]
        atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path) -> "DLRM":
        """Read a model written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(os.fspath(path), allow_pickle=False) as z:
            if "config" not in z.files:
                raise ValueError(f"{path} is not a lukern DLRM file (no 'config' entry).")
            cfg = json.loads(str(z["config"]))
            if cfg.get("format_version") != _FORMAT_VERSION:
                raise ValueError(f"{path}: DLRM file format {cfg.get('format_version')} is not supported "
                                 f"(this lukern reads {_FORMAT_VERSION}).")
            m = cls(cfg["cat_sizes"], cfg["n_dense"], dim=cfg["dim"], bottom=cfg["bottom"], top=cfg["top"],
                    lr_dense=cfg["lr_dense"], lr_emb=cfg["lr_emb"], seed=cfg["seed"], dtype=cfg["dtype"],
                    _empty=True)
            np.copyto(m.emb_buffer, z["emb_buffer"])
            for k in m.params:
                np.copyto(m.params[k], z[f"param/{k}"])
            if "emb_acc" in z.files:
                np.copyto(m.emb_acc, z["emb_acc"])
                m.adam_t = int(z["adam_t"])
                for k in m.params:
                    np.copyto(m.adam_m[k], z[f"adam_m/{k}"])
                    np.copyto(m.adam_v[k], z[f"adam_v/{k}"])
        return m


def _take(stream, sel):
    from .streams import Batch

    return Batch(stream.t[sel], stream.dense[sel], stream.cat[sel], stream.labels[sel])
