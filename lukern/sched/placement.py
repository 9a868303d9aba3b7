"""NUMA placement of the trainer: pin to the node that holds the table, first-touch the
adapter arrays there (DESIGN section 5).

Which node holds a table is read from ``/proc/self/numa_maps`` (pages per node of the
mapping that contains the table's first byte); the topology comes from
:func:`lukern.topology.read_topology`, so fake sysfs trees cover multi-node hosts.

Examples
--------
>>> from lukern.topology import read_topology
>>> topo = read_topology()
>>> node = trainer_node(topo, [0])
>>> set(trainer_cpus(topo, node)) <= set(topo.online_cpus)
True
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = ["first_touch", "node_of_array", "pin_thread", "trainer_cpus", "trainer_node"]


def node_of_array(arr: np.ndarray, *, proc_root="/proc", pid="self") -> int | None:
    """The NUMA node holding most pages of the mapping that contains ``arr``'s data, from
    ``numa_maps`` (``7f12a0000000 default anon=256 dirty=256 N0=200 N1=56``); None when
    the file is missing or the mapping has no pages yet."""
    addr = arr.__array_interface__["data"][0]
    try:
        text = Path(proc_root, str(pid), "numa_maps").read_text()
    except OSError:
        return None
    # numa_maps gives only the start of each mapping: the containing one is the last
    # start <= addr (mappings do not overlap).
    best, best_start = None, -1
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            start = int(fields[0], 16)
        except ValueError:
            continue
        if best_start < start <= addr:
            best_start, best = start, fields
    if best is None:
        return None
    pages = Counter()
    for f in best[1:]:
        if f.startswith("N") and "=" in f:
            n, _, c = f[1:].partition("=")
            if n.isdigit():
                pages[int(n)] += int(c)
    return pages.most_common(1)[0][0] if pages else None


def trainer_node(topology, table_nodes) -> int:
    """The node the trainer thread should run on: the CPU node holding most of the
    tables (``table_nodes``: one node id or None per table). Memory-only nodes have no
    CPUs, so a table there is trained from its nearest CPU node (smallest SLIT distance).
    """
    cpu_nodes = [n.id for n in topology.nodes if n.cpus]
    if not cpu_nodes:
        raise ValueError("the topology has no node with online CPUs.")
    votes = Counter()
    for nd in table_nodes:
        if nd is None:
            continue
        nd = int(nd)
        if nd not in cpu_nodes:
            nd = min(cpu_nodes, key=lambda c: (topology.distance(nd, c), c))
        votes[nd] += 1
    if not votes:
        return cpu_nodes[0]
    return max(votes.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def trainer_cpus(topology, node: int) -> tuple[int, ...]:
    """Online CPUs of ``node`` (what the trainer threads are pinned to)."""
    online = set(topology.online_cpus)
    cpus = tuple(c for c in topology.cpus_of(node) if c in online)
    if not cpus:
        raise ValueError(f"NUMA node {node} has no online CPUs; choose a CPU node.")
    return cpus


def pin_thread(cpus, tid: int | None = None) -> tuple[int, ...]:
    """Restrict thread ``tid`` (default: the caller) to ``cpus``, intersected with what the
    process may use (a cpuset may forbid some). Returns the CPUs actually set."""
    allowed = set(os.sched_getaffinity(0))
    use = sorted(set(int(c) for c in cpus) & allowed) or sorted(allowed)
    os.sched_setaffinity(threading.get_native_id() if tid is None else int(tid), use)
    return tuple(use)


def first_touch(factory, cpus):
    """Run ``factory()`` on a short-lived thread pinned to ``cpus`` and return its result.

    Linux places an anonymous page on the node of the CPU that first writes it, so arrays
    built (and filled) by ``factory`` there live on that node. ``numpy.zeros`` pages are
    placed when first written, which the trainer (pinned to the same CPUs) does.

    Examples
    --------
    >>> import numpy as np, os
    >>> float(first_touch(lambda: np.ones(4), sorted(os.sched_getaffinity(0))).sum())
    4.0
    """
    box = {}

    def run():
        try:
            pin_thread(cpus)
            box["value"] = factory()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    t = threading.Thread(target=run, name="lukern-first-touch", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
