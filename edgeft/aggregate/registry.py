"""Strategies by name, as a job's ``strategy`` names them."""

from __future__ import annotations

from typing import Mapping

from edgeft.aggregate.base import Strategy
from edgeft.aggregate.fedavg import FedAvg, FedProx
from edgeft.aggregate.fedopt import FedAdagrad, FedAdam, FedYogi
from edgeft.aggregate.options import StrategyOptions, parse_strategy_options
from edgeft.aggregate.privacy import require_accountant
from edgeft.aggregate.robust import Krum, Median, MultiKrum, TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum, "multikrum": MultiKrum,
}


def build_strategy(name: str, options: Mapping[str, object] | StrategyOptions | None = None) -> Strategy:
    """The strategy ``name`` with its options checked (ConfigError names a bad one)."""
    parsed = parse_strategy_options(name, options)
    if parsed.private:
        require_accountant()
    return STRATEGIES[name](parsed)  # type: ignore[call-arg]
