"""The exchange protocol between replicas, independent of the transport.

A replica *publishes* a :class:`Snapshot` of what it learned (per table: the adapter's
compact :class:`~lukern.Factors` and which of those rows its trainer changed since its
last merge), and *collects* its peers' latest snapshots. Every snapshot carries the
publisher's version; a collector passes the versions it has merged already (``seen``)
and gets only newer snapshots, so a stale one (e.g. the last words of a replica that
died) is never merged twice.

Implementations: :class:`InProcessExchange` (a dict behind a lock: tests, threads of one
process) and :class:`lukern.distributed.ray_backend.RayExchange` (a board actor holding
object-store references: replicas fetch each other's snapshots from the object store).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..lora import Factors

__all__ = ["FactorExchange", "InProcessExchange", "Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """What one replica publishes: per table, its factors (or None: no adapter) and a
    packed bit per exported row, set when its trainer changed the row since the
    replica's last merge.

    Examples
    --------
    >>> import numpy as np, lukern
    >>> f = lukern.Factors(np.array([4, 9]), np.ones((2, 1), np.float32), np.ones((1, 8), np.float32), 1.0, 3)
    >>> s = Snapshot.build(0, 1, [f, None], [np.array([True, False]), None])
    >>> s.touched_mask(0).tolist(), s.nbytes
    ([True, False], 73)
    """

    replica_id: int
    version: int
    factors: tuple
    touched: tuple

    @classmethod
    def build(cls, replica_id, version, factors, touched=None) -> "Snapshot":
        """Pack ``touched`` (per table: bool array over the factors' rows, or None for
        "all rows") into bits."""
        factors = tuple(factors)
        if touched is None:
            touched = [None] * len(factors)
        if len(touched) != len(factors):
            raise ValueError(f"`touched` must have one entry per table ({len(factors)}); got {len(touched)}.")
        packed = []
        for t, (f, m) in enumerate(zip(factors, touched)):
            if f is not None and not isinstance(f, Factors):
                raise TypeError(f"`factors[{t}]` must be a lukern.Factors or None; got {type(f).__name__}.")
            if f is None or m is None:
                packed.append(None)
                continue
            m = np.asarray(m)
            if m.dtype != np.bool_ or m.shape != (f.row_ids.size,):
                raise ValueError(f"`touched[{t}]` must be a bool array of length {f.row_ids.size}; "
                                 f"got {m.dtype} {m.shape}.")
            packed.append(np.packbits(m))
        return cls(int(replica_id), int(version), factors, tuple(packed))

    def touched_mask(self, t: int):
        """Bool array over table ``t``'s exported rows (None: every row counts as touched)."""
        f, p = self.factors[t], self.touched[t]
        if f is None or p is None:
            return None
        return np.unpackbits(p, count=f.row_ids.size).astype(bool)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: the factors plus the packed bits."""
        return int(sum(f.nbytes for f in self.factors if f is not None)
                   + sum(p.nbytes for p in self.touched if p is not None))


@runtime_checkable
class FactorExchange(Protocol):
    """Where replicas meet. Implementations must be safe to call from several
    replicas at once."""

    def publish(self, replica_id: int, snapshot: Snapshot) -> None:
        """Store ``snapshot`` as the replica's latest, unless an equal or newer
        version is there already."""

    def collect(self, replica_id: int, seen: dict | None = None) -> dict:
        """``{peer_id: Snapshot}`` of every other replica whose latest version is newer
        than ``seen.get(peer_id, -1)``. Peers whose snapshot cannot be fetched are left
        out and listed in the implementation's ``failed`` attribute."""

    def forget(self, replica_id: int) -> None:
        """Drop a replica (it died or left); its snapshot is no longer collected."""


class InProcessExchange:
    """A :class:`FactorExchange` inside one process (thread-safe; snapshots are shared,
    not copied: they are immutable by contract).

    Examples
    --------
    >>> ex = InProcessExchange()
    >>> ex.publish(0, Snapshot(0, 2, (), ())); ex.publish(1, Snapshot(1, 1, (), ()))
    >>> ex.publish(0, Snapshot(0, 1, (), ()))          # older than what is there: ignored
    >>> {k: s.version for k, s in ex.collect(1).items()}, ex.collect(1, seen={0: 2})
    ({0: 2}, {})
    """

    def __init__(self):
        self._latest: dict[int, Snapshot] = {}
        self._lock = threading.Lock()
        self.failed: list = []

    def publish(self, replica_id, snapshot):
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"`snapshot` must be a lukern.distributed.Snapshot; got {type(snapshot).__name__}.")
        if int(replica_id) != snapshot.replica_id:
            raise ValueError(f"`replica_id` ({replica_id}) must match `snapshot.replica_id` "
                             f"({snapshot.replica_id}).")
        with self._lock:
            old = self._latest.get(snapshot.replica_id)
            if old is None or snapshot.version > old.version:
                self._latest[snapshot.replica_id] = snapshot

    def collect(self, replica_id, seen=None):
        seen = seen or {}
        with self._lock:
            return {rid: s for rid, s in sorted(self._latest.items())
                    if rid != replica_id and s.version > seen.get(rid, -1)}

    def forget(self, replica_id):
        with self._lock:
            self._latest.pop(int(replica_id), None)

    def versions(self) -> dict:
        """``{replica_id: latest version}``."""
        with self._lock:
            return {rid: s.version for rid, s in sorted(self._latest.items())}
