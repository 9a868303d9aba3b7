"""The generated kernels' disk cache: one folder per build, cold-cache detection, and the
removal of other builds' folders once unused for long."""

import os
import time

import numba

from lukern._kernels import _codegen as C


def _fresh_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LUKERN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_cache_is_cold_until_a_kernel_is_compiled(tmp_path, monkeypatch):
    _fresh_root(tmp_path, monkeypatch)
    folder = C._cache_dir()
    assert folder.startswith(str(tmp_path)) and f"numba{numba.__version__}" in folder
    assert C.cache_is_cold()
    # a generated module written (as on import) is not machine code yet
    with open(os.path.join(folder, "_lukern_gen_x.py"), "w") as f:
        f.write("")
    assert C.cache_is_cold()
    os.makedirs(os.path.join(folder, "__pycache__"))
    with open(os.path.join(folder, "__pycache__", "_lukern_gen_x.f-1.py311.nbi"), "w") as f:
        f.write("")
    assert not C.cache_is_cold()


def test_a_new_build_removes_old_unused_builds_only(tmp_path, monkeypatch):
    root = _fresh_root(tmp_path, monkeypatch)
    old, recent, other = root / "kernels-numba0.1-aaaa", root / "kernels-numba0.1-bbbb", root / "profile.json"
    for d in (old, recent):
        d.mkdir()
        (d / "k.py").write_text("")
    other.write_text("{}")
    past = time.time() - C._PRUNE_AFTER_S - 3600
    os.utime(old / "k.py", (past, past))
    os.utime(old, (past, past))
    folder = C._cache_dir()  # this build's folder is new: the prune runs
    assert os.path.isdir(folder)
    assert not old.exists()
    assert recent.exists() and other.exists()
    # an existing folder does not prune again (nothing else is touched)
    past_dir = root / "kernels-numba0.1-cccc"
    past_dir.mkdir()
    os.utime(past_dir, (past, past))
    assert C._cache_dir() == folder and past_dir.exists()
