"""lukern.topology on the three fake sysfs trees and on this host."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lukern import topology as T
from lukern.topology import CpuModel, format_cpulist, parse_cpulist, read_topology

TREES = Path(__file__).parent / "fixtures" / "sysfs"
FAKE_CPU = CpuModel("Fake CPU 9000", ("avx2", "sse4_2"), "x86_64", "test")


def fake(name, **kw):
    kw.setdefault("cpu", FAKE_CPU)
    kw.setdefault("threading_layer", "omp")
    return read_topology(TREES / name, **kw)


@pytest.mark.parametrize("text, cpus", [
    ("0-3,8-11", (0, 1, 2, 3, 8, 9, 10, 11)),
    ("0-3,8-11\n", (0, 1, 2, 3, 8, 9, 10, 11)),
    ("", ()),
    ("\n", ()),
    ("5", (5,)),
    ("0,2,4-5", (0, 2, 4, 5)),
    ("0-7:2", (0, 2, 4, 6)),
    ("3,1,1-2", (1, 2, 3)),
])
def test_parse_cpulist(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("cpus", [(), (0,), (0, 1, 2, 3, 8, 9, 10, 11), (0, 2, 4, 6), tuple(range(64))])
def test_format_cpulist_roundtrip(cpus):
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_one_node_2cpu():
    t = fake("one_node_2cpu")
    assert t.source == "sysfs"
    assert t.node_ids == (0,)
    assert t.cpus_of(0) == (0, 1)
    assert t.online_cpus == (0, 1) and t.offline_cpus == ()
    assert t.nodes[0].mem_total_bytes == 5335252 * 1024
    assert t.nodes[0].distances == (10,)
    assert t.distance(0, 0) == 10
    assert [t.node_of_cpu(c) for c in (0, 1, 2)] == [0, 0, None]
    summary = {c["name"]: c for c in t.cache_summary()}
    assert summary["L1d"]["size_bytes"] == 48 * 1024 and summary["L1d"]["count"] == 2
    assert summary["L2"]["size_bytes"] == 1 << 20 and summary["L2"]["cpus_per_instance"] == 1
    assert summary["L3"]["count"] == 1 and summary["L3"]["cpus_per_instance"] == 2
    assert t.cache_bytes(3) == 32 << 20
    assert t.cache_bytes(1) == 48 * 1024  # data cache, not the 32K instruction cache


def test_two_node_64cpu():
    t = fake("two_node_64cpu")
    assert t.node_ids == (0, 1) and t.n_cpus == 64
    assert t.cpus_of(0) == tuple(range(16)) + tuple(range(32, 48))
    assert t.cpus_of(1) == tuple(range(16, 32)) + tuple(range(48, 64))
    assert t.node_of_cpu(40) == 0 and t.node_of_cpu(17) == 1 and t.node_of_cpu(63) == 1
    assert t.distance(0, 1) == t.distance(1, 0) == 21 and t.distance(1, 1) == 10
    assert t.nodes[1].mem_total_bytes == 64 << 30
    summary = {c["name"]: c for c in t.cache_summary()}
    assert summary["L1d"]["count"] == 32 and summary["L1d"]["cpus_per_instance"] == 2  # SMT siblings
    assert summary["L3"]["count"] == 2 and summary["L3"]["cpus_per_instance"] == 32


def test_four_node_memory_only_offline_and_missing_distance():
    t = fake("four_node_memonly")
    assert t.node_ids == (0, 1, 2, 3)
    assert t.cpus_of(0) == (0, 1, 2, 3, 8, 9, 10, 11)
    assert t.cpus_of(1) == (4, 5, 12, 13)  # 6-7 and 14-15 are offline
    assert t.nodes[1].offline_cpus == (6, 7, 14, 15)
    assert t.offline_cpus == (6, 7, 14, 15) and t.n_cpus == 12
    assert [n.memory_only for n in t.nodes] == [False, False, True, True]
    assert t.cpus_of(2) == () and t.nodes[2].mem_total_bytes == 32 << 30
    assert [n.id for n in t.cpu_nodes] == [0, 1]
    assert t.node_of_cpu(6) is None and t.node_of_cpu(12) == 1
    # node 3 has no distance file: its row comes from the others' columns, itself is 10
    assert t.nodes[3].distances == ()
    assert t.distance(3, 0) == 30 and t.distance(2, 3) == 40 and t.distance(3, 3) == 10
    assert t.distance(0, 2) == 30
    summary = {c["name"]: c for c in t.cache_summary()}
    assert summary["L2"]["count"] == 12  # offline CPUs have no cache directories
    assert summary["L3"]["count"] == 2
    text = t.describe()
    assert "memory only" in text and "no distance file" in text and "offline 6-7,14-15" in text


def test_no_distance_files_at_all_uses_kernel_defaults(tmp_path):
    root = tmp_path / "sys"
    shutil.copytree(TREES / "two_node_64cpu", root)
    for f in root.glob("devices/system/node/node*/distance"):
        f.unlink()
    t = read_topology(root, cpu=FAKE_CPU, threading_layer="omp")
    assert t.distance(0, 1) == 20 and t.distance(0, 0) == 10


def test_no_node_directory_falls_back_to_one_node(tmp_path):
    root = tmp_path / "sys"
    shutil.copytree(TREES / "one_node_2cpu" / "devices" / "system" / "cpu", root / "devices" / "system" / "cpu")
    t = read_topology(root, cpu=FAKE_CPU, threading_layer="omp")
    assert t.source.startswith("fallback")
    assert t.node_ids == (0,) and t.cpus_of(0) == (0, 1)


def test_bad_sysfs_root_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="sysfs_root"):
        read_topology(tmp_path / "nope", cpu=FAKE_CPU)


def test_unknown_node_is_a_clear_error():
    with pytest.raises(ValueError, match="node_id"):
        fake("one_node_2cpu").cpus_of(7)


def test_fingerprint_stable_and_sensitive(tmp_path):
    fps = {name: fake(name).fingerprint() for name in ("one_node_2cpu", "two_node_64cpu", "four_node_memonly")}
    assert len(set(fps.values())) == 3
    assert all(len(f) == 16 and int(f, 16) >= 0 for f in fps.values())
    assert fake("two_node_64cpu").fingerprint() == fps["two_node_64cpu"]
    # memory moves on VMs with hot-plugged memory: not part of the identity
    root = tmp_path / "sys"
    shutil.copytree(TREES / "one_node_2cpu", root)
    (root / "devices/system/node/node0/meminfo").write_text("Node 0 MemTotal:       7563476 kB\n")
    assert read_topology(root, cpu=FAKE_CPU, threading_layer="omp").fingerprint() == fps["one_node_2cpu"]
    # what changes the fastest plan does change it
    assert fake("one_node_2cpu", threading_layer="tbb").fingerprint() != fps["one_node_2cpu"]
    other_cpu = CpuModel("Fake CPU 9000", ("avx2", "avx512f", "sse4_2"), "x86_64", "test")
    assert fake("one_node_2cpu", cpu=other_cpu).fingerprint() != fps["one_node_2cpu"]
    (root / "devices/system/cpu/online").write_text("0\n")
    assert read_topology(root, cpu=FAKE_CPU, threading_layer="omp").fingerprint() != fps["one_node_2cpu"]


def test_to_dict_is_json_ready():
    import json

    d = fake("four_node_memonly").to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["nodes"][2]["memory_only"] and d["offline_cpus"] == "6-7,14-15"


def test_cpu_model_is_cached_on_disk(tmp_path, monkeypatch):
    calls = []

    def query():
        calls.append(1)
        return CpuModel("Disk Cached CPU", ("sse2",), "x86_64", "py-cpuinfo")

    monkeypatch.setattr(T, "CPUINFO_CACHE", tmp_path / "cpuinfo.json")
    monkeypatch.setattr(T, "_query_cpuinfo", query)
    monkeypatch.setattr(T, "_cpu_memo", {})
    assert T.cpu_model().brand == "Disk Cached CPU"
    T._cpu_memo.clear()  # a new process: memory cache empty, disk cache present
    assert T.cpu_model().brand == "Disk Cached CPU"
    assert len(calls) == 1
    (tmp_path / "cpuinfo.json").write_text("{not json")
    T._cpu_memo.clear()
    assert T.cpu_model().flags == ("sse2",) and len(calls) == 2  # a broken cache is re-made


def test_predicted_threading_layer_follows_numba_rules(monkeypatch):
    import numba

    monkeypatch.setattr(T, "_active_threading_layer", lambda: "default")
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "workqueue")
    assert T.predicted_threading_layer() == "workqueue"
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "default")
    monkeypatch.setattr(T, "_layer_loads", lambda name: name == "omp")
    assert T.predicted_threading_layer() == "omp"
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "safe")
    assert T.predicted_threading_layer() == "none"  # only tbb qualifies and it does not load


def test_this_host():
    t = read_topology()
    assert t is read_topology()  # read once per process
    assert t.n_cpus >= 1 and t.cpu_nodes
    assert all(t.node_of_cpu(c) is not None for c in t.online_cpus)
    assert t.threading_layer in ("tbb", "omp", "workqueue", "none")
    assert t.fingerprint() == read_topology().fingerprint()
