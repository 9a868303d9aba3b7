"""Search strategies behind a registry (kernel_tuner's layout: one small module each).

A strategy is a function ``strategy(ctx) -> None`` that calls ``ctx.evaluate(candidate)``
until it is done or ``ctx.evaluate`` returns ``None`` (the budget is spent). The
context keeps every trial, so a strategy needs no bookkeeping of its own.

Add one with::

    from lukern_tuning.strategies import register

    @register("my_strategy")
    def my_strategy(ctx):
        for c in ctx.space:
            if ctx.evaluate(c) is None:
                return
"""

from __future__ import annotations

from typing import Callable

__all__ = ["STRATEGIES", "get_strategy", "register"]

STRATEGIES: dict[str, Callable] = {}


def register(name: str):
    """Decorator: make a strategy available as ``--strategy name``."""

    def deco(fn):
        STRATEGIES[name] = fn
        return fn

    return deco


def get_strategy(name: str) -> Callable:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"`strategy` must be one of {sorted(STRATEGIES)}; got {name!r}.") from None


from . import auto, brute_force, random_sample  # noqa: E402,F401  (they register themselves)
