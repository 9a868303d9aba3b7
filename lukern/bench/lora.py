"""LoRA comparison: the fused lookup against the plain one, and a training step (forward,
backward, row-wise Adagrad) against PyTorch autograd and numpy, on the same inputs in
one run. Prints medians and ratios, and the adapter's memory breakdown.

    python -m lukern.bench lora            # 4M x 64 table, 5% rows active, r = 8
    python -m lukern.bench.lora --quick    # 400k rows

Contenders alternate on a ring of distinct batches (see :mod:`lukern.bench.lookup`).
The fused cells activate 5% of the rows at random (the issue's bar); the extra "hot"
row activates the 5% of rows the Zipf stream touches most, as a trained adapter would,
so most looked-up ids carry an A row.

Measured (fused/plain wall-time ratios; training step wall medians):

- quiet machine, before the rank-8 backward kernel: uniform 1.25x / 1.15x (1 / 2
  threads), Zipf 1.45x / 1.27x, hot 2.1x; step 5.17 ms, numpy 49.9 ms (9.6x), torch
  24.3 ms (4.7x).
- 2-core Zen 5 shared with two other benchmark jobs, same code: uniform 1.29x / 1.15x,
  Zipf 1.49x / 1.41x, hot 2.30x / 2.40x; step 7.34 ms, numpy 73.2 ms (10.0x), torch
  30.7 ms (4.2x).
- same machine, with the rank-8 backward kernel (two runs): uniform 1.21-1.38x, Zipf
  1.47-1.53x, hot 1.89-1.91x on 1 thread (the 2-thread cells were unusable there: a
  pool thread waiting for a core put both lookups at ~8 ms); step 4.43-4.84 ms, numpy
  45.5-57.4 ms (10.3-11.9x), torch 18.7-32.9 ms (4.2-6.8x). The step alone, two
  adapters alternating in one process, thread CPU time: 4.55 ms median with the rank-8
  kernel against 4.98 ms with the generic one, the same bits after 400 steps.
- 2-core EPYC VM (2 MiB L2 per core), after ``assign_scatter`` stopped zeroing a new
  pending row right before adding to it (a store-forwarding stall that made that pass
  5-6x slower), three runs: step 4.48 / 2.92 / 2.70 ms, numpy 55.4 / 32.3 / 28.1 ms
  (12.4x / 11.1x / 10.4x), torch 28.1 / 11.7 / 10.8 ms (6.3x / 4.0x / 4.0x); fused
  lookup on 1 thread uniform 1.17-1.28x, Zipf 1.43-1.51x, hot 2.03-2.32x (2 threads:
  uniform 1.15-1.17x, Zipf 1.28-1.43x).
- same VM, later (two runs): fused lookup on 1 / 2 threads uniform 1.18-1.23x / 1.06-1.25x,
  Zipf 1.41-1.51x / 1.18-1.38x, hot 1.94-2.40x / 1.85-2.10x; step 3.04 / 2.86 ms, numpy
  11.7x / 10.1x, torch 4.6x / 3.6x. The table-batched lookup with adapters (one kernel call
  per width since this run) 136 / 261 us against 50 us plain, adapted rows random / hot;
  133 / 247 us against 49 us once each id's slot was probed once, 118 / 150 us against 48 / 50
  us once its P @ B vectorised (a third run: fused 1.23x /
  1.08x uniform, 1.43x / 1.34x Zipf, 2.29x / 2.21x hot).
- same VM, a slow day (a plain Zipf lookup 1.0-1.7 ms): before and after the trainer's
  forward probes every id first when most ids have an A row (``LoRAAdapter.forward``;
  every id of the step's batches has one): step 6.90 -> 4.95 ms, numpy 10.0x -> 11.4x,
  torch 4.2x -> 4.2x; fused lookup 1 / 2 threads uniform 1.15 / 1.13x and 1.14 / 1.14x,
  Zipf 1.21 / 1.18x and 1.24 / 1.15x, hot 2.13 / 1.87x and 2.06 / 1.86x (the serving
  lookup is unchanged). The co-located trainer's step 2.63 -> 2.03 ms with the rank-8
  by-row backward kernel (by bag / by row, same run: 1.84x -> 2.02x; the by-bag path
  unchanged). Two later runs (a faster hour: numpy 36-38 ms): step 3.90 ms
  (9.3x numpy, 3.0x torch), then 3.65 ms (10.3x, 3.6x) once that forward's probes skip
  the presence bitmap; fused Zipf 1.26 / 1.20x and 1.28 / 1.24x.
- same VM, next session, after the fused lookup's W-row prefetch distance went 64 -> 32
  ids: five runs, fused/plain on 1 / 2 threads uniform 1.11-1.13x / 1.10-1.19x, Zipf
  1.20-1.26x / 1.16-1.30x, hot 2.09-2.18x / 1.96-2.08x (the run before the change: uniform
  1.15 / 1.16x, Zipf 1.28 / 1.18x); step 3.25-3.64 ms, numpy 9.8-11.4x, torch 3.2-4.1x.
  Where the fused Zipf lookup's extra time goes (kernel variants, one thread): the
  presence-bit test in the W loop ~11-15 % (as a branch-free append, or in its own loop
  before the bag's W rows: no cheaper), probing and pooling A ~5 %, P @ B ~4-7 %.
- same VM, next session, after the plain kernels read positions as unsigned integers and
  prefetch rows into L2 (and the fused kernel its W rows too): two runs, fused/plain on 1 /
  2 threads uniform 1.09-1.24x / 1.19-1.39x, Zipf 1.40-1.45x / 1.39-1.47x, hot 2.34-2.52x /
  1.99-2.18x; plain Zipf lookup 0.60-0.70 ms (0.83 ms the same day before), fused
  0.86-0.97 ms (1.10 ms). The same kernels against the plain loop they share (kernel
  variants, same inputs): the presence test (bitmap lines, test, branch) ~20 %, the 5 % of
  ids that hit ~15-20 %; with every id's slot known beforehand and no test (the trainer's
  ``by_slot`` kernel) 1.17-1.24x. Step 3.67-3.71 ms, numpy 11.7-12.5x, torch 4.3x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .. import LoRAAdapter, embedding_bag
from ..memory import empty_table
from .lookup import _batches, _torch


def _median_times(contenders, batches, repeats):
    """name -> (median wall seconds, median CPU seconds of the process) over ``repeats``
    alternating runs on a ring of batches (as :func:`lukern.bench.lookup._median_times`).
    The CPU time leaves out the time the process waited for a core, which dominates the
    wall time's noise on a machine shared with other jobs; for multi-threaded runs it is
    the summed work of the threads, not the latency."""
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # one untimed call each: compile, page-in, thread start
        contenders[name](*batches[0])
    k = 0
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            idx, off = batches[k % len(batches)]
            k += 1
            c0, t0 = time.process_time(), time.perf_counter()
            contenders[name](idx, off)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (float(np.median(wall[name])), float(np.median(cpu[name]))) for name in names}


def _adapter_with_active(rows, dim, rank, active_share, rng, dtype=np.float32, ids=None):
    n_active = int(rows * active_share)
    a = LoRAAdapter(rows, dim, rank=rank, capacity=n_active, dtype=dtype, lr_a=0.05, lr_b=0.01)
    if ids is None:
        ids = rng.choice(rows, n_active, replace=False).astype(np.int64)
    for start in range(0, n_active, 1 << 16):  # admit in chunks, then give A random rows
        part = ids[start:start + (1 << 16)]
        a.backward(part, np.array([0, part.size]), np.zeros((1, dim), dtype))
        a.step()
    rows, acc_a, acc_b = a.optimizer_state()
    a.refactor(rng.standard_normal((rows.size, rank)).astype(dtype) * 0.01, a.B, acc_a=acc_a, acc_b=acc_b)
    return a


def _hot_rows(rows, share):
    """The rows :func:`lukern.testing.zipf_ids` draws most often: its ranks 0..k-1 through
    its fixed permutation (kept in step with it by ``tests/test_lora.py``)."""
    k = int(rows * share)
    a = 2654435761 % rows or 1
    while np.gcd(a, rows) != 1:
        a += 1
    return (np.arange(k, dtype=np.int64) * a + 12345) % rows


def run_fused(rows, dim, rank, active_share, threads, repeats, seed=0, driver=None):
    rng = np.random.default_rng(seed)
    table = empty_table(rows, dim)
    table[:] = rng.standard_normal((rows, dim), dtype=np.float32)
    adapters = {"random": _adapter_with_active(rows, dim, rank, active_share, rng)}
    adapters["hot"] = _adapter_with_active(rows, dim, rank, active_share, rng, ids=_hot_rows(rows, active_share))
    out = np.empty((2048, dim), np.float32)
    res = []
    for dist, which in (("uniform", "random"), ("zipf", "random"), ("zipf", "hot")):
        a = adapters[which]
        batches = _batches(rng, rows, 2048, (20, 40), dist, 16)
        active = a.active_rows()[0]
        hits = float(np.mean([np.isin(i, active).mean() for i, _ in batches[:2]]))
        for nt in threads:
            med = _median_times({
                "plain": lambda i, o, nt=nt: embedding_bag(table, i, o, out=out, n_threads=nt, driver=driver),
                "fused": lambda i, o, nt=nt: embedding_bag(table, i, o, out=out, n_threads=nt, driver=driver,
                                                           adapter=a),
            }, batches, repeats)
            res.append({"dist": dist, "active": which, "threads": nt, "plain_ms": med["plain"][0] * 1e3,
                        "fused_ms": med["fused"][0] * 1e3, "fused_over_plain": med["fused"][0] / med["plain"][0],
                        "cpu_fused_over_plain": med["fused"][1] / med["plain"][1], "ids_with_a_row": hits})
    return res


def run_memory(rows, dim, rank, active_share=0.01):
    """An adapter with ``active_share`` of the rows active, trained one step (so the
    pending buffers exist): its breakdown, nbytes, and the worst case ``nbytes_at``."""
    n_active = int(rows * active_share)
    a = LoRAAdapter(rows, dim, rank=rank, capacity=n_active)
    ids = np.random.default_rng(1).choice(rows, n_active, replace=False).astype(np.int64)
    for start in range(0, n_active, 1 << 16):
        part = ids[start:start + (1 << 16)]
        a.train_step(None, part, np.array([0, part.size]), np.full((1, dim), 1e-3, np.float32))
    return a, rows * dim * 4


def _numpy_step(W, A, B, acc_a, acc_b, slot_of, idx, off, G, s, lr_a, lr_b, eps=1e-8):
    """The same LoRA step in plain numpy (dense A over all rows, gather/scatter by index)."""
    seg = np.repeat(np.arange(len(off) - 1), np.diff(off))
    sl = slot_of[idx]
    P = np.zeros((len(off) - 1, A.shape[1]), np.float32)
    np.add.at(P, seg, A[sl])
    y = np.add.reduceat(W[idx], off[:-1], axis=0) + s * P @ B  # forward (bags non-empty)
    U = s * G @ B.T
    dA = np.zeros_like(A)
    np.add.at(dA, sl, U[seg])
    dB = s * P.T @ G
    touched = np.unique(sl)
    acc_a[touched] += (dA[touched] ** 2).mean(axis=1)
    A[touched] -= lr_a * dA[touched] / (np.sqrt(acc_a[touched])[:, None] + eps)
    acc_b += dB * dB
    B -= lr_b * dB / (np.sqrt(acc_b) + eps)
    return y


def run_train_step(rows, dim, rank, repeats, seed=0):
    """Forward + backward + row-wise Adagrad for one batch (2048 bags, 20-40 ids)."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    table = empty_table(rows, dim)
    table[:] = rng.standard_normal((rows, dim), dtype=np.float32)
    batches = _batches(rng, rows, 2048, (20, 40), "zipf", 8)
    # room for every row the batches touch: the same computation as the dense-A peers
    # (no eviction), with a realistic hash size (5% of the rows, or what the ring needs)
    distinct = np.unique(np.concatenate([i for i, _ in batches])).size
    a = LoRAAdapter(rows, dim, rank=rank, capacity=max(rows // 20, int(distinct * 1.25)), lr_a=0.05, lr_b=0.01)
    grads = {id(i): rng.standard_normal((2048, dim)).astype(np.float32) * 0.01 for i, _ in batches}
    out = np.empty((2048, dim), np.float32)

    def lukern_step(i, o):
        y, ctx = a.forward(table, i, o, out=out)  # forward, keeping the slots and pooled A rows
        a.train_step(table, i, o, grads[id(i)], n_threads=1, context=ctx)  # backward + optimizer
        return y

    contenders = {"lukern": lukern_step}
    # numpy: dense slot map is allowed here (it is the naive baseline)
    slot_of = np.arange(rows) % (rows // 20)
    A_np = np.zeros((rows // 20, rank), np.float32)
    B_np = (rng.standard_normal((rank, dim)) / np.sqrt(dim)).astype(np.float32)
    acc_a = np.zeros(rows // 20, np.float32)
    acc_b = np.zeros((rank, dim), np.float32)
    contenders["numpy"] = lambda i, o: _numpy_step(table, A_np, B_np, acc_a, acc_b, slot_of, i, o, grads[id(i)],
                                                   1.0, 0.05, 0.01)
    if torch is not None:
        torch.set_num_threads(1)
        tW = torch.from_numpy(table)
        tA = torch.nn.Parameter(torch.zeros((rows, rank)))  # the LoRA rows, sparse gradients
        tB = torch.nn.Parameter(torch.from_numpy(B_np.copy()))
        embA = torch.nn.Embedding.from_pretrained(tA.data, freeze=False, sparse=True)
        opt_a = torch.optim.Adagrad([embA.weight], lr=0.05)
        opt_b = torch.optim.Adagrad([tB], lr=0.01)
        tb = {id(i): (torch.from_numpy(i), torch.from_numpy(o), torch.from_numpy(grads[id(i)])) for i, o in batches}

        def torch_step(i, o):
            ti, to, tg = tb[id(i)]
            base = torch.nn.functional.embedding_bag(ti, tW, to, mode="sum", include_last_offset=True)
            pa = torch.nn.functional.embedding_bag(ti, embA.weight, to, mode="sum", include_last_offset=True,
                                                   sparse=True)
            y = base + pa @ tB
            opt_a.zero_grad()
            opt_b.zero_grad()
            y.backward(tg)
            opt_a.step()
            opt_b.step()
            return y

        contenders["torch"] = torch_step
    # one BLAS thread for numpy too: an idle OpenBLAS worker spinning after each numpy
    # call took a core from the contender that ran next (lukern 7.9 vs 4.3 ms per step)
    with _blas_threads(1):
        med = _median_times(contenders, batches, repeats)
    return {k: v[0] * 1e3 for k, v in med.items()}, {k: v[1] * 1e3 for k, v in med.items()}


def _blas_threads(n):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def run_table_batch(repeats, seed=0):
    """The serving benchmark's request (:class:`lukern.bench.serving.Model`: 26 tables of
    20k x 16 float32, 256 one-id Zipf bags each, r = 8, 2500 rows adapted per table):
    ``TableBatch.lookup`` without and with the adapters, the adapted rows at random or
    the hottest (as trained adapters hold). Medians of alternating runs, microseconds."""
    from .serving import Model

    m = Model(seed=seed)
    reqs = m.make_requests(16, 256, seed=seed + 1)
    rng = np.random.default_rng(seed)
    out = np.empty((256, m.n_tables * m.dim), np.float32)
    res = []
    for which in ("random", "hot"):
        adapters = m.new_adapters()
        for a in adapters:
            rows = (_hot_rows(m.rows, a.capacity / m.rows) if which == "hot"
                    else rng.choice(m.rows, a.capacity, replace=False))
            a.backward(rows, np.arange(rows.size + 1), np.zeros((rows.size, m.dim), np.float32))
            a.step()
            a.refactor(rng.standard_normal((a.n_active, a.rank)).astype(np.float32) * 0.01, a.B)
        batches = [(r[1], r[2]) for r in reqs]
        med = _median_times({
            "plain": lambda i, o: m.tables.lookup(i, o, out=out, unchecked=True, n_threads=1),
            "adapted": lambda i, o: m.tables.lookup(i, o, out=out, unchecked=True, n_threads=1, adapters=adapters),
        }, batches, repeats)
        share = float(np.mean([np.isin(r[0][:, t], a.active_rows()[0]).mean() for r in reqs[:4]
                               for t, a in enumerate(adapters)]))
        res.append({"active": which, "plain_us": med["plain"][0] * 1e6, "adapted_us": med["adapted"][0] * 1e6,
                    "ids_with_a_row": share})
    return res


def run_batched_step(repeats, seed=0):
    """The co-located trainer's step on the serving benchmark's model (26 tables of 20k x
    16, r = 8, 1024 one-id Zipf bags per table, as the sidecar steps them): one
    :class:`lukern.lora_batch.BatchedTrainer` call with the backward by touched row
    against the same call forced to the by-bag kernel, each on its own copy of the
    adapters, alternating on a ring of distinct batches. Medians, milliseconds."""
    from ..lora_batch import BatchedTrainer
    from ..testing import zipf_ids
    from .serving import Model

    m = Model(seed=seed)
    rng = np.random.default_rng(seed + 1)
    n = 1024
    off = np.arange(n + 1, dtype=np.int64)
    batches = [(np.stack([zipf_ids(rng, n, m.rows) for _ in range(m.n_tables)]).astype(np.int64),
                (0.01 * rng.standard_normal((m.n_tables, n, m.dim))).astype(np.float32)) for _ in range(24)]
    trainers = {}
    for name, how in (("by row", "row"), ("by bag", "bag")):
        tr = BatchedTrainer(m.new_adapters(), [None] * m.n_tables, backward=how)
        for ids, g in batches[:12]:  # fill the slots as a running trainer has
            tr.train_step(ids, off, g)
        trainers[name] = tr
    med = _median_times({name: (lambda ids, g, tr=tr: tr.train_step(ids, off, g)) for name, tr in trainers.items()},
                        batches, repeats)
    return {name: v[0] * 1e3 for name, v in med.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lukern.bench lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--active", type=float, default=0.05, help="share of rows with an A row")
    p.add_argument("--threads", type=int, nargs="+", default=(1, 2))
    p.add_argument("--driver", choices=("serial", "threads", "prange"), default=None,
                   help="parallel driver of both lookups (default: the plan's)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.repeats = 400_000, 15
    print(f"fused lookup: {a.rows} x {a.dim} float32, r = {a.rank}, {a.active:.0%} of rows active, batch 2048, "
          f"pooling 20-40; medians of {a.repeats} (bar: fused/plain <= 1.25x)")
    fused = run_fused(a.rows, a.dim, a.rank, a.active, tuple(a.threads), a.repeats, driver=a.driver)
    print(f"{'ids':8} {'active':7} {'thr':>3} {'plain ms':>9} {'fused ms':>9} {'fused/plain':>11} {'(cpu time)':>10} "
          f"{'ids with A row':>15}")
    for r in fused:
        print(f"{r['dist']:8} {r['active']:7} {r['threads']:>3} {r['plain_ms']:>9.3f} {r['fused_ms']:>9.3f} "
              f"{r['fused_over_plain']:>10.2f}x {r['cpu_fused_over_plain']:>9.2f}x {r['ids_with_a_row']:>14.1%}")
    tbe = run_table_batch(max(200, 10 * a.repeats))
    print("\ntable-batched lookup with adapters (the serving benchmark's request: 26 tables x 256 one-id bags, "
          "d = 16, r = 8), 1 thread:")
    for r in tbe:
        print(f"  {r['active']:7} rows adapted: plain {r['plain_us']:7.1f} us, with adapters {r['adapted_us']:7.1f} us "
              f"({r['adapted_us'] / r['plain_us']:.2f}x), {r['ids_with_a_row']:.0%} of ids with an A row")
    bstep = run_batched_step(max(40, 2 * a.repeats))
    print(f"\nco-located trainer step (BatchedTrainer, 26 tables x 1024 one-id Zipf bags, d = 16, r = 8), 1 thread: "
          f"by touched row {bstep['by row']:.2f} ms, by bag {bstep['by bag']:.2f} ms "
          f"({bstep['by bag'] / bstep['by row']:.2f}x)")
    adapter, table_bytes = run_memory(a.rows, a.dim, a.rank)
    print(f"\nmemory (bar: < 2% of the table), d = {a.dim}, r = {a.rank}, {adapter.n_active} active rows "
          f"({adapter.n_active / a.rows:.0%}):")
    parts = adapter.nbytes_breakdown()
    for k, v in parts.items():
        print(f"  {k:16} {v / 2**20:9.3f} MiB")
    print(f"  {'total':16} {adapter.nbytes / 2**20:9.3f} MiB = {adapter.nbytes / table_bytes:.2%} of the "
          f"{table_bytes / 2**20:.0f} MiB table; worst case (pending buffers grown) "
          f"{adapter.nbytes_at() / table_bytes:.2%}")
    memory = {"parts": parts, "nbytes": adapter.nbytes, "nbytes_at": adapter.nbytes_at(), "table_bytes": table_bytes}
    del adapter
    steps, steps_cpu = run_train_step(a.rows, a.dim, a.rank, max(10, a.repeats // 2))
    print("\ntraining step (forward + backward + row-wise Adagrad), 1 thread, Zipf ids "
          "(bars: >= 3x torch, >= 10x numpy); wall and CPU-time medians:")
    for k, v in steps.items():
        c = steps_cpu[k]
        print(f"  {k:7} {v:9.2f} ms {c:9.2f} ms cpu" + ("" if k == "lukern" else
              f"   lukern is {v / steps['lukern']:.1f}x faster ({c / steps_cpu['lukern']:.1f}x in CPU time)"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"fused": fused, "table_batch": tbe, "batched_step_ms": bstep, "memory": memory,
                       "train_step_ms": steps, "train_step_cpu_ms": steps_cpu}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
