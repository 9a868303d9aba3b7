"""Random sampling, then coordinate descent from the best sample.

The sample (a quarter of the space, at least ``MIN_SAMPLES``) finds the right region
cheaply; coordinate descent then tries the adjacent value of one parameter at a time
from the current best and moves whenever that is faster, until a full sweep over all
parameters brings no improvement or the budget is spent.
"""

from __future__ import annotations

from . import register

SAMPLE_FRACTION = 0.25
MIN_SAMPLES = 4


@register("random_sample")
def random_sample(ctx) -> None:
    candidates = list(ctx.space)
    if not candidates:
        return
    n = min(len(candidates), max(MIN_SAMPLES, int(SAMPLE_FRACTION * len(candidates))))
    for i in ctx.rng.permutation(len(candidates))[:n]:
        if ctx.evaluate(candidates[int(i)]) is None:
            return
    current = ctx.best()
    if current is None:  # every sample failed: nothing to descend from
        return
    improved = True
    while improved:
        improved = False
        for name in ctx.space.params:
            for neighbour in ctx.space.neighbours(current.params, name):
                trial = ctx.evaluate(neighbour)
                if trial is None:
                    return
                if trial.ok and trial.median_s < current.median_s:
                    current, improved = trial, True
