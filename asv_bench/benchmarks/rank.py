"""Randomized SVD and the rank controller (issue 4).

lukern's ``randomized_svd`` (forced randomized, and auto = the method it picks by
shape) beside scikit-learn's at equal k, oversampling and power iterations, on a dense
tall-skinny matrix and on gathered rows of a table; and one controller decision.
"""

import numpy as np
from threadpoolctl import threadpool_limits

import lukern

from ._common import SKIP_SLOW, table


def _sklearn():
    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError:
        return None
    return randomized_svd


def _decaying(n, d, seed=0):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, d), dtype=np.float32)
    M *= (0.95 ** np.arange(d)).astype(np.float32)
    return M


class RandomizedSVDDense:
    """200000 x 128 float32 with a decaying spectrum; threads pinned on both sides."""

    params = (["lukern_randomized", "lukern_auto", "sklearn"], [4, 32], [1, 2])
    param_names = ["impl", "k", "threads"]
    timeout = 120

    def setup(self, impl, k, threads):
        if impl == "sklearn" and _sklearn() is None:
            raise NotImplementedError("scikit-learn is not installed")
        self.M = _decaying(200_000, 128)
        self.k, self.threads = k, threads
        self.time_svd(impl, k, threads)  # compile outside the timing

    def time_svd(self, impl, k, threads):
        with threadpool_limits(threads):
            if impl == "sklearn":
                _sklearn()(self.M, k, n_oversamples=10, n_iter=4, random_state=0)
            else:
                lukern.randomized_svd(self.M, k, oversample=10, n_iter=4, n_threads=threads,
                                      method="randomized" if impl == "lukern_randomized" else "auto")


class RandomizedSVDGathered:
    """524288 row ids of a 4M x 64 float32 table (1 GiB; skipped under ASV_SKIP_SLOW).
    scikit-learn is timed on ``table[ids]`` including the gather it needs."""

    params = (["lukern_randomized", "lukern_auto", "sklearn"], [4, 32])
    param_names = ["impl", "k"]
    timeout = 300

    def setup(self, impl, k):
        if SKIP_SLOW:
            raise NotImplementedError("ASV_SKIP_SLOW is set")
        if impl == "sklearn" and _sklearn() is None:
            raise NotImplementedError("scikit-learn is not installed")
        self.table = table(4_000_000, 64)
        self.ids = np.random.default_rng(1).choice(4_000_000, 1 << 19, replace=False)
        self.op = lukern.GatheredRows(self.table, self.ids)
        self.time_svd(impl, k)

    def time_svd(self, impl, k):
        if impl == "sklearn":
            _sklearn()(self.table[self.ids], k, n_oversamples=10, n_iter=4, random_state=0)
        else:
            lukern.randomized_svd(self.op, k, oversample=10, n_iter=4,
                                  method="randomized" if impl == "lukern_randomized" else "auto")


class ControllerDecision:
    """One shrink decision (QR of A, SVD of R B, re-factor) of a rank-16 adapter."""

    params = [[1000, 20000]]
    param_names = ["active_rows"]
    number = 1  # setup builds a fresh rank-16 adapter for every sample

    def setup(self, active):
        rng = np.random.default_rng(0)
        n, d = 200_000, 64
        self.table = np.zeros((n, d), np.float32)
        self.active = active
        self.rng = rng
        self._build()
        self.ctl.decide()  # compile outside the timing
        self._build()

    def _build(self):
        a = lukern.LoRAAdapter(200_000, 64, rank=16, capacity=self.active)
        ids = self.rng.choice(200_000, self.active, replace=False)
        a.backward(ids, np.arange(self.active + 1), np.zeros((self.active, 64), np.float32))
        a.step()
        _, slots = a.active_rows()
        a.A[slots] = (self.rng.standard_normal((self.active, 3)) @ self.rng.standard_normal((3, 16))).astype(np.float32)
        self.ctl = lukern.RankController(a, self.table, budget=1.0, every=1)

    def time_decide(self, active):
        self.ctl.decide()
