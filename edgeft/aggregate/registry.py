"""Strategies by name, as a job's ``strategy`` names them: built from the strategy classes (their ``name``,
``options``, ``mean`` and ``mixed_ranks``), so each fact about a strategy is written once, on its class."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from edgeft.aggregate.base import Strategy
from edgeft.aggregate.fedavg import FedAvg, FedProx
from edgeft.aggregate.fedopt import FedAdagrad, FedAdam, FedYogi
from edgeft.aggregate.options import StrategyOptions
from edgeft.aggregate.privacy import require_accountant
from edgeft.aggregate.robust import Krum, Median, MultiKrum, TrimmedMean
from edgeft.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, Median, TrimmedMean, Krum, MultiKrum)}
STRATEGY_NAMES = tuple(STRATEGIES)
MEAN_STRATEGIES = tuple(name for name, cls in STRATEGIES.items() if cls.mean)
MIXED_RANK_STRATEGIES = tuple(name for name, cls in STRATEGIES.items() if cls.mixed_ranks)


def strategies_taking(option: str) -> tuple[str, ...]:
    return tuple(name for name, cls in STRATEGIES.items() if option in cls.options)


def parse_strategy_options(strategy: str, raw: Mapping[str, object] | StrategyOptions | None) -> StrategyOptions:
    """``[job.strategy_options]`` for ``strategy`` as typed options; ConfigError names a bad, unknown or
    misplaced key."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"invalid job.strategy={strategy!r}: expected one of {', '.join(STRATEGY_NAMES)}")
    if isinstance(raw, StrategyOptions):
        given = {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)
                 if getattr(raw, f.name) != f.default}
    else:
        given = dict(raw or {})
    known = {f.name for f in dataclasses.fields(StrategyOptions)}
    own = [f.name for f in dataclasses.fields(StrategyOptions) if f.name in STRATEGIES[strategy].options]
    for key in given:
        if key not in known:
            raise ConfigError(f"unknown job.strategy_options.{key}; strategy {strategy!r} takes "
                              f"{', '.join(own) or 'no options'}")
        if key not in STRATEGIES[strategy].options:
            raise ConfigError(f"job.strategy_options.{key} does not apply to strategy {strategy!r} (it is an "
                              f"option of {', '.join(strategies_taking(key))}); {strategy!r} takes "
                              f"{', '.join(own) or 'none'}")
    if isinstance(raw, StrategyOptions):
        return raw
    return StrategyOptions(**given)  # type: ignore[arg-type]


def build_strategy(name: str, options: Mapping[str, object] | StrategyOptions | None = None) -> Strategy:
    """The strategy ``name`` with its options checked (ConfigError names a bad one)."""
    parsed = parse_strategy_options(name, options)
    if parsed.private:
        require_accountant()
    return STRATEGIES[name](parsed)  # type: ignore[call-arg]
