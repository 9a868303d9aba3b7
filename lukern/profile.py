"""Tuned profiles: the JSON that ``lukern-tune`` writes and every kernel call reads.

lukern only *reads* profiles (the tuner, ``lukern_tuning``, writes them through
:func:`write_profile`). Importing this module installs :func:`lookup` as
:data:`lukern.plan.profile_lookup`, so :func:`lukern.plan.resolve_plan` asks it for a
plan when neither the caller nor the scheduler fixed one:

1. the exact shape bucket of the call, else
2. the nearest tuned bucket of the same op (same dtype first), else
3. the op's best plan overall, else ``None`` (built-in heuristics).

Every answer is memoised per ``(op, bucket)``, so a call costs one dict lookup.

Where the profile lives: ``LUKERN_PROFILE`` if set, else ``profile.json`` in the user
cache dir (``platformdirs.user_cache_dir("lukern")``). ``LUKERN_NO_PROFILE=1`` ignores
it. A profile tuned on another host (a different :meth:`Topology.fingerprint`) or one
that cannot be read is ignored with ONE :class:`ProfileWarning` per process. A missing
file at the default location is silent: most users never tune, and heuristics are the
documented default. A missing file that ``LUKERN_PROFILE`` names explicitly warns.

Format (version 1)::

    {"format": "lukern-profile", "version": 1, "fingerprint": "<16 hex>",
     "host": {...}, "created": "...", "lukern_version": "...",
     "ops": {"<op>": {"bucket_axes": ["dtype", "d", "log2_pooling", "log2_bags"],
                      "best": {"n_threads": 2, "chunk_size": 64, "driver": "prange"},
                      "buckets": [{"bucket": ["float32", 64, 4, 11],
                                   "plan": {...}, ...measurements...}]}}}

Examples
--------
>>> from lukern import profile
>>> index = profile.ProfileIndex({"format": "lukern-profile", "version": 1, "fingerprint": "x",
...     "ops": {"embedding_bag": {"bucket_axes": ["dtype", "d", "log2_pooling", "log2_bags"],
...         "best": {"n_threads": 2, "chunk_size": 256, "driver": "prange"},
...         "buckets": [{"bucket": ["float32", 64, 4, 11],
...                      "plan": {"n_threads": 1, "chunk_size": 64, "driver": "serial"}}]}}})
>>> index.lookup("embedding_bag", ("float32", 64, 4, 11))
(1, 64, 'serial', 'profile exact bucket')
>>> index.lookup("embedding_bag", ("float32", 64, 4, 12))[3]
"profile nearest bucket ('float32', 64, 4, 11)"
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import warnings
from pathlib import Path

from . import _config, plan
from ._io import atomic_write

__all__ = [
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "ProfileError",
    "ProfileIndex",
    "ProfileWarning",
    "active_profile",
    "default_profile_path",
    "disabled",
    "lookup",
    "read_profile",
    "status",
    "use_profile",
    "write_profile",
]

PROFILE_FORMAT = "lukern-profile"
PROFILE_VERSION = 1
_DRIVERS = ("serial", "threads", "prange")
#: cost of a dtype (or any string axis) mismatch when looking for the nearest bucket:
#: larger than any realistic sum of size differences, so same-dtype buckets win
_STRING_MISMATCH = 1000.0
_MEMO_MAX = 4096


class ProfileWarning(UserWarning):
    """A tuned profile exists but is not used (foreign host, unreadable, missing)."""


class ProfileError(ValueError):
    """A profile file is not a valid lukern profile."""


def default_profile_path() -> Path:
    """``LUKERN_PROFILE`` if set, else ``<user cache dir>/lukern/profile.json``."""
    if _config.PROFILE_PATH:
        return Path(_config.PROFILE_PATH).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lukern")) / "profile.json"


# -- reading and writing -------------------------------------------------------------------

def _check_plan(where: str, p) -> dict:
    if not isinstance(p, dict):
        raise ProfileError(f"{where} must be an object with n_threads, chunk_size, driver; got {p!r}.")
    try:
        nt, cs, drv = int(p["n_threads"]), int(p["chunk_size"]), str(p["driver"])
    except (KeyError, TypeError, ValueError):
        raise ProfileError(f"{where} must hold integer n_threads and chunk_size and a driver; got {p!r}.") from None
    if nt < 1 or cs < 1 or drv not in _DRIVERS:
        raise ProfileError(f"{where} needs n_threads >= 1, chunk_size >= 1, driver in {_DRIVERS}; got {p!r}.")
    return {"n_threads": nt, "chunk_size": cs, "driver": drv}


def validate_profile(profile) -> dict:
    """Check the structure of a profile dict; return it. Raises :class:`ProfileError`."""
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"not a lukern profile: expected \"format\": \"{PROFILE_FORMAT}\".")
    if profile.get("version") != PROFILE_VERSION:
        raise ProfileError(f"profile version {profile.get('version')!r} is not supported (this lukern reads "
                           f"version {PROFILE_VERSION}); re-run lukern-tune.")
    if not isinstance(profile.get("fingerprint"), str):
        raise ProfileError("profile has no host \"fingerprint\" string.")
    ops = profile.get("ops")
    if not isinstance(ops, dict):
        raise ProfileError("profile \"ops\" must be an object keyed by op name.")
    for op, entry in ops.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("buckets", []), list):
            raise ProfileError(f"profile ops[{op!r}] must be an object with a \"buckets\" list.")
        if entry.get("best") is not None:
            _check_plan(f"ops[{op!r}].best", entry["best"])
        for i, b in enumerate(entry.get("buckets", [])):
            if not isinstance(b, dict) or not isinstance(b.get("bucket"), list):
                raise ProfileError(f"ops[{op!r}].buckets[{i}] must be an object with a \"bucket\" list.")
            _check_plan(f"ops[{op!r}].buckets[{i}].plan", b.get("plan"))
    return profile


def read_profile(path) -> dict:
    """Load and validate a profile file. Raises ``OSError`` or :class:`ProfileError`."""
    path = Path(path)
    try:
        profile = json.loads(path.read_text())
    except ValueError as exc:
        raise ProfileError(f"{path} is not valid JSON ({exc}); re-run lukern-tune or delete it.") from None
    try:
        return validate_profile(profile)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def write_profile(profile: dict, path=None) -> Path:
    """Write ``profile`` atomically: a temporary file in the same folder, fsync, rename.

    A reader sees the old profile or the new one, never half a file. Returns the path
    (``default_profile_path()`` when ``path`` is None).
    """
    validate_profile(profile)
    path = Path(path) if path is not None else default_profile_path()
    text = json.dumps(profile, indent=1, sort_keys=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False, make_folder=True)  # the cache folder
    if str(path) == str(_current_path()):
        _reset()
    return path


# -- the index -------------------------------------------------------------------------------

def _as_key(bucket) -> tuple:
    return tuple(bucket)


def _axis_distance(axis: str, a, b) -> float:
    if isinstance(a, str) or isinstance(b, str):
        return 0.0 if a == b else _STRING_MISMATCH
    a, b = float(a), float(b)
    if axis.startswith("log2_"):  # already on a log scale
        return abs(a - b)
    if a > 0 and b > 0:  # raw sizes (such as d): compare their ratio
        return abs(math.log2(a) - math.log2(b))
    return abs(a - b)


class ProfileIndex:
    """A validated profile arranged for O(1) plan lookups (memoised per bucket)."""

    def __init__(self, profile: dict, origin: str = "<dict>"):
        validate_profile(profile)
        self.profile = profile
        self.origin = origin
        self.fingerprint = profile["fingerprint"]
        self._ops = {}
        for op, entry in profile["ops"].items():
            exact = {}
            for b in entry.get("buckets", []):
                p = _check_plan(op, b["plan"])
                exact[_as_key(b["bucket"])] = (p["n_threads"], p["chunk_size"], p["driver"])
            best = entry.get("best")
            best = (best["n_threads"], best["chunk_size"], best["driver"]) if best else None
            axes = tuple(entry.get("bucket_axes") or ())
            self._ops[op] = (exact, best, axes)
        self._memo: dict = {}

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(self._ops)

    def lookup(self, op: str, bucket) -> tuple | None:
        """``(n_threads, chunk_size, driver, source)`` for a call of ``op`` in ``bucket``,
        or None when the profile knows nothing about ``op``."""
        try:
            return self._memo[(op, bucket)]
        except KeyError:
            pass
        except TypeError:  # unhashable bucket (a list): normalise once
            bucket = _as_key(bucket)
        answer = self._resolve(op, bucket)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        try:
            self._memo[(op, bucket)] = answer
        except TypeError:
            pass
        return answer

    def _resolve(self, op, bucket):
        entry = self._ops.get(op)
        if entry is None:
            return None
        exact, best, axes = entry
        if bucket is not None:
            key = _as_key(bucket) if not isinstance(bucket, tuple) else bucket
            hit = exact.get(key)
            if hit is not None:
                return hit + ("profile exact bucket",)
            near = self._nearest(exact, axes, key)
            if near is not None:
                return exact[near] + (f"profile nearest bucket {near}",)
        if best is not None:
            return best + ("profile op best",)
        return None

    @staticmethod
    def _nearest(exact, axes, key):
        best_key, best_d = None, math.inf
        for k in exact:
            if len(k) != len(key):
                continue
            names = axes if len(axes) == len(k) else ("",) * len(k)
            d = sum(_axis_distance(n, a, b) for n, a, b in zip(names, k, key))
            if d < best_d:
                best_key, best_d = k, d
        return best_key


# -- the active profile (what kernel calls read) -------------------------------------------

_UNLOADED = object()
_lock = threading.Lock()
_active = _UNLOADED          # ProfileIndex, None (no usable profile) or _UNLOADED
_override: Path | None = None
_status: dict = {}
_warned: set = set()
_tls = threading.local()


def _current_path() -> Path:
    return _override if _override is not None else default_profile_path()


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, ProfileWarning, stacklevel=4)


def _load():
    global _active
    with _lock:
        if _active is not _UNLOADED:
            return _active
        path = _current_path()
        explicit = _override is not None or bool(_config.PROFILE_PATH)
        st = {"path": str(path), "exists": path.is_file(), "used": False, "reason": ""}
        index = None
        if _config.NO_PROFILE and _override is None:
            st["reason"] = "LUKERN_NO_PROFILE is set"
        elif not st["exists"]:
            st["reason"] = "no profile file (run lukern-tune)"
            if explicit:
                _warn_once(f"missing:{path}", f"lukern: tuned profile {path} does not exist; using built-in "
                                              "heuristics. Run `lukern-tune` or fix LUKERN_PROFILE.")
        else:
            try:
                index = ProfileIndex(read_profile(path), str(path))
            except (OSError, ProfileError) as exc:
                st["reason"] = f"unreadable: {exc}"
                _warn_once(f"bad:{path}", f"lukern: ignoring tuned profile {path}: {exc}")
            if index is not None:
                from .topology import read_topology

                here = read_topology().fingerprint()
                st["profile_fingerprint"], st["host_fingerprint"] = index.fingerprint, here
                if index.fingerprint != here:
                    host = index.profile.get("host", {})
                    brand = host.get("cpu", {}).get("brand", "?") if isinstance(host, dict) else "?"
                    st["reason"] = "tuned on another host"
                    _warn_once(f"foreign:{path}",
                               f"lukern: ignoring tuned profile {path}: it was tuned on host {index.fingerprint} "
                               f"({brand}), this host is {here}. Using built-in heuristics; run `lukern-tune` "
                               "on this host to tune it.")
                    index = None
                else:
                    st["used"], st["reason"] = True, "fingerprint matches this host"
        _status.clear()
        _status.update(st)
        _active = index
        return index


def _reset() -> None:
    global _active
    with _lock:
        _active = _UNLOADED
        _status.clear()


def lookup(op: str, bucket) -> tuple | None:
    """The :data:`lukern.plan.profile_lookup` hook: ``(n_threads, chunk_size, driver,
    source)`` from the active profile, or None. Loads the profile on first use."""
    if getattr(_tls, "disabled", 0):
        return None
    index = _active
    if index is _UNLOADED:
        index = _load()
    if index is None:
        return None
    return index.lookup(op, bucket)


def active_profile() -> ProfileIndex | None:
    """The profile kernel calls use now (loading it if needed), or None."""
    index = _active
    return _load() if index is _UNLOADED else index


def status() -> dict:
    """Where the active profile comes from and whether it is used, and why."""
    active_profile()
    return dict(_status)


def use_profile(path=None) -> ProfileIndex | None:
    """Use the profile at ``path`` from now on (None: back to the default location),
    reloading it; returns the loaded index or None. Foreign profiles still warn once.

    Examples
    --------
    >>> from lukern import profile
    >>> profile.use_profile("/nonexistent/profile.json") is None  # doctest: +SKIP
    True
    """
    global _override
    with _lock:
        _override = Path(path) if path is not None else None
    _reset()
    return active_profile()


@contextlib.contextmanager
def disabled():
    """Ignore the profile on this thread inside the block (the tuner measures the
    built-in heuristic this way)."""
    _tls.disabled = getattr(_tls, "disabled", 0) + 1
    try:
        yield
    finally:
        _tls.disabled -= 1


plan.profile_lookup = lookup
