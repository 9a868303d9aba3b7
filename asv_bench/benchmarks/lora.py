"""LoRA adapter: the fused lookup beside the plain one, and one training step
(forward, backward, row-wise Adagrad) of lukern, on the same inputs.

The issue's bars compare these pairs (``python -m lukern.bench lora`` prints the
ratios from one run): fused <= 1.25x plain; the training step against PyTorch autograd
and numpy lives in that script only (their setup is the bench's).
"""

import numpy as np

import lukern

from ._common import SKIP_SLOW, lookup_batches, table


def _adapter(n_rows, dim, rank, active_share, seed=0):
    """An adapter with ``active_share`` of the rows active at random, A random."""
    rng = np.random.default_rng(seed)
    n_active = int(n_rows * active_share)
    a = lukern.LoRAAdapter(n_rows, dim, rank=rank, capacity=n_active)
    ids = rng.choice(n_rows, n_active, replace=False)
    for s in range(0, n_active, 1 << 16):
        part = ids[s:s + (1 << 16)]
        a.backward(part, np.array([0, part.size]), np.zeros((1, dim), np.float32))
        a.step()
    rows, acc_a, acc_b = a.optimizer_state()
    a.refactor(rng.standard_normal((rows.size, rank)).astype(np.float32) * 0.01, a.B, acc_a=acc_a, acc_b=acc_b)
    return a


class _Ring:
    def _next(self):
        self._k = (self._k + 1) % len(self.batches)
        return self.batches[self._k]


class FusedLookup(_Ring):
    """embedding_bag with and without an adapter (r = 8, 5% of rows active)."""

    params = (["plain", "fused"], [(200_000, 64), (4_000_000, 64)], ["uniform", "zipf"], [1, 2])
    param_names = ["lookup", "table", "ids", "threads"]
    timeout = 300

    def setup(self, lookup, shape, ids, threads):
        n_rows, dim = shape
        if n_rows > 1_000_000 and SKIP_SLOW:
            raise NotImplementedError("ASV_SKIP_SLOW is set")
        self.table = table(n_rows, dim)
        self.batches = lookup_batches(n_rows, 2048, (20, 40), ids, n_batches=16)
        self.adapter = _adapter(n_rows, dim, 8, 0.05) if lookup == "fused" else None
        self.out = np.empty((2048, dim), np.float32)
        self._k = 0
        self.time_lookup(lookup, shape, ids, threads)  # compile outside the timing

    def time_lookup(self, lookup, shape, ids, threads):
        i, o = self._next()
        lukern.embedding_bag(self.table, i, o, out=self.out, n_threads=threads, adapter=self.adapter)


class TrainStep(_Ring):
    """forward + backward + row-wise Adagrad for one batch (2048 bags, 20-40 Zipf ids),
    the trainer's serial path (n_threads=1) and the split one (2)."""

    params = ([200_000, 4_000_000], [1, 2])
    param_names = ["rows", "threads"]
    timeout = 300

    def setup(self, rows, threads):
        if rows > 1_000_000 and SKIP_SLOW:
            raise NotImplementedError("ASV_SKIP_SLOW is set")
        self.table = table(rows, 64).copy()  # eviction folds into it
        self.batches = lookup_batches(rows, 2048, (20, 40), "zipf", n_batches=8)
        rng = np.random.default_rng(1)
        self.grads = [rng.standard_normal((2048, 64)).astype(np.float32) * 0.01 for _ in self.batches]
        self.adapter = lukern.LoRAAdapter(rows, 64, rank=8, capacity=rows // 20, lr_a=0.05, lr_b=0.01)
        self.out = np.empty((2048, 64), np.float32)
        self._k = 0
        for _ in self.batches:
            self.time_train_step(rows, threads)

    def time_train_step(self, rows, threads):
        i, o = self._next()
        _, ctx = self.adapter.forward(self.table, i, o, out=self.out)
        self.adapter.train_step(self.table, i, o, self.grads[self._k], n_threads=threads, context=ctx)


class BatchedTrainStep(_Ring):
    """The co-located trainer's step (lukern.lora_batch.BatchedTrainer): 26 tables of 20k
    x 16, r = 8, 1024 one-id Zipf bags per table, no eviction (the sidecar's case), with
    the backward by touched row or by bag."""

    params = (["row", "bag"],)
    param_names = ["backward"]
    timeout = 120

    def setup(self, backward):
        from lukern.lora_batch import BatchedTrainer
        from lukern.testing import zipf_ids

        n_tables, rows, dim, n = 26, 20_000, 16, 1024
        rng = np.random.default_rng(0)
        self.off = np.arange(n + 1, dtype=np.int64)
        self.batches = [(np.stack([zipf_ids(rng, n, rows) for _ in range(n_tables)]).astype(np.int64),
                         (0.01 * rng.standard_normal((n_tables, n, dim))).astype(np.float32)) for _ in range(8)]
        adapters = [lukern.LoRAAdapter(rows, dim, rank=8, capacity=rows // 8, lr_a=0.02, lr_b=0.002)
                    for _ in range(n_tables)]
        self.trainer = BatchedTrainer(adapters, [None] * n_tables, backward=backward)
        self._k = 0
        for _ in range(2 * len(self.batches)):  # compile, and fill the slots as a running trainer has
            self.time_train_step(backward)

    def time_train_step(self, backward):
        ids, g = self._next()
        self.trainer.train_step(ids, self.off, g)
