"""Kernels generated from source text: numba's SLP switch and a disk-backed loader.

Width-specialised kernels are written as Python source, saved under lukern's cache
folder and imported from there, so numba's ``cache=True`` keeps their machine code
between processes (a cold compile of one set takes ~1.3 s; a cached load a few ms).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading

import numba
from numba.core.compiler_lock import global_compiler_lock

__all__ = ["load_generated", "slp_vectorizer_on", "with_slp"]


@contextlib.contextmanager
def slp_vectorizer_on():
    """LLVM's SLP vectorizer on for compilations inside this block only.

    numba reads ``config.SLP_VECTORIZE`` when it builds each pass pipeline; the switch is
    flipped only while numba's global compiler lock is held, so no other compilation (of
    lukern or of the user) sees it, and numba's global config is restored at once.
    """
    with global_compiler_lock:
        saved = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            numba.config.SLP_VECTORIZE = saved


def with_slp(dispatcher):
    """Make every compilation of ``dispatcher`` (lazy or eager) use the SLP vectorizer."""
    lazy, eager = dispatcher._compile_for_args, dispatcher.compile

    def compile_for_args(*args, **kws):
        with slp_vectorizer_on():
            return lazy(*args, **kws)

    def compile_signature(sig):
        with slp_vectorizer_on():
            return eager(sig)

    dispatcher._compile_for_args = compile_for_args
    dispatcher.compile = compile_signature
    return dispatcher


@functools.lru_cache(maxsize=1)
def _kernels_digest() -> str:
    """Hash of lukern's kernel sources: generated modules import them, and numba's cache
    checks only the generated file's own stamp, so a new lukern gets a new folder."""
    h = hashlib.sha256()
    folder = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:12]


def _cache_dir() -> str | None:
    root = os.environ.get("LUKERN_CACHE_DIR")
    if not root:
        try:
            import platformdirs

            root = platformdirs.user_cache_dir("lukern")
        except ImportError:  # pragma: no cover - platformdirs is a dependency
            return None
    path = os.path.join(root, f"kernels-numba{numba.__version__}-{_kernels_digest()}")
    fresh = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if fresh:
        _prune_old_builds(root, keep=path)
    return path if os.access(path, os.W_OK) else None


#: a cache folder of another lukern or numba build unused for this long is removed when
#: a new build makes its own (each holds ~15 MB of machine code)
_PRUNE_AFTER_S = 14 * 86400


def _prune_old_builds(root: str, keep: str) -> None:
    import shutil
    import time

    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith("kernels-") or path == keep or not os.path.isdir(path):
            continue
        try:
            newest = max((e.stat().st_mtime for e in os.scandir(path)), default=os.stat(path).st_mtime)
            if now - newest > _PRUNE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # another process pruned or uses it: leave it
            continue


def cache_is_cold() -> bool:
    """True when this build has no generated kernels cached yet: its first run compiles
    them (minutes on a small machine), later runs load them in milliseconds."""
    folder = _cache_dir()
    if folder is None:
        return False
    # modules are written on import, machine code (numba's index files) once compiled
    compiled = os.path.join(folder, "__pycache__")
    return not (os.path.isdir(compiled) and any(n.endswith(".nbi") for n in os.listdir(compiled)))


_load_lock = threading.RLock()


def load_generated(name: str, source: str):
    """Import ``source`` as a module named after ``name`` and a hash of the text.

    The file is written atomically once (same text, same name) into the cache folder;
    when that folder is not writable the source is executed in memory, without caching.
    Thread-safe: a second thread asking for the module while the first imports it waits
    (it used to find a half-executed module in ``sys.modules``).
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    modname = f"_lukern_gen_{name}_{digest}"
    module = sys.modules.get(modname)
    if module is not None and getattr(module, "__lukern_loaded__", False):
        return module
    with _load_lock:
        module = sys.modules.get(modname)
        if module is not None and getattr(module, "__lukern_loaded__", False):
            return module
        module = _load(modname, name, source)
        module.__lukern_loaded__ = True
        return module


def _load(modname: str, name: str, source: str):
    folder = _cache_dir()
    if folder is None:
        module = type(sys)(modname)
        exec(compile(source, f"<lukern generated {name}>", "exec"), module.__dict__)
        sys.modules[modname] = module
        return module
    path = os.path.join(folder, modname + ".py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module
