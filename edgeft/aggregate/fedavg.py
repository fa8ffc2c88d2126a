"""FedAvg (McMahan et al., 2017): the example-weighted mean of the clients' adapters."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from edgeft.aggregate.base import Aggregation, Partial, RoundContext, Strategy, Summable
from edgeft.aggregate.options import MEAN_OPTIONS, StrategyOptions
from edgeft.aggregate.vectors import accumulate
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate


def finish(total: dict[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """total / weight as float32 tensors."""
    if weight <= 0:
        raise ConfigError("no updates to average")
    return {k: (v / weight).astype(np.float32) for k, v in total.items()}


class WeightedMean(Summable):
    """Running sum_i n_i * x_i and sum_i n_i: memory is one adapter in float64, whatever the client count."""

    def __init__(self, template: dict[str, np.ndarray]):
        self.total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
        self.weight = 0
        self.count = 0

    def add(self, update: AdapterUpdate) -> None:
        accumulate(self.total, update.tensors, float(update.n_examples))
        self.weight += update.n_examples
        self.count += 1

    def partial(self) -> Partial:
        return Partial({k: v.copy() for k, v in self.total.items()}, float(self.weight), [], self.count)

    def add_partial(self, partial: Partial) -> None:
        """Fold in the example-weighted adapters another WeightedMean added (``add``)."""
        accumulate(self.total, partial.total, 1.0)
        self.weight += int(round(partial.weight))
        self.count += partial.count

    def result(self) -> dict[str, np.ndarray]:
        return finish(self.total, self.weight)

    def report(self) -> dict:
        return {"updates": self.count, "examples": self.weight}


def weighted_mean(updates: Iterable[AdapterUpdate]) -> dict[str, np.ndarray]:
    """The example-weighted mean of ``updates`` (at least one)."""
    aggregate: WeightedMean | None = None
    for update in updates:
        aggregate = aggregate or WeightedMean(update.tensors)
        aggregate.add(update)
    if aggregate is None:
        raise ConfigError("no updates to average")
    return aggregate.result()


class FedAvg(Strategy):
    """Example-weighted mean of the updates; streaming, so memory grows with the adapter, not the clients.

    With ``clip_norm`` each client's delta is clipped to that norm first (norm clipping); with
    ``noise_multiplier`` the round is differentially private (see ``edgeft.aggregate.privacy``).
    """

    name = "fedavg"
    options = MEAN_OPTIONS
    mean = mixed_ranks = True

    def __init__(self, options: StrategyOptions | None = None):
        self.options = options or StrategyOptions()

    def start(self, global_adapter: dict[str, np.ndarray], context: RoundContext | None = None) -> Aggregation:
        if self.options.clip_norm is None and not self.options.private:
            return WeightedMean(global_adapter)
        from edgeft.aggregate.delta import DeltaMean

        return DeltaMean(global_adapter, self.options, context)

    def start_secure(self, global_adapter: dict[str, np.ndarray], context: RoundContext | None = None) -> Aggregation:
        from edgeft.aggregate.delta import DeltaMean

        return DeltaMean(global_adapter, self.options, context)


class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg's aggregation over clients that train with the proximal term
    mu/2 * ||w - w_global||^2, which lives in the bundle's training graph (``ExportConfig.proximal_mu``)."""

    name = "fedprox"
    options = (*MEAN_OPTIONS, "mu")

    def check_bundle(self, manifest: object) -> None:
        proximal = getattr(manifest, "proximal", None)
        if not proximal:
            raise ConfigError("strategy 'fedprox' needs a bundle exported with a proximal term: export it with "
                              "`edgeft export --proximal-mu MU` (or [job.export] proximal_mu), or let the "
                              "coordinator export the model")
        if self.options.mu is not None and abs(proximal["mu"] - self.options.mu) > 1e-12:
            raise ConfigError(f"invalid job.strategy_options.mu={self.options.mu!r}: the bundle was exported with "
                              f"proximal_mu={proximal['mu']!r}; re-export it or drop the option")
