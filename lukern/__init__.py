"""lukern: Numba kernels for embedding-bag lookups fused with row-sparse LoRA adapters,
trained next to inference on the same CPU."""

from __future__ import annotations

__version__ = "0.1.0"

from .embedding import TableBatch, embedding_bag, warmup
from . import memory
from .lora import Factors, LeastRecentlyUsed, LoRAAdapter, SmallestNorm, load_factors, save_factors
from .memory import empty_table
from .plan import Plan, resolve_plan, thread_limit
from .sched import LiveUpdater, ServingLoad
from . import profile  # noqa: E402,F401  (installs the tuned-profile hook in lukern.plan)

__all__ = sorted([
    "Factors",
    "LeastRecentlyUsed",
    "LiveUpdater",
    "LoRAAdapter",
    "Plan",
    "ServingLoad",
    "SmallestNorm",
    "load_factors",
    "save_factors",
    "TableBatch",
    "__version__",
    "embedding_bag",
    "empty_table",
    "resolve_plan",
    "thread_limit",
    "warmup",
])
