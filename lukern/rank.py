"""Spectra and rank control (DESIGN sections 2 "Randomized SVD" and 4).

- :func:`randomized_svd`: truncated SVD of a dense matrix or of an implicit operand
  (:class:`GatheredRows`: rows of a table picked by id; :class:`LowRankRows`: an adapter's
  ``s * A_rows @ B``), never densified. Two methods, chosen by shape and reported:
  ``"gram"`` (exact ``M^T M`` in one blocked pass + ``eigh``, the fast path for narrow
  matrices) and ``"randomized"`` (Halko-Martinsson-Tropp subspace iteration where every
  power iteration is one pass applying ``M^T M`` block by block).
- :func:`probe_rank`: the smallest rank that holds a share of the energy, with the
  spectrum that justifies it.
- :class:`GradientWindow`: a bounded ring of recent pooled-gradient rows, fed by the LoRA
  backward, that tells how much gradient energy lies outside the row space of ``B``.
- :class:`RankController`: shrinks, grows and keeps an adapter inside a memory budget,
  logging every decision.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from . import _validate as V
from ._kernels import rsvd as K
from ._pool import available_cpus, run_ranges

__all__ = [
    "GatheredRows",
    "GradientWindow",
    "LowRankRows",
    "ProbeResult",
    "RankController",
    "SVDResult",
    "probe_rank",
    "randomized_svd",
]

_METHODS = ("auto", "randomized", "gram")
_NO_Y = {np.dtype(np.float32): np.empty((0, 1), np.float32), np.dtype(np.float64): np.empty((0, 1), np.float64)}

_blas = None


def _blas_single_thread():
    """BLAS limited to one thread while lukern's own threads split the rows.

    Measured on the 2-vCPU reference host under load: a pass at 200000 x 128, l = 42
    took 82 ms with two lukern threads over 1-thread BLAS and 170-330 ms (up to 7 s in
    one outlier run) with one caller and OpenBLAS's own two threads on 256..8192-row
    blocks. The limit is process-wide while the pass runs and restored afterwards.
    """
    global _blas
    try:
        if _blas is None:
            from threadpoolctl import ThreadpoolController
            _blas = ThreadpoolController()
        return _blas.limit(limits=1, user_api="blas")
    except Exception:  # pragma: no cover - threadpoolctl absent or unusable
        return nullcontext()


# Partial sums of a pass are kept per *lane*, a range of rows fixed by the operand's shape
# alone, and merged in lane order: the result is bit-for-bit the same for every thread
# count (threads take whole lanes). A lane holds at least 8 blocks (fewer and the split
# costs more than it brings), there are at most 64 of them (enough to balance 2..16
# threads) and their accumulators take at most 32 MiB together.
_LANE_BLOCKS = 8
_MAX_LANES = 64
_LANE_BYTES = 32 << 20


def _lanes(n_rows, acc_nbytes):
    """Row ranges ``[(lo, hi), ...]`` of a pass, block-aligned, a function of the shape only."""
    n_blocks = -(-n_rows // K.BLOCK_ROWS)
    n = max(1, min(-(-n_blocks // _LANE_BLOCKS), _MAX_LANES, _LANE_BYTES // max(int(acc_nbytes), 1)))
    cuts = np.minimum(np.linspace(0, n_blocks, n + 1).astype(np.int64) * K.BLOCK_ROWS, n_rows)
    return [(int(cuts[i]), int(cuts[i + 1])) for i in range(n)]


def _split_rows(kernel, n_rows, n_threads, acc_shape=None):
    """Run ``kernel(acc, lo, hi)`` over the lanes of ``n_rows`` on lukern's threads (each
    thread takes a contiguous group of lanes); the per-lane float64 accumulators are summed
    in lane order, so the result does not depend on ``n_threads``."""
    acc_nbytes = 0 if acc_shape is None else 8 * int(np.prod(acc_shape))
    lanes = _lanes(n_rows, acc_nbytes)
    accs = [np.zeros(acc_shape, np.float64) if acc_shape is not None else None for _ in lanes]
    nt = max(1, min(available_cpus() if n_threads is None else int(n_threads), len(lanes)))
    groups = np.linspace(0, len(lanes), nt + 1).astype(np.int64)

    def fn(g0, g1):
        for i in range(g0, g1):
            kernel(accs[i], *lanes[i])

    # BLAS on one thread whatever nt is: the same BLAS partitioning on every path, and
    # lukern's threads over 1-thread BLAS measured faster (see _blas_single_thread)
    with _blas_single_thread():
        run_ranges(fn, [(int(groups[i]), int(groups[i + 1])) for i in range(nt)])
    if acc_shape is None:
        return None
    total = accs[0]
    for acc in accs[1:]:
        total += acc
    return total


# --- operands --------------------------------------------------------------------------------

class _Dense:
    """A C-contiguous 2-D float array seen through the operand protocol."""

    def __init__(self, M):
        self.M = M
        self.shape = M.shape
        self.dtype = M.dtype

    def gram_apply(self, Q, n_threads=None, Y=None):
        M, keep = self.M, Y is not None
        Yk = Y if keep else _NO_Y[self.dtype]
        return _split_rows(lambda Z, lo, hi: K.gram_apply_dense(M, Q, Z, Yk, keep, lo, hi), self.shape[0],
                           n_threads, (self.shape[1], Q.shape[1]))

    def gram(self, n_threads=None):
        M = self.M
        return _split_rows(lambda G, lo, hi: K.gram_dense(M, G, lo, hi), self.shape[0], n_threads,
                           (self.shape[1], self.shape[1]))

    def matmul(self, X, n_threads=None):
        M = self.M
        out = np.empty((self.shape[0], X.shape[1]), self.dtype)
        _split_rows(lambda _, lo, hi: K.matmul_dense(M, X, out, lo, hi), self.shape[0], n_threads)
        return out

    def to_dense(self):
        return self.M


class GatheredRows:
    """The rows ``table[row_ids]`` of a table as an operand, never copied whole.

    Passes over it gather one cache-sized block of rows at a time (with software
    prefetch) and multiply it at once, so a spectrum of the active rows of a 1 GiB table
    costs block-sized scratch, not a copy.

    Parameters
    ----------
    table : ndarray (n_rows, d), float32 or float64, C-contiguous
    row_ids : ndarray of int32 or int64, values in [0, n_rows)

    Examples
    --------
    >>> import numpy as np, lukern
    >>> t = np.arange(12, dtype=np.float32).reshape(6, 2)
    >>> g = lukern.GatheredRows(t, np.array([5, 0]))
    >>> g.shape, g.to_dense().tolist()
    ((2, 2), [[10.0, 11.0], [0.0, 1.0]])
    """

    def __init__(self, table, row_ids):
        V.check_table(table)
        V.check_indices(row_ids, table.shape[0], name="row_ids")
        self.table = table
        self.row_ids = np.ascontiguousarray(row_ids, dtype=np.int64)
        self.shape = (self.row_ids.shape[0], table.shape[1])
        self.dtype = table.dtype

    def _buf(self):
        return np.empty((K.BLOCK_ROWS, self.shape[1]), self.dtype)

    def gram_apply(self, Q, n_threads=None, Y=None):
        t, ids, keep = self.table, self.row_ids, Y is not None
        Yk = Y if keep else _NO_Y[self.dtype]
        return _split_rows(lambda Z, lo, hi: K.gram_apply_gathered(t, ids, Q, Z, Yk, keep, self._buf(), lo, hi),
                           self.shape[0], n_threads, (self.shape[1], Q.shape[1]))

    def gram(self, n_threads=None):
        t, ids = self.table, self.row_ids
        return _split_rows(lambda G, lo, hi: K.gram_gathered(t, ids, G, self._buf(), lo, hi),
                           self.shape[0], n_threads, (self.shape[1], self.shape[1]))

    def matmul(self, X, n_threads=None):
        t, ids = self.table, self.row_ids
        out = np.empty((self.shape[0], X.shape[1]), self.dtype)
        _split_rows(lambda _, lo, hi: K.matmul_gathered(t, ids, X, out, self._buf(), lo, hi), self.shape[0],
                    n_threads)
        return out

    def to_dense(self):
        """The gathered rows as a dense copy (for tests and small operands)."""
        return self.table[self.row_ids]

    def __repr__(self):
        return f"GatheredRows({self.shape[0]} of {self.table.shape[0]} rows, d={self.shape[1]}, {self.dtype})"


class LowRankRows:
    """``scale * A_rows @ B`` (k x d) as an operand: an adapter's active correction.

    Its exact SVD costs ``O(k r^2 + r^2 d)`` through ``QR(A_rows) = Q R`` and the SVD of
    ``scale * R @ B`` (r x d); :meth:`svd` returns it, and :func:`randomized_svd` uses it
    under ``method="auto"`` (reported as ``"qr"``).

    Examples
    --------
    >>> import numpy as np, lukern
    >>> op = lukern.LowRankRows(np.eye(3, 2), np.array([[2.0, 0.0], [0.0, 1.0]]), 0.5)
    >>> np.round(lukern.randomized_svd(op, 2).S, 6).tolist()
    [1.0, 0.5]
    """

    def __init__(self, A_rows, B, scale=1.0):
        V.check_array("A_rows", A_rows, 2)
        V.check_array("B", B, 2)
        for name, x in (("A_rows", A_rows), ("B", B)):
            if x.dtype not in V.FLOAT_DTYPES:
                raise TypeError(f"`{name}` must be float32 or float64; got {x.dtype}.")
        if A_rows.shape[1] != B.shape[0]:
            raise ValueError(f"`A_rows` (k x r) and `B` (r x d) must agree on r; got {A_rows.shape} and {B.shape}.")
        if not np.isfinite(scale):
            raise ValueError(f"`scale` must be finite; got {scale!r}.")
        self.A = np.ascontiguousarray(A_rows)
        self.B = np.ascontiguousarray(B)
        self.scale = float(scale)
        self.shape = (A_rows.shape[0], B.shape[1])
        self.dtype = np.result_type(A_rows.dtype, B.dtype)
        self._AtA = None

    def _ata(self):
        if self._AtA is None:  # r x r, one blocked pass over A
            G = np.zeros((self.A.shape[1], self.A.shape[1]), np.float64)
            K.gram_dense(self.A, G, 0, self.A.shape[0])
            self._AtA = G
        return self._AtA

    def gram_apply(self, Q, n_threads=None, Y=None):
        if Y is not None:
            Y[:] = self.matmul(Q)
        B = self.B.astype(np.float64)
        return self.scale ** 2 * (B.T @ (self._ata() @ (B @ Q.astype(np.float64))))

    def gram(self, n_threads=None):
        B = self.B.astype(np.float64)
        return self.scale ** 2 * (B.T @ self._ata() @ B)

    def matmul(self, X, n_threads=None):
        Y = (self.scale * (self.B.astype(np.float64) @ X.astype(np.float64))).astype(self.A.dtype)
        out = np.empty((self.shape[0], X.shape[1]), self.A.dtype)
        K.matmul_dense(self.A, Y, out, 0, self.shape[0])
        return out

    def svd(self):
        """Exact thin SVD ``(U, S, Vt)`` (float64) via QR of A and SVD of ``s R B``."""
        Qa, R = np.linalg.qr(self.A.astype(np.float64))
        Us, S, Vt = np.linalg.svd(self.scale * (R @ self.B.astype(np.float64)), full_matrices=False)
        return Qa @ Us, S, Vt

    def to_dense(self):
        return self.scale * (self.A.astype(np.float64) @ self.B.astype(np.float64))

    def __repr__(self):
        return f"LowRankRows(k={self.shape[0]}, r={self.A.shape[1]}, d={self.shape[1]}, scale={self.scale:g})"


def _as_operand(M, name="M"):
    if isinstance(M, (GatheredRows, LowRankRows, _Dense)):
        return M
    if not isinstance(M, np.ndarray):
        raise TypeError(f"`{name}` must be a 2-D numpy array, lukern.GatheredRows or lukern.LowRankRows; "
                        f"got {type(M).__name__}.")
    V.check_array(name, M, 2)
    if M.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32 or float64; got {M.dtype}. Convert with {name}.astype(np.float32).")
    if not M.flags.c_contiguous:
        raise ValueError(f"`{name}` must be C-contiguous (strides {M.strides}); lukern does not copy silently. "
                         f"Use numpy.ascontiguousarray({name}) once.")
    return _Dense(M)


# --- randomized SVD ----------------------------------------------------------------------------

class SVDResult:
    """``U, S, Vt = result`` like :func:`numpy.linalg.svd`; ``result.method`` says how."""

    __slots__ = ("U", "S", "Vt", "method")

    def __init__(self, U, S, Vt, method):
        self.U, self.S, self.Vt, self.method = U, S, Vt, method

    def __iter__(self):
        return iter((self.U, self.S, self.Vt))

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return (self.U, self.S, self.Vt)[i]

    def __repr__(self):
        return f"SVDResult(k={self.S.shape[0]}, method={self.method!r}, S[:4]={np.round(self.S[:4], 6).tolist()})"


def _choose_method(n, d, l, n_iter):
    # Flop model of one pass each: the Gram pass is one n x d x d product, a randomized
    # pass two n x d x l products, and randomized needs n_iter + 1 of them. At 200000 x
    # 128 float32 the Gram pass took 53 ms and a randomized pass with l = 42 took 42 ms
    # (DESIGN section 9 reports 52 ms for the Gram route), so the flop model holds.
    gram = 2.0 * n * d * d + 10.0 * d ** 3
    rand = (n_iter + 1) * 4.0 * n * d * l
    return "gram" if gram <= rand else "randomized"


def _fix_signs(V):
    # deterministic signs: the largest-magnitude entry of every right singular vector > 0
    idx = np.argmax(np.abs(V), axis=0)
    sg = np.sign(V[idx, np.arange(V.shape[1])])
    sg[sg == 0] = 1
    return sg


def _finish(op, S, V, method, n_threads):
    """U = M V / S in one pass; zero singular values get a zero U column."""
    sg = _fix_signs(V)
    V = V * sg
    inv = np.where(S > 0, 1.0 / np.where(S > 0, S, 1.0), 0.0)
    U = op.matmul(np.ascontiguousarray((V * inv).astype(op.dtype)), n_threads)
    return SVDResult(U, S.astype(op.dtype), np.ascontiguousarray(V.T.astype(op.dtype)), method)


def randomized_svd(M, k, *, oversample=10, n_iter=4, rng=None, method="auto", n_threads=None):
    """Truncated SVD ``M ~ U diag(S) Vt`` of rank ``k``, for dense or implicit operands.

    Parameters
    ----------
    M : ndarray (n, d) float32/float64 C-contiguous, :class:`GatheredRows` or :class:`LowRankRows`
    k : int
        Number of singular triplets, ``1 <= k <= min(n, d)``.
    oversample : int
        Extra test vectors (``l = k + oversample``), as in Halko et al.
    n_iter : int
        Power iterations; each is one blocked pass applying ``M^T M``.
    rng : None, int or numpy.random.Generator
        Seed of the Gaussian test matrix (default 0: results are deterministic).
    method : {"auto", "randomized", "gram"}
        ``"gram"``: exact ``M^T M`` (one pass) and ``eigh``, the fast path for narrow
        ``d``; ``"randomized"``: subspace iteration. ``"auto"`` chooses by a flop model
        (and uses the exact QR route for :class:`LowRankRows`).
    n_threads : int, optional
        lukern threads splitting the rows (default: the CPUs this process may use).
        With more than one, BLAS is limited to one thread for the duration of each pass
        (process-wide, restored afterwards); results are deterministic per thread count.

    Returns
    -------
    SVDResult
        Unpacks as ``U (n, k), S (k,), Vt (k, d)`` in the operand's dtype, singular values
        descending; ``.method`` is ``"gram"``, ``"randomized"`` or ``"qr"``.

    Notes
    -----
    Squared singular values are accumulated in float64 from BLAS products of the
    operand's dtype: with float32 data, singular values below about 1e-3 of the largest
    are not resolved (pass float64 data if they matter). Wide dense inputs (n < d) are
    handled through their transpose (a copy of ``M.T``); a :class:`GatheredRows` with
    fewer rows than columns is gathered densely (it is smaller than ``d x d``).

    Examples
    --------
    >>> import numpy as np, lukern
    >>> M = np.random.default_rng(0).standard_normal((1000, 20)).astype(np.float32)
    >>> res = lukern.randomized_svd(M, 3)
    >>> U, S, Vt = res
    >>> U.shape, S.shape, Vt.shape, res.method
    ((1000, 3), (3,), (3, 20), 'gram')
    >>> bool(np.allclose(S, np.linalg.svd(M, compute_uv=False)[:3], rtol=1e-4))
    True
    """
    op = _as_operand(M)
    n, d = op.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(n, d):
        raise ValueError(f"`k` must be an int in [1, min(n, d)] = [1, {min(n, d)}] for an operand of shape {op.shape}; "
                         f"got {k!r}.")
    k = int(k)
    for name, v in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"`{name}` must be an int >= 0; got {v!r}.")
    V.check_choice("method", method, _METHODS)
    n_threads = V.check_positive_int("n_threads", n_threads)
    if n < d and not isinstance(op, LowRankRows):
        # work on the transpose: it is small (n x d with n < d costs less than d x d)
        Mt = np.ascontiguousarray(op.to_dense().T)
        r = randomized_svd(Mt, k, oversample=oversample, n_iter=n_iter, rng=rng, method=method, n_threads=n_threads)
        return SVDResult(np.ascontiguousarray(r.Vt.T), r.S, np.ascontiguousarray(r.U.T), r.method)
    l = min(k + int(oversample), d)
    if method == "auto":
        method = "qr" if isinstance(op, LowRankRows) else _choose_method(n, d, l, int(n_iter))
    if method == "qr":
        U, S, Vt = op.svd()
        sg = _fix_signs(Vt[:k].T)
        dt = op.dtype
        return SVDResult((U[:, :k] * sg).astype(dt), S[:k].astype(dt), (Vt[:k] * sg[:, None]).astype(dt), "qr")
    if method == "gram":
        G = op.gram(n_threads)
        lam, W = np.linalg.eigh((G + G.T) * 0.5)
        order = np.argsort(lam)[::-1][:k]
        return _finish(op, np.sqrt(np.maximum(lam[order], 0.0)), W[:, order], "gram", n_threads)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
    Q = gen.standard_normal((d, l)).astype(op.dtype)
    for _ in range(int(n_iter)):
        Z = op.gram_apply(Q, n_threads)
        Q = np.ascontiguousarray(np.linalg.qr(Z)[0].astype(op.dtype))
    # Rayleigh-Ritz on M^T M over span(Q): the same subspace as Halko et al.'s
    # range((M M^T)^q M Omega), reached with one pass per iteration instead of two
    Q64 = np.linalg.qr(Q.astype(np.float64))[0]
    Qc = np.ascontiguousarray(Q64.astype(op.dtype))
    # the last pass keeps the sketch Y = M Q (n x l): U = Y W / S then needs no extra
    # pass over M (at 200000 x 128, k = 4, one thread: 6 passes instead of 7)
    Y = np.empty((n, l), op.dtype)
    Z = op.gram_apply(Qc, n_threads, Y)
    Hm = Qc.astype(np.float64).T @ Z
    lam, W = np.linalg.eigh((Hm + Hm.T) * 0.5)
    order = np.argsort(lam)[::-1][:k]
    S = np.sqrt(np.maximum(lam[order], 0.0))
    Vr = Q64 @ W[:, order]
    sg = _fix_signs(Vr)
    inv = np.where(S > 0, 1.0 / np.where(S > 0, S, 1.0), 0.0)
    U = Y @ (W[:, order] * (sg * inv)).astype(op.dtype)
    return SVDResult(U, S.astype(op.dtype), np.ascontiguousarray((Vr * sg).T.astype(op.dtype)), "randomized")


# --- probe_rank ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe_rank` found: ``rank`` and the evidence for it."""

    rank: int
    spectrum: np.ndarray  # singular values, descending
    total_energy: float  # sum of squared singular values (squared Frobenius norm)
    energy_kept: float  # share of total_energy held by the top `rank` directions
    energy: float  # the requested share
    method: str = "spectrum"

    def __repr__(self):
        return (f"ProbeResult(rank={self.rank}, energy_kept={self.energy_kept:.4f} (asked {self.energy}), "
                f"total_energy={self.total_energy:.6g}, spectrum[:8]={np.round(self.spectrum[:8], 6).tolist()}, "
                f"method={self.method!r})")


def _rank_for(S, energy, total):
    if total <= 0:
        return 0, 1.0
    cum = np.cumsum(S.astype(np.float64) ** 2)
    r = int(np.searchsorted(cum, energy * total * (1 - 1e-12)) + 1)
    r = min(r, S.shape[0])
    return r, float(cum[r - 1] / total)


def probe_rank(M, energy=0.95, max_rank=None):
    """The smallest rank whose singular values hold ``energy`` of the total (sum of squares).

    Parameters
    ----------
    M : 1-D array of singular values (a spectrum), 2-D array, GatheredRows or LowRankRows
    energy : float in (0, 1]
    max_rank : int, optional
        Cap on the returned rank (``energy_kept`` then reports what the cap holds).

    Returns
    -------
    ProbeResult
        ``rank``, ``spectrum``, ``total_energy``, ``energy_kept``, ``energy``, ``method``.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> p = lukern.probe_rank(np.array([3.0, 2.0, 0.1]), energy=0.95)
    >>> p.rank, round(p.energy_kept, 4)
    (2, 0.9992)
    """
    if not (isinstance(energy, (int, float, np.floating)) and 0 < energy <= 1):
        raise ValueError(f"`energy` must be a number in (0, 1]; got {energy!r}.")
    if max_rank is not None:
        max_rank = V.check_positive_int("max_rank", max_rank)
    if isinstance(M, np.ndarray) and M.ndim == 1:
        if not np.issubdtype(M.dtype, np.number) or not np.all(np.isfinite(M)) or np.any(M < 0):
            raise ValueError("a 1-D `M` is read as a spectrum: it must hold finite singular values >= 0.")
        S = np.sort(M.astype(np.float64))[::-1]
        method = "spectrum"
    else:
        op = _as_operand(M)
        n, d = op.shape
        if isinstance(op, LowRankRows):
            S, method = op.svd()[1], "qr"
        elif min(n, d) == 0:
            S, method = np.zeros(0), "gram"
        else:
            # the full spectrum from the Gram matrix (d x d, or n x n for wide inputs)
            if n < d:
                X = op.to_dense().astype(np.float64)
                G = X @ X.T
            else:
                G = op.gram()
            S, method = np.sqrt(np.maximum(np.linalg.eigvalsh((G + G.T) * 0.5), 0.0))[::-1], "gram"
    total = float(np.sum(S.astype(np.float64) ** 2))
    r, kept = _rank_for(S, float(energy), total)
    if max_rank is not None and r > max_rank:
        r = max_rank
        kept = float(np.sum(S[:r].astype(np.float64) ** 2) / total)
    return ProbeResult(r, S, total, kept, float(energy), method)


# --- gradient window ---------------------------------------------------------------------------

class GradientWindow:
    """A bounded ring of recent pooled-gradient rows (``capacity x dim``, float32).

    The LoRA backward hands it the (n_bags, d) gradient of every batch through
    ``adapter.grad_window = window``; at most ``per_add`` evenly spaced rows of a batch
    are kept so feeding it costs O(per_add * d) per step. Its bytes count against a
    :class:`RankController`'s budget, so keep it small for small tables (the spectra
    measured on MovieLens and TalkingData put about 90% of the gradient energy in one
    direction: a few dozen rows estimate the residual well).

    Examples
    --------
    >>> import numpy as np, lukern
    >>> w = lukern.GradientWindow(4, 8, per_add=4)
    >>> w.add(np.eye(4)[:2])
    >>> round(w.residual_energy(np.eye(4)[:1]), 6)
    0.5
    """

    def __init__(self, dim, capacity=256, *, per_add=None):
        self.dim = V.check_positive_int("dim", dim, allow_none=False)
        self.capacity = V.check_positive_int("capacity", capacity, allow_none=False)
        self.per_add = V.check_positive_int("per_add", per_add) or max(1, self.capacity // 8)
        self._buf = np.zeros((self.capacity, self.dim), np.float32)
        self._pos = 0
        self.n = 0  # rows held
        self.n_seen = 0  # rows offered since creation

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def add(self, grad) -> None:
        """Keep (a strided subsample of) the rows of ``grad`` (n x dim)."""
        g = np.asarray(grad)
        if g.ndim != 2 or g.shape[1] != self.dim:
            raise ValueError(f"`grad` must have shape (n, {self.dim}); got {g.shape}.")
        m = g.shape[0]
        self.n_seen += m
        if m == 0:
            return
        if m > self.per_add:  # evenly spaced rows (centred strata): deterministic
            g = g[((np.arange(self.per_add) + 0.5) * (m / self.per_add)).astype(np.int64)]
        m = g.shape[0]
        end = self._pos + m
        if end <= self.capacity:
            self._buf[self._pos:end] = g
        else:
            first = self.capacity - self._pos
            self._buf[self._pos:] = g[:first]
            self._buf[:m - first] = g[first:]
        self._pos = end % self.capacity
        self.n = min(self.n + m, self.capacity)

    def rows(self) -> np.ndarray:
        """The rows held, as float64 (a copy; ring order, not time order)."""
        return self._buf[:self.n].astype(np.float64)

    def clear(self) -> None:
        self._pos = self.n = 0

    def _basis(self, B):
        if B is None or B.shape[0] == 0:
            return np.zeros((self.dim, 0))
        B = np.asarray(B, np.float64)
        if B.ndim != 2 or B.shape[1] != self.dim:
            raise ValueError(f"`B` must have shape (r, {self.dim}); got {B.shape}.")
        Q, R = np.linalg.qr(B.T)
        keep = np.abs(np.diag(R)) > 1e-12 * max(1.0, float(np.abs(R).max(initial=0.0)))
        return Q[:, keep]

    def residual_energy(self, B) -> float:
        """Share of the window's energy outside the row space of ``B`` (r x dim); 0 if empty."""
        W = self.rows()
        total = float(np.einsum("ij,ij->", W, W))
        if total == 0:
            return 0.0
        P = W @ self._basis(B)
        return max(0.0, 1.0 - float(np.einsum("ij,ij->", P, P)) / total)

    def top_directions(self, k, exclude=None):
        """The ``k`` top right singular vectors of the window with the row space of
        ``exclude`` projected out: ``(directions (k x dim), share)`` where ``share[i]`` is
        the part of the window's energy direction ``i`` carries. Directions without
        energy are left out, so fewer than ``k`` may come back."""
        k = V.check_positive_int("k", k, allow_none=False)
        W = self.rows()
        total = float(np.einsum("ij,ij->", W, W))
        Qb = self._basis(exclude)
        R = W - (W @ Qb) @ Qb.T
        k = min(k, self.dim - Qb.shape[1], max(self.n, 1))
        if total == 0 or k <= 0:
            return np.zeros((0, self.dim)), np.zeros(0)
        G = R.T @ R
        lam, Wv = np.linalg.eigh((G + G.T) * 0.5)
        order = np.argsort(lam)[::-1][:k]
        order = order[lam[order] > 1e-12 * total]  # no direction without energy
        dirs = Wv[:, order].T
        dirs *= _fix_signs(dirs.T)[:, None]
        return np.ascontiguousarray(dirs), np.maximum(lam[order], 0.0) / total


# --- the rank controller -------------------------------------------------------------------

# Ids the re-admission tracking of a RankController follows at most (8 bytes each, plus a
# filter of at most 64 bits each): 512 keeps it at 8 KiB, two gradient windows' worth; it
# also takes at most 1/16 of the budget.
_TRACK_ROWS = 512


def adapter_bytes(adapter, capacity, rank) -> int:
    """Worst-case ``adapter.nbytes`` at ``capacity`` and ``rank``: the adapter's own
    :meth:`~lukern.LoRAAdapter.nbytes_at` (every array it owns, the pending-gradient
    buffers at their largest), so a budget kept on this figure holds at every step.

    (An earlier copy of the adapter's layout here over-counted by about 50% at small
    capacities, which made the controller fold rows it had room for.)
    """
    return int(adapter.nbytes_at(capacity=int(capacity), rank=int(rank)))


@dataclass
class RankController:
    """Keeps a :class:`lukern.LoRAAdapter`'s rank where its spectrum says, inside a memory
    budget, with a log of every decision.

    Call :meth:`step` between training steps. Every ``every`` calls (and on the first) it

    - **shrinks**: exact singular values of the active ``s A B`` (QR of A, SVD of R B);
      keeps the smallest rank holding ``energy`` of the correction, widened by the
      directions of the dropped subspace that hold more than ``1 - energy`` of the
      gradient window; re-factors onto the kept directions ``Vk`` as
      ``A = dW Vk^T / (s c)``, ``B = c Vk`` (``c`` the RMS row norm of the old B, so the
      optimizers' step sizes carry over; DESIGN's balanced ``S^(1/2)`` split rescaled B
      and hurt training). Served values move by at most the largest dropped singular
      value times the norm of a bag's per-row weights;
    - **grows**: when the gradient window's energy outside the row space of B exceeds
      ``grow_threshold``, adds up to ``grow_step`` directions: new B rows are the top
      residual directions (``seed_scale`` times the mean norm of B's rows), new A
      columns are 0 (served values do not move). The default 0.9 is conservative: on
      the TalkingData sample, growing at 0.5 re-factored every period and raised the
      test log loss (``python -m lukern.bench gradient_spectrum``);
    - **enforces the budget** ``adapter_bytes + window.nbytes + scratch_nbytes <= budget *
      table.nbytes`` (``adapter_bytes``: the adapter's largest possible ``nbytes`` at its
      capacity and rank, so the bound holds at every step in between; ``scratch_nbytes``:
      the controller's row bookkeeping, fixed, at most 8 KiB and 1/16 of the budget) by lowering the rank or
      folding the least recently used rows and shrinking the capacity, whichever loses
      less: lowering the rank loses the dropped energy; folding keeps every served value
      and loses only the learning of *hot* rows (touched within ``hot_steps`` adapter
      steps, default ``every``), counted as their share of the correction. Equal losses
      (typically nothing learned yet) lower the rank with ``ties="rows"`` and fold rows
      with ``ties="rank"``;
    - **grows the capacity** (``grow_capacity``) when it thrashes: rows were folded since
      the last decision and at least ``readmit_share`` of the rows admitted since had
      been folded before (a filter of folded row ids); it doubles at most, within the
      budget. A long tail of new rows does not trigger it.

    ``shrink_after`` holds the shrink back for the adapter's first steps. On the
    TalkingData sample every energy-based shrink cost test log loss: the correction's
    energy sits in one or two directions, yet the loss kept improving with rank up to 16,
    and a shrink at step 20 cut rank 16 to 1-2 for good (``python -m lukern.bench
    gradient_spectrum``, see its docstring); there ``energy=1.0`` (drop only directions
    without energy), ``shrink_after=100`` and ``ties="rank"`` did best.

    Every change goes through ``adapter.refactor`` / ``adapter.evict`` / ``adapter.resize``
    (new arrays, one reference swap). The decision log is ``controller.log``.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> table = np.zeros((10000, 16), np.float32)
    >>> a = lukern.LoRAAdapter(10000, 16, rank=8, capacity=64)
    >>> ctl = lukern.RankController(a, table, budget=0.05, every=10)
    >>> d = ctl.step()  # first call: checks the budget and the spectrum
    >>> a.nbytes <= 0.05 * table.nbytes
    True
    """

    adapter: object
    table: np.ndarray = field(repr=False)
    budget: float = 0.02
    energy: float = 0.95
    max_rank: int | None = None
    min_rank: int = 1
    every: int = 100
    grow_threshold: float = 0.9
    grow_step: int = 2
    seed_scale: float = 1.0
    shrink_after: int = 0
    grow_capacity: bool = True
    hot_steps: int | None = None
    ties: str = "rows"
    readmit_share: float = 0.5
    window: GradientWindow | None = field(default=None, repr=False)
    log: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        a = self.adapter
        for name in ("refactor", "evict", "resize", "active_rows"):
            if not hasattr(a, name):
                raise TypeError(f"`adapter` must be a lukern.LoRAAdapter; got {type(a).__name__}.")
        V.check_table(self.table)
        a._check_compatible(self.table)
        # above 1 is allowed: a global budget split over tables may give a small table more
        # than its own bytes (a 161-row table's adapter holding every row at rank 16 takes
        # 48 KB, its table 41 KB; the hash, bitmap and B's optimizer state do not shrink)
        if not (isinstance(self.budget, (int, float, np.floating)) and np.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"`budget` must be a finite number > 0 (a share of the table's bytes); "
                             f"got {self.budget!r}.")
        if not 0 < self.energy <= 1:
            raise ValueError(f"`energy` must be in (0, 1]; got {self.energy!r}.")
        if self.max_rank is None:
            self.max_rank = min(a.dim, max(16, a.rank))
        self.max_rank = V.check_positive_int("max_rank", self.max_rank, allow_none=False)
        self.min_rank = V.check_positive_int("min_rank", self.min_rank, allow_none=False)
        if self.min_rank > self.max_rank:
            raise ValueError(f"`min_rank` ({self.min_rank}) must be <= `max_rank` ({self.max_rank}).")
        self.every = V.check_positive_int("every", self.every, allow_none=False)
        self.grow_step = V.check_positive_int("grow_step", self.grow_step, allow_none=False)
        if isinstance(self.shrink_after, bool) or not isinstance(self.shrink_after, (int, np.integer)) \
                or self.shrink_after < 0:
            raise ValueError(f"`shrink_after` must be an int >= 0 (adapter steps); got {self.shrink_after!r}.")
        self.hot_steps = V.check_positive_int("hot_steps", self.hot_steps) or self.every
        V.check_choice("ties", self.ties, ("rows", "rank"))
        if not 0 <= self.readmit_share <= 1:
            raise ValueError(f"`readmit_share` must be in [0, 1]; got {self.readmit_share!r}.")
        if self.window is None:
            if isinstance(a.grad_window, GradientWindow):
                self.window = a.grad_window
            else:
                # the default window takes at most a quarter of the budget (it counts
                # against it), so small tables still leave room for the adapter
                row_bytes = a.dim * np.dtype(np.float32).itemsize
                fit = int(self.budget * self.table.nbytes) // 4 // row_bytes
                self.window = GradientWindow(a.dim, capacity=int(min(256, max(1, fit))))
        a.grad_window = self.window
        self._calls = 0
        self._grew_at = -1
        self._evicted_seen = a.evicted_rows
        # re-admission tracking on a fixed-size sample of rows (see _track_rows)
        # (at most 1/16 of the budget: about 16 bytes a tracked id with its filter bits)
        self._track_k = int(max(1, min(a.n_rows, _TRACK_ROWS, self.budget * self.table.nbytes // 256)))
        self._filter_bits = min(a.n_rows, 64 * self._track_k)
        self._filter = np.zeros(-(-self._filter_bits // 8), np.uint8)
        self._reset_tracking()

    @property
    def limit_bytes(self) -> int:
        """Bytes the adapter may use: the budget minus the gradient window's bytes and
        the controller's row bookkeeping (``scratch_nbytes``)."""
        return int(self.budget * self.table.nbytes) - self.window.nbytes - self.scratch_nbytes

    def _bytes(self, capacity, rank):
        return adapter_bytes(self.adapter, capacity, rank)

    def spectrum(self):
        """Exact singular values (and factors) of the active correction ``s A B``."""
        a = self.adapter
        _, slots = a.active_rows()
        return LowRankRows(a.A[slots], a.B, a.scale).svd()

    # -- actions -----------------------------------------------------------------------------

    @staticmethod
    def _refactor(a, A_active, B, keep_b_rows=0):
        """``a.refactor`` keeping the optimizer's memory.

        Without accumulators ``refactor`` restarts the optimizer state, so the next
        Adagrad steps are full-size again. In the TalkingData controller run (``python -m
        lukern.bench gradient_spectrum``, seed 0, growth at 0.5, balanced factors)
        restarting gave a test log loss of 0.0193 and carrying the memory 0.0113 (no
        re-factors: 0.0086). The row-wise accumulator of A does not depend on the rank
        and is carried per row; B's accumulator is carried for rows kept as they were and
        set to its column mean for rotated or new rows.
        """
        _, acc_a, acc_b = a.optimizer_state()
        new_acc_b = None
        if acc_b.size:
            new_acc_b = np.empty((np.shape(B)[0], acc_b.shape[1]), acc_b.dtype)
            new_acc_b[:] = acc_b.mean(axis=0)
            keep = min(keep_b_rows, acc_b.shape[0], new_acc_b.shape[0])
            new_acc_b[:keep] = acc_b[:keep]
        a.refactor(A_active, B, acc_a=acc_a, acc_b=new_acc_b)

    def _refactor_to(self, r_new, U, S, Vt):
        a = self.adapter
        s = a.scale
        c = float(np.sqrt(np.mean(np.sum(a.B.astype(np.float64) ** 2, axis=1)))) or 1.0  # see _shrink
        self._refactor(a, (U[:, :r_new] * (S[:r_new] / (s * c))).astype(a.dtype), (Vt[:r_new] * c).astype(a.dtype))

    def _shrink(self, U, S, Vt):
        a = self.adapter
        r_old = a.rank
        total = float(np.sum(S ** 2))
        if total == 0 or a.n_active == 0:
            return None
        m = S.shape[0]  # min(active rows, rank)
        r_top, _ = _rank_for(S, self.energy, total)
        r_top = min(max(self.min_rank, r_top), m)
        # Keep, besides the top directions of the correction, the directions of the
        # dropped subspace that recent gradients point along: a direction grown a few
        # steps ago holds little correction yet, and dropping it only to grow it back at
        # the next check restarts its learning every period (seen on TalkingData).
        D = Vt[r_top:].astype(np.float64)
        extra = np.zeros((0, a.dim))
        W = self.window.rows()
        g_total = float(np.einsum("ij,ij->", W, W))
        if g_total > 0 and D.shape[0]:
            P = W @ D.T
            lam, E = np.linalg.eigh(P.T @ P)
            lam, E = lam[::-1].clip(min=0), E[:, ::-1]
            left = float(lam.sum())
            j = 0
            while j < lam.shape[0] and left > (1.0 - self.energy) * g_total:
                left -= float(lam[j])
                j += 1
            extra = E[:, :j].T @ D
        r_new = r_top + extra.shape[0]
        if r_new >= r_old:
            return None
        # new factors: the correction projected on the kept directions Vk,
        # s A' B' = dW Vk^T Vk with A' = dW Vk^T / (s c) and B' = c Vk, where c is the
        # RMS row norm of the old B: B keeps its scale, so the gradients of A (s g B^T)
        # and the optimizers' step sizes stay what they were. (Balanced factors,
        # c_i = sqrt(S_i / s), gave 0.00997 test log loss on TalkingData against
        # 0.00898 with the common c, seed 0, same run otherwise.)
        s = a.scale
        C_top = U[:, :r_top] * S[:r_top]
        C_x = (U * S) @ (Vt.astype(np.float64) @ extra.T)
        c = float(np.sqrt(np.mean(np.sum(a.B.astype(np.float64) ** 2, axis=1)))) or 1.0
        A_new = np.hstack([C_top, C_x]) / (s * c)
        B_new = np.vstack([Vt[:r_top], extra]) * c
        self._refactor(a, A_new.astype(a.dtype), B_new.astype(a.dtype))
        kept = float((np.sum(C_top ** 2) + np.sum(C_x ** 2)) / total)
        return dict(action="shrink", old_rank=r_old, new_rank=r_new, energy_kept=kept,
                    kept_for_gradients=int(extra.shape[0]),
                    max_served_change_per_unit_weight=float(S[r_top]) if r_top < m else 0.0)

    def _grow(self):
        a = self.adapter
        if self.window.n < min(2 * a.dim, self.window.capacity) or a.rank >= self.max_rank:
            return None
        res = self.window.residual_energy(a.B)
        if res <= self.grow_threshold:
            return None
        g = min(self.grow_step, self.max_rank - a.rank)
        # the budget must allow the wider factors at the current capacity
        while g > 0 and self._bytes(a.capacity, a.rank + g) > self.limit_bytes:
            g -= 1
        if g == 0:
            return None
        dirs, share = self.window.top_directions(g, exclude=a.B)
        if dirs.shape[0] == 0:
            return None
        g = dirs.shape[0]
        norms = np.linalg.norm(a.B.astype(np.float64), axis=1)
        row_norm = self.seed_scale * (float(np.mean(norms)) if norms.size and np.mean(norms) > 0 else 1.0)
        rows, slots = a.active_rows()
        r_old = a.rank
        A_new = np.zeros((rows.size, r_old + g), a.dtype)
        A_new[:, :r_old] = a.A[slots]
        B_new = np.vstack([a.B, (dirs * row_norm).astype(a.dtype)])
        self._refactor(a, A_new, B_new, keep_b_rows=r_old)
        self._grew_at = self._calls
        return dict(action="grow", old_rank=r_old, new_rank=r_old + g, residual_energy=res,
                    seeded_share=float(np.sum(share)), energy_kept=1.0)

    def _lower_rank(self, r_new, U, S):
        a = self.adapter
        if S is None or S.shape[0] == 0:  # no active rows: nothing served changes
            self._refactor(a, np.zeros((0, r_new), a.dtype), a.B[:r_new], keep_b_rows=r_new)
        else:
            Sp = np.zeros(r_new)
            Sp[:min(r_new, S.shape[0])] = S[:r_new]
            Up = np.zeros((U.shape[0], r_new))
            Up[:, :min(r_new, U.shape[1])] = U[:, :r_new]
            Vp = np.zeros((r_new, a.dim))
            Vp[:min(r_new, self._Vt.shape[0])] = self._Vt[:r_new]
            self._refactor_to(r_new, Up, Sp, Vp)

    def _largest_capacity(self, rank, upper=None):
        a, lo, best = self.adapter, 1, None
        hi = a.capacity if upper is None else int(upper)
        while lo <= hi:
            mid = (lo + hi) // 2
            if self._bytes(mid, rank) <= self.limit_bytes:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    def _hot(self, slots):
        """Which of ``slots`` were touched within the last ``hot_steps`` adapter steps."""
        a = self.adapter
        return a._state.last_step[slots] >= a.step_count - self.hot_steps

    def _tracked(self, rows):
        """The rows of ``rows`` inside the tracked sample of the table's rows: all of them
        while the capacity is at most ``_TRACK_ROWS``, else those whose hash falls in one
        of ``m`` buckets (so about ``_TRACK_ROWS`` active rows are followed)."""
        if self._track_m == 1:
            return rows
        h = (rows.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)) >> np.uint64(32)
        return rows[(h % np.uint64(self._track_m)) == 0]

    def _reset_tracking(self):
        a = self.adapter
        self._track_m = max(1, -(-a.capacity // self._track_k))
        self._track_cap = a.capacity
        self._prev_rows = self._tracked(np.sort(a.active_rows()[0]))[:self._track_k]
        self._filter[:] = 0
        self._filter_set = 0

    def _filter_pos(self, rows):
        if self._filter_bits == self.adapter.n_rows:
            return rows
        h = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)
        return (h % np.uint64(self._filter_bits)).astype(np.int64)

    def _track_rows(self):
        """Rows admitted since the last decision, and how many of them had been folded
        before (active at an earlier decision, then gone): a re-admission restarts the
        row's A and optimizer memory. Followed on a fixed-size sample of the rows (see
        :meth:`_tracked`): the last decision's active sampled rows and a bit filter of
        folded ones (exact up to 64 rows a tracked id, else hashed and cleared when a
        quarter full), ``scratch_nbytes`` in all, reserved from the budget like the
        window. Rows admitted and folded between two decisions go unseen."""
        a = self.adapter
        if a.capacity != self._track_cap:
            if max(1, -(-a.capacity // self._track_k)) != self._track_m:  # another sample
                self._reset_tracking()
                return 0, 0
            self._track_cap = a.capacity
        rows = self._tracked(np.sort(a.active_rows()[0]))[:self._track_k]
        admitted = np.setdiff1d(rows, self._prev_rows, assume_unique=True)
        pos = self._filter_pos(admitted)
        back = int(np.count_nonzero(self._filter[pos >> 3] & (1 << (pos & 7)).astype(np.uint8)))
        gone = np.setdiff1d(self._prev_rows, rows, assume_unique=True)
        if gone.size:
            if self._filter_bits != a.n_rows and 4 * (self._filter_set + gone.size) > self._filter_bits:
                self._filter[:] = 0
                self._filter_set = 0
            pos = self._filter_pos(gone)
            np.bitwise_or.at(self._filter, pos >> 3, (1 << (pos & 7)).astype(np.uint8))
            self._filter_set += int(gone.size)
        self._prev_rows = rows
        return int(admitted.size), back

    @property
    def scratch_nbytes(self) -> int:
        """Bytes reserved for the controller's row bookkeeping (fixed at construction:
        8 bytes a tracked id and the folded-row filter), taken from the budget."""
        return int(8 * self._track_k + self._filter.nbytes)

    def _grow_capacity(self, admitted, readmitted):
        """Widen the capacity when it thrashes: rows were folded since the last decision
        and most rows admitted since were rows folded earlier (``readmit_share``), i.e.
        rows still in use are folded and re-admitted, each time with A and its optimizer
        memory restarted. (TalkingData, fixed rank 16: holding all 161 rows of the
        ``channel`` table instead of 64 gave 0.83x the test log loss over 4 seeds.) A
        stream of new rows (a long tail) folds rows that do not come back: no growth.
        Doubles the capacity at most (or takes the whole table when doubling would hold
        three quarters of it), within the budget at the current rank."""
        a = self.adapter
        evicted, self._evicted_seen = a.evicted_rows - self._evicted_seen, a.evicted_rows
        if (not self.grow_capacity or evicted == 0 or a.capacity >= a.n_rows or admitted == 0
                or readmitted < self.readmit_share * admitted):
            return None
        # doubling, or the whole table when doubling would hold most of it (no row is
        # then ever folded again; TalkingData's 130-161-row tables stopped at 128 otherwise)
        want = a.n_rows if 2 * a.capacity >= 0.75 * a.n_rows else 2 * a.capacity
        fit = self._largest_capacity(a.rank, upper=want)
        if fit is None or fit <= a.capacity:
            return None
        old = a.capacity
        a.resize(fit)
        return dict(action="grow_capacity", old_rank=a.rank, new_rank=a.rank, old_capacity=old, new_capacity=fit,
                    evicted_since_last=int(evicted), admitted=admitted, readmitted=readmitted, energy_kept=1.0)

    def _evict_to(self, cap):
        a = self.adapter
        n_evict = max(0, a.n_active - cap)
        if n_evict:
            a.evict(n_evict, self.table)
        a.resize(cap)
        return n_evict

    def _enforce_budget(self, U, S):
        a = self.adapter
        limit = self.limit_bytes
        if self._bytes(a.capacity, a.rank) <= limit:
            return None
        total = float(np.sum(S ** 2)) if S is not None else 0.0
        old_rank, old_cap = a.rank, a.capacity
        # option 1: lower the rank at the current capacity (loses the dropped energy)
        r_opt = next((r for r in range(a.rank - 1, self.min_rank - 1, -1)
                      if self._bytes(a.capacity, r) <= limit), None)
        rank_loss = np.inf if r_opt is None else (float(np.sum(S[r_opt:] ** 2)) if S is not None else 0.0)
        # option 2: fold the coldest rows into the table and shrink the capacity (moves
        # their share of the correction out of the adapter)
        c_opt = self._largest_capacity(a.rank)
        evict_loss = np.inf
        if c_opt is not None:
            n_evict = max(0, a.n_active - c_opt)
            evict_loss = 0.0
            if n_evict and S is not None:
                slots = np.asarray(a.eviction.choose(a, n_evict), np.int64)
                # folding keeps every served value; what it can cost is the learning of
                # rows still in use (re-admitted with A and optimizer memory restarted),
                # so only the correction of hot rows counts as lost. Cold rows fold free.
                slots = slots[self._hot(slots)]
                Ae = a.A[slots].astype(np.float64) @ a.B.astype(np.float64)
                evict_loss = float(a.scale ** 2 * np.einsum("ij,ij->", Ae, Ae))
        if r_opt is None and c_opt is None:
            # neither alone fits: the lowest rank, then the capacity that fits at it
            c_min = self._largest_capacity(self.min_rank)
            if c_min is None:
                raise ValueError(f"the budget {self.budget} of the table's {self.table.nbytes} bytes ({limit} bytes) "
                                 f"cannot hold a rank-{self.min_rank}, capacity-1 adapter "
                                 f"({self._bytes(1, self.min_rank)} bytes) besides the gradient window's "
                                 f"{self.window.nbytes} bytes and the controller's {self.scratch_nbytes} bytes of "
                                 f"row bookkeeping; raise `budget` or use a smaller window.")
            lost = float(np.sum(S[self.min_rank:] ** 2)) if S is not None else 0.0
            self._lower_rank(self.min_rank, U, S)
            n = self._evict_to(c_min)
            return dict(action="budget_rank_and_evict", old_rank=old_rank, new_rank=a.rank, evicted_rows=int(n),
                        energy_kept=1.0 - lost / total if total > 0 else 1.0, old_capacity=old_cap,
                        new_capacity=c_min)
        # ties (typically nothing learned yet) keep the rows with ties="rows" (an adapter
        # with rows can learn and grow its rank later) or the rank with ties="rank"
        if rank_loss < evict_loss or (rank_loss == evict_loss and self.ties == "rows"):
            self._lower_rank(r_opt, U, S)
            return dict(action="budget_rank", old_rank=old_rank, new_rank=r_opt,
                        energy_kept=1.0 - rank_loss / total if total > 0 else 1.0,
                        old_capacity=old_cap, new_capacity=a.capacity)
        n = self._evict_to(c_opt)
        return dict(action="budget_evict", old_rank=old_rank, new_rank=a.rank, evicted_rows=int(n),
                    folded_energy_share=evict_loss / total if total > 0 else 0.0, energy_kept=1.0,
                    old_capacity=old_cap, new_capacity=c_opt)

    # -- the periodic call --------------------------------------------------------------------

    def step(self):
        """Run the controller if this is its turn (the first call and every ``every``-th).

        Returns the decision (a dict, also appended to :attr:`log`) when something
        changed, else None.
        """
        self._calls += 1
        if (self._calls - 1) % self.every:
            return None
        return self.decide()

    def decide(self):
        """Shrink, grow and enforce the budget now; returns the decision dict or None."""
        a = self.adapter
        bytes_before, rank_before = a.nbytes, a.rank
        actions = []
        U = S = None
        self._Vt = None
        if a.n_active:
            U, S, Vt = self.spectrum()
            self._Vt = Vt
            # right after a grow the new directions had one period to learn: keep them;
            # before `shrink_after` steps the spectrum is still forming (on TalkingData a
            # shrink at step 20 cut rank 16 to 1-2, and the directions never came back)
            if (self._grew_at < 0 or self._calls - self._grew_at > self.every) and a.step_count >= self.shrink_after:
                d = self._shrink(U, S, Vt)
                if d:
                    actions.append(d)
        if not actions:
            d = self._grow()
            if d:
                actions.append(d)
        d = self._grow_capacity(*self._track_rows())
        if d:
            actions.append(d)
        if actions and a.n_active:
            U, S, self._Vt = self.spectrum()
        d = self._enforce_budget(U, S)
        if d:
            actions.append(d)
        self._evicted_seen = a.evicted_rows  # the controller's own folds are not thrashing
        if not actions:
            return None
        kept = float(np.prod([x.get("energy_kept", 1.0) for x in actions]))
        decision = dict(step=int(a.step_count), call=self._calls, old_rank=rank_before, new_rank=a.rank,
                        energy_kept=kept, bytes_before=int(bytes_before), bytes_after=int(a.nbytes),
                        bytes_bound=self._bytes(a.capacity, a.rank), limit_bytes=self.limit_bytes,
                        actions=actions)
        self.log.append(decision)
        return decision
