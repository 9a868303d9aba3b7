"""lukern.sched.load (serving signals, /proc fallbacks on fake trees) and lukern.sched.guard
(fast guard, slow controller) driven by fake clocks: no real time, no timing asserts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lukern.sched.guard import FastGuard, SlowController
from lukern.sched.load import ServingLoad, read_psi_cpu, read_runqueue_wait


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s
        return False


# --- ServingLoad --------------------------------------------------------------------------

def test_request_counts_in_flight_and_latency():
    c = Clock()
    load = ServingLoad(window=4, clock=c)
    with load.request():
        assert load.in_flight == 1 and load.busy()
        c.t += 0.003
    assert load.in_flight == 0 and not load.busy()
    assert load.latencies().tolist() == [pytest.approx(0.003)]


def test_request_that_raises_still_leaves_flight():
    load = ServingLoad()
    with pytest.raises(KeyError):
        with load.request():
            raise KeyError("x")
    assert load.in_flight == 0 and load.n_latencies == 1


def test_latency_ring_keeps_newest_and_percentiles_match_numpy():
    load = ServingLoad(window=100)
    vals = np.arange(1, 251) * 1e-4
    for v in vals:
        load.report_latency(v)
    kept = vals[-100:]
    assert np.array_equal(load.latencies(), kept)
    assert load.p50() == pytest.approx(np.percentile(kept, 50))
    assert load.p99() == pytest.approx(np.percentile(kept, 99))


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_report_latency_rejects_bad_values(bad):
    load = ServingLoad()
    with pytest.raises(ValueError, match="seconds"):
        load.report_latency(bad)
    assert load.n_latencies == 0


def test_concurrent_requests_balance():
    load = ServingLoad()

    def work():
        for _ in range(500):
            with load.request():
                pass

    th = [threading.Thread(target=work) for _ in range(4)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert load.in_flight == 0 and load.n_latencies == 2000


def _fake_proc(root, waits, psi_some=None):
    for tid, w in waits.items():
        d = root / "self" / "task" / str(tid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "schedstat").write_text(f"1000 {w} 7\n")
    if psi_some is not None:
        (root / "pressure").mkdir(exist_ok=True)
        (root / "pressure" / "cpu").write_text(
            f"some avg10=1.00 avg60=0.50 avg300=0.10 total={psi_some}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def test_proc_readers_on_fake_tree(tmp_path):
    _fake_proc(tmp_path, {10: 500, 11: 700, 12: 9000}, psi_some=1234)
    assert read_runqueue_wait(tmp_path, exclude={12}) == (1200, 2)
    assert read_psi_cpu(tmp_path) == {"some": 1234, "full": 0}
    assert read_runqueue_wait(tmp_path / "nope") is None and read_psi_cpu(tmp_path / "nope") is None


def test_fallback_uses_runqueue_wait_of_other_threads(tmp_path):
    c = Clock()
    _fake_proc(tmp_path, {10: 0, 99: 0})
    load = ServingLoad(proc_root=tmp_path, clock=c, poll_interval=0.005, wait_fraction=0.05)
    load.exclude_tids.add(99)  # the trainer's own waiting does not count
    assert not load.busy()  # first poll: a baseline
    c.t += 0.010
    _fake_proc(tmp_path, {10: 100_000, 99: 10_000_000})  # 0.1 ms of 10 ms: 1 %
    assert not load.busy()
    c.t += 0.010
    _fake_proc(tmp_path, {10: 3_100_000, 99: 10_000_000})  # 3 ms of 10 ms: 30 %
    assert load.busy()
    c.t += 0.001  # within the poll interval: the cached answer
    _fake_proc(tmp_path, {10: 3_100_000})
    assert load.busy()


def test_fallback_psi_when_no_schedstat(tmp_path):
    c = Clock()
    _fake_proc(tmp_path, {}, psi_some=1000)
    load = ServingLoad(proc_root=tmp_path, clock=c)
    assert not load.busy()
    c.t += 0.1
    _fake_proc(tmp_path, {}, psi_some=1000 + 50_000)  # 50 ms stalled in 100 ms
    assert load.busy()


def test_serving_reports_win_over_fallback(tmp_path):
    c = Clock()
    _fake_proc(tmp_path, {10: 0})
    load = ServingLoad(proc_root=tmp_path, clock=c, stale_after=1.0)
    load.report_latency(0.001)
    _fake_proc(tmp_path, {10: 10**12})  # the fallback would say busy
    c.t += 0.5
    assert not load.busy()  # the serving stack reported recently and nothing is in flight


# --- FastGuard ----------------------------------------------------------------------------

def test_guard_not_busy_costs_nothing():
    c = Clock()
    g = FastGuard(lambda: False, clock=c, wait=c.sleep)
    assert g.check() == 0.0 and g.pauses == 0


def test_guard_backoff_doubles_and_caps():
    c = Clock()
    waits = []
    busy = iter([True] * 8 + [False])

    def wait(s):
        waits.append(s)
        return c.sleep(s)

    g = FastGuard(lambda: next(busy), min_backoff=1e-3, max_backoff=8e-3, clock=c, wait=wait)
    paused = g.check()
    assert waits == [1e-3, 2e-3, 4e-3, 8e-3, 8e-3, 8e-3, 8e-3, 8e-3]
    assert paused == pytest.approx(sum(waits)) and g.paused_time == pytest.approx(paused) and g.pauses == 1
    # the next episode starts from the minimum again
    busy2 = iter([True, False])
    g.busy = lambda: next(busy2)
    waits.clear()
    g.check()
    assert waits == [1e-3]


def test_guard_disabled_never_pauses():
    g = FastGuard(lambda: True, enabled=False)
    assert g.check() == 0.0


def test_guard_wake_ends_a_pause():
    g = FastGuard(lambda: True, min_backoff=1e-3, max_backoff=1e-3)
    threading.Timer(0.05, g.wake).start()
    g.check()  # returns once woken, although still busy
    assert g.stopping


def test_guard_rejects_bad_backoff():
    with pytest.raises(ValueError, match="backoff"):
        FastGuard(lambda: False, min_backoff=0.0)


# --- SlowController -----------------------------------------------------------------------

def test_controller_backs_off_at_once_and_grows_after_patience():
    c = Clock()
    ctl = SlowController(0.010, period=0.5, patience=3, n_threads=2, max_threads=2, chunk_s=1e-3,
                         max_rate=None, start_rate=100.0, clock=c)
    c.t = 0.2
    k0 = ctl.update(0.0200)  # before the period: nothing moves
    assert (k0.n_threads, k0.chunk_s, k0.max_rate) == (2, 1e-3, None)
    c.t = 0.6
    k = ctl.update(0.0095)  # slack 5 %: back off
    assert (k.n_threads, k.chunk_s, k.max_rate) == (1, 0.5e-3, 50.0)
    for i in range(2):  # slack 50 %, but patience is 3
        c.t += 0.5
        k = ctl.update(0.005)
        assert k.max_rate == 50.0
    c.t += 0.5
    k = ctl.update(0.005)
    assert (k.n_threads, k.max_rate) == (2, 62.5) and k.chunk_s == pytest.approx(0.625e-3)
    assert ctl.backoffs == 1 and ctl.growths == 1


def test_controller_holds_in_the_dead_band_and_resets_patience():
    c = Clock()
    ctl = SlowController(0.010, period=0.1, patience=2, max_rate=40.0, clock=c)
    seq = [0.005, 0.008, 0.005, 0.008]  # good, in band (resets), good, in band
    for p in seq:
        c.t += 0.1
        k = ctl.update(p)
    assert k.max_rate == 40.0 and ctl.growths == 0 and ctl.backoffs == 0


def test_controller_without_target_or_reports_keeps_knobs():
    c = Clock()
    ctl = SlowController(None, clock=c)
    c.t = 5
    assert ctl.update(1.0).max_rate is None
    ctl2 = SlowController(0.01, clock=c)
    c.t = 10
    assert ctl2.update(None).max_rate is None


def test_controller_floors():
    c = Clock()
    ctl = SlowController(0.010, period=0.1, chunk_s=1e-3, min_chunk=0.25e-3, max_rate=4.0, min_rate=1.0, clock=c)
    for _ in range(10):
        c.t += 0.1
        k = ctl.update(0.050)
    assert (k.n_threads, k.chunk_s, k.max_rate) == (1, 0.25e-3, 1.0)


def test_controller_validates():
    with pytest.raises(ValueError, match="target_p99"):
        SlowController(-1.0)
    with pytest.raises(ValueError, match="low < high"):
        SlowController(0.01, low=0.5, high=0.2)
