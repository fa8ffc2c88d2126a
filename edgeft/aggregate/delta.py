"""The mean client delta (adapter minus the global one), optionally norm-clipped or differentially private,
and the server update that turns it into the next global adapter (plain step, or a server optimiser).

Streaming: memory is one adapter in float64 whatever the number of clients.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgeft.aggregate.base import Partial, RoundContext, Summable
from edgeft.aggregate.options import StrategyOptions
from edgeft.aggregate.privacy import clip_to_norm, epsilon, gaussian_noise, private_mean
from edgeft.aggregate.vectors import accumulate, delta, global_norm
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate

State = dict[str, np.ndarray]
# (global adapter, mean delta, previous state) -> (new global adapter, state to keep), all float64
ServerUpdate = Callable[[State, State, State | None], tuple[State, State]]
LEDGER = "privacy/noise_multipliers"


def plain_step(global_adapter: State, mean_delta: State, state: State | None) -> tuple[State, State]:
    """x + mean delta: FedAvg's server step (server learning rate 1); keeps no state."""
    return {k: v + mean_delta[k] for k, v in global_adapter.items()}, {}


class DeltaMean(Summable):
    """sum_i w_i * clip(x_i - x) / sum_i w_i with w_i = n_examples; with differential privacy,
    (sum_i clip(x_i - x) + N(0, (sigma C)^2)) / selected clients; then ``server_update``."""

    def __init__(self, global_adapter: State, options: StrategyOptions, context: RoundContext | None = None,
                 server_update: ServerUpdate = plain_step):
        self.reference = {k: v.astype(np.float64) for k, v in global_adapter.items()}
        self.options = options
        self.context = context or RoundContext()
        self.server_update = server_update
        self.total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_adapter.items()}
        self.weight = 0.0
        self.norms: list[float] = []
        self.summed = 0  # updates that came already summed (add_sum)
        self._state: State = {}
        self._report: dict = {}

    def add(self, update: AdapterUpdate) -> None:
        change = delta(update.tensors, self.reference)
        if self.options.clip_norm is not None:
            change, norm = clip_to_norm(change, self.options.clip_norm)
        else:
            norm = global_norm(change)
        weight = 1.0 if self.options.private else float(update.n_examples)
        accumulate(self.total, change, weight)
        self.weight += weight
        self.norms.append(norm)

    def add_sum(self, total: State, weight: float, count: int) -> None:
        """Fold in the sum of ``count`` deltas computed elsewhere: sum_i w_i * delta_i and sum_i w_i, with
        w_i = n_examples, or w_i = 1 with differential privacy (secure aggregation: the devices clipped their
        deltas themselves, the coordinator only ever saw the sum)."""
        accumulate(self.total, total, 1.0)
        self.weight += weight
        self.summed += count

    def partial(self) -> Partial:
        return Partial({k: v.copy() for k, v in self.total.items()}, self.weight, list(self.norms), len(self.norms))

    def add_partial(self, partial: Partial) -> None:
        """Fold in the clipped, weighted deltas another DeltaMean of this round added (``add``), with their norms,
        so the report (median and largest norm, clipped updates) is the one of adding them here."""
        self.add_sum(partial.total, partial.weight, 0)
        self.norms.extend(partial.norms)

    @property
    def updates(self) -> int:
        return len(self.norms) + self.summed

    def mean_delta(self) -> State:
        """The (clipped, possibly noisy) mean delta of the updates added so far."""
        if not self.updates or self.weight <= 0:
            raise ConfigError("no updates to average")
        if not self.options.private:
            return {k: v / self.weight for k, v in self.total.items()}
        std = self.options.noise_multiplier * self.options.clip_norm  # type: ignore[operator]
        seed = self.options.noise_seed
        rng = np.random.default_rng(None if seed is None else [seed, self.context.round])
        denominator = max(self.context.selected, self.updates)
        return private_mean(self.total, gaussian_noise(self.total, std, rng), denominator)

    def result(self) -> dict[str, np.ndarray]:
        mean = self.mean_delta()
        new, self._state = self.server_update(self.reference, mean, self.context.state)
        clip = self.options.clip_norm
        self._report = {"updates": self.updates}
        if self.norms:  # single updates seen (not with secure aggregation)
            self._report.update(delta_norm_median=float(np.median(self.norms)), delta_norm_max=float(max(self.norms)))
        if clip is not None and self.norms:
            self._report.update(clip_norm=clip, clipped=int(sum(n > clip for n in self.norms)))
        if self.options.private:
            self._account()
        return {k: v.astype(np.float32) for k, v in new.items()}

    def _account(self) -> None:
        """Append this round's noise multiplier to the ledger kept in the state; report (epsilon, delta)."""
        previous = self.context.state or {}
        ledger = [float(x) for x in previous.get(LEDGER, np.zeros(0))]
        ledger += [0.0] * max(0, self.context.round - 1 - len(ledger))  # earlier rounds without noise
        sigma, target = self.options.noise_multiplier, self.options.dp_delta
        ledger.append(sigma)
        self._state[LEDGER] = np.array(ledger, dtype=np.float64)
        self._report["privacy"] = {
            "noise_multiplier": sigma, "clip_norm": self.options.clip_norm, "noise_std": sigma * self.options.clip_norm,
            "denominator": max(self.context.selected, self.updates), "delta": target,
            "epsilon": epsilon([sigma], target), "epsilon_cumulative": epsilon(ledger, target),
            "rounds_accounted": len(ledger), "accountant": "dp-accounting RDP, no sampling amplification"}

    def state(self) -> State | None:
        return self._state or None

    def report(self) -> dict:
        return self._report
