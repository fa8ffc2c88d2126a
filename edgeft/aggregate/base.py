"""The Strategy interface and client selection."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate


def select_clients(available: Sequence[str], fraction: float, minimum: int, maximum: int | None,
                   rng: np.random.Generator) -> list[str]:
    """Pick ceil(fraction * available) clients, clamped to [minimum, maximum], uniformly at random.

    Raises ConfigError when fewer than ``minimum`` clients are available.
    """
    if len(available) < minimum:
        raise ConfigError(f"{len(available)} clients available, the round needs at least {minimum}")
    count = max(minimum, math.ceil(fraction * len(available)))
    count = min(count, maximum or count, len(available))
    chosen = rng.choice(len(available), size=count, replace=False)
    return [available[i] for i in sorted(chosen)]


@dataclass(frozen=True)
class RoundContext:
    """What a strategy knows about the round it aggregates, besides the global adapter.

    selected: clients selected for the round (whether or not they answered): the fixed denominator of the
    differentially private mean. state: what the strategy kept after the previous round (server optimiser
    moments, the privacy ledger), as stored by the coordinator; None in the first round.
    """

    round: int = 1
    selected: int = 0
    state: dict[str, np.ndarray] | None = None


class Aggregation(ABC):
    """One round's aggregate, fed update by update (mean-based rules stream, so memory stays at one
    adapter's size; robust rules keep every update)."""

    @abstractmethod
    def add(self, update: AdapterUpdate) -> None:
        """Fold one (already validated) update into the aggregate."""

    @abstractmethod
    def result(self) -> dict[str, np.ndarray]:
        """The new global adapter."""

    def state(self) -> dict[str, np.ndarray] | None:
        """After ``result``: what the next round needs (stored with the new global adapter), or None."""
        return None

    def report(self) -> dict:
        """After ``result``: JSON-ready facts about the round (clipped updates, privacy spent, Krum's picks)."""
        return {}


@dataclass
class Partial:
    """Updates folded into an aggregation elsewhere (a coordinator replica's running sum): the sum of their weighted
    contributions (``total``: float64), the sum of their weights, the norm of each one's delta (empty for a plain
    weighted mean) and how many they are."""

    total: dict[str, np.ndarray]
    weight: float
    norms: list[float]
    count: int


class Summable(Aggregation):
    """An aggregation that is a weighted sum of per-update contributions: what one instance folded (``partial``)
    folds into another of the same round (``add_partial``) as if its updates had been added there one by one."""

    @abstractmethod
    def partial(self) -> Partial:
        """What the updates added so far contribute (a copy, unaffected by later additions)."""

    @abstractmethod
    def add_partial(self, partial: Partial) -> None:
        """Fold in what another aggregation of the same round (same global adapter, same options) added."""


class Strategy(ABC):
    """How rounds are configured and aggregated. The registry (``edgeft.aggregate.registry``) is built from the
    subclasses' class attributes: ``name`` (a job's ``strategy``), ``options`` (the ``StrategyOptions`` fields it
    takes), ``mean`` (it aggregates a weighted mean of deltas: secure aggregation, norm clipping and differential
    privacy apply), ``mixed_ranks`` (it aggregates clients of mixed LoRA ranks)."""

    name: str
    options: tuple[str, ...] = ()
    mean: bool = False
    mixed_ranks: bool = False

    @classmethod
    def min_round(cls, options: object) -> int:
        """The fewest updates a round of this strategy can aggregate (``options``: its StrategyOptions)."""
        return 1

    def configure_round(self, round_number: int, available: Sequence[str], fraction: float, minimum: int,
                        maximum: int | None, rng: np.random.Generator) -> list[str]:
        """The clients that train in this round (default: uniform selection)."""
        return select_clients(available, fraction, minimum, maximum, rng)

    def check_bundle(self, manifest: object) -> None:
        """Raise ConfigError when the job's bundle cannot serve this strategy (default: any bundle can)."""

    @abstractmethod
    def start(self, global_adapter: dict[str, np.ndarray], context: RoundContext | None = None) -> Aggregation:
        """A fresh aggregation for a round that starts from ``global_adapter``."""

    def start_secure(self, global_adapter: dict[str, np.ndarray], context: RoundContext | None = None):  # noqa: ANN201
        """A fresh aggregation fed one summed delta (``add_sum``) instead of single updates, for secure
        aggregation (a ``DeltaMean``). Strategies that need every update on its own refuse (ConfigError)."""
        raise ConfigError(f"strategy {self.name!r} needs every client's update on its own, which secure "
                          "aggregation hides; use a mean strategy (fedavg, fedprox, fedadam, fedyogi, fedadagrad)")
