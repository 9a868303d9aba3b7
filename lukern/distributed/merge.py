"""Merging compact factors from several replicas: correct for the products, not the factors.

Averaging A and B separately is not averaging A·B. Each contribution i is the correction
``s_i A_i B_i`` on its rows R_i. The merge concatenates the ranks on the union of rows
(a row absent from a contribution has zero A there), divides each row by the number of
replicas that touched it (a row one replica learned keeps its full correction; a row
several learned gets their mean), and re-compresses to the target rank with QR of the
concatenated A and the SVD of ``R B_cat`` (DESIGN section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lora import Factors

__all__ = ["MergeResult", "merge_factors"]


@dataclass(frozen=True)
class MergeResult:
    factors: Factors
    dropped_energy: float  # share of the merged correction's energy the re-compression dropped
    rank_before: int       # sum of the contributions' ranks


def merge_factors(contributions, rank: int, *, weights=None, average_rows: bool = True, scale: float | None = None,
                  version: int = 0) -> MergeResult:
    """Merge :class:`~lukern.Factors` of one table from several replicas.

    Parameters
    ----------
    contributions : sequence of Factors
        Same width d; any ranks and row sets.
    rank : int
        Rank of the merged factors (exact when >= the sum of the ranks).
    weights : sequence of float, optional
        Multiplies each contribution's correction (e.g. -1 to subtract a common base).
    average_rows : bool
        Divide each row by the number of contributions that hold it (the mean of the
        replicas' corrections); False sums them (merging deltas from a common base).
    scale : float, optional
        Scale of the result (default: the first contribution's).

    Returns
    -------
    MergeResult
        ``factors`` (rows sorted), the dropped energy share and the concatenated rank.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> a = lukern.Factors(np.array([1]), np.ones((1, 1)), np.ones((1, 2)), 1.0, 0)
    >>> b = lukern.Factors(np.array([2]), np.ones((1, 1)), 2 * np.ones((1, 2)), 1.0, 0)
    >>> m = merge_factors([a, b], rank=2).factors
    >>> np.round(m.delta(), 6).tolist()
    [[1.0, 1.0], [2.0, 2.0]]
    """
    contributions = [c for c in contributions if c is not None]
    if not contributions:
        raise ValueError("`contributions` must hold at least one Factors.")
    d = contributions[0].B.shape[1]
    for c in contributions:
        if not isinstance(c, Factors):
            raise TypeError(f"`contributions` must hold lukern.Factors; got {type(c).__name__}.")
        if c.B.shape[1] != d:
            raise ValueError(f"every contribution must have width {d}; got {c.B.shape[1]}.")
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1; got {rank}.")
    dtype = contributions[0].A.dtype
    out_scale = float(contributions[0].scale if scale is None else scale)
    rows = np.unique(np.concatenate([np.asarray(c.row_ids, np.int64) for c in contributions]))
    k, r_cat = rows.size, sum(c.A.shape[1] for c in contributions)
    if k == 0:
        return MergeResult(Factors(rows, np.zeros((0, rank), dtype), np.zeros((rank, d), dtype), out_scale, version),
                           0.0, r_cat)
    weights = np.ones(len(contributions)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(contributions),):
        raise ValueError(f"`weights` must hold one number per contribution ({len(contributions)}); got {weights.shape}.")
    touched = np.zeros(k)
    pos = [np.searchsorted(rows, np.asarray(c.row_ids, np.int64)) for c in contributions]
    for p in pos:
        touched[p] += 1
    if not average_rows:
        touched[:] = 1
    A_cat = np.zeros((k, r_cat))
    col = 0
    for c, p, w in zip(contributions, pos, weights):
        r = c.A.shape[1]
        A_cat[p, col:col + r] = w * c.scale * c.A.astype(np.float64) / touched[p, None]
        col += r
    B_cat = np.concatenate([c.B.astype(np.float64) for c in contributions], axis=0)
    Q, R = np.linalg.qr(A_cat)  # (k x r'), (r' x r')
    U, S, Vt = np.linalg.svd(R @ B_cat, full_matrices=False)
    keep = min(rank, S.size)
    energy = float((S ** 2).sum())
    dropped = float((S[keep:] ** 2).sum() / energy) if energy > 0 else 0.0
    root = np.sqrt(S[:keep])
    A = np.zeros((k, rank))
    B = np.zeros((rank, d))
    A[:, :keep] = (Q @ U[:, :keep]) * root / out_scale
    B[:keep] = root[:, None] * Vt[:keep]
    return MergeResult(Factors(rows, A.astype(dtype), B.astype(dtype), out_scale, version), dropped, r_cat)
