"""lukern.LiveUpdater: lifecycle, the ring, failure handling, concurrency and that the
trainer learns what the numpy reference says it should."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest

import lukern
from lukern.sched import LiveUpdater, ServingLoad

N_ROWS = (40, 30, 20)
D = 4


def make_tables(seed=0):
    rng = np.random.default_rng(seed)
    return lukern.TableBatch([rng.standard_normal((n, D)).astype(np.float32) for n in N_ROWS])


W = np.linspace(-1, 1, len(N_ROWS) * D).astype(np.float32)


def squared_loss(pooled, labels):
    err = pooled @ W - labels
    return float((err ** 2).mean()), (2 * err[:, None] * W[None, :] / len(err)).astype(np.float32)


def ids_batch(rng, n):
    return np.stack([rng.integers(0, r, n) for r in N_ROWS], axis=1)


def updater(**kw):
    kw.setdefault("pin", False)
    kw.setdefault("mode", "thread")  # the logic tests; the sidecar has its own below
    # SCHED_IDLE is tested on its own; here it would only make the tests wait for idle CPU
    # on a loaded machine
    kw.setdefault("qos", "cooperative")
    kw.setdefault("batch_size", 16)
    kw.setdefault("adapter_kwargs", {"rank": 2, "capacity": 16, "optimizer_a": "sgd", "optimizer_b": "sgd",
                                     "lr_a": 0.1, "lr_b": 0.01})
    return LiveUpdater(make_tables(), kw.pop("loss_grad", squared_loss), **kw)


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


def trainer_threads():
    return [t for t in threading.enumerate() if t.name == "lukern-trainer"]


def test_one_step_matches_a_manual_step():
    rng = np.random.default_rng(1)
    ids, y = ids_batch(rng, 16), rng.standard_normal(16)
    up = updater()
    ref = updater()  # same seeds: identical adapters
    up.record(ids, y)
    with up:
        assert up.flush(timeout=30)
    # the reference step by hand with the public adapter API
    idx = np.ascontiguousarray(ids.T).reshape(-1)
    off = np.arange(idx.size + 1)
    pooled = ref.tables.lookup(idx, off, adapters=ref.adapters)
    _, g = squared_loss(pooled, y.astype(np.float32))
    for t, a in enumerate(ref.adapters):
        c0, c1 = ref.col_offsets[t], ref.col_offsets[t + 1]
        a.train_step(ref.tables.tables[t], np.ascontiguousarray(ids[:, t]), np.arange(17), g[:, c0:c1])
    for a, b in zip(up.adapters, ref.adapters):
        np.testing.assert_allclose(a.dense_delta(), b.dense_delta(), rtol=1e-5, atol=1e-7)
    st = up.stats()
    assert st["steps"] == 1 and st["samples"] == 16 and st["recorded"] == 16 and st["pending"] == 0


def test_training_reduces_the_loss():
    rng = np.random.default_rng(2)
    ids = ids_batch(rng, 512)
    y = (rng.standard_normal(512) * 0.1 + 1.0)
    up = updater(batch_size=64)
    idx = np.ascontiguousarray(ids.T).reshape(-1)
    off = np.arange(idx.size + 1)
    before = squared_loss(up.tables.lookup(idx, off, adapters=up.adapters), y)[0]
    with up:
        for _ in range(4):
            up.record(ids, y)
            up.flush(timeout=60)
    after = squared_loss(up.tables.lookup(idx, off, adapters=up.adapters), y)[0]
    assert after < 0.8 * before


def test_ring_drops_oldest_and_counts():
    up = updater(buffer_size=10)
    rng = np.random.default_rng(3)
    a, b = ids_batch(rng, 8), ids_batch(rng, 8)
    up.record(a, np.zeros(8))
    up.record(b, np.ones(8))
    st = up.stats()
    assert st["recorded"] == 16 and st["dropped"] == 6 and st["pending"] == 10
    got = up._pop(10)
    np.testing.assert_array_equal(got["ids"][:, :, 0], np.concatenate([a[6:], b]))
    np.testing.assert_array_equal(got["labels"], [0, 0] + [1] * 8)
    up.record(ids_batch(rng, 25), np.ones(25))  # larger than the ring: the newest 10 kept
    assert up.stats()["dropped"] == 6 + 15 and up.stats()["pending"] == 10


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_record_sheds_while_the_trainer_is_behind(mode):
    # held by pause(), the trainer is behind: past max_backlog unread samples a record is
    # shed (counted as recorded and dropped, nothing copied); the ring keeps what came first
    up = updater(mode=mode, buffer_size=64, max_backlog=32)
    rng = np.random.default_rng(4)
    recs = [(ids_batch(rng, 16), np.full(16, float(k))) for k in range(5)]
    with up:
        up.pause()
        for ids, y in recs:
            up.record(ids, y)
        st = up.stats()
        assert (st["recorded"], st["shed"], st["dropped"], st["pending"]) == (80, 48, 48, 32)
        with pytest.raises(ValueError, match="finite"):  # bad input still raises while shedding
            up.record(recs[0][0], np.full(16, np.nan))
        assert up.stats()["recorded"] == 80
        up.resume()
        assert up.flush(timeout=60)
        assert up.stats()["samples"] == 32  # the first two records, trained
        up.record(*recs[4])  # caught up: recorded again
        assert up.flush(timeout=60)
    st = up.stats()
    assert (st["samples"], st["shed"], st["recorded"]) == (48, 48, 96)


def test_record_longer_than_max_backlog_gets_into_an_empty_ring():
    up = updater(buffer_size=64, max_backlog=16)
    rng = np.random.default_rng(6)
    with up:
        up.pause()
        up.record(ids_batch(rng, 20), np.ones(20))  # past the cap, but nothing is unread
        up.record(ids_batch(rng, 20), np.ones(20))  # shed
        st = up.stats()
        assert (st["pending"], st["shed"], st["recorded"]) == (20, 20, 40)
        up.resume()
        assert up.flush(timeout=60)
    assert up.stats()["samples"] == 20


def test_record_sheds_nothing_without_a_running_trainer_or_with_max_backlog_none():
    rng = np.random.default_rng(5)
    recs = [(ids_batch(rng, 16), np.zeros(16)) for _ in range(5)]
    idle = updater(buffer_size=64, max_backlog=32)  # never started: the ring alone decides
    for ids, y in recs:
        idle.record(ids, y)
    st = idle.stats()
    assert (st["shed"], st["pending"], st["dropped"]) == (0, 64, 16)
    keep = updater(buffer_size=64, max_backlog=None)
    assert keep.max_backlog is None
    with keep:
        keep.pause()
        for ids, y in recs:
            keep.record(ids, y)
        st = keep.stats()
        assert (st["shed"], st["pending"], st["dropped"]) == (0, 64, 16)
        keep.resume()
    assert updater(batch_size=16, buffer_size=100).max_backlog == 100  # "auto": the ring


@pytest.mark.parametrize("bad", [8, 0, 65, "all", True, 2.5])
def test_max_backlog_checked(bad):
    with pytest.raises(ValueError, match=r"`max_backlog` must be 'auto', None or an integer in "
                                         r"\[batch_size, buffer_size\] = \[16, 64\] .*got"):
        updater(batch_size=16, buffer_size=64, max_backlog=bad)


@pytest.mark.parametrize("labels, exc, match", [
    (np.array([0.0, np.nan, 1.0, 0.0]), ValueError, "finite"),
    (np.array([0.0, np.inf, 1.0, 0.0]), ValueError, "finite"),
    (np.zeros(3), ValueError, "shape"),
])
def test_bad_labels_rejected_nothing_queued(labels, exc, match):
    up = updater()
    with pytest.raises(exc, match=match):
        up.record(ids_batch(np.random.default_rng(0), 4), labels)
    assert up.stats()["recorded"] == 0 and up.stats()["pending"] == 0


def test_bad_ids_rejected():
    up = updater()
    ids = ids_batch(np.random.default_rng(0), 4)
    ids[2, 1] = N_ROWS[1]
    with pytest.raises(IndexError, match=r"batch\[:, 1\]"):
        up.record(ids, np.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        up.record(ids[:, :2], np.zeros(4))
    with pytest.raises(TypeError, match="integers"):
        up.record(ids.astype(np.float32), np.zeros(4))
    assert up.stats()["pending"] == 0


def test_record_fields_must_stay_the_same():
    up = updater()
    rng = np.random.default_rng(0)
    up.record(ids_batch(rng, 4), np.zeros(4))
    with pytest.raises(ValueError, match="same fields"):
        up.record(ids_batch(rng, 4), np.zeros(4), extra=np.zeros((4, 2)))


def test_extra_and_pooled_are_handed_over():
    seen = []

    def loss_grad(pooled, labels, extra):
        seen.append((pooled.copy(), extra.copy()))
        return 0.0, np.zeros_like(pooled)

    up = updater(loss_grad=loss_grad)
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((4, len(N_ROWS) * D)).astype(np.float32)
    up.record(ids_batch(rng, 4), np.zeros(4), extra=np.arange(8.0).reshape(4, 2), pooled=pooled)
    with up:
        up.flush(timeout=30)
    np.testing.assert_array_equal(seen[0][0], pooled)  # no second forward: the recorded one
    np.testing.assert_array_equal(seen[0][1], np.arange(8.0).reshape(4, 2))


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_step_reads_the_ring_in_place_and_nothing_overwrites_it(mode, tmp_path):
    # with max_backlog (default) a step gets read-only views of the ring, and records
    # made while it runs are shed rather than written over the samples it is reading
    log_path = tmp_path / "seen.txt"  # written by the loss callback (in the sidecar's process too)

    def loss_grad(pooled, labels, extra):
        first = float(extra.min()), float(extra.max())
        calls = log_path.read_text().count("\n") if log_path.exists() else 0
        if calls == 0:
            time.sleep(1.5)  # the test records a burst meanwhile
        with open(log_path, "a") as f:
            f.write(f"{pooled.flags.writeable} {extra.flags.writeable} {first} {float(extra.min())} "
                    f"{float(extra.max())}\n")
        return 0.0, np.zeros(pooled.shape, np.float32)

    kw = {"extra_width": 2, "record_pooled": True} if mode == "process" else {}
    up = updater(loss_grad=loss_grad, mode=mode, buffer_size=64, batch_size=32, **kw)
    rng = np.random.default_rng(5)
    pooled = rng.standard_normal((32, len(N_ROWS) * D)).astype(np.float32)
    up.record(ids_batch(rng, 32), np.zeros(32), extra=np.full((32, 2), 1.0), pooled=pooled)
    with up:
        assert wait_for(lambda: int(up._ctr[10]) == 32, 30)  # the first step has taken its batch
        for k in range(6):  # 32 in flight + 32 unread fill the ring: every record past the first is shed
            up.record(ids_batch(rng, 32), np.zeros(32), extra=np.full((32, 2), 2.0 + k), pooled=pooled)
        assert up.flush(timeout=60)
    st = up.stats()
    assert st["shed"] == 5 * 32 and st["dropped"] == 5 * 32 and st["samples"] == 64
    lines = log_path.read_text().splitlines()
    assert lines == ["False False (1.0, 1.0) 1.0 1.0", "False False (2.0, 2.0) 2.0 2.0"]


def test_record_sheds_while_requests_wait_and_the_next_batch_is_queued():
    # queued > 0 sheds a record only while the trainer runs and already has a batch
    # waiting; with nothing waiting for the trainer, or nothing queued, it is copied
    rng = np.random.default_rng(6)
    idle = updater(buffer_size=256, batch_size=16)
    for _ in range(3):  # the trainer not running: always copied
        idle.record(ids_batch(rng, 8), np.zeros(8), queued=3)
    assert idle.stats()["shed"] == 0 and idle.stats()["pending"] == 24
    up = updater(buffer_size=256, batch_size=4)  # reserve: 4 batches = 16 samples
    with up:
        up.pause()
        for _ in range(2):  # less than the reserve unread: copied
            up.record(ids_batch(rng, 8), np.zeros(8), queued=3)
        assert up.stats()["shed"] == 0 and up.stats()["pending"] == 16
        up.record(ids_batch(rng, 8), np.zeros(8), queued=2)  # the reserve is queued: shed
        assert up.stats()["shed"] == 8 and up.stats()["pending"] == 16
        up.record(ids_batch(rng, 8), np.zeros(8))  # nobody waits: copied
        assert up.stats()["shed"] == 8 and up.stats()["pending"] == 24
        with pytest.raises(ValueError, match="queued"):
            up.record(ids_batch(rng, 8), np.zeros(8), queued=-1)
        with pytest.raises(TypeError, match="queued"):
            up.record(ids_batch(rng, 8), np.zeros(8), queued=1.5)
        assert up.stats()["recorded"] == 32 and up.stats()["pending"] == 24  # bad calls queued nothing
        up.resume()
        assert up.flush(timeout=30)
    assert up.stats()["samples"] == 24 and up.stats()["dropped"] == 8


def test_loss_callback_that_raises_is_counted_and_adapters_untouched(caplog):
    calls = []

    def bad(pooled, labels):
        calls.append(1)
        raise RuntimeError("model bug")

    up = updater(loss_grad=bad)
    before = [a.dense_delta() for a in up.adapters]
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.ERROR, logger="lukern.sched"):
        with up:
            for _ in range(3):
                up.record(ids_batch(rng, 16), np.zeros(16))
                up.flush(timeout=30)
    st = up.stats()
    assert st["loss_errors"] == 3 and st["steps"] == 0 and len(calls) == 3
    assert "model bug" in up.last_error and "loss_grad raised" in caplog.text
    for a, b in zip(up.adapters, before):
        np.testing.assert_array_equal(a.dense_delta(), b)
        assert a.step_count == 0


@pytest.mark.parametrize("grad", ["nan", "inf", "nan_fortran", "shape"])
def test_bad_gradient_rejected_adapters_untouched(grad):
    def lg(pooled, labels):
        g = np.zeros_like(pooled)
        if grad == "nan":
            g[0, 0] = np.nan
            return 0.0, g
        if grad == "inf":
            g[-1, -1] = -np.inf
            return 0.0, g
        if grad == "nan_fortran":  # not C-contiguous: the check's other path
            g = np.asfortranarray(g)
            g[3, 1] = np.nan
            return 0.0, g
        return 0.0, g[:, :3]

    up = updater(loss_grad=lg)
    up.record(ids_batch(np.random.default_rng(0), 16), np.zeros(16))
    with up:
        up.flush(timeout=30)
    assert up.stats()["rejected"] == 1 and all(a.step_count == 0 for a in up.adapters)


def test_record_from_several_threads():
    up = updater(buffer_size=100_000, batch_size=64)
    per, n_threads = 50, 4

    def feed(seed):
        rng = np.random.default_rng(seed)
        for _ in range(per):
            up.record(ids_batch(rng, 8), np.ones(8))

    with up:
        th = [threading.Thread(target=feed, args=(s,)) for s in range(n_threads)]
        for t in th:
            t.start()
        for t in th:
            t.join()
        assert up.flush(timeout=60)
    st = up.stats()
    assert st["recorded"] == per * n_threads * 8 == st["samples"] and st["dropped"] == 0


def test_start_stop_many_times_without_leaking_threads():
    base = len(threading.enumerate())
    up = updater()
    rng = np.random.default_rng(0)
    for i in range(15):
        up.start()
        up.start()  # idempotent
        assert len(trainer_threads()) == 1 and up.stats()["running"]
        up.record(ids_batch(rng, 4), np.zeros(4))
        up.stop()
        up.stop()  # idempotent
        assert not trainer_threads() and not up.stats()["running"]
    assert len(threading.enumerate()) == base
    with up:  # anything left queued is trained after the next start
        assert up.flush(timeout=30)
    assert up.stats()["samples"] == 60


def test_stop_while_a_step_runs_commits_it():
    entered, release = threading.Event(), threading.Event()

    def slow(pooled, labels):
        entered.set()
        release.wait(5)
        return squared_loss(pooled, labels)

    up = updater(loss_grad=slow)
    up.record(ids_batch(np.random.default_rng(0), 16), np.ones(16))
    up.start()
    assert entered.wait(30)
    stopper = threading.Thread(target=up.stop)
    stopper.start()
    time.sleep(0.05)
    assert stopper.is_alive()  # stop() waits for the step in flight
    release.set()
    stopper.join(10)
    assert not stopper.is_alive() and not trainer_threads()
    assert up.stats()["steps"] == 1 and all(a.step_count == 1 for a in up.adapters)


def test_guard_pauses_while_requests_are_in_flight():
    load = ServingLoad()
    up = updater(load=load)
    rng = np.random.default_rng(0)
    with up:
        with load.request():  # inference busy: the trainer must not step
            up.record(ids_batch(rng, 16), np.ones(16))
            assert wait_for(lambda: up.stats()["pauses"] >= 1)
            time.sleep(0.05)
            assert up.stats()["steps"] == 0
        assert up.flush(timeout=30)
    st = up.stats()
    assert st["steps"] == 1 and st["pauses"] >= 1 and st["paused_s"] > 0


def test_stats_report_qos_and_placement():
    up = updater(pin=True, qos="auto")
    with up:
        st = up.stats()
        assert st["qos"] in ("sched_idle", "cgroup", "nice", "cooperative") and st["threads"] == 1
        assert st["cpus"] and st["node"] is not None
    assert up.stats()["threads"] == 0


def test_constructor_validation():
    with pytest.raises(TypeError, match="loss_grad"):
        LiveUpdater(make_tables(), None)
    with pytest.raises(ValueError, match="qos"):
        LiveUpdater(make_tables(), squared_loss, qos="turbo", pin=False)
    with pytest.raises(ValueError, match="adapters"):
        LiveUpdater(make_tables(), squared_loss, adapters=[None], pin=False)
    with pytest.raises(ValueError, match="batch_size"):
        LiveUpdater(make_tables(), squared_loss, batch_size=0, pin=False)
    with pytest.raises(ValueError, match="pause_wait"):
        LiveUpdater(make_tables(), squared_loss, pause_wait="nap", pin=False)
    with pytest.raises(ValueError, match="breathe_every"):
        LiveUpdater(make_tables(), squared_loss, breathe_every=-1.0, pin=False)


def test_untrained_tables_and_exported_name():
    assert lukern.LiveUpdater is LiveUpdater
    tb = make_tables()
    ad = [lukern.LoRAAdapter(N_ROWS[0], D, rank=2), None, None]
    up = LiveUpdater(tb, squared_loss, adapters=ad, pin=False, batch_size=8)
    assert up.mode == "process"  # the default where fork exists
    up.record(ids_batch(np.random.default_rng(0), 8), np.ones(8))
    with up:
        up.flush(timeout=30)
    assert up.stats()["steps"] == 1 and ad[0].n_active > 0  # the child's factors, adopted here


# --- the sidecar process mode ---------------------------------------------------------------

def test_process_mode_learns_the_same_as_thread_mode():
    rng = np.random.default_rng(5)
    batches = [(ids_batch(rng, 16), rng.standard_normal(16)) for _ in range(4)]
    results = []
    kw = {"rank": 2, "capacity": 64, "optimizer_a": "sgd", "optimizer_b": "sgd", "lr_a": 0.1, "lr_b": 0.01}
    for mode in ("thread", "process"):
        up = updater(mode=mode, adapter_kwargs=kw)  # capacity >= rows: no eviction, no folding
        with up:
            for ids, y in batches:
                up.record(ids, y)
                assert up.flush(timeout=60)
        st = up.stats()
        assert st["steps"] == 4 and st["samples"] == 64 and st["mode"] == mode
        results.append([a.dense_delta() for a in up.adapters])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_process_mode_start_stop_reaps_children_and_counts_errors():
    def bad(pooled, labels):
        raise RuntimeError("model bug")

    up = updater(mode="process", loss_grad=bad)
    pids = []
    rng = np.random.default_rng(0)
    for _ in range(4):
        up.start()
        pids.append(up._pid)
        up.record(ids_batch(rng, 16), np.zeros(16))
        assert up.flush(timeout=60)
        up.stop()
        assert not up.running
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped: no zombies left behind
    st = up.stats()
    assert st["loss_errors"] == 4 and st["steps"] == 0
    assert all(a.step_count == 0 and not a.dense_delta().any() for a in up.adapters)
    assert not trainer_threads() and not [t for t in threading.enumerate() if t.name == "lukern-sidecar-recv"]


@pytest.mark.parametrize("how", [{}, {"pause_wait": "spin", "breathe_every": 0.0}, {"breathe_every": 1e-5}])
def test_process_mode_guard_reads_the_shared_in_flight_counter(how):
    load = ServingLoad()
    up = updater(mode="process", load=load, pause_in_flight=1, **how)
    with up:
        with load.request():
            time.sleep(0.1)  # the child's next guard check (<= 10 ms idle poll) sees it busy
            up.record(ids_batch(np.random.default_rng(0), 16), np.ones(16))
            time.sleep(0.3)  # the child publishes nothing while paused: its counters stay
            assert up.stats()["steps"] == 0 and up.stats()["pending"] == 16
        assert up.flush(timeout=60)
    st = up.stats()
    assert st["steps"] == 1 and st["pauses"] >= 1


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_pause_and_resume(mode):
    up = updater(mode=mode, pause=False)  # holds even with the guard disabled
    rng = np.random.default_rng(0)
    with up:
        up.pause()
        time.sleep(0.05)
        up.record(ids_batch(rng, 16), np.ones(16))
        time.sleep(0.2)
        assert up.stats()["pending"] == 16 and up.stats()["held"]
        up.resume()
        assert up.flush(timeout=60)
    assert up.stats()["steps"] == 1 and not up.stats()["held"]


def test_multi_hot_bags_match_a_manual_step():
    rng = np.random.default_rng(7)
    ids = np.stack([rng.integers(0, r, (16, 3)) for r in N_ROWS], axis=1)  # (n, T, pooling 3)
    y = rng.standard_normal(16)
    up, ref = updater(), updater()
    up.record(ids, y)
    with up:
        assert up.flush(timeout=30)
    idx = np.ascontiguousarray(ids.transpose(1, 0, 2)).reshape(-1)
    off = np.arange(0, idx.size + 1, 3)
    pooled = ref.tables.lookup(idx, off, adapters=ref.adapters)
    _, g = squared_loss(pooled, y.astype(np.float32))
    for t, a in enumerate(ref.adapters):
        c0, c1 = ref.col_offsets[t], ref.col_offsets[t + 1]
        a.train_step(ref.tables.tables[t], np.ascontiguousarray(ids[:, t, :]).reshape(-1), np.arange(0, 49, 3),
                     g[:, c0:c1])
    for a, b in zip(up.adapters, ref.adapters):
        np.testing.assert_allclose(a.dense_delta(), b.dense_delta(), rtol=1e-5, atol=1e-7)


def test_placement_on_a_fake_two_node_topology():
    from pathlib import Path

    from lukern.topology import CpuModel, read_topology
    topo = read_topology(Path(__file__).parent / "fixtures" / "sysfs" / "two_node_64cpu",
                         cpu=CpuModel("Fake", (), "x86_64", "test"), threading_layer="omp")
    up = updater(pin=True, topology=topo)
    # where numa_maps cannot tell (or says node 0), the tables' node is 0: its CPUs
    assert up.node == 0 and up.cpus == topo.cpus_of(0)
    with up:  # pinning to CPUs this host lacks falls back to the allowed ones, training goes on
        up.record(ids_batch(np.random.default_rng(0), 16), np.ones(16))
        assert up.flush(timeout=30)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint32])
def test_first_bad_sample_matches_a_numpy_reference(dtype):
    # the branch-free pass must find exactly what a plain search finds: the first
    # non-finite label, else the first sample/table with an id outside [0, n_rows[t])
    from lukern._kernels.sched import first_bad_sample

    rng = np.random.default_rng(11)
    n_rows = np.array([5, 300, 70], np.int64)

    def reference(ids, y):
        for i in range(len(y)):
            if not np.isfinite(y[i]):
                return 2, i, 0
        for i in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if ((ids[i, t] < 0) | (ids[i, t] >= n_rows[t])).any():
                    return 1, i, t
        return 0, -1, -1

    for trial in range(200):
        n, L = int(rng.integers(1, 40)), int(rng.integers(1, 4))
        ids = np.stack([rng.integers(0, r, (n, L)) for r in n_rows], axis=1)
        y = rng.standard_normal(n)
        for _ in range(int(rng.integers(0, 3))):
            i, t, k = rng.integers(0, n), rng.integers(0, 3), rng.integers(0, L)
            ids[i, t, k] = n_rows[t] + rng.integers(0, 3) if (rng.random() < 0.5 or dtype == np.uint32) else -1
        if rng.random() < 0.2:
            y[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
        got = first_bad_sample(ids.astype(dtype), n_rows, y)
        assert tuple(int(v) for v in got) == reference(ids, y), trial


def test_record_fast_path_matches_the_general_path():
    # record() of a batch in the ring's exact layout runs one kernel (checks, claim,
    # copies, publish); the ring and counters must be what the general path leaves
    rng = np.random.default_rng(5)
    fast, slow = updater(buffer_size=13), updater(buffer_size=13)
    width = len(N_ROWS) * D
    for k in range(6):  # 6 x 5 samples through a 13-slot ring: wraps, overwrites unread ones
        ids, y = ids_batch(rng, 5).astype(np.int64), rng.integers(0, 2, 5).astype(np.float64)
        pooled = rng.standard_normal((5, width)).astype(np.float32)
        used = fast._record_fast(ids, y, None, pooled)
        assert used == (k > 0)  # the first record lays the ring out (general path)
        if not used:
            fast.record(ids, y, pooled=pooled)
        slow.record(ids.astype(np.int32), list(y), pooled=pooled.astype(np.float64))  # general path
    for name in ("ids", "labels", "pooled"):
        np.testing.assert_array_equal(fast._ring[name], slow._ring[name], err_msg=name)
    np.testing.assert_array_equal(fast._ctr, slow._ctr)
    assert fast.stats()["dropped"] == slow.stats()["dropped"] == 30 - 13
    # a bad batch in the fast layout: the general path raises its error, nothing queued
    before = fast._ctr.copy()
    ids = ids_batch(rng, 5).astype(np.int64)
    ids[3, 2] = -1
    assert not fast._record_fast(ids, np.zeros(5), None, np.zeros((5, width), np.float32))
    with pytest.raises(IndexError, match=r"batch\[:, 2\]"):
        fast.record(ids, np.zeros(5), pooled=np.zeros((5, width), np.float32))
    with pytest.raises(ValueError, match="finite"):
        fast.record(ids_batch(rng, 5).astype(np.int64), np.array([0, 1, np.nan, 0, 1.0]),
                    pooled=np.zeros((5, width), np.float32))
    np.testing.assert_array_equal(fast._ctr, before)
    # other layouts are left to the general path
    assert not fast._record_fast(ids_batch(rng, 5).astype(np.int64), np.zeros(5), None, None)  # no pooled
    assert not fast._record_fast(ids_batch(rng, 5).astype(np.int64), np.zeros(5), np.zeros((5, 2)),
                                 np.zeros((5, width), np.float32))  # extra


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 200, 4096 + 37])
def test_stream_copy_matches_numpy_at_every_alignment(n):
    from lukern._kernels.sched import stream_copy
    rng = np.random.default_rng(n)
    src_base = rng.integers(0, 256, n + 64).astype(np.uint8)
    for dst_off in range(0, 64, 5):
        for src_off in (0, 3, 17):
            dst = np.zeros(n + 128, np.uint8)
            src = src_base[src_off:src_off + n]
            stream_copy(dst[dst_off:dst_off + len(src)], src)
            want = np.zeros_like(dst)
            want[dst_off:dst_off + len(src)] = src
            np.testing.assert_array_equal(dst, want, err_msg=f"dst_off={dst_off} src_off={src_off}")


def test_streamed_ring_copy_equals_the_plain_copy(monkeypatch):
    # record()'s large copies use non-temporal stores (lukern.sched.live._copy_rows);
    # every byte of the ring and every counter must be what numpy's copy leaves, through
    # wraparounds at unaligned positions
    import lukern.sched.live as live
    rng = np.random.default_rng(8)
    width = len(N_ROWS) * D
    batches = [(ids_batch(rng, n).astype(np.int64), rng.integers(0, 2, n).astype(np.float64),
                rng.standard_normal((n, width)).astype(np.float32)) for n in (150, 97, 211, 150, 33)]
    rings = {}
    for stream_min in (0, np.iinfo(np.int64).max):
        monkeypatch.setattr(live, "_STREAM_MIN_BYTES", stream_min)
        up = updater(buffer_size=301)
        for ids, y, pooled in batches:
            up.record(ids, y, pooled=pooled)
        rings[stream_min] = up
    streamed, plain = rings.values()
    for name in ("ids", "labels", "pooled"):
        np.testing.assert_array_equal(streamed._ring[name], plain._ring[name], err_msg=name)
    np.testing.assert_array_equal(streamed._ctr, plain._ctr)
    got = streamed._pop(301)  # the newest 301 samples, in order
    np.testing.assert_array_equal(got["pooled"], np.concatenate([b[2] for b in batches])[-301:])


def _serve_once_on(up, cpus):
    """One request reported from a new thread pinned to ``cpus`` (a serving thread)."""
    def run():
        os.sched_setaffinity(0, cpus)
        with up.serving():
            pass
    th = threading.Thread(target=run)
    th.start()
    th.join()


def _sched_idle_works():
    try:
        th_ok = []

        def probe():
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                th_ok.append(True)
            except (OSError, AttributeError):
                th_ok.append(False)
        th = threading.Thread(target=probe)
        th.start()
        th.join()
        return th_ok[0]
    except Exception:
        return False


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not _sched_idle_works(),
                    reason="needs two CPUs and SCHED_IDLE")
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_trainer_follows_pinned_serving_threads(mode):
    cpus = sorted(os.sched_getaffinity(0))
    up = updater(mode=mode, qos="sched_idle", pin=False, publish_every=0.05)

    def trainer_cpus():
        if mode == "process":  # the sidecar's own affinity, as the kernel has it
            return tuple(sorted(os.sched_getaffinity(up._pid)))
        return tuple(up.stats()["cpus"] or ())

    with up:
        assert wait_for(lambda: up.stats()["running"])
        time.sleep(0.2)
        assert trainer_cpus() == tuple(cpus)
        _serve_once_on(up, {cpus[0]})  # serving pinned to one CPU: the trainer joins it there
        assert wait_for(lambda: trainer_cpus() == (cpus[0],))
        if mode == "process":  # so does the thread that adopts the sidecar's factors (at its next message)
            up.pause()
            up.resume()
            recv = up._receiver.native_id
            assert wait_for(lambda: tuple(sorted(os.sched_getaffinity(recv))) == (cpus[0],))
        _serve_once_on(up, {cpus[1]})  # serving spread over every CPU: the trainer's own again
        assert wait_for(lambda: trainer_cpus() == tuple(cpus))
    # explicit CPUs, or a trainer the kernel would not preempt, are never moved
    for kw in ({"cpus": cpus[1:2]}, {"qos": "cooperative"}):
        up = updater(mode="thread", pin=False, **{"qos": "sched_idle", **kw})
        with up:
            _serve_once_on(up, {cpus[0]})
            time.sleep(0.2)
            assert up.stats()["cpus"] == (tuple(cpus[1:2]) if "cpus" in kw else tuple(cpus))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_prior_acc_seeds_admitted_rows(batched, mode):
    # a row admitted into an adapter starts its row-wise Adagrad accumulator from the
    # prior (the model's own history), batched step or not, thread or sidecar
    from lukern.lora_batch import StableLRU

    prior = [np.full(n, 7.0 + t, np.float32) for t, n in enumerate(N_ROWS)]
    prior[1] = None  # a table without a prior starts from 0
    kw = {"rank": 2, "capacity": 64, "lr_a": 0.05, "lr_b": 0.01}  # room for every row
    adapters = [lukern.LoRAAdapter(n, D, eviction=StableLRU(), **kw) for n in N_ROWS]
    up = updater(adapters=adapters, prior_acc=prior, batched=batched, mode=mode, batch_size=64)
    rng = np.random.default_rng(4)
    up.record(ids_batch(rng, 64), rng.standard_normal(64))
    with up:
        assert up.flush(timeout=60)
    for t, a in enumerate(up.adapters):
        rows, acc, _ = a.optimizer_state()
        assert rows.size > 0
        g2 = acc - (0.0 if prior[t] is None else prior[t][rows])
        # one step: the accumulator is the prior plus that step's mean squared gradient
        assert np.all(g2 >= 0) and np.all(g2 < 1.0), (t, acc)
        if prior[t] is not None:
            assert np.all(acc >= 7.0 + t)
        else:
            assert np.all(acc < 1.0)


def test_prior_acc_is_checked():
    with pytest.raises(ValueError, match=r"prior_acc\[1\]"):
        updater(prior_acc=[None, np.zeros(5, np.float32), None])
    with pytest.raises(ValueError, match="one array"):
        updater(prior_acc=[None])
    with pytest.raises(ValueError, match=r"prior_acc\[0\].*float32"):
        updater(prior_acc=[np.zeros(N_ROWS[0]), None, None])
