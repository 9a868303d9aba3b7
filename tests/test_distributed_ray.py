"""The Ray backend on a private loopback Ray: start and clean stop, the replicas as
actors (same numbers as in-process), pinning, and a replica killed mid-exchange.

Skipped when ray is not importable."""

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("ray")

from lukern.distributed.ray_backend import RayCluster  # noqa: E402
from lukern.distributed.replay import run_replicated  # noqa: E402
from lukern.replay.runner import ReplayConfig  # noqa: E402
from lukern.replay.synthetic import synthetic_stream  # noqa: E402


def test_cluster_listens_on_loopback_only_and_stops_everything_it_started():
    import ray

    env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    with RayCluster(num_cpus=1) as c:
        assert ray.get(ray.put(41)) + 1 == 42
        assert len(c.node_ids()) == 1
        tmp = c._tmp
        assert os.path.isdir(tmp)
        addrs = c.listening_addresses()
        if importlib.util.find_spec("psutil") is not None:
            # every listening socket of every Ray process is on loopback
            assert addrs and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in addrs), addrs
        started = set(c.processes)
    assert started and not ray.is_initialized()
    assert c.alive_processes() == [] and c.killed == []
    assert not os.path.exists(tmp)
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == env  # the driver's environment is restored


@pytest.fixture(scope="module")
def stream():
    return synthetic_stream(n_events=12_000, seed=2)


@pytest.mark.slow
def test_ray_replicas_match_in_process_and_survive_a_killed_peer(stream):
    """Two replica actors pinned to the node; replica 1 is killed after it published and
    before the merge: replica 0 keeps serving (all of the traffic from then on),
    training and exchanging, and the driver reports the loss. Every Ray process started
    is gone afterwards."""
    cfg = ReplayConfig(windows=3, epochs=1, bootstrap=20)
    ref = run_replicated(stream, cfg, replicas=2, backend="inproc")
    killed = []

    def kill_one(arm, w, rs):
        if arm == "exchanging" and w == 0:
            rs.kill(1)  # published, then dies before merging
            killed.append(1)

    with RayCluster(num_cpus=2) as c:
        r = run_replicated(stream, cfg, replicas=2, backend="ray", pin=c.node_ids(), on_exchange=kill_one)
        node = c.node_ids()[0]
    assert c.alive_processes() == [] and len(c.processes) >= 4

    iso, ex = r["arms"]["isolated"], r["arms"]["exchanging"]
    # the isolated arm is deterministic: the actors compute what the in-process replicas do
    np.testing.assert_allclose(iso["auc"], ref["arms"]["isolated"]["auc"], rtol=0, atol=1e-12)
    assert {s["node"] for s in iso["final"].values()} == {node}
    assert len({s["pid"] for s in iso["final"].values()}) == 2

    assert killed == [1]
    assert [(x["replica"], x["phase"]) for x in ex["lost"]] == [(1, "merge")]
    assert ex["alive"] == [1, 1, 1] and sum(ex["unserved_rows"]) == 0
    assert all(np.isfinite(ex["auc"])) and all(a > 0.5 for a in ex["auc"])
    survivor = ex["final"][0]
    assert survivor["finite"] and survivor["merges"] == 3 and survivor["served"] > r["rows_per_replica"][0]
    # the survivor merged the snapshot its peer had published, or skipped it if it was
    # gone with its owner: either way nothing else
    first = ex["exchanges"][0]
    assert first["replicas"] == 2 and [f["peer"] for f in first["failed"]] in ([], [1])
    assert all(e["bytes_exchanged"] == e["published"] for e in ex["exchanges"][1:])  # alone: nothing to download
