"""``LUKERN_*`` environment variables, read once at import.

=========================  ==========================================================
variable                   meaning
=========================  ==========================================================
``LUKERN_PROFILE``         path of the tuned profile JSON (default: user cache dir)
``LUKERN_NUM_THREADS``     default thread cap for lukern's own kernels
``LUKERN_NO_PROFILE``      ``1``: ignore any tuned profile, use built-in heuristics
``LUKERN_DATA``            folder of the shared click logs (default ``../shared/data``)
``LUKERN_DRIVER``          default parallel driver of the serving path: ``prange``
                           (numba's pool, the default) or ``threads`` (lukern's own
                           worker threads: fork-safe on every numba threading layer)
=========================  ==========================================================
"""

from __future__ import annotations

import os

__all__ = ["DATA_DIR", "DRIVER", "NO_PROFILE", "NUM_THREADS", "PROFILE_PATH"]


def _int_env(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {raw!r}") from None
    if value < 1:
        raise ValueError(f"environment variable {name} must be >= 1; got {value}")
    return value


PROFILE_PATH: str | None = os.environ.get("LUKERN_PROFILE") or None
NUM_THREADS: int | None = _int_env("LUKERN_NUM_THREADS", None)
NO_PROFILE: bool = os.environ.get("LUKERN_NO_PROFILE", "") not in ("", "0")
DATA_DIR: str | None = os.environ.get("LUKERN_DATA") or None
DRIVER: str | None = os.environ.get("LUKERN_DRIVER") or None
if DRIVER is not None and DRIVER not in ("prange", "threads", "serial"):
    raise ValueError(f"environment variable LUKERN_DRIVER must be 'prange', 'threads' or 'serial'; got {DRIVER!r}")
