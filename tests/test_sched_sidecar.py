"""The sidecar trainer (LiveUpdater mode="process") and lukern in a forked child: lookups
on lukern's worker threads and on numba's pool work there after the parent used both; a
sidecar that dies is noticed; the shared ring is fenced; adopted state lands on the
tables' node; stop/start keeps the optimizer state."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import lukern
from lukern._pool import run_ranges
from lukern.plan import resolve_plan
from lukern.testing import reference_table_batch

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _problem(n_bags=3000):
    rng = np.random.default_rng(0)
    tables = [rng.standard_normal((500, 16)).astype(np.float32) for _ in range(3)]
    ids = [rng.integers(0, 500, n_bags) for _ in tables]
    offs = [np.arange(n_bags + 1, dtype=np.int64) for _ in tables]
    tb = lukern.TableBatch(tables)
    idx, off = tb.pack(ids, offs)
    return tb, idx, off, reference_table_batch(tables, idx, off)


def _in_child(fn, timeout=30.0) -> int:
    """Run ``fn()`` in a forked child; its exit code (0: fn returned True), or -1 when it
    hung (then it is killed)."""
    pid = os.fork()
    if pid == 0:  # never return into pytest from the child
        code = 1
        try:
            code = 0 if fn() else 3
        finally:
            os._exit(code)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


def test_worker_pool_works_in_a_forked_child():
    seen = []
    run_ranges(lambda a, b: seen.append((a, b)), [(0, 1), (1, 2), (2, 3)])  # the pool now exists
    assert sorted(seen) == [(0, 1), (1, 2), (2, 3)]

    def child():
        out = np.zeros(4)

        def fill(a, b):
            out[a:b] = a + 1
        run_ranges(fill, [(0, 2), (2, 4)])
        return out.tolist() == [1, 1, 3, 3]
    # before the fix the child queued work for the parent's (absent) idle workers: hung
    assert _in_child(child) == 0


@pytest.mark.parametrize("driver", ["threads", "prange", None])
def test_parallel_lookup_in_a_child_forked_after_the_parent_used_it(driver):
    tb, idx, off, ref = _problem()
    for d in ("threads", "prange"):  # both pools started in the parent
        np.testing.assert_allclose(tb.lookup(idx, off, n_threads=2, driver=d), ref, rtol=1e-5, atol=1e-5)

    def child():
        out = tb.lookup(idx, off, n_threads=2, driver=driver)
        return np.allclose(out, ref, rtol=1e-5, atol=1e-5)
    # GNU OpenMP kills a forked child on its first parallel region (exit -15); the plan
    # switches such a child to lukern's threads
    assert _in_child(child) == 0


def test_plan_in_a_forked_child_says_why():
    tb, idx, off, _ = _problem()
    tb.lookup(idx, off, n_threads=2, driver="prange")
    import numba
    gnu_omp = numba.threading_layer() == "omp" and \
        getattr(__import__("numba.np.ufunc.omppool", fromlist=["x"]), "openmp_vendor", "GNU") == "GNU"

    def child():
        plan = resolve_plan("embedding_bag", 10**6, n_threads=2, driver="prange")
        if gnu_omp:
            return plan.driver == "threads" and "forked after GNU OpenMP" in plan.source
        return plan.driver == "prange"
    assert _in_child(child) == 0
    assert resolve_plan("embedding_bag", 10**6, n_threads=2, driver="prange").driver == "prange"  # parent unchanged


def test_sidecar_trainer_with_two_kernel_threads_after_parallel_serving():
    tb, idx, off, _ = _problem()
    tb.lookup(idx, off, n_threads=2, driver="prange")  # the serving process used numba's pool
    w = np.random.default_rng(1).standard_normal(48).astype(np.float32)

    def loss_grad(pooled, labels):
        err = pooled @ w - labels
        return float((err ** 2).mean()), (2 * err[:, None] * w[None, :] / len(err)).astype(np.float32)

    up = lukern.LiveUpdater(tb, loss_grad, batch_size=2048, mode="process", n_threads=2, max_threads=2, pin=False,
                            adapter_kwargs={"capacity": 512})
    rng = np.random.default_rng(2)
    up.record(rng.integers(0, 500, (4096, 3)), rng.random(4096))
    with up:
        assert up.flush(timeout=60), up.stats()
    assert up.stats()["samples"] == 4096


def test_a_sidecar_that_dies_is_noticed_and_can_be_restarted():
    tb, _, _, _ = _problem(8)
    w = np.random.default_rng(1).standard_normal(48).astype(np.float32)

    def loss_grad(pooled, labels):
        if labels[0] == 42:  # a crash the trainer cannot catch (segfault, OOM kill, os._exit)
            os._exit(7)
        err = pooled @ w - labels
        return float((err ** 2).mean()), (2 * err[:, None] * w[None, :] / len(err)).astype(np.float32)

    up = lukern.LiveUpdater(tb, loss_grad, batch_size=64, mode="process", pin=False, adapter_kwargs={"capacity": 64})
    rng = np.random.default_rng(2)
    up.record(rng.integers(0, 500, (64, 3)), np.full(64, 42.0))
    up.start()
    t0 = time.monotonic()
    up.flush(timeout=60)  # every sample is accounted for (here: dropped) once the death is noticed
    assert time.monotonic() - t0 < 30  # noticed, not waited out
    st = up.stats()
    assert not st["running"] and "exit code 7" in st["last_error"]
    assert st["dropped"] == 64  # the batch the dead trainer had taken is lost, and counted
    up.stop()  # nothing left to stop: no error
    up.record(rng.integers(0, 500, (128, 3)), rng.random(128))
    with up:  # a fresh sidecar trains what was recorded since
        assert up.flush(timeout=60)
    st = up.stats()
    assert st["samples"] == 128 and st["dropped"] == 64


def test_shared_ring_fence_is_a_real_fence():
    # the sidecar's ring relies on it on Arm / POWER (x86 orders stores anyway); check
    # the instruction, not only that it runs
    import platform

    from numba import njit

    from lukern._kernels._intrinsics import memory_fence
    from lukern._kernels.sched import fence

    fence()

    @njit
    def f():
        memory_fence()

    f()
    assert "fence seq_cst" in f.inspect_llvm()[()]
    if platform.machine() in ("x86_64", "AMD64"):  # LLVM emits mfence or a locked no-op (both full barriers)
        asm = f.inspect_asm()[()]
        assert "mfence" in asm or "\tlock\t" in asm


def test_sidecar_factors_are_adopted_on_the_tables_node():
    from lukern.topology import CpuModel, Node, Topology
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    a, b = allowed[:2]
    # a fake two-node host: the tables (first touched here, node 0 or unknown) belong to node 0 = CPU a
    topo = Topology(nodes=(Node(0, (a,), 1 << 30, (10, 20)), Node(1, (b,), 1 << 30, (20, 10))), caches=(),
                    online_cpus=(a, b), offline_cpus=(), cpu=CpuModel("Fake", (), "x86_64", "test"),
                    numba_version="0", threading_layer="omp")
    tb, _, _, _ = _problem(8)
    w = np.ones(48, np.float32)

    def loss_grad(pooled, labels):
        err = pooled @ w - labels
        return float((err ** 2).mean()), (2 * err[:, None] * w[None, :] / len(err)).astype(np.float32)

    up = lukern.LiveUpdater(tb, loss_grad, batch_size=32, mode="process", pin=True, topology=topo,
                            adapter_kwargs={"capacity": 64}, publish_every=0.01)
    assert up.node == 0 and up.cpus == (a,)
    rng = np.random.default_rng(3)
    up.record(rng.integers(0, 500, (64, 3)), rng.random(64))
    with up:
        assert up.flush(timeout=60)
        # the receiver thread (which allocates the adopted factors' arrays) runs on node 0
        assert os.sched_getaffinity(up._receiver.native_id) == {a}
    assert up.adapters[0].n_active > 0



@pytest.mark.parametrize("restarts", [1, 2])
def test_sidecar_stop_start_keeps_the_optimizer_state(restarts):
    # Adagrad: a sidecar restarted from bare factors would start with empty accumulators
    # and take full-size steps again; thread mode keeps them, the sidecar must too
    rng = np.random.default_rng(4)
    tables = [rng.standard_normal((n, 4)).astype(np.float32) for n in (40, 30)]
    w = np.linspace(-1, 1, 8).astype(np.float32)

    def loss_grad(pooled, labels):
        err = pooled @ w - labels
        return float((err ** 2).mean()), (2 * err[:, None] * w[None, :] / len(err)).astype(np.float32)

    rounds = [[(np.stack([rng.integers(0, 40, 16), rng.integers(0, 30, 16)], 1), rng.standard_normal(16))
               for _ in range(3)] for _ in range(restarts + 1)]
    kw = {"rank": 2, "capacity": 64, "lr_a": 0.2, "lr_b": 0.05}  # row-wise Adagrad on A, Adagrad on B
    out = {}
    for mode in ("thread", "process"):
        up = lukern.LiveUpdater(lukern.TableBatch([t.copy() for t in tables]), loss_grad, batch_size=16, mode=mode,
                                pin=False, qos="cooperative", adapter_kwargs=kw)
        for batches in rounds:
            for ids, y in batches:
                up.record(ids, y)
            with up:
                assert up.flush(timeout=60)
        out[mode] = up
    th, pr = out["thread"], out["process"]
    assert pr.stats()["steps"] == th.stats()["steps"] == 3 * (restarts + 1)
    for a, b in zip(th.adapters, pr.adapters):
        np.testing.assert_allclose(b.dense_delta(), a.dense_delta(), rtol=1e-5, atol=1e-6)
        assert b.step_count == a.step_count and b.scale == a.scale and b.rank == a.rank
        ra, sa = a.active_rows()
        rb, sb = b.active_rows()
        order_a, order_b = np.argsort(ra), np.argsort(rb)
        np.testing.assert_array_equal(ra[order_a], rb[order_b])
        np.testing.assert_allclose(b._state.acc_a[sb][order_b], a._state.acc_a[sa][order_a], rtol=1e-5)
        np.testing.assert_allclose(b._state.acc_b, a._state.acc_b, rtol=1e-5)


def test_spin_wait_returns_when_the_counter_drops_and_gives_up_when_busy():
    import threading
    from lukern._kernels.sched import spin_while_busy
    flight = np.array([2], np.int64)
    assert not spin_while_busy(flight, 1, 1000)  # still busy after 1000 loads: gives up
    assert spin_while_busy(flight, 3, 1)  # 2 < 3: released at once
    # another thread lowers the counter while the kernel spins (it runs without the GIL)
    t = threading.Thread(target=lambda: (time.sleep(0.05), flight.__setitem__(0, 0)))
    t.start()
    assert spin_while_busy(flight, 1, 10**12)
    t.join()


def test_sidecar_pinned_to_given_cpus_trains_and_reports_them():
    cpu = sorted(os.sched_getaffinity(0))[-1]
    tb = lukern.TableBatch([np.zeros((40, 4), np.float32), np.zeros((30, 4), np.float32)])
    w = np.ones(8, np.float32)

    def loss_grad(pooled, labels):
        err = pooled @ w - labels
        return float((err ** 2).mean()), (2 * err[:, None] * w[None, :] / len(err)).astype(np.float32)

    up = lukern.LiveUpdater(tb, loss_grad, batch_size=8, mode="process", cpus=[cpu], batch_wait=0.0)
    rng = np.random.default_rng(0)
    with up:
        up.record(np.stack([rng.integers(0, 30, 20), rng.integers(0, 30, 20)], 1), np.ones(20))
        assert up.flush(timeout=60)
    st = up.stats()
    assert st["cpus"] == (cpu,) and st["samples"] == 20 and st["steps"] == 3
    with pytest.raises(ValueError, match="cpus"):
        lukern.LiveUpdater(tb, loss_grad, cpus=[])
    with pytest.raises(ValueError, match="cpus"):
        lukern.LiveUpdater(tb, loss_grad, cpus=[10_000])


def _staging_updater(**kw):
    from lukern.sched import LiveUpdater
    rng = np.random.default_rng(3)
    tables = lukern.TableBatch([rng.standard_normal((n, 4)).astype(np.float32) for n in (40, 30, 20)])
    w = np.linspace(-1, 1, 12).astype(np.float32)

    def loss_grad(pooled, labels):
        err = pooled @ w - labels
        return float((err ** 2).mean()), (2 * err[:, None] * w[None, :] / len(err)).astype(np.float32)

    return LiveUpdater(tables, loss_grad, mode="process", pin=False, qos="cooperative", batch_size=16,
                       record_pooled=True, batch_wait=0.0,
                       adapter_kwargs={"rank": 2, "capacity": 64, "optimizer_a": "sgd", "optimizer_b": "sgd",
                                       "lr_a": 0.1, "lr_b": 0.01}, **kw)


def _requests(up, n_req=6, n=16):
    rng = np.random.default_rng(4)
    out = []
    for _ in range(n_req):
        ids = np.stack([rng.integers(0, r, n) for r in (40, 30, 20)], axis=1)
        idx = np.ascontiguousarray(ids.T).reshape(-1)
        out.append((ids, idx, np.arange(idx.size + 1), rng.standard_normal(n)))
    return out


def test_out_buffers_train_the_same_as_copied_pooled():
    # the trainer reads staged rows in place: the same steps as with the rows copied
    results = []
    for staged in (False, True):
        up = _staging_updater(**({"out_buffers": 4, "out_rows": 16} if staged else {}))
        with up:
            for ids, idx, off, y in _requests(up):
                buf = up.out_buffer(len(y))
                assert (buf is not None) == staged
                pooled = up.tables.lookup(idx, off, adapters=up.adapters, out=buf)
                up.record(ids, y, pooled=pooled)
                assert up.flush(timeout=60)
        st = up.stats()
        assert st["samples"] == 96 and st["dropped"] == 0 and st["steps"] == 6
        results.append([a.dense_delta() for a in up.adapters])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_out_buffer_handed_out_again_before_read_drops_its_samples():
    up = _staging_updater(out_buffers=2, out_rows=16)
    reqs = _requests(up, n_req=3)
    for ids, idx, off, y in reqs:  # trainer not running: buffer 0 is handed out again by the third
        buf = up.out_buffer(16)
        up.record(ids, y, pooled=up.tables.lookup(idx, off, out=buf))
    with up:
        assert up.flush(timeout=60)
    st = up.stats()
    assert st["recorded"] == 48 and st["samples"] == 32 and st["dropped"] == 16
    assert up.out_buffer(17) is None  # larger than out_rows: the caller uses its own array


def test_out_buffer_misuse_is_rejected_and_queues_nothing():
    import threading
    up = _staging_updater(out_buffers=2, out_rows=16)
    (ids, idx, off, y), = _requests(up, n_req=1)
    buf = up.out_buffer(16)
    up.record(ids, y, pooled=buf)
    with pytest.raises(ValueError, match="out_buffer"):
        up.record(ids, y, pooled=buf)  # recorded twice
    other = []
    t = threading.Thread(target=lambda: other.append(up.out_buffer(16)))
    t.start()
    t.join()
    with pytest.raises(ValueError, match="out_buffer"):
        up.record(ids, y, pooled=other[0])  # handed to another thread
    assert up.stats()["recorded"] == 16
    with pytest.raises(ValueError, match="out_buffers"):
        _staging_updater(out_buffers=2)  # no out_rows
