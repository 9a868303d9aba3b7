"""Measuring one candidate plan on one case.

Per candidate: one warm-up call (it compiles what is missing, pages the data in and
starts the threads; its time is discarded) whose output is verified against the numpy
reference from ``lukern.testing``; then timed repetitions until the time share is used
(at least ``min_reps``), each on the next batch of the case's ring of distinct batches,
so that no repetition finds the previous one's rows in the cache. The statistic is the
median. A candidate that raises is ``failed``, one that disagrees with the reference is
``wrong``; both are recorded with the reason and never chosen.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["Case", "Runner"]


@dataclass
class Case:
    """One shape of one kernel family, with data, ready to run.

    ``call(plan, i)`` runs the op with ``plan`` (``n_threads``, ``chunk_size``,
    ``driver`` keyword arguments) on batch ``i % n_batches`` and returns its output;
    ``expected`` is the reference output of batch 0.
    """

    op: str
    label: str
    bucket: tuple
    n_work: int
    n_items: int
    call: Callable[[dict, int], np.ndarray]
    expected: np.ndarray | None
    n_batches: int = 1
    rtol: float = 1e-4
    atol: float = 1e-4
    nbytes: int = 0
    shape: dict = field(default_factory=dict)
    #: further keywords the op's wrapper passes to ``resolve_plan`` (kept in step with
    #: the wrapper by tests/test_tuner.py::test_real_case_bucket_matches_wrapper_and_verifies)
    plan_kwargs: dict = field(default_factory=dict)

    def verify(self, out) -> str | None:
        """None when ``out`` matches the reference, else what is wrong."""
        if self.expected is None:
            return None
        out = np.asarray(out)
        if out.shape != self.expected.shape:
            return f"output shape {out.shape} != reference {self.expected.shape}"
        if not np.allclose(out, self.expected, rtol=self.rtol, atol=self.atol, equal_nan=True):
            err = np.abs(out.astype(np.float64) - self.expected.astype(np.float64))
            return f"max abs error {np.nanmax(err):.3g} vs reference (rtol {self.rtol}, atol {self.atol})"
        return None

    def heuristic_plan(self) -> dict:
        """The plan lukern's wrapper picks without a profile (``resolve_plan`` with the
        profile disabled and no explicit arguments)."""
        from lukern import profile
        from lukern.plan import resolve_plan

        with profile.disabled():
            p = resolve_plan(self.op, self.n_work, bucket=self.bucket, n_items=self.n_items, **self.plan_kwargs)
        return {"n_threads": p.n_threads, "chunk_size": p.chunk_size, "driver": p.driver}


class Runner:
    """Times candidates with ``time.perf_counter``.

    Parameters
    ----------
    min_reps, max_reps : int
        Bounds on timed repetitions per candidate.
    """

    def __init__(self, min_reps: int = 5, max_reps: int = 20000, clock=time.perf_counter):
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.clock = clock

    def measure(self, case: Case, plan: dict, time_s: float) -> tuple[str, list[float], str | None]:
        """``(status, times, error)`` for ``plan`` on ``case`` using about ``time_s``."""
        try:
            out = case.call(plan, 0)  # warm-up: compiles, pages in; time discarded
            problem = case.verify(out)
            if problem is not None:
                return "wrong", [], problem
            times = self._repeat(case, plan, time_s)
        except Exception as exc:  # recorded as a failed candidate, the search goes on
            return "failed", [], f"{type(exc).__name__}: {exc}"
        return "ok", times, None

    def _repeat(self, case, plan, time_s):
        clock = self.clock
        times = []
        gc_was = gc.isenabled()
        gc.disable()  # a collection inside one repetition is noise, not the kernel
        try:
            end = clock() + time_s
            i = 1
            while len(times) < self.max_reps and (len(times) < self.min_reps or clock() < end):
                t0 = clock()
                case.call(plan, i)
                times.append(clock() - t0)
                i += 1
        finally:
            if gc_was:
                gc.enable()
        return times

    def compare(self, case: Case, plan_a: dict, plan_b: dict, time_s: float) -> tuple[list[float], list[float]]:
        """Alternate ``plan_a`` and ``plan_b`` (ABBA order) for about ``time_s`` and return
        both time lists: drifting load on a shared host hits both alike."""
        clock = self.clock
        ta, tb = [], []
        case.call(plan_a, 0)
        case.call(plan_b, 0)
        gc_was = gc.isenabled()
        gc.disable()
        try:
            end = clock() + time_s
            i = 1
            while len(ta) < self.max_reps and (len(ta) < self.min_reps or clock() < end):
                order = ((plan_a, ta), (plan_b, tb)) if i % 2 else ((plan_b, tb), (plan_a, ta))
                for p, sink in order:
                    t0 = clock()
                    case.call(p, i)
                    sink.append(clock() - t0)
                i += 1
        finally:
            if gc_was:
                gc.enable()
        return ta, tb
