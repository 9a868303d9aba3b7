"""Scale-out: replicas that learn locally and share compact factors (issue 8).

:func:`merge_factors` merges products, not factors; :class:`FactorExchange` is the
transport-agnostic protocol (:class:`InProcessExchange` in one process,
:class:`lukern.distributed.ray_backend.RayExchange` over Ray); :class:`Replica` is one
inference replica with its co-located trainer and :class:`LocalReplicaSet` N of them in
one process. The Ray backend (``pip install 'lukern[ray]'``) lives in
:mod:`lukern.distributed.ray_backend` and the replay across replicas in
:mod:`lukern.distributed.replay`.
"""

from .exchange import FactorExchange, InProcessExchange, Snapshot
from .merge import MergeResult, merge_factors
from .replica import LocalReplicaSet, Replica

__all__ = ["FactorExchange", "InProcessExchange", "LocalReplicaSet", "MergeResult", "Replica", "Snapshot",
           "merge_factors"]
