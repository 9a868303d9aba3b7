"""lukern.sched.qos (the ladder, the resctrl / cgroup writers on fake trees, the real
SCHED_IDLE path) and lukern.sched.placement (NUMA choices on the fake sysfs trees)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from lukern.sched import placement as P
from lukern.sched import qos as Q
from lukern.topology import CpuModel, read_topology

TREES = Path(__file__).parent / "fixtures" / "sysfs"
FAKE_CPU = CpuModel("Fake CPU 9000", ("avx2",), "x86_64", "test")


def fake_resctrl(root, cbm="fff", min_bits="1", mb_min="10", gran="10", domains=(0, 1)):
    (root / "info" / "L3").mkdir(parents=True)
    (root / "info" / "MB").mkdir(parents=True)
    (root / "info" / "L3" / "cbm_mask").write_text(cbm + "\n")
    (root / "info" / "L3" / "min_cbm_bits").write_text(min_bits + "\n")
    (root / "info" / "MB" / "min_bandwidth").write_text(mb_min + "\n")
    (root / "info" / "MB" / "bandwidth_gran").write_text(gran + "\n")
    (root / "schemata").write_text("    L3:" + ";".join(f"{d}={cbm}" for d in domains) + "\n"
                                   "    MB:" + ";".join(f"{d}=100" for d in domains) + "\n")
    (root / "tasks").write_text("")
    return root


def test_resctrl_schemata_sized_from_info(tmp_path):
    root = fake_resctrl(tmp_path)
    assert Q.resctrl_schemata(root) == ["L3:0=007;1=007", "MB:0=10;1=10"]  # 12 ways * 0.25 = 3 ways
    assert Q.resctrl_schemata(root, l3_share=0.0, mb_percent=25) == ["L3:0=001;1=001", "MB:0=30;1=30"]


def test_resctrl_min_cbm_bits_respected(tmp_path):
    root = fake_resctrl(tmp_path, cbm="ff", min_bits="4", domains=(0,))
    assert Q.resctrl_schemata(root)[0] == "L3:0=0f"


def test_resctrl_probe_and_writer_on_fake_tree(tmp_path):
    root = fake_resctrl(tmp_path / "resctrl")
    ladder = Q.probe_ladder(resctrl_root=root, cgroup_root=tmp_path / "none", probe_threads=False)
    lv = ladder.level("resctrl")
    assert lv.usable and "L3:0=007;1=007" in lv.reason
    gdir = Q.apply_resctrl(root, [101, 102], schemata=lv.detail["schemata"])
    assert gdir == root / Q.GROUP_NAME
    # the kernel merges one resource per write; a plain file keeps the last write only
    assert (gdir / "tasks").read_text().split() == ["101", "102"]
    assert (gdir / "schemata").read_text().strip() in lv.detail["schemata"]
    # apply() through the ladder entry
    done = Q.apply(lv, 103)
    assert done["level"] == "resctrl" and (gdir / "tasks").read_text().split() == ["101", "102", "103"]


def test_resctrl_unusable_says_why(tmp_path):
    ladder = Q.probe_ladder(resctrl_root=tmp_path / "missing", cgroup_root=tmp_path / "none", probe_threads=False)
    lv = ladder.level("resctrl")
    assert not lv.usable and "not mounted" in lv.reason
    (tmp_path / "r" / "info").mkdir(parents=True)
    (tmp_path / "r" / "schemata").write_text("")
    lv = Q.probe_ladder(resctrl_root=tmp_path / "r", cgroup_root=tmp_path / "none", probe_threads=False).level("resctrl")
    assert not lv.usable and "neither L3 CAT nor MBA" in lv.reason
    with pytest.raises(ValueError, match="not usable"):
        Q.apply("resctrl", 1, ladder=ladder)


def test_cgroup_v1_and_v2_writers_on_fake_trees(tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.shares").write_text("1024\n")
    lv = Q.probe_ladder(resctrl_root=tmp_path / "x", cgroup_root=v1, probe_threads=False).level("cgroup")
    assert lv.usable and lv.detail["version"] == 1
    lv.detail["parent"] = str(v1 / "cpu")  # the fake tree has no per-process subgroup
    g = Q.apply_cgroup(lv.detail, [7, 8])
    assert (g / "cpu.shares").read_text() == "2\n" and (g / "tasks").read_text().split() == ["7", "8"]

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    g = Q.apply_cgroup({"version": 2, "parent": str(v2)}, [9])
    assert (g / "cgroup.type").read_text() == "threaded\n" and (g / "cpu.idle").read_text() == "1\n"
    assert (g / "cgroup.threads").read_text().split() == ["9"]


def test_cgroup_quota_and_cpuset(tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    g = Q.apply_cgroup({"version": 1, "parent": str(v1)}, [5], cpu_max="20000 100000")
    assert (g / "cpu.cfs_quota_us").read_text() == "20000\n" and (g / "cpu.cfs_period_us").read_text() == "100000\n"
    v2 = tmp_path / "v2"
    v2.mkdir()
    g = Q.apply_cgroup({"version": 2, "parent": str(v2)}, [5], cpu_max="max 100000", cpus=[0, 1, 2, 5])
    assert (g / "cpu.max").read_text() == "max 100000\n" and (g / "cpuset.cpus").read_text() == "0-2,5\n"
    with pytest.raises(ValueError, match="cpu_max"):
        Q.apply_cgroup({"version": 2, "parent": str(tmp_path / "v3")}, [5], cpu_max="fast")
    assert not (tmp_path / "v3").exists()  # validated before anything was created


def test_cgroup_unusable_reasons(tmp_path):
    lv = Q.probe_ladder(resctrl_root=tmp_path, cgroup_root=tmp_path / "none", probe_threads=False).level("cgroup")
    assert not lv.usable and "no cgroup" in lv.reason
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("memory io\n")
    lv = Q.probe_ladder(resctrl_root=tmp_path, cgroup_root=v2, probe_threads=False).level("cgroup")
    assert not lv.usable and "no cpu controller" in lv.reason


def test_ladder_shape_and_description():
    ladder = Q.probe_ladder()
    assert [lv.name for lv in ladder.levels] == list(Q.LEVELS)
    assert all(lv.reason and "\n" not in lv.reason for lv in ladder.levels)
    assert ladder.level("cooperative").usable
    text = ladder.describe()
    assert len(text.splitlines()) == len(Q.LEVELS)
    d = ladder.to_dict()
    assert d["best"] == ladder.best and len(d["levels"]) == 5
    with pytest.raises(KeyError):
        ladder.level("turbo")


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no SCHED_IDLE on this platform")
def test_sched_idle_for_real_on_a_thread():
    if not Q.probe_ladder(resctrl_root="/nonexistent", cgroup_root="/nonexistent").level("sched_idle").usable:
        pytest.skip("this kernel or container refuses SCHED_IDLE")
    seen = {}

    def body():
        tid = threading.get_native_id()
        before = os.sched_getscheduler(tid)
        done = Q.apply("sched_idle", tid)
        seen["during"] = os.sched_getscheduler(tid)
        Q.restore(done)
        seen["after"] = os.sched_getscheduler(tid)
        seen["before"] = before

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["during"] == os.SCHED_IDLE and seen["after"] == seen["before"]
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller was never touched


def test_apply_rejects_unknown_level():
    with pytest.raises(ValueError, match="sched_idle"):
        Q.apply("realtime")


def test_cpu_level_preference():
    lad = Q.Ladder([Q.Level("resctrl", True, "x"), Q.Level("cgroup", True, "x"), Q.Level("sched_idle", False, "x"),
                    Q.Level("nice", True, "x"), Q.Level("cooperative", True, "x")])
    assert Q.cpu_level(lad) == "cgroup"
    lad.levels[2].usable = True
    assert Q.cpu_level(lad) == "sched_idle"


def test_tuner_info_prints_the_ladder():
    from tuning import cli
    ladder, lines = cli._qos()
    assert ladder is not None and lines[0] == "QoS:" and len(lines) == 1 + len(Q.LEVELS)
    assert [lv["name"] for lv in cli._jsonable(ladder)["levels"]] == list(Q.LEVELS)


# --- NUMA placement on fake topologies -------------------------------------------------------

def fake(name):
    return read_topology(TREES / name, cpu=FAKE_CPU, threading_layer="omp")


def test_trainer_node_follows_the_tables():
    topo = fake("two_node_64cpu")
    assert P.trainer_node(topo, [1, 1, 0]) == 1
    assert P.trainer_node(topo, [0, 1]) == 0  # a tie goes to the lower node
    assert P.trainer_node(topo, [None, None]) == 0
    cpus = P.trainer_cpus(topo, 1)
    assert cpus == tuple(range(16, 32)) + tuple(range(48, 64))


def test_memory_only_node_trains_from_the_nearest_cpu_node():
    topo = fake("four_node_memonly")
    mem_only = [n.id for n in topo.nodes if not n.cpus]
    assert mem_only
    for m in mem_only:
        want = min((n.id for n in topo.nodes if n.cpus), key=lambda c: (topo.distance(m, c), c))
        assert P.trainer_node(topo, [m]) == want
    with pytest.raises(ValueError, match="no online CPUs"):
        P.trainer_cpus(topo, mem_only[0])


def test_node_of_array_from_numa_maps(tmp_path):
    a = np.zeros(1024)
    addr = a.__array_interface__["data"][0]
    d = tmp_path / "self"
    d.mkdir()
    (d / "numa_maps").write_text(
        f"{addr - 4096 * 1000:x} default anon=10 N0=10\n"
        f"{addr - 64:x} default anon=300 dirty=300 N0=100 N1=200 kernelpagesize_kB=4\n"
        f"{addr + 4096 * 1000:x} default anon=5 N0=5\n")
    assert P.node_of_array(a, proc_root=tmp_path) == 1
    (d / "numa_maps").write_text(f"{addr - 64:x} default\n")
    assert P.node_of_array(a, proc_root=tmp_path) is None
    assert P.node_of_array(a, proc_root=tmp_path / "none") is None


def test_pinning_and_first_touch_on_this_host():
    topo = read_topology()
    node = P.trainer_node(topo, [P.node_of_array(np.ones(10))])
    cpus = P.trainer_cpus(topo, node)
    seen = {}

    def factory():
        seen["aff"] = os.sched_getaffinity(0)
        return np.ones(8)

    out = P.first_touch(factory, cpus[:1])
    assert out.sum() == 8 and seen["aff"] == {cpus[0]}
    assert os.sched_getaffinity(0) != {cpus[0]} or len(cpus) == 1  # the caller keeps its affinity
    with pytest.raises(ZeroDivisionError):
        P.first_touch(lambda: 1 / 0, cpus)
