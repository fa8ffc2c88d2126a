"""Adaptive server optimisers (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2):
FedAdam, FedYogi and FedAdagrad over the mean client delta.

    delta_t = mean_i(x_i) - x_t                     (the DeltaMean of the round, optionally clipped / private)
    m_t     = beta1 * m_{t-1} + (1 - beta1) * delta_t
    v_t     = v_{t-1} + delta_t^2                                       (FedAdagrad)
            = v_{t-1} - (1 - beta2) * delta_t^2 * sign(v_{t-1} - delta_t^2)   (FedYogi)
            = beta2 * v_{t-1} + (1 - beta2) * delta_t^2                 (FedAdam)
    x_{t+1} = x_t + server_lr * m_t / (sqrt(v_t) + tau)

with m_{-1} = 0 and v_{-1} = tau^2 (the paper's v_{-1} >= tau^2) and, as in the paper, no bias correction.
The moments (m, v) are the strategy's state: the coordinator stores them beside each global adapter, in the
same transaction, so they survive restarts.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from edgeft.aggregate.base import Aggregation, RoundContext, Strategy
from edgeft.aggregate.delta import DeltaMean, State
from edgeft.aggregate.options import MEAN_OPTIONS, StrategyOptions


def first_moment(m: np.ndarray, delta: np.ndarray, beta1: float) -> np.ndarray:
    return beta1 * m + (1 - beta1) * delta


def adam_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    return beta2 * v + (1 - beta2) * delta * delta


def yogi_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    squared = delta * delta
    return v - (1 - beta2) * squared * np.sign(v - squared)


def adagrad_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:  # noqa: ARG001
    return v + delta * delta


def server_step(x: np.ndarray, m: np.ndarray, v: np.ndarray, server_lr: float, tau: float) -> np.ndarray:
    return x + server_lr * m / (np.sqrt(v) + tau)


SECOND_MOMENTS = {"fedadam": adam_second_moment, "fedyogi": yogi_second_moment,
                  "fedadagrad": adagrad_second_moment}


def optimiser_update(kind: str, options: StrategyOptions, global_adapter: State, mean_delta: State,
                     state: State | None) -> tuple[State, State]:
    """One server optimiser step over every tensor; returns (new global adapter, new moments {m/.., v/..})."""
    state = state or {}
    second = SECOND_MOMENTS[kind]
    new, kept = {}, {}
    for name, x in global_adapter.items():
        m = state.get(f"m/{name}")
        v = state.get(f"v/{name}")
        if m is None or v is None or m.shape != x.shape:
            m, v = np.zeros_like(x), np.full_like(x, options.tau ** 2)
        m = first_moment(m.astype(np.float64), mean_delta[name], options.beta1)
        v = second(v.astype(np.float64), mean_delta[name], options.beta2)
        new[name] = server_step(x, m, v, options.server_lr, options.tau)
        kept[f"m/{name}"], kept[f"v/{name}"] = m, v
    for key, value in state.items():  # carry what is not ours (the privacy ledger) through
        if not key.startswith(("m/", "v/")):
            kept[key] = value
    return new, kept


class FedOpt(Strategy):
    """A server optimiser over the mean client delta; see the module docstring."""

    name = "fedadam"
    options = (*MEAN_OPTIONS, "server_lr", "beta1", "beta2", "tau")
    mean = True

    def __init__(self, options: StrategyOptions | None = None):
        self.options = options or StrategyOptions()

    def start(self, global_adapter: dict[str, np.ndarray], context: RoundContext | None = None) -> Aggregation:
        return DeltaMean(global_adapter, self.options, context, partial(optimiser_update, self.name, self.options))

    start_secure = start


class FedAdam(FedOpt):
    name = "fedadam"


class FedYogi(FedOpt):
    name = "fedyogi"


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    options = (*MEAN_OPTIONS, "server_lr", "beta1", "tau")
