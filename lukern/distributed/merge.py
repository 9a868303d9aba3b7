"""Merging the compact factors of several replicas: correct for the products, not the factors.

Each contribution ``i`` is the correction ``s_i A_i B_i`` on its rows ``R_i``. Averaging
the A's and the B's separately is not averaging the products (``mean(A) mean(B)`` mixes
one replica's rows with another's basis), so the merge works on the products:

1. **Concatenate the ranks** on the union of the rows. A row absent from a contribution
   has a zero A there, so ``A_cat B_cat = sum_i W_i s_i A_i B_i`` exactly, where ``W_i``
   is a per-row weight (step 2).
2. **Weight the rows.** ``mode="mean"`` (default) gives every row the mean of the
   corrections of the contributions that *touched* it: a row one replica learned keeps
   its full correction, a row several learned gets their mean. "Touched" defaults to
   "holds the row"; a replica that knows which rows its trainer changed since the last
   exchange passes them (``touched=``), so a row it merely carries from an earlier merge
   does not dilute a peer's fresh learning; rows no contribution touched get the mean
   over the contributions that hold them. ``mode="sum"`` adds the corrections (merging
   deltas taken from a common base).
3. **Re-compress** to the target rank with the exact SVD the rank controller uses
   (:class:`lukern.LowRankRows`: QR of ``A_cat``, SVD of ``R B_cat``, float64), keeping
   the top singular directions. The share of the merged correction's energy (squared
   Frobenius norm) that the truncation dropped is returned: by Eckart-Young it is the
   relative squared error of the merged correction, zero when the target rank is at
   least the sum of the ranks.

The returned ``B`` has orthogonal rows of norm ``b_row_norm`` and ``A = U S / (s c)``
(the split the rank controller found to train better than the balanced ``S^(1/2)``
one). If the merged correction has fewer directions than the target rank, the extra
rows of B are orthonormal directions outside the kept ones (preferring the span of
``pad_with``, e.g. the replica's own B) with zero A columns: the served values are
unchanged and an adapter adopting the factors can still learn along every direction
(a zero row of B would never receive a gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lora import Factors

__all__ = ["MergeResult", "merge_factors"]


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_factors` returns.

    Attributes
    ----------
    factors : Factors
        The merged correction at the target rank, rows sorted ascending.
    dropped_energy : float
        Share of the merged correction's energy the re-compression dropped (0..1).
    rank_before : int
        Sum of the contributions' ranks (the concatenated rank).
    energy : float
        Squared Frobenius norm of the merged correction before truncation.
    """

    factors: Factors
    dropped_energy: float
    rank_before: int
    energy: float


def _check_contribution(i, c, d):
    rows, A, B = c.row_ids, c.A, c.B
    if not (isinstance(rows, np.ndarray) and isinstance(A, np.ndarray) and isinstance(B, np.ndarray)):
        raise TypeError(f"`contributions[{i}]` must hold numpy arrays (row_ids, A, B).")
    if not np.issubdtype(rows.dtype, np.integer):
        raise TypeError(f"`contributions[{i}].row_ids` must be integers; got {rows.dtype}.")
    if not (np.issubdtype(A.dtype, np.floating) and np.issubdtype(B.dtype, np.floating)):
        raise TypeError(f"`contributions[{i}]` A and B must be floating point; got {A.dtype} and {B.dtype}.")
    if rows.ndim != 1 or A.ndim != 2 or B.ndim != 2 or A.shape != (rows.size, B.shape[0]):
        raise ValueError(f"`contributions[{i}]` shapes are inconsistent: row_ids {rows.shape}, A {A.shape}, "
                         f"B {B.shape} (expected A = (len(row_ids), r), B = (r, d)).")
    if B.shape[1] != d:
        raise ValueError(f"every contribution must have width d = {d} (the first one's); "
                         f"`contributions[{i}].B` has {B.shape[1]} columns.")
    if rows.size and rows.min() < 0:
        raise IndexError(f"`contributions[{i}].row_ids` must be >= 0; got {rows.min()}.")
    if np.unique(rows).size != rows.size:
        raise ValueError(f"`contributions[{i}].row_ids` must be unique.")
    if not (np.isfinite(A).all() and np.isfinite(B).all() and np.isfinite(c.scale)):
        raise ValueError(f"`contributions[{i}]` holds NaN or Inf.")


def _orthonormal_completion(V, n, prefer, d):
    """``n`` unit rows orthogonal to the orthonormal rows of ``V`` and to each other,
    taken from ``prefer``'s rows first, then from the coordinate axes (Gram-Schmidt with
    one re-orthogonalisation: plain and exact enough for d of a few hundred)."""
    basis = [v for v in V]
    out = []
    candidates = list(prefer) + list(np.eye(d))
    for c in candidates:
        if len(out) == n:
            break
        v = np.array(c, dtype=np.float64)
        norm0 = np.linalg.norm(v)
        if norm0 == 0:
            continue
        for _ in range(2):
            for b in basis:
                v -= (b @ v) * b
        norm = np.linalg.norm(v)
        if norm > 1e-6 * norm0:
            v /= norm
            basis.append(v)
            out.append(v)
    return np.array(out, dtype=np.float64).reshape(len(out), d)


def merge_factors(contributions, rank: int, *, touched=None, mode: str = "mean", weights=None,
                  scale: float | None = None, b_row_norm: float = 1.0, pad_with=None, dtype=None,
                  version: int = 0) -> MergeResult:
    """Merge the :class:`~lukern.Factors` of one table from several replicas.

    Parameters
    ----------
    contributions : sequence of Factors or None
        Same width ``d``, any ranks, scales and row sets (row ids unique within one
        contribution). ``None`` entries are skipped (a table without an adapter).
    rank : int
        Rank of the merged factors, ``1 <= rank <= d``. Exact when it is at least the
        rank of the merged correction (e.g. the sum of the contributions' ranks).
    touched : sequence of (bool array or None), optional
        Per contribution, aligned with its ``row_ids``: the rows it changed since the
        last merge (``None``: all of its rows). Only used by ``mode="mean"``.
    mode : {"mean", "sum"}
        ``mean``: each row gets the mean correction of the contributions that touched it
        (or, if none did, of those that hold it). ``sum``: the corrections add up.
    weights : sequence of float, optional
        Multiplies each contribution's correction (e.g. ``-1`` to subtract a base).
    scale : float, optional
        The ``s`` of the result (default: the first contribution's); must be non-zero.
    b_row_norm : float
        Norm of the rows of the merged ``B`` (pass the RMS row norm of an adapter's B to
        keep its optimizer step sizes meaningful).
    pad_with : (m, d) array, optional
        Directions preferred for the rows of B beyond the merged correction's rank.
    dtype : numpy dtype, optional
        Of the result's A and B (default: the first contribution's A).
    version : int
        Stored in the result.

    Returns
    -------
    MergeResult
        ``factors``, ``dropped_energy``, ``rank_before``, ``energy``.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> from lukern.distributed import merge_factors
    >>> a = lukern.Factors(np.array([1, 2]), np.ones((2, 1)), np.ones((1, 2)), 1.0, 0)
    >>> b = lukern.Factors(np.array([2, 3]), np.ones((2, 1)), 3 * np.ones((1, 2)), 1.0, 0)
    >>> m = merge_factors([a, b], rank=2)   # row 2 is the mean of 1 and 3
    >>> m.factors.row_ids.tolist(), np.round(m.factors.delta(), 6).tolist()
    ([1, 2, 3], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    >>> np.round(merge_factors([a, b], rank=1, mode="sum").factors.delta()[1], 6).tolist()
    [4.0, 4.0]
    """
    items = [(i, c) for i, c in enumerate(contributions) if c is not None]
    if not items:
        raise ValueError("`contributions` must hold at least one Factors (got none, or only None).")
    if mode not in ("mean", "sum"):
        raise ValueError(f"`mode` must be 'mean' or 'sum'; got {mode!r}.")
    for i, c in items:
        if not isinstance(c, Factors):
            raise TypeError(f"`contributions[{i}]` must be a lukern.Factors; got {type(c).__name__}.")
    B0 = items[0][1].B
    d = B0.shape[1] if isinstance(B0, np.ndarray) and B0.ndim == 2 else -1
    for i, c in items:
        _check_contribution(i, c, d)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= d:
        raise ValueError(f"`rank` must be an integer in [1, d = {d}]; got {rank!r}.")
    rank = int(rank)
    n_in = len(contributions)
    if weights is None:
        w_c = np.ones(n_in)
    else:
        w_c = np.asarray(weights, dtype=np.float64)
        if w_c.shape != (n_in,) or not np.isfinite(w_c).all():
            raise ValueError(f"`weights` must hold one finite number per contribution ({n_in}); got shape "
                             f"{w_c.shape}.")
    masks = {}
    if touched is not None:
        if len(touched) != n_in:
            raise ValueError(f"`touched` must hold one entry per contribution ({n_in}); got {len(touched)}.")
        for i, c in items:
            t = touched[i]
            if t is None:
                continue
            t = np.asarray(t)
            if t.dtype != np.bool_ or t.shape != (c.row_ids.size,):
                raise ValueError(f"`touched[{i}]` must be a bool array with one entry per row of "
                                 f"`contributions[{i}]` ({c.row_ids.size}); got {t.dtype} {t.shape}.")
            masks[i] = t
    out_scale = float(items[0][1].scale if scale is None else scale)
    if not np.isfinite(out_scale) or out_scale == 0:
        raise ValueError(f"`scale` must be finite and non-zero; got {out_scale!r}.")
    if not (np.isfinite(b_row_norm) and b_row_norm > 0):
        raise ValueError(f"`b_row_norm` must be finite and > 0; got {b_row_norm!r}.")
    out_dtype = np.dtype(items[0][1].A.dtype if dtype is None else dtype)
    if pad_with is not None:
        pad_with = np.asarray(pad_with, dtype=np.float64)
        if pad_with.ndim != 2 or pad_with.shape[1] != d:
            raise ValueError(f"`pad_with` must be an (m, {d}) array; got shape {pad_with.shape}.")
    else:
        pad_with = np.zeros((0, d))

    rows = np.unique(np.concatenate([c.row_ids.astype(np.int64) for _, c in items]))
    k = rows.size
    r_cat = sum(c.A.shape[1] for _, c in items)
    pos = {i: np.searchsorted(rows, c.row_ids.astype(np.int64)) for i, c in items}

    # per-row weight of every contribution
    row_w = {i: np.ones(c.row_ids.size) for i, c in items}
    if mode == "mean":
        n_touch = np.zeros(k)
        n_hold = np.zeros(k)
        for i, c in items:
            n_hold[pos[i]] += 1
            n_touch[pos[i]] += masks[i] if i in masks else 1
        for i, c in items:
            p = pos[i]
            t = masks[i] if i in masks else np.ones(c.row_ids.size, bool)
            by_touch = n_touch[p] > 0
            row_w[i] = np.where(by_touch, t / np.maximum(n_touch[p], 1), 1.0 / n_hold[p])

    A_cat = np.zeros((k, r_cat))
    B_cat = np.empty((r_cat, d))
    col = 0
    for i, c in items:
        r = c.A.shape[1]
        A_cat[pos[i], col:col + r] = (w_c[i] * float(c.scale) * row_w[i])[:, None] * c.A.astype(np.float64)
        B_cat[col:col + r] = c.B
        col += r

    A = np.zeros((k, rank))
    if k and r_cat:
        # the rank controller's exact SVD of a low-rank operand (QR of A, SVD of R B)
        from ..rank import LowRankRows

        U, S, Vt = LowRankRows(A_cat, B_cat, 1.0).svd()
    else:
        U, S, Vt = np.zeros((k, 0)), np.zeros(0), np.zeros((0, d))
    energy = float(np.sum(S ** 2))
    tol = S[0] * max(k, d) * np.finfo(np.float64).eps if S.size else 0.0
    keep = int(min(rank, np.count_nonzero(S > tol)))
    dropped = float(np.sum(S[keep:] ** 2) / energy) if energy > 0 else 0.0
    c = float(b_row_norm)
    B = np.empty((rank, d))
    B[:keep] = c * Vt[:keep]
    A[:, :keep] = U[:, :keep] * (S[:keep] / (out_scale * c))
    if keep < rank:
        B[keep:] = c * _orthonormal_completion(Vt[:keep], rank - keep, pad_with, d)
    f = Factors(rows, A.astype(out_dtype), B.astype(out_dtype), out_scale, int(version))
    return MergeResult(f, dropped, r_cat, energy)
