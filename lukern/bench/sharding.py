"""Sharding: per-node load imbalance of three partitioners on Zipf(1.05) ids, and the cost
of a ShardedTable lookup against the plain one (same inputs, one run): one shard, two
shards in one ordered pass (1 thread), and two shards run pinned per node on a fake
2-node topology that deals this machine's CPUs over the nodes (against plain on as many
threads).

    python -m lukern.bench sharding
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from .. import ShardedTable, embedding_bag, partition_rows
from ..memory import empty_table
from ..testing import zipf_ids
from ..topology import Node, read_topology
from .lookup import _batches


def _ids(rng, n_rows, n, permuted):
    if permuted:
        return zipf_ids(rng, n, n_rows)
    c = np.cumsum(np.arange(1, n_rows + 1, dtype=np.float64) ** -1.05)
    return np.minimum(np.searchsorted(c / c[-1], rng.random(n)), n_rows - 1)


def _paired_times(contenders, batches, repeats):
    """name -> per-round seconds; each round times every contender once (rotating the
    order) on the next batch of the ring, so a round's ratios see the same machine load
    (this host is shared: its load drifts between rounds)."""
    names = list(contenders)
    for name in names:  # untimed: compile, page-in, thread start
        contenders[name](*batches[0])
    times = {name: [] for name in names}
    k = 0
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            idx, off = batches[k % len(batches)]
            k += 1
            t0 = time.perf_counter()
            contenders[name](idx, off)
            times[name].append(time.perf_counter() - t0)
    return {name: np.array(v) for name, v in times.items()}


def huge_page_share(arr) -> float | None:
    """Share of ``arr``'s mapping backed by transparent huge pages (/proc/self/smaps):
    random lookups from 4 KiB pages pay TLB misses, so this explains a slow table."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    addr, inside, size = arr.ctypes.data, False, 0
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("Size:"):
            size = int(line.split()[1])
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / max(size, 1)
    return None


def split_topology(n_nodes: int):
    """This machine's topology with its CPUs dealt round-robin over ``n_nodes`` fake
    nodes (ids 0..n-1; memory nodes that do not exist fall back to first touch)."""
    topo = read_topology()
    cpus = sorted(c for n in topo.nodes for c in n.cpus)
    nodes = tuple(Node(k, tuple(cpus[k::n_nodes]) or (cpus[k % len(cpus)],), 0) for k in range(n_nodes))
    return dataclasses.replace(topo, nodes=nodes)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lukern.bench sharding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--stream", type=int, default=4_000_000, help="ids in the recorded stream")
    p.add_argument("--replicate-mib", type=float, default=1.0, help="replica budget per node")
    p.add_argument("--repeats", type=int, default=60)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    row_bytes = a.dim * 4
    print(f"load imbalance (max/mean per node), Zipf(1.05) over {a.rows} rows, {a.stream} ids; frequency-aware "
          f"replicates {a.replicate_mib} MiB per node")
    print(f"{'hot ids':10} {'nodes':>5} {'frequency':>10} {'range':>8} {'hash':>8} {'replicated':>11} {'map bytes':>10}")
    for permuted in (True, False):
        freq = np.bincount(_ids(rng, a.rows, a.stream, permuted), minlength=a.rows).astype(np.float64)
        for nodes in (2, 4):
            fa = partition_rows(freq, nodes, replicate_bytes=int(a.replicate_mib * 2**20), row_bytes=row_bytes)
            r = partition_rows(freq, nodes, strategy="range")
            h = partition_rows(freq, nodes, strategy="hash")
            print(f"{'permuted' if permuted else 'low rows':10} {nodes:>5} {fa.imbalance(freq):>10.3f} "
                  f"{r.imbalance(freq):>8.3f} {h.imbalance(freq):>8.3f} {fa.replicated.size * row_bytes * nodes / 2**20:>8.1f} MiB "
                  f"{fa.map_nbytes():>10}")
    table = empty_table(a.rows, a.dim)
    table[:] = rng.standard_normal((a.rows, a.dim), dtype=np.float32)
    one = ShardedTable(table, partition_rows(np.ones(a.rows), 1))
    freq = np.bincount(_ids(rng, a.rows, a.stream, True), minlength=a.rows).astype(np.float64)
    part2 = partition_rows(freq, 2, replicate_bytes=2**20, row_bytes=row_bytes)
    two = ShardedTable(table, part2)
    topo2 = split_topology(2)
    pinned = ShardedTable(table, part2, topology=topo2)
    nt = sum(len(c) for c in pinned.node_cpus)
    out = np.empty((2048, a.dim), np.float32)
    print(f"\nlookup, {a.rows} x {a.dim} float32, batch 2048, pooling 20-40, {a.repeats} rounds: medians, and in "
          f"brackets the median over rounds of the ratio to the row's baseline in the same round. Ordered rows run "
          f"1 thread against plain on 1; pinned runs nodes on CPUs {[sorted(c) for c in pinned.node_cpus]} "
          f"(allocation {pinned.allocation}) against plain on {nt} threads")
    shares = [huge_page_share(x) for x in (table, one._layout.buffer, two._layout.buffer)]
    if None not in shares:
        print("  huge-page share of the mapping: plain table {:.0%}, 1 shard {:.0%}, 2 shards {:.0%}".format(*shares))
    for dist in ("uniform", "zipf"):
        batches = _batches(rng, a.rows, 2048, (20, 40), dist, 16)
        # single-threaded and multi-threaded contenders are timed in separate rounds: a
        # parallel lookup's pool threads keep spinning for a while after it returns
        # (OpenMP's wait policy), which slowed whichever 1-thread contender came next
        t = _paired_times({
            "plain": lambda i, o: embedding_bag(table, i, o, out=out, n_threads=1),
            "1 shard": lambda i, o: one.lookup(i, o, out=out, n_threads=1),
            "2 shards ordered": lambda i, o: two.lookup(i, o, out=out, n_threads=1),
        }, batches, a.repeats)
        t.update(_paired_times({
            f"plain {nt} threads": lambda i, o: embedding_bag(table, i, o, out=out, n_threads=nt),
            "2 shards pinned": lambda i, o: pinned.lookup(i, o, out=out),
        }, batches, a.repeats))
        cells = []
        for name, v in t.items():
            base = t[f"plain {nt} threads"] if name == "2 shards pinned" else t["plain"]
            cells.append(f"{name} {np.median(v) * 1e3:.3f} ms" + ("" if name.startswith("plain") else
                                                                  f" ({np.median(v / base):.2f}x)"))
        print(f"  {dist:8} " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
