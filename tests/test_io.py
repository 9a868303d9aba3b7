"""Atomic writes: the folder must exist (unless asked to make it) and the file gets the
mode an ordinary write would give it."""

import os
import stat

import numpy as np
import pytest

import lukern
from lukern._io import atomic_write


def test_missing_folder_raises_and_creates_nothing(tmp_path):
    target = tmp_path / "no" / "such" / "u.npz"
    a = lukern.LoRAAdapter(10, 4, rank=2, dtype=np.float64)
    with pytest.raises(FileNotFoundError, match="the folder .*no/such does not exist"):
        lukern.save_factors(target, a.export())
    assert not (tmp_path / "no").exists()
    made = atomic_write(tmp_path / "made" / "x.txt", lambda fh: fh.write("x"), binary=False, make_folder=True)
    assert open(made).read() == "x"


def test_mode_follows_umask_or_the_existing_file(tmp_path):
    old = os.umask(0o027)
    try:
        p = atomic_write(tmp_path / "a.txt", lambda fh: fh.write("1"), binary=False)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640  # not mkstemp's 0600
        os.chmod(p, 0o604)
        atomic_write(p, lambda fh: fh.write("2"), binary=False)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o604 and open(p).read() == "2"
    finally:
        os.umask(old)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = atomic_write(tmp_path / "a.txt", lambda fh: fh.write("old"), binary=False)

    def boom(fh):
        fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom, binary=False)
    assert open(p).read() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]
