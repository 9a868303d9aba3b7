"""Scale-out: replicas that learn locally and share compact factors (issue 8).

``merge_factors`` merges products, not factors; ``FactorExchange`` is the transport-agnostic
protocol with :class:`InProcessExchange` for one process and a Ray implementation in
:mod:`lukern.distributed.ray_backend` (``pip install 'lukern[ray]'``).
"""

from .exchange import FactorExchange, InProcessExchange
from .merge import MergeResult, merge_factors
from .replica import Replica

__all__ = ["FactorExchange", "InProcessExchange", "MergeResult", "Replica", "merge_factors"]
