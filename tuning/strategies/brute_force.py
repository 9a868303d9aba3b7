"""Brute force: every candidate in the space's order, until done or out of budget."""

from __future__ import annotations

from . import register


@register("brute_force")
def brute_force(ctx) -> None:
    for candidate in ctx.space:
        if ctx.evaluate(candidate) is None:
            return
