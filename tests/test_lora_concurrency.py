"""Serving threads look up through a LoRAAdapter while a trainer trains, folds, evicts,
resizes, changes the rank and merges factors: every output must be the lookup of one
state the trainer published (pre- or post-update), checked for every call, row by row."""

import threading
import time

import numpy as np

import lukern
from lukern.testing import make_lookup_problem, reference_embedding_bag


def test_readers_see_published_states_while_trainer_mutates():
    rng = np.random.default_rng(0)
    n_rows, d = 3000, 16
    W = rng.standard_normal((n_rows, d))
    a = lukern.LoRAAdapter(n_rows, d, rank=4, capacity=300, dtype=np.float64, lr_a=0.1, lr_b=0.05,
                           evict_fraction=0.1)
    p = make_lookup_problem(n_rows=n_rows, dim=d, n_bags=48, pooling=(1, 10), dtype=np.float64, table=W, seed=3,
                            distribution="zipf")
    published = {}  # even generation -> the lookup of that state (dense numpy reference)
    cond = threading.Condition()

    def publish():
        ref = reference_embedding_bag(W + a.dense_delta(), p.indices, p.offsets)
        with cond:
            published[a.generation] = ref
            cond.notify_all()

    publish()
    stop = threading.Event()
    errors, counts = [], [0, 0]

    def check(g0, g1, out):
        lo = g0 + (g0 & 1)  # a mutation under way at g0 finishes at g0 + 1
        hi = g1 - (g1 & 1)
        with cond:  # the trainer publishes right after each mutation; wait for it
            if not cond.wait_for(lambda: hi in published, timeout=10):
                return f"state {hi} never published"
            refs = [published[g] for g in range(lo, hi + 1, 2)]
        # row by row: each output row equals that row of some published state
        ok = np.zeros(out.shape[0], bool)
        for ref in refs:
            ok |= np.isclose(out, ref, rtol=1e-9, atol=1e-9).all(axis=1)
        whole = any(np.allclose(out, ref, rtol=1e-9, atol=1e-9) for ref in refs)
        if not ok.all():
            return f"rows {np.flatnonzero(~ok)[:5]} match no state in generations [{lo}, {hi}]"
        if not whole:
            return f"output mixes states of generations [{lo}, {hi}]"
        return None

    def reader(k, driver):
        try:
            while not stop.is_set():
                g0 = a.generation
                out = lukern.embedding_bag(W, p.indices, p.offsets, adapter=a, driver=driver, n_threads=2)
                g1 = a.generation
                if not np.isfinite(out).all():
                    errors.append("non-finite output")
                why = check(g0, g1, out)
                if why:
                    errors.append(why)
                counts[k] += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    readers = [threading.Thread(target=reader, args=(0, "serial")),
               threading.Thread(target=reader, args=(1, "threads"))]
    for t in readers:
        t.start()
    # every public call below makes at most one mutation, and the trainer publishes after
    # each, so every even generation a reader can see has its reference
    deadline = time.perf_counter() + 2.5
    k, ops = 0, set()
    try:
        while time.perf_counter() < deadline and not errors:
            q = make_lookup_problem(n_rows=n_rows, dim=d, n_bags=32, pooling=(1, 12), dtype=np.float64, table=W,
                                    seed=100 + k, distribution="zipf")
            a.backward(q.indices, q.offsets, rng.standard_normal((32, d)), table=W, n_threads=1 + k % 2)
            publish()  # an eviction inside backward folded rows into W
            a.step()
            publish()
            if k % 5 == 2:
                a.evict(15, W)
                ops.add("evict")
            elif k % 7 == 3:
                a.resize(a.capacity + 16)
                ops.add("resize")
            elif k % 11 == 5:
                rows, slots = a.active_rows()
                a.refactor(a.A[slots] * 2.0, a.B * 0.5)  # same product, new arrays
                ops.add("refactor")
            elif k % 13 == 6:
                a.apply_factors(a.export(), table=W)  # the correction folded once more into W
                ops.add("apply")
            elif k % 17 == 8:
                a.fold_all(W)
                ops.add("fold_all")
            publish()
            k += 1
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert errors == [], errors[:3]
    assert min(counts) > 5 and k > 20, (counts, k)
    assert ops == {"evict", "resize", "refactor", "apply", "fold_all"} and a.evicted_rows > 0
