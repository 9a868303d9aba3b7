"""Randomized SVD: lukern against scikit-learn's ``randomized_svd`` at equal k,
oversampling and power iterations, medians of alternating runs in one process.

    python -m lukern.bench rsvd                 # 200000 x 128 dense; gathered rows of a 4M x 64 table
    python -m lukern.bench rsvd --table-rows 1000000 --repeats 3
    python -m lukern.bench rsvd --quick         # small shapes, a smoke run

Cases: a dense float32 matrix with a decaying spectrum, and ``GatheredRows`` (row ids of a
big table, never copied by lukern; scikit-learn needs ``table[ids]`` first, timed both
with and without that gather). lukern runs ``method="randomized"`` (the equal-settings
comparison) and ``method="auto"`` (what a user gets; it names the method it picked).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import numpy as np

from ..rank import GatheredRows, randomized_svd


def _sklearn():
    try:
        from sklearn.utils.extmath import randomized_svd as sk
    except ImportError:  # pragma: no cover - measured only where installed
        return None
    return sk


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run_case(name, operand, dense_fn, ks, oversample, n_iter, repeats, n_threads=None):
    """Alternate every variant once per repeat; return rows of medians and ratios."""
    sk = _sklearn()
    rows = []
    for k in ks:
        variants = {
            "lukern_randomized": lambda k=k: randomized_svd(operand, k, oversample=oversample, n_iter=n_iter,
                                                            method="randomized", n_threads=n_threads),
            "lukern_auto": lambda k=k: randomized_svd(operand, k, oversample=oversample, n_iter=n_iter,
                                                      n_threads=n_threads),
        }
        if sk is not None:
            if dense_fn is not None:  # gathered case: sklearn needs the rows copied first
                dense = dense_fn()
                variants["sklearn"] = lambda k=k, M=dense: sk(M, k, n_oversamples=oversample, n_iter=n_iter,
                                                             random_state=0)
                variants["sklearn_with_gather"] = lambda k=k: sk(dense_fn(), k, n_oversamples=oversample,
                                                                 n_iter=n_iter, random_state=0)
            else:
                variants["sklearn"] = lambda k=k: sk(operand, k, n_oversamples=oversample, n_iter=n_iter,
                                                     random_state=0)
        for fn in variants.values():  # warm-up: JIT and first touches outside the timing
            fn()
        times = {v: [] for v in variants}
        outs = {}
        for _ in range(repeats):
            for v, fn in variants.items():
                t, outs[v] = _time(fn)
                times[v].append(t)
        med = {v: float(np.median(t)) for v, t in times.items()}
        row = {"case": name, "k": k, "auto_method": outs["lukern_auto"].method,
               **{f"{v}_ms": med[v] * 1e3 for v in variants}}
        if "sklearn" in med:
            row["sklearn_over_lukern_randomized"] = med["sklearn"] / med["lukern_randomized"]
            row["sklearn_over_lukern_auto"] = med["sklearn"] / med["lukern_auto"]
            if "sklearn_with_gather" in med:
                row["sklearn_with_gather_over_lukern_randomized"] = (med["sklearn_with_gather"]
                                                                     / med["lukern_randomized"])
            S_sk = np.asarray(outs["sklearn"][1], np.float64)
            row["max_rel_diff_S_vs_sklearn"] = float(np.max(np.abs(outs["lukern_randomized"].S - S_sk) / S_sk))
        rows.append(row)
        print(_fmt(row), file=sys.stderr, flush=True)
    return rows


def _fmt(r):
    parts = [f"{r['case']:<28} k={r['k']:<3} lukern randomized {r['lukern_randomized_ms']:8.1f} ms",
             f"auto({r['auto_method']}) {r['lukern_auto_ms']:8.1f} ms"]
    if "sklearn_ms" in r:
        parts.append(f"sklearn {r['sklearn_ms']:8.1f} ms")
        if "sklearn_with_gather_ms" in r:
            parts.append(f"sklearn+gather {r['sklearn_with_gather_ms']:8.1f} ms")
        parts.append(f"sklearn/lukern_randomized {r['sklearn_over_lukern_randomized']:5.2f}x")
        parts.append(f"sklearn/lukern_auto {r['sklearn_over_lukern_auto']:5.2f}x")
        parts.append(f"maxrelS {r['max_rel_diff_S_vs_sklearn']:.1e}")
    return " | ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lukern.bench rsvd", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows of the dense matrix")
    p.add_argument("--cols", type=int, default=128, help="columns of the dense matrix")
    p.add_argument("--table-rows", type=int, default=4_000_000, help="rows of the gathered table")
    p.add_argument("--table-dim", type=int, default=64)
    p.add_argument("--ids", type=int, default=1 << 19, help="distinct row ids gathered from the table")
    p.add_argument("--ks", default="4,8,16,32")
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--n-iter", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="pin both sides: lukern n_threads and BLAS threads (scikit-learn's only parallelism)")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.table_rows, a.ids, a.repeats = 20_000, 200_000, 20_000, 3
    ks = [int(k) for k in a.ks.split(",")]
    rng = np.random.default_rng(0)
    # decaying spectrum: Gaussian columns scaled 0.95^j
    M = rng.standard_normal((a.rows, a.cols), dtype=np.float32)
    M *= (0.95 ** np.arange(a.cols)).astype(np.float32)
    print(f"dense {a.rows} x {a.cols} float32; gathered {a.ids} ids of a {a.table_rows} x {a.table_dim} float32 "
          f"table ({a.table_rows * a.table_dim * 4 / 2**30:.2f} GiB); oversample {a.oversample}, n_iter {a.n_iter}, "
          f"{a.repeats} alternating repeats; threads {a.threads or 'default'}; "
          f"sklearn {'installed' if _sklearn() else 'absent'}", file=sys.stderr)
    limit = nullcontext
    if a.threads is not None:
        from threadpoolctl import threadpool_limits

        def limit():
            return threadpool_limits(a.threads)
    with limit():
        rows = run_case(f"dense {a.rows}x{a.cols}", M, None, ks, a.oversample, a.n_iter, a.repeats, a.threads)
    del M
    table = rng.standard_normal((a.table_rows, a.table_dim), dtype=np.float32)
    table *= (0.95 ** np.arange(a.table_dim)).astype(np.float32)
    ids = rng.choice(a.table_rows, a.ids, replace=False).astype(np.int64)
    g = GatheredRows(table, ids)
    with limit():
        rows += run_case(f"gathered {a.ids}/{a.table_rows}x{a.table_dim}", g, lambda: table[ids], ks, a.oversample,
                         a.n_iter, a.repeats, a.threads)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(_fmt(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
