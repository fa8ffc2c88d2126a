"""The Strategy interface and client selection."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
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


class Aggregation(ABC):
    """One round's aggregate, fed update by update so memory stays at one adapter's size."""

    @abstractmethod
    def add(self, update: AdapterUpdate) -> None:
        """Fold one (already validated) update into the aggregate."""

    @abstractmethod
    def result(self) -> dict[str, np.ndarray]:
        """The new global adapter."""


class Strategy(ABC):
    """How rounds are configured and aggregated."""

    name: str

    def configure_round(self, round_number: int, available: Sequence[str], fraction: float, minimum: int,
                        maximum: int | None, rng: np.random.Generator) -> list[str]:
        """The clients that train in this round (default: uniform selection)."""
        return select_clients(available, fraction, minimum, maximum, rng)

    @abstractmethod
    def start(self, global_adapter: dict[str, np.ndarray]) -> Aggregation:
        """A fresh aggregation for a round that starts from ``global_adapter``."""
