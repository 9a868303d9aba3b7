"""lukern's autotuner, installed as ``lukern_tuning`` with the ``lukern-tune`` command.

It imports lukern; lukern never imports it (lukern only reads the profiles it writes,
see :mod:`lukern.profile`). Layout, after kernel_tuner:

- :mod:`.families`: what is tuned (op, shapes, data builder, reference), a registry;
- :mod:`.space`: search spaces (ordered candidates + restrictions), the thread ladder;
- :mod:`.strategies`: ``brute_force``, ``random_sample`` (+ coordinate descent), ``auto``;
- :mod:`.runner`: warm-up, verification, repetitions, medians, interleaved comparison;
- :mod:`.journal`: the append-only, resumable JSONL journal;
- :mod:`.tuner`: the session (budget, choice, confirmation, profile);
- :mod:`.cli`: ``lukern-tune``; :mod:`.report`: the per-bucket report.
"""

from __future__ import annotations

from .families import FAMILIES, Family, Workspace, register
from .journal import Journal, JournalError
from .runner import Case, Runner
from .search import Budget, SearchContext, Trial
from .space import SearchSpace, lookup_space, thread_ladder
from .strategies import STRATEGIES, get_strategy
from .tuner import Tuner, build_profile, select_best

__all__ = sorted([
    "Budget",
    "Case",
    "FAMILIES",
    "Family",
    "Journal",
    "JournalError",
    "Runner",
    "STRATEGIES",
    "SearchContext",
    "SearchSpace",
    "Trial",
    "Tuner",
    "Workspace",
    "build_profile",
    "get_strategy",
    "lookup_space",
    "register",
    "select_best",
    "thread_ladder",
])
