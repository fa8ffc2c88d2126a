"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum and multi-Krum.

Each rule needs every update of the round at once, so these aggregations keep them all: memory is
(number of updates) x (adapter size) in float32, e.g. about 0.4 MB per client for MiniLM with LoRA rank 8
on query/value plus its 77-class head, 40 MB for 100 clients. The rules ignore the example counts clients
report (a Byzantine client could claim any count); they work on the adapters themselves, which gives the
same result as working on the deltas (each rule commutes with subtracting the global adapter).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from edgeft.aggregate.base import Aggregation, RoundContext, Strategy
from edgeft.aggregate.options import StrategyOptions
from edgeft.aggregate.vectors import flatten, unflatten
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate

Rule = Callable[[np.ndarray], tuple[np.ndarray, dict]]


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """The median of every coordinate over the rows of ``stack`` [n, d] (mean of the middle two for even n)."""
    return np.median(stack, axis=0)


def trimmed_mean(stack: np.ndarray, trim: float) -> np.ndarray:
    """Per coordinate: drop the floor(trim * n) smallest and largest values, average the rest."""
    n = stack.shape[0]
    cut = math.floor(trim * n)
    ordered = np.sort(stack, axis=0)
    return ordered[cut:n - cut].mean(axis=0, dtype=np.float64)


def krum_scores(stack: np.ndarray, byzantine: int) -> np.ndarray:
    """Krum's score of each row (Blanchard et al., 2017): the sum of its squared L2 distances to its
    n - f - 2 nearest other rows. Needs n >= 2f + 3."""
    n = stack.shape[0]
    if n < 2 * byzantine + 3:
        raise ConfigError(f"Krum with byzantine={byzantine} needs at least {2 * byzantine + 3} updates, got {n}")
    rows = stack.astype(np.float64)
    distances = np.stack([np.square(rows - rows[i]).sum(axis=1) for i in range(n)])
    neighbours = n - byzantine - 2
    return np.array([np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)])


def multikrum_select(stack: np.ndarray, byzantine: int, selected: int) -> np.ndarray:
    """The indices of the ``selected`` rows with the lowest Krum scores (ties: the lower index first)."""
    if not 1 <= selected <= stack.shape[0]:
        raise ConfigError(f"multi-Krum cannot select {selected} of {stack.shape[0]} updates")
    return np.argsort(krum_scores(stack, byzantine), kind="stable")[:selected]


class Collected(Aggregation):
    """Keeps every update (as one float32 row each) and applies ``rule`` to the stack at the end."""

    def __init__(self, global_adapter: dict[str, np.ndarray], rule: Rule):
        self.template = global_adapter
        self.names = sorted(global_adapter)
        self.rule = rule
        self.rows: list[np.ndarray] = []
        self._report: dict = {}

    def add(self, update: AdapterUpdate) -> None:
        self.rows.append(flatten(update.tensors, self.names, np.float32))

    def result(self) -> dict[str, np.ndarray]:
        if not self.rows:
            raise ConfigError("no updates to aggregate")
        vector, self._report = self.rule(np.stack(self.rows))
        self._report = {"updates": len(self.rows), **self._report}
        return unflatten(vector, self.template, self.names)

    def report(self) -> dict:
        return self._report


class RobustStrategy(Strategy):
    """A robust rule over all of a round's updates."""

    name = ""

    def __init__(self, options: StrategyOptions | None = None):
        self.options = options or StrategyOptions()

    def rule(self, stack: np.ndarray) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def start(self, global_adapter: dict[str, np.ndarray], context: RoundContext | None = None) -> Aggregation:
        return Collected(global_adapter, self.rule)


class Median(RobustStrategy):
    """Coordinate-wise median (Yin et al., 2018)."""

    name = "median"

    def rule(self, stack: np.ndarray) -> tuple[np.ndarray, dict]:
        return coordinate_median(stack), {}


class TrimmedMean(RobustStrategy):
    """Coordinate-wise trimmed mean (Yin et al., 2018): ``trim`` of the values cut at each end."""

    name = "trimmed_mean"
    options = ("trim",)

    def rule(self, stack: np.ndarray) -> tuple[np.ndarray, dict]:
        return trimmed_mean(stack, self.options.trim), {"trimmed_each_end": math.floor(self.options.trim * len(stack))}


class Krum(RobustStrategy):
    """Krum: the single update closest to its n - f - 2 neighbours becomes the global adapter."""

    name = "krum"
    options = ("byzantine",)

    @classmethod
    def min_round(cls, options: StrategyOptions) -> int:
        return 2 * options.byzantine + 3  # Krum's 2f + 3

    def rule(self, stack: np.ndarray) -> tuple[np.ndarray, dict]:
        chosen = multikrum_select(stack, self.options.byzantine, 1)
        return stack[chosen[0]].astype(np.float64), {"krum_selected": [int(i) for i in chosen]}


class MultiKrum(Krum):
    """Multi-Krum: the unweighted mean of the ``selected`` best-scored updates (default n - f)."""

    name = "multikrum"
    options = ("byzantine", "selected")

    def rule(self, stack: np.ndarray) -> tuple[np.ndarray, dict]:
        count = self.options.selected or len(stack) - self.options.byzantine
        chosen = multikrum_select(stack, self.options.byzantine, count)
        return stack[chosen].mean(axis=0, dtype=np.float64), {"krum_selected": sorted(int(i) for i in chosen)}
