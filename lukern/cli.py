"""The ``lukern`` command: ``lukern demo``, ``lukern info``, ``lukern replay`` (and more subcommands as they land).

Results go to stdout; progress and diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__


def _demo(args) -> int:
    import numpy as np

    import lukern
    from lukern.testing import make_offsets, zipf_ids

    rng = np.random.default_rng(args.seed)
    print(f"building a {args.rows} x {args.dim} float32 table ({args.rows * args.dim * 4 / 2**20:.0f} MiB)...",
          file=sys.stderr)
    table = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    report = lukern.warmup(dims=(args.dim,), index_dtypes=("int64",), modes=("sum",), batched=False)
    print(f"compiled {len(report['compiled'])} kernels in {report['seconds']:.1f} s", file=sys.stderr)
    print(f"{'ids':8} {'threads':>7} {'lukern ms':>10} {'M lookups/s':>12} {'numpy ms':>9} {'speed-up':>9}")
    for dist in ("uniform", "zipf"):
        batches = []
        for _ in range(8):
            off = make_offsets(rng, args.batch, (20, 40))
            n = int(off[-1])
            idx = rng.integers(0, args.rows, n) if dist == "uniform" else zipf_ids(rng, n, args.rows)
            batches.append((idx, off))
        for threads in (1, 2):
            times, np_times = [], []
            for r in range(args.repeats):
                idx, off = batches[r % len(batches)]
                t0 = time.perf_counter()
                lukern.embedding_bag(table, idx, off, n_threads=threads)
                times.append(time.perf_counter() - t0)
                if r < 5:
                    t0 = time.perf_counter()
                    np.add.reduceat(table[idx], off[:-1], axis=0)
                    np_times.append(time.perf_counter() - t0)
            t, tn = float(np.median(times)), float(np.median(np_times))
            n_ids = np.mean([len(i) for i, _ in batches])
            print(f"{dist:8} {threads:>7} {t * 1e3:>10.3f} {n_ids / t / 1e6:>12.1f} {tn * 1e3:>9.2f} {tn / t:>8.1f}x")
    print("(compare with PyTorch in the same run: python -m lukern.bench lookup)", file=sys.stderr)
    return 0


def _info(args) -> int:
    import numba

    import lukern
    from lukern._pool import available_cpus
    from lukern._threading import threading_layer

    from lukern.topology import predicted_threading_layer

    layer = threading_layer()
    if layer == "default":  # numba picks its layer at the first parallel launch: say which it will be
        layer = f"{predicted_threading_layer()} (predicted)"
    info = {"lukern": lukern.__version__, "numba": numba.__version__, "threading_layer": layer,
            "cpus": available_cpus()}
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lukern", description="lukern: fresh DLRM embeddings on the inference node")
    parser.add_argument("--version", action="version", version=f"lukern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a table, run lookups, print throughput against numpy")
    demo.add_argument("--rows", type=int, default=1_000_000)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--batch", type=int, default=2048)
    demo.add_argument("--repeats", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="versions, threading layer and CPUs as JSON")
    info.set_defaults(func=_info)
    from .replay.command import add_replay_parser

    add_replay_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
