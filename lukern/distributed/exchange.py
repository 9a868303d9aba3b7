"""The exchange protocol between replicas, independent of the transport.

A replica *publishes* its compact factors (one :class:`~lukern.Factors` or None per table,
tagged with a version) and *collects* its peers' latest ones. Versions let a replica skip
what it has merged already. :class:`InProcessExchange` keeps them in a dict (tests, one
process); :class:`lukern.distributed.ray_backend.RayExchange` keeps them in a Ray actor.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["FactorExchange", "InProcessExchange"]


class FactorExchange(Protocol):
    def publish(self, replica_id: int, version: int, factors: list) -> None:
        """Store ``factors`` (per table) as the replica's latest, if newer."""

    def collect(self, replica_id: int, seen: dict | None = None) -> dict:
        """Peers' latest ``{replica_id: (version, factors)}``, newer than ``seen``."""

    def forget(self, replica_id: int) -> None:
        """Drop a replica (it died or left)."""


class InProcessExchange:
    """A :class:`FactorExchange` in one process (thread-safe).

    Examples
    --------
    >>> ex = InProcessExchange()
    >>> ex.publish(0, 1, ["f0"]); ex.publish(1, 1, ["f1"])
    >>> ex.collect(0)
    {1: (1, ['f1'])}
    """

    def __init__(self):
        self._latest = {}
        self._lock = threading.Lock()

    def publish(self, replica_id, version, factors):
        with self._lock:
            old = self._latest.get(replica_id)
            if old is None or version > old[0]:
                self._latest[replica_id] = (int(version), list(factors))

    def collect(self, replica_id, seen=None):
        seen = seen or {}
        with self._lock:
            return {rid: vf for rid, vf in self._latest.items()
                    if rid != replica_id and vf[0] > seen.get(rid, -1)}

    def forget(self, replica_id):
        with self._lock:
            self._latest.pop(replica_id, None)
