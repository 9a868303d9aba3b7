"""``auto``: brute force when the whole space fits the budget, else sampling + descent."""

from __future__ import annotations

from . import register

#: above this many candidates brute force is not considered even with time to spare
BRUTE_FORCE_MAX = 64


@register("auto")
def auto(ctx) -> None:
    from .brute_force import brute_force
    from .random_sample import random_sample

    n = len(ctx.space)
    estimate = ctx.budget.estimate()
    fits = estimate is None or estimate * n <= ctx.budget.remaining()
    ctx.chosen = "brute_force" if n <= BRUTE_FORCE_MAX and fits else "random_sample"
    (brute_force if ctx.chosen == "brute_force" else random_sample)(ctx)
