"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_write"]


def _new_file_mode(path: str) -> int:
    """The mode an ordinary ``open(path, "w")`` would give: the existing file's, else
    0o666 minus the umask (read from /proc, as setting the umask to read it is not
    thread-safe; 0o644 where /proc does not say)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write(path, write, *, binary: bool = True, make_folder: bool = False) -> str:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, flush and fsync it,
    rename it over ``path`` and fsync the folder (so the rename itself is durable).
    On any error the temporary file is removed and ``path`` is left as it was. The file
    gets the mode a plain write would give it (not the temporary file's 0600). A missing
    folder raises FileNotFoundError unless ``make_folder``. Returns the path as a string."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if make_folder:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist. Create it first "
                                f"(os.makedirs) or check the path.")
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path
