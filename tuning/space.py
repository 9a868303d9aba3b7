"""Search spaces: an ordered dict of candidate values per parameter plus restrictions
(kernel_tuner's model), and the topology-aware thread ladder.

The order of the values matters twice: brute force walks the product in that order
(the first parameter varies slowest, so all one-node thread counts come before the
cross-node ones), and coordinate descent moves to the *adjacent* value of one parameter.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Sequence

__all__ = ["SearchSpace", "candidate_key", "lookup_space", "thread_ladder", "thread_scope"]


def candidate_key(params: Mapping) -> str:
    """Canonical string of a parameter dict (journal and cache key)."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


class SearchSpace:
    """Candidates = the product of ``params`` values that pass every restriction.

    Parameters
    ----------
    params : mapping of name -> sequence of values, in search order
    restrictions : iterable of callables ``candidate_dict -> bool``

    Examples
    --------
    >>> s = SearchSpace({"n_threads": [1, 2], "driver": ["serial", "prange"]},
    ...                 [lambda c: (c["n_threads"] == 1) == (c["driver"] == "serial")])
    >>> list(s)
    [{'n_threads': 1, 'driver': 'serial'}, {'n_threads': 2, 'driver': 'prange'}]
    """

    def __init__(self, params: Mapping[str, Sequence], restrictions: Iterable[Callable[[dict], bool]] = ()):
        self.params = OrderedDict((name, tuple(values)) for name, values in params.items())
        for name, values in self.params.items():
            if not values:
                raise ValueError(f"search parameter {name!r} needs at least one candidate value; got none.")
        self.restrictions = tuple(restrictions)
        names = list(self.params)
        self._candidates = []
        for combo in itertools.product(*self.params.values()):
            c = dict(zip(names, combo))
            if self.is_valid(c):
                self._candidates.append(c)
        self._keys = {candidate_key(c) for c in self._candidates}

    def is_valid(self, candidate: Mapping) -> bool:
        if set(candidate) != set(self.params):
            return False
        if any(candidate[n] not in vals for n, vals in self.params.items()):
            return False
        return all(r(candidate) for r in self.restrictions)

    def __contains__(self, candidate) -> bool:
        return candidate_key(candidate) in self._keys

    def __len__(self) -> int:
        return len(self._candidates)

    def __iter__(self):
        return (dict(c) for c in self._candidates)

    @property
    def size_unrestricted(self) -> int:
        return math.prod(len(v) for v in self.params.values())

    def neighbours(self, candidate: Mapping, name: str) -> list[dict]:
        """The nearest valid candidates along parameter ``name`` on each side (skipping
        values that break a restriction), others held fixed."""
        values = self.params[name]
        i = values.index(candidate[name])
        out = []
        for step in (-1, 1):
            j = i + step
            while 0 <= j < len(values):
                c = dict(candidate)
                c[name] = values[j]
                if self.is_valid(c):
                    out.append(c)
                    break
                j += step
        return out

    def describe(self) -> str:
        vals = ", ".join(f"{n}={list(v)}" for n, v in self.params.items())
        return f"{len(self)} candidates of {self.size_unrestricted} ({vals})"


# -- threads and topology --------------------------------------------------------------------

def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return set(range(os.cpu_count() or 1))


def _node_sizes(topology, allowed) -> list[int]:
    sizes = sorted((len([c for c in n.cpus if c in allowed]) for n in topology.cpu_nodes), reverse=True)
    sizes = [s for s in sizes if s > 0]
    return sizes or [max(1, len(allowed))]


def thread_ladder(topology, allowed: set[int] | None = None) -> list[int]:
    """Thread counts to try, smallest first: powers of two up to the largest node's
    CPUs (this process may use), that node's full count, then whole extra nodes.

    Threads within one node come first because a lookup's rows then come from one
    memory controller (lukern's drivers do not pin, the scheduler does).

    Examples
    --------
    Two nodes of 32 CPUs: ``[1, 2, 4, 8, 16, 32, 64]``.
    """
    allowed = _allowed_cpus() if allowed is None else set(allowed)
    sizes = _node_sizes(topology, allowed)
    first = sizes[0]
    ladder = []
    p = 1
    while p < first:
        ladder.append(p)
        p *= 2
    ladder.append(first)
    total = first
    for s in sizes[1:]:
        total += s
        ladder.append(total)
    return sorted(set(ladder))


def thread_scope(topology, n_threads: int, allowed: set[int] | None = None) -> str:
    """``"1 node"`` when ``n_threads`` fit in the largest node, else how many nodes."""
    allowed = _allowed_cpus() if allowed is None else set(allowed)
    sizes = _node_sizes(topology, allowed)
    total, k = 0, 0
    for s in sizes:
        total += s
        k += 1
        if n_threads <= total:
            break
    return "1 node" if k == 1 else f"{k} nodes"


#: prange chunks expressed per thread: 4 is the built-in heuristic (a few chunks per
#: thread balance the load); 1 is one chunk per thread, 64 many small chunks
CHUNKS_PER_THREAD = (1, 2, 4, 8, 16, 64)
DEFAULT_CHUNKS_PER_THREAD = 4


def lookup_space(topology, n_items: int, *, allowed: set[int] | None = None, max_prange_threads: int | None = None,
                 drivers=("serial", "prange", "threads"), chunks_per_thread=CHUNKS_PER_THREAD) -> SearchSpace:
    """Threads x driver x chunking for a bag-parallel kernel over ``n_items`` bags.

    Restrictions: one thread means the serial driver and vice versa; only ``prange``
    uses the chunk size (the others get the default, so they appear once); ``prange``
    cannot use more threads than numba's pool; no more threads than bags.
    """
    if max_prange_threads is None:
        import numba

        max_prange_threads = numba.config.NUMBA_NUM_THREADS
    threads = [t for t in thread_ladder(topology, allowed) if t <= max(1, n_items)]
    return SearchSpace(
        OrderedDict(n_threads=threads, driver=tuple(drivers), chunks_per_thread=tuple(chunks_per_thread)),
        [
            lambda c: (c["n_threads"] == 1) == (c["driver"] == "serial"),
            lambda c: c["driver"] == "prange" or c["chunks_per_thread"] == DEFAULT_CHUNKS_PER_THREAD,
            lambda c: c["driver"] != "prange" or c["n_threads"] <= max_prange_threads,
        ],
    )
