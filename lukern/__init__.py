"""lukern: Numba kernels for embedding-bag lookups fused with row-sparse LoRA adapters,
trained next to inference on the same CPU."""

from __future__ import annotations

__version__ = "0.1.0"

from . import memory
from . import profile  # noqa: F401  (installs the tuned-profile hook in lukern.plan)
from .embedding import TableBatch, embedding_bag, warmup
from .lora import Factors, LeastRecentlyUsed, LoRAAdapter, SmallestNorm, load_factors, save_factors
from .memory import empty_table
from .plan import Plan, resolve_plan, thread_limit
from .rank import GatheredRows, GradientWindow, LowRankRows, RankController, probe_rank, randomized_svd
from .sched import LiveUpdater, ServingLoad
from .sharding import AccessCounter, Partition, ShardedTable, partition_rows

__all__ = [
    "AccessCounter",
    "Factors",
    "GatheredRows",
    "GradientWindow",
    "LeastRecentlyUsed",
    "LiveUpdater",
    "LoRAAdapter",
    "LowRankRows",
    "Partition",
    "Plan",
    "RankController",
    "ServingLoad",
    "ShardedTable",
    "SmallestNorm",
    "TableBatch",
    "__version__",
    "embedding_bag",
    "empty_table",
    "load_factors",
    "partition_rows",
    "probe_rank",
    "randomized_svd",
    "resolve_plan",
    "save_factors",
    "thread_limit",
    "warmup",
]
