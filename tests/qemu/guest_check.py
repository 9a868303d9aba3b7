"""Runs inside the two-node QEMU guest (booted by tests/qemu/guest.py): the sharded
lookup on a real two-node kernel. Prints one ``LUKERN-RESULT {json}`` line."""

from __future__ import annotations

import json
import os

import numpy as np

import lukern
from lukern.sharding import memory_policy
from lukern.topology import read_topology
from lukern.testing import make_lookup_problem


def main():
    topo = read_topology()
    nodes = [n for n in topo.nodes if n.cpus]
    p = make_lookup_problem(n_rows=20_000, dim=16, n_bags=500, pooling=(0, 30), distribution="zipf",
                            dtype=np.float64, weighted=True, seed=0)
    freq = np.bincount(p.indices, minlength=20_000).astype(float)
    part = lukern.partition_rows(freq, topo, replicate_bytes=64 * 128, row_bytes=128)
    st = lukern.ShardedTable(p.table, part, topology=topo)
    plain = lukern.embedding_bag(p.table, p.indices, p.offsets, weights=p.weights)
    pinned = st.lookup(p.indices, p.offsets, weights=p.weights)
    ordered = st.lookup(p.indices, p.offsets, weights=p.weights, execution="ordered")
    placed = [memory_policy(st.node_rows(k).ctypes.data) for k in range(len(nodes))]
    print("LUKERN-RESULT " + json.dumps({
        "nodes": [[n.id, list(n.cpus)] for n in nodes],
        "cpus": sorted(os.sched_getaffinity(0)),
        "allocation": st.allocation,
        "placed": [list(map(lambda x: x if isinstance(x, int) else list(x), pl)) for pl in placed],
        "pinned": [sorted({c for _, aff in pool.pinned for c in aff}) for pool in st.pools],
        "pinned_max_abs_err": float(np.abs(pinned - plain).max()),
        "ordered_bit_exact": bool(np.array_equal(ordered, plain)),
        "imbalance": part.imbalance(freq),
    }), flush=True)


if __name__ == "__main__":
    main()
