"""Typed options of the aggregation strategies (a job's ``[job.strategy_options]`` table)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from edgeft.errors import check_config

# The options of every strategy that aggregates a weighted mean of deltas (norm clipping, differential privacy).
# Which strategy takes which option is each strategy class's ``options`` (edgeft.aggregate.registry).
MEAN_OPTIONS = ("clip_norm", "noise_multiplier", "dp_delta", "noise_seed")


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_option(cond: bool, name: str, value: object, why: str) -> None:
    check_config(cond, f"job.strategy_options.{name}", value, why)


@dataclass(frozen=True)
class StrategyOptions:
    """Every strategy's knobs; each applies to the strategies whose class lists it in ``options``.

    server_lr, beta1, beta2, tau: the server optimiser of FedAdam/FedYogi/FedAdagrad (Reddi et al., 2021):
      x <- x + server_lr * m / (sqrt(v) + tau) over the mean client delta.
    mu: FedProx's proximal weight (None: the bundle's, or 0.01 when the coordinator exports the model).
    trim: trimmed mean: the fraction of values cut at each end of every coordinate, in [0, 0.5).
    byzantine: Krum / multi-Krum: the number f of Byzantine clients tolerated (a round needs 2f + 3 updates).
    selected: multi-Krum: how many of the best-scored updates are averaged (default: n - f).
    clip_norm: mean strategies: clip each client's delta (its adapter minus the global one) to this L2 norm.
    noise_multiplier: client-level differential privacy (needs clip_norm): Gaussian noise of std
      noise_multiplier * clip_norm added to the sum of clipped deltas, divided by the selected clients.
    dp_delta: the delta that (epsilon, delta) is reported for.
    noise_seed: seeds the privacy noise, for tests only (predictable noise gives no privacy).
    """

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    mu: float | None = None
    trim: float = 0.1
    byzantine: int = 1
    selected: int | None = None
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        _check_option(is_number(self.server_lr) and self.server_lr > 0, "server_lr", self.server_lr, "must be positive")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check_option(is_number(value) and 0 <= value < 1, name, value, "must be in [0, 1)")
        _check_option(is_number(self.tau) and self.tau > 0, "tau", self.tau, "must be positive (it bounds the step size)")
        _check_option(self.mu is None or (is_number(self.mu) and self.mu >= 0), "mu", self.mu, "must be >= 0")
        _check_option(is_number(self.trim) and 0 <= self.trim < 0.5, "trim", self.trim,
               "must be in [0, 0.5): the fraction cut at each end of every coordinate")
        _check_option(is_integer(self.byzantine) and self.byzantine >= 0, "byzantine", self.byzantine,
               "must be an integer >= 0")
        _check_option(self.selected is None or (is_integer(self.selected) and self.selected >= 1), "selected", self.selected,
               "must be an integer >= 1")
        _check_option(self.clip_norm is None or (is_number(self.clip_norm) and self.clip_norm > 0), "clip_norm", self.clip_norm,
               "must be positive")
        _check_option(is_number(self.noise_multiplier) and self.noise_multiplier >= 0, "noise_multiplier",
               self.noise_multiplier, "must be >= 0")
        _check_option(self.noise_multiplier == 0 or self.clip_norm is not None, "noise_multiplier", self.noise_multiplier,
               "differential privacy needs clip_norm: the noise is calibrated to the clipped updates' norm")
        _check_option(is_number(self.dp_delta) and 0 < self.dp_delta < 1, "dp_delta", self.dp_delta, "must be in (0, 1)")
        _check_option(self.noise_seed is None or is_integer(self.noise_seed), "noise_seed", self.noise_seed,
               "must be an integer")

    @property
    def private(self) -> bool:
        """Whether rounds add differential-privacy noise."""
        return self.noise_multiplier > 0
