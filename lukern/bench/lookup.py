"""Lookup comparison: lukern vs PyTorch ``embedding_bag`` vs numpy, same inputs, one run.

    python -m lukern.bench lookup            # the issue's cells (1 GiB table)
    python -m lukern.bench lookup --quick    # small table, seconds

Each repetition runs every contender once, in alternating order, on a batch taken in turn
from a ring of distinct batches (so a repeated batch cannot sit in the cache), and the
report prints medians and ratios. Times include the Python call of each library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .. import embedding_bag
from ..embedding import TableBatch, pack_batched
from ..memory import empty_table
from ..testing import make_offsets, zipf_ids


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _batches(rng, n_rows, n_bags, pooling, dist, n_batches, index_dtype=np.int64):
    out = []
    for _ in range(n_batches):
        off = make_offsets(rng, n_bags, pooling, dtype=index_dtype)
        n = int(off[-1])
        if dist == "uniform":
            idx = rng.integers(0, n_rows, size=n).astype(index_dtype)
        else:
            idx = zipf_ids(rng, n, n_rows, exponent=1.05, dtype=index_dtype)
        out.append((idx, off))
    return out


def _median_times(contenders, batches, repeats):
    """contenders: name -> fn(idx, off). Returns name -> median seconds."""
    times = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # one untimed call each: compile, page-in, thread start
        contenders[name](*batches[0])
    # every run takes the next batch of the ring, so no contender finds rows that the
    # previous one just pulled into the cache (the ring is far larger than the L3)
    k = 0
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            idx, off = batches[k % len(batches)]
            k += 1
            t0 = time.perf_counter()
            contenders[name](idx, off)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in times.items()}


def run_lookup(rows=4_000_000, dim=64, n_bags=2048, pooling=(20, 40), threads=(1, 2),
               dists=("uniform", "zipf"), repeats=40, n_batches=16, numpy_repeats=5, seed=0, aligned=True):
    torch = _torch()
    rng = np.random.default_rng(seed)
    # one table for every contender, cache-line aligned (both libraries gain ~20%)
    if aligned:
        table = empty_table(rows, dim, np.float32)
        table[:] = rng.standard_normal((rows, dim), dtype=np.float32)
    else:  # numpy's own 16-byte alignment, shifted off any 64-byte boundary
        raw = np.empty(rows * dim + 16, np.float32)
        start = 4 if raw.ctypes.data % 64 == 0 else 0
        table = raw[start:start + rows * dim].reshape(rows, dim)
        table[:] = rng.standard_normal((rows, dim), dtype=np.float32)
    results = []
    for dist in dists:
        batches = _batches(rng, rows, n_bags, pooling, dist, n_batches)
        tbatches = [(torch.from_numpy(i), torch.from_numpy(o)) for i, o in batches] if torch else None
        tt = torch.from_numpy(table) if torch else None
        out = np.empty((n_bags, dim), np.float32)
        for nt in threads:
            contenders = {"lukern": lambda i, o, nt=nt: embedding_bag(table, i, o, out=out, n_threads=nt)}
            if torch is not None:
                torch.set_num_threads(nt)
                lookup = {id(b[0]): tb for b, tb in zip(batches, tbatches)}

                def torch_fn(i, o, lookup=lookup):
                    ti, to = lookup[id(i)]
                    torch.nn.functional.embedding_bag(ti, tt, to, mode="sum", include_last_offset=True)

                contenders["torch"] = torch_fn
            med = _median_times(contenders, batches, repeats)
            np_med = _median_times({"numpy": lambda i, o: np.add.reduceat(table[i], o[:-1], axis=0)},
                                   batches, numpy_repeats)["numpy"] if numpy_repeats else float("nan")
            n_ids = float(np.mean([len(i) for i, _ in batches]))
            row = {"dist": dist, "threads": nt, "lukern_ms": med["lukern"] * 1e3,
                   "lukern_Mlookups_s": n_ids / med["lukern"] / 1e6, "numpy_ms": np_med * 1e3,
                   "speedup_vs_numpy": np_med / med["lukern"]}
            if "torch" in med:
                row.update(torch_ms=med["torch"] * 1e3, torch_Mlookups_s=n_ids / med["torch"] / 1e6,
                           speedup_vs_torch=med["torch"] / med["lukern"])
            results.append(row)
    return results


def run_table_batch(n_tables=26, rows=100_000, dim=16, n_bags=2048, pooling=(1, 1), threads=(1, 2),
                    repeats=60, n_batches=8, seed=0):
    """Batched call over n_tables tables vs one call over one table holding the same rows."""
    rng = np.random.default_rng(seed)
    tables = [rng.standard_normal((rows, dim), dtype=np.float32) for _ in range(n_tables)]
    batch = TableBatch(tables)
    big = batch.groups[0][1]  # the shared buffer: the same rows, as one table
    pairs = []
    for _ in range(n_batches):
        il, ol = [], []
        for _t in range(n_tables):
            off = make_offsets(rng, n_bags, pooling)
            il.append(rng.integers(0, rows, size=int(off[-1])))
            ol.append(off)
        idx, off = pack_batched(il, ol)
        bases = np.repeat(np.arange(n_tables, dtype=np.int64) * rows, np.diff(off).reshape(n_tables, n_bags).sum(1))
        pairs.append((idx, off, idx + bases))
    # line-aligned outputs, as lukern allocates them (the batched one is then streamed)
    out_b = empty_table(n_bags, n_tables * dim)
    out_s = empty_table(n_tables * n_bags, dim)
    results = []
    for nt in threads:
        single = {id(p[0]): p[2] for p in pairs}
        med = _median_times({
            "batched": lambda i, o, nt=nt: batch.lookup(i, o, out=out_b, n_threads=nt),
            "single": lambda i, o, nt=nt: embedding_bag(big, single[id(i)], o, out=out_s, n_threads=nt),
        }, [(p[0], p[1]) for p in pairs], repeats)
        results.append({"threads": nt, "batched_ms": med["batched"] * 1e3, "single_ms": med["single"] * 1e3,
                        "batched_over_single": med["batched"] / med["single"]})
    return results


def _print_lookup(rows, file=sys.stdout):
    print(f"{'ids':8} {'thr':>3} {'lukern ms':>10} {'M lk/s':>8} {'torch ms':>9} {'M lk/s':>8} "
          f"{'vs torch':>9} {'numpy ms':>9} {'vs numpy':>9}", file=file)
    for r in rows:
        print(f"{r['dist']:8} {r['threads']:>3} {r['lukern_ms']:>10.3f} {r['lukern_Mlookups_s']:>8.1f} "
              f"{r.get('torch_ms', float('nan')):>9.3f} {r.get('torch_Mlookups_s', float('nan')):>8.1f} "
              f"{r.get('speedup_vs_torch', float('nan')):>8.2f}x {r['numpy_ms']:>9.2f} {r['speedup_vs_numpy']:>8.1f}x",
              file=file)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lukern.bench lookup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--pooling", type=int, nargs=2, default=(20, 40))
    p.add_argument("--threads", type=int, nargs="+", default=(1, 2))
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="200k-row table, fewer repeats")
    p.add_argument("--skip-batched", action="store_true")
    p.add_argument("--unaligned", action="store_true", help="a table not aligned to cache lines (numpy default)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.repeats = 200_000, 15
    torch = _torch()
    print(f"lookup: {a.rows} x {a.dim} float32, batch {a.batch}, pooling {a.pooling[0]}-{a.pooling[1]}, int64 ids, "
          f"sum, {'unaligned' if a.unaligned else '64-byte aligned'} table; "
          f"torch {'%s' % torch.__version__ if torch else 'not installed'}; medians of {a.repeats}")
    rows = run_lookup(a.rows, a.dim, a.batch, tuple(a.pooling), tuple(a.threads), repeats=a.repeats,
                      aligned=not a.unaligned)
    _print_lookup(rows)
    report = {"lookup": rows}
    if not a.skip_batched:
        tb = run_table_batch(threads=tuple(a.threads), repeats=max(20, a.repeats))
        print("\ntable-batched: 26 tables x 100k x 16, batch 2048, pooling 1, vs one call over the same rows")
        for r in tb:
            print(f"  threads {r['threads']}: batched {r['batched_ms']:.3f} ms, single {r['single_ms']:.3f} ms, "
                  f"ratio {r['batched_over_single']:.2f}")
        report["table_batch"] = tb
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
