"""Embedding-bag lookups: lukern beside PyTorch and numpy on the same inputs."""

import numpy as np

import lukern
from lukern import plan

from ._common import SKIP_SLOW, lookup_batches, table, torch_or_none


class _Ring:
    def _next(self):
        self._k = (self._k + 1) % len(self.batches)
        return self.batches[self._k]


class EmbeddingBag(_Ring):
    """lukern.embedding_bag over dtype, width, pooling, batch, id distribution, threads."""

    params = (["float32", "float64"], [16, 64, 128], [(1, 1), (20, 40)], [512, 2048], ["uniform", "zipf"], [1, 2])
    param_names = ["dtype", "dim", "pooling", "batch", "ids", "threads"]
    timeout = 120

    def setup(self, dtype, dim, pooling, batch, ids, threads):
        self.table = table(200_000, dim, dtype)
        self.batches = lookup_batches(200_000, batch, pooling, ids)
        self.out = np.empty((batch, dim), dtype)
        self._k = 0
        self.time_embedding_bag(dtype, dim, pooling, batch, ids, threads)  # compile outside the timing

    def time_embedding_bag(self, dtype, dim, pooling, batch, ids, threads):
        i, o = self._next()
        lukern.embedding_bag(self.table, i, o, out=self.out, n_threads=threads)


class PeersLargeTable(_Ring):
    """The issue's cells: 4M x 64 float32 (1 GiB), batch 2048, pooling 20-40; lukern,
    torch (when installed) and numpy on the same batches."""

    params = (["lukern", "torch", "numpy"], ["uniform", "zipf"], [1, 2])
    param_names = ["library", "ids", "threads"]
    timeout = 300

    def setup(self, library, ids, threads):
        if SKIP_SLOW:
            raise NotImplementedError("ASV_SKIP_SLOW is set")  # asv's way to skip a case
        self.table = table(4_000_000, 64)
        self.batches = lookup_batches(4_000_000, 2048, (20, 40), ids, n_batches=16)
        self._k = 0
        self.out = np.empty((2048, 64), np.float32)
        if library == "torch":
            torch = torch_or_none()
            if torch is None:
                raise NotImplementedError("torch is not installed")
            torch.set_num_threads(threads)
            self.tt = torch.from_numpy(self.table)
            self.batches = [(torch.from_numpy(i), torch.from_numpy(o)) for i, o in self.batches]
            self.fn = lambda i, o: torch.nn.functional.embedding_bag(i, self.tt, o, mode="sum",
                                                                     include_last_offset=True)
        elif library == "numpy":
            self.fn = lambda i, o: np.add.reduceat(self.table[i], o[:-1], axis=0)
        else:
            self.fn = lambda i, o: lukern.embedding_bag(self.table, i, o, out=self.out, n_threads=threads)
        self.fn(*self._next())

    def time_lookup(self, library, ids, threads):
        self.fn(*self._next())


class TableBatched(_Ring):
    """26 tables of 100k x 16 in one call vs one call over one table with the same rows."""

    params = (["batched", "single"], [1, 2])
    param_names = ["form", "threads"]

    def setup(self, form, threads):
        rng = np.random.default_rng(0)
        tables = [rng.standard_normal((100_000, 16)).astype(np.float32) for _ in range(26)]
        self.batch = lukern.TableBatch(tables)
        big = self.batch.groups[0][1]
        self.batches = []
        for _ in range(8):
            idx = rng.integers(0, 100_000, size=26 * 2048)
            off = np.arange(26 * 2048 + 1, dtype=np.int64)
            flat = idx + np.repeat(np.arange(26) * 100_000, 2048)
            self.batches.append((idx, off, flat))
        self._k = 0
        if form == "batched":
            out = np.empty((2048, 416), np.float32)
            self.fn = lambda i, o, f: self.batch.lookup(i, o, out=out, n_threads=threads)
        else:
            out = np.empty((26 * 2048, 16), np.float32)
            self.fn = lambda i, o, f: lukern.embedding_bag(big, f, o, out=out, n_threads=threads)
        self.fn(*self._next())

    def time_lookup(self, form, threads):
        self.fn(*self._next())


class TunedPlan(_Ring):
    """The one class that measures the plan lukern resolves by itself (tuned profile when
    present, heuristic otherwise) against a pinned single thread."""

    params = ["resolved", "pinned-1"]
    param_names = ["plan"]

    def setup(self, which):
        self.table = table(200_000, 64)
        self.batches = lookup_batches(200_000, 2048, (20, 40), "zipf")
        self._k = 0
        self.kw = {} if which == "resolved" else {"n_threads": 1}
        self.out = np.empty((2048, 64), np.float32)
        lukern.embedding_bag(self.table, *self._next(), out=self.out, **self.kw)

    def time_lookup(self, which):
        lukern.embedding_bag(self.table, *self._next(), out=self.out, **self.kw)

    def track_threads(self, which):
        i, o = self.batches[0]
        return plan.resolve_plan("embedding_bag", len(i), n_items=len(o) - 1, **self.kw).n_threads


class Compile:
    """Cold compile of one specialised kernel set, and the import of lukern."""

    timeout = 120
    number = 1
    repeat = 3

    def time_compile_d64(self):
        from lukern._kernels import embedding as K

        K._bag_kernels.cache_clear()
        K._KERNEL_SETS.clear()
        lukern.warmup(dims=(64,), dtypes=("float32",), index_dtypes=("int64",), modes=("sum",),
                      drivers=("serial",), batched=False)

    def timeraw_import_lukern(self):
        return "import lukern"
