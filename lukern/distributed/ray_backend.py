"""Replicas as Ray actors (``pip install 'lukern[ray]'``): one long-lived actor per replica
holding its model, adapters and trainer; factors exchanged through a board actor.

Ray runs on loopback only here: :class:`RayCluster` starts it with an explicit local
address and no dashboard, and shuts down what it started.
"""

from __future__ import annotations

__all__ = ["RayCluster", "RayExchange", "replica_actor"]


def _ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - exercised where ray is absent
        raise ImportError("the Ray backend needs ray: pip install 'lukern[ray]'") from None
    return ray


class RayCluster:
    """Context manager: a local Ray on 127.0.0.1 (no dashboard), shut down on exit if it
    was started here.

    Examples
    --------
    >>> with RayCluster(num_cpus=2) as ray:          # doctest: +SKIP
    ...     ray.get(ray.put(1))
    1
    """

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = int(num_cpus)
        self._started = False

    def __enter__(self):
        ray = _ray()
        if not ray.is_initialized():
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
            self._started = True
        return ray

    def __exit__(self, *exc):
        if self._started:
            _ray().shutdown()
        return False


_BOARD = None
_ACTOR = None


def _classes():
    """The actor classes, defined once ray is imported (it stays optional)."""
    global _BOARD, _ACTOR
    if _BOARD is None:
        ray = _ray()
        from .exchange import InProcessExchange
        from .replica import Replica

        @ray.remote(num_cpus=0)
        class Board:
            def __init__(self):
                self.ex = InProcessExchange()

            def publish(self, rid, version, factors):
                self.ex.publish(rid, version, factors)

            def collect(self, rid, seen):
                return self.ex.collect(rid, seen)

            def forget(self, rid):
                self.ex.forget(rid)

        @ray.remote(num_cpus=1)
        class ReplicaActor:
            def __init__(self, replica_id, model, strategy_kw):
                self.replica = Replica(replica_id, model, strategy_kw)

            def serve(self, batch):
                return self.replica.serve(batch)

            def exchange(self, board):
                return self.replica.exchange(RayExchange(board))

            def changed_rows(self):
                return self.replica.changed_rows()

            def stats(self):
                s = self.replica.strategy
                return {"served": self.replica.served, "adapter_nbytes": s.adapter_nbytes}

        _BOARD, _ACTOR = Board, ReplicaActor
    return _BOARD, _ACTOR


class RayExchange:
    """A :class:`~lukern.distributed.exchange.FactorExchange` over a board actor."""

    def __init__(self, board=None):
        ray = _ray()
        if board is None:
            board = _classes()[0].remote()
        self.board = board
        self._ray = ray

    def publish(self, replica_id, version, factors):
        self._ray.get(self.board.publish.remote(replica_id, version, factors))

    def collect(self, replica_id, seen=None):
        return self._ray.get(self.board.collect.remote(replica_id, seen or {}))

    def forget(self, replica_id):
        self._ray.get(self.board.forget.remote(replica_id))


def replica_actor(replica_id, model_ref, strategy_kw, *, node_resource: str | None = None):
    """Start one replica actor (optionally pinned to a node through a custom resource)."""
    actor_cls = _classes()[1]
    opts = {"resources": {node_resource: 0.01}} if node_resource else {}
    return actor_cls.options(**opts).remote(replica_id, model_ref, strategy_kw)
