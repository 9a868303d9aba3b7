"""Smoke test of the serving benchmark (python -m lukern.bench serving): tiny shapes, no
timing assertions, only that every arm runs, reports and is compared with the baseline."""

import json
import os

import numpy as np
import pytest

from lukern.bench import serving

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the sidecar and hog arms fork")


def test_serving_bench_runs_every_kind_of_arm(capsys):
    code = serving.main(["--duration", "0.4", "--segment", "0.2", "--rows", "2000", "--batch", "32",
                         "--train-batch", "64", "--buffer", "4096", "--probe", "0.3", "--arms",
                         "off,offb,on,onold,onstaged,record,hog,sleepyhog,idle", "--max-others", "-1", "--max-redo", "2", "--quiet-wait", "0.6",
                         "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    by = {a["arm"]: a for a in out["arms"]}
    assert set(by) == {"off", "offb", "on", "onold", "onstaged", "record", "hog", "sleepyhog", "idle"}
    # every round was over the (impossible) quiet threshold: repeated until the budget ran out,
    # and each arm kept one segment per round
    assert out["verdict"]["rounds_repeated"] == 2
    assert by["off"]["requests"] == by["on"]["requests"] == by["hog"]["requests"]
    assert by["record"]["trained"] == 0 and by["record"]["fed"] > 0  # record() only, no trainer
    assert by["on"]["mode"] == "process" and by["on"]["fed"] > 0
    assert 0 <= by["on"]["trained"] <= by["on"]["fed"]
    assert by["idle"]["samples_per_s"] > 0  # at 0 % load the trainer uses the spare CPU
    for arm in ("offb", "on", "onold", "record", "hog", "sleepyhog"):
        for q in ("p50", "p99", "svc50"):
            assert np.isfinite(out["verdict"][f"{arm}_paired_{q}_ratio"]) and out["verdict"][f"{arm}_paired_{q}_ratio"] > 0
    assert {"p50_ratio", "p99_ratio", "trained_share", "paired_bars_met", "on_vs_sleepyhog_paired_p50_ratio"} <= set(out["verdict"])
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _child_of_us(p)]  # hogs and sidecars reaped


def _child_of_us(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[1]) == os.getpid() and fields[0] != "Z"


def test_serving_bench_rejects_unknown_arms_and_bad_placement(capsys):
    assert serving.main(["--duration", "0.2", "--rows", "500", "--batch", "8", "--arms", "off,turbo"]) == 2
    assert "turbo" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--serve-cpu"):
        serving._trainer_cpus("same", None)
    cpu = sorted(os.sched_getaffinity(0))[0]
    assert serving._trainer_cpus("same", cpu) == (cpu,)
    assert cpu not in serving._trainer_cpus("other", cpu) or len(os.sched_getaffinity(0)) == 1
    assert serving._trainer_cpus("auto", cpu) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="placement needs two CPUs")
def test_serving_bench_places_the_trainer_on_or_off_the_serving_cpu(capsys, monkeypatch):
    # --serve-cpu pins the serving threads only: the trainer can then go to the other CPUs
    monkeypatch.setattr(serving, "_SERVE_CPU", None)  # restored after the test
    cpus = sorted(os.sched_getaffinity(0))
    code = serving.main(["--duration", "0.2", "--segment", "0.2", "--rows", "2000", "--batch", "32",
                         "--train-batch", "64", "--buffer", "4096", "--probe", "0.3", "--serve-cpu", str(cpus[0]),
                         "--arms", "off,onsame,onother", "--json"])
    assert code == 0
    by = {a["arm"]: a for a in json.loads(capsys.readouterr().out)["arms"]}
    assert by["onsame"]["cpus"] == [cpus[0]]
    assert by["onother"]["cpus"] and cpus[0] not in by["onother"]["cpus"]
    assert sorted(os.sched_getaffinity(0)) == cpus  # the caller's thread was not pinned
    assert serving._SERVE_CPU == cpus[0]
