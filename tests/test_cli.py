"""The lukern command: info and demo (replay has its own tests)."""

import json

from lukern.cli import main


def test_info_prints_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpus"] >= 1 and info["threading_layer"]


def test_demo_prints_a_throughput_table(capsys):
    assert main(["demo", "--rows", "5000", "--dim", "16", "--batch", "64", "--repeats", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["ids", "threads"]
    assert len(out) == 5 and all(line.split()[-1].endswith("x") for line in out[1:])


def test_version(capsys):
    import pytest

    import lukern

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lukern {lukern.__version__}"


def test_replay_help_shows_no_default_for_flags(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(ablation) --qos" in text  # --no-prior-acc: no "(default: True)" that reads as on
    assert "0: early stopping" in text and "(default: 64)" in text  # valued options keep theirs
