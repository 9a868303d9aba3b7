"""The time budget and the context a strategy searches in.

:class:`Budget` answers "may I start one more measurement?": only when the time left
covers the typical cost of one (the median of the costs so far), so a strategy never
starts a measurement it cannot finish. Trials answered from the journal cost nothing.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .space import SearchSpace, candidate_key

__all__ = ["Budget", "SearchContext", "Trial"]


@dataclass
class Trial:
    """One measured (or failed) candidate.

    ``status``: ``ok``; ``wrong`` (ran but disagreed with the numpy reference);
    ``failed`` (raised). Failures are kept in the journal and the report, never dropped.
    """

    params: dict
    plan: dict
    status: str
    median_s: float | None = None
    times: list = field(default_factory=list)
    spread: float | None = None
    error: str | None = None
    cost_s: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_s is not None

    def to_record(self) -> dict:
        return {"params": self.params, "plan": self.plan, "status": self.status, "median_s": self.median_s,
                "spread": self.spread, "n_reps": len(self.times), "times": [round(t, 9) for t in self.times[:64]],
                "error": self.error, "cost_s": round(self.cost_s, 6)}

    @classmethod
    def from_record(cls, rec: dict) -> "Trial":
        return cls(dict(rec["params"]), dict(rec["plan"]), rec["status"], rec.get("median_s"),
                   list(rec.get("times") or []), rec.get("spread"), rec.get("error"), float(rec.get("cost_s") or 0.0),
                   cached=True)


def summarize(times) -> tuple[float | None, float | None]:
    """Median and relative spread (interquartile range / median) of repetition times."""
    if not times:
        return None, None
    med = statistics.median(times)
    if len(times) < 4 or med <= 0:
        return med, None
    q = np.percentile(times, [25, 75])
    return med, float((q[1] - q[0]) / med)


class Budget:
    """Seconds available to a search, measured on ``clock``.

    Parameters
    ----------
    seconds : float
    clock : callable returning seconds (``time.perf_counter``; tests pass a fake clock)
    hint : float, optional
        Expected cost of one measurement before any has been made.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter, hint: float | None = None):
        self.seconds = float(seconds)
        self.clock = clock
        self.start = clock()
        self.hint = hint
        self.costs: list[float] = []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def estimate(self) -> float | None:
        """Typical cost of one measurement: the median so far (compilation makes the first
        ones slow; the median is not fooled by them), else the hint."""
        if self.costs:
            return statistics.median(self.costs)
        return self.hint

    def charge(self, cost: float) -> None:
        self.costs.append(float(cost))

    def allows(self) -> bool:
        left = self.remaining()
        if left <= 0:
            return False
        est = self.estimate()
        return est is None or est <= left


class SearchContext:
    """What a strategy sees: the space, the budget, a seeded rng and ``evaluate``.

    ``measure(candidate) -> Trial`` does the real work (runner, journal); the context
    memoises it per candidate, charges the budget for fresh measurements only, and
    returns ``None`` once the budget refuses another measurement.
    """

    def __init__(self, space: SearchSpace, measure: Callable[[dict], Trial], budget: Budget, rng=None,
                 on_trial: Callable[[Trial], None] | None = None):
        self.space = space
        self._measure = measure
        self.budget = budget
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.trials: dict[str, Trial] = {}
        self.stopped = False
        self.chosen: str | None = None
        self._on_trial = on_trial

    def evaluate(self, candidate: dict) -> Trial | None:
        key = candidate_key(candidate)
        if key in self.trials:
            return self.trials[key]
        if self.stopped or not self.budget.allows():
            self.stopped = True
            return None
        t0 = self.budget.clock()
        trial = self._measure(dict(candidate))
        if not trial.cached:
            self.budget.charge(self.budget.clock() - t0)
        self.trials[key] = trial
        if self._on_trial is not None:
            self._on_trial(trial)
        return trial

    def best(self) -> Trial | None:
        ok = [t for t in self.trials.values() if t.ok]
        return min(ok, key=lambda t: t.median_s) if ok else None
