"""FedAvg (McMahan et al., 2017): the example-weighted mean of the clients' adapters."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from edgeft.aggregate.base import Aggregation, Strategy
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate


def accumulate(total: dict[str, np.ndarray], tensors: dict[str, np.ndarray], weight: float) -> None:
    """total[name] += weight * tensors[name], in float64, in place."""
    for name, value in tensors.items():
        total[name] += weight * value.astype(np.float64, copy=False)


def finish(total: dict[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """total / weight as float32 tensors."""
    if weight <= 0:
        raise ConfigError("no updates to average")
    return {k: (v / weight).astype(np.float32) for k, v in total.items()}


class WeightedMean(Aggregation):
    """Running sum_i n_i * x_i and sum_i n_i: memory is one adapter in float64, whatever the client count."""

    def __init__(self, template: dict[str, np.ndarray]):
        self.total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
        self.weight = 0

    def add(self, update: AdapterUpdate) -> None:
        accumulate(self.total, update.tensors, float(update.n_examples))
        self.weight += update.n_examples

    def result(self) -> dict[str, np.ndarray]:
        return finish(self.total, self.weight)


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
    """Example-weighted mean of the updates; streaming, so memory grows with the adapter, not the clients."""

    name = "fedavg"

    def start(self, global_adapter: dict[str, np.ndarray]) -> Aggregation:
        return WeightedMean(global_adapter)
