"""FedAdam, FedYogi and FedAdagrad (Reddi et al., 2021) against the update rules written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate import FedAdagrad, FedAdam, FedYogi, RoundContext, StrategyOptions
from edgeft.aggregate.fedopt import (adagrad_second_moment, adam_second_moment, first_moment, server_step,
                                     yogi_second_moment)
from edgeft.update import AdapterUpdate

OPTIONS = StrategyOptions(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)


def updates(*pairs: tuple[float, int]) -> list[AdapterUpdate]:
    return [AdapterUpdate({"w": np.array([value], np.float32)}, n) for value, n in pairs]


def run_round(strategy, global_value: float, clients, state=None, number=1):  # noqa: ANN001, ANN201
    aggregation = strategy.start({"w": np.array([global_value], np.float32)}, RoundContext(number, len(clients), state))
    for update in clients:
        aggregation.add(update)
    return float(aggregation.result()["w"][0]), aggregation.state()


def test_moment_rules_by_hand():
    m, v, d = np.array([0.2]), np.array([0.04]), np.array([0.5])
    assert first_moment(m, d, 0.9)[0] == pytest.approx(0.9 * 0.2 + 0.1 * 0.5)
    assert adam_second_moment(v, d, 0.99)[0] == pytest.approx(0.99 * 0.04 + 0.01 * 0.25)
    assert yogi_second_moment(v, d, 0.99)[0] == pytest.approx(0.04 + 0.01 * 0.25)  # v < d^2: v grows
    assert yogi_second_moment(np.array([1.0]), d, 0.99)[0] == pytest.approx(1.0 - 0.01 * 0.25)  # v > d^2: shrinks
    assert adagrad_second_moment(v, d, 0.99)[0] == pytest.approx(0.04 + 0.25)
    assert server_step(np.array([1.0]), m, v, 0.1, 0.1)[0] == pytest.approx(1.0 + 0.1 * 0.2 / (0.2 + 0.1))


@pytest.mark.parametrize("strategy, v1", [(FedAdam, 0.99 * 0.01 + 0.01 * 0.25), (FedYogi, 0.01 + 0.01 * 0.25),
                                          (FedAdagrad, 0.01 + 0.25)])
def test_first_round_by_hand(strategy, v1):
    # global 1.0; clients 3.0 (1 example) and 1.0 (3 examples): mean 1.5, delta 0.5; m_-1 = 0, v_-1 = tau^2 = 0.01
    new, state = run_round(strategy(OPTIONS), 1.0, updates((3.0, 1), (1.0, 3)))
    m1 = 0.1 * 0.5
    assert new == pytest.approx(1.0 + 0.1 * m1 / (np.sqrt(v1) + 0.1), rel=1e-6)
    assert state["m/w"][0] == pytest.approx(m1) and state["v/w"][0] == pytest.approx(v1)


def test_second_round_continues_from_the_stored_moments():
    x1, state = run_round(FedAdam(OPTIONS), 1.0, updates((3.0, 1), (1.0, 3)))
    x2, state2 = run_round(FedAdam(OPTIONS), x1, updates((x1 - 0.2, 2), (x1 - 0.2, 2)), state, number=2)
    m2 = 0.9 * 0.05 + 0.1 * -0.2
    v2 = 0.99 * (0.99 * 0.01 + 0.01 * 0.25) + 0.01 * 0.04
    assert x2 == pytest.approx(x1 + 0.1 * m2 / (np.sqrt(v2) + 0.1), rel=1e-5)
    assert state2["m/w"][0] == pytest.approx(m2) and state2["v/w"][0] == pytest.approx(v2)
    # without the stored state the step would be another one: the state matters
    assert run_round(FedAdam(OPTIONS), x1, updates((x1 - 0.2, 2)), None, number=2)[0] != pytest.approx(x2)


def test_fedadam_steps_each_coordinate_by_about_the_server_lr():
    """With |delta| >> tau the first step is server_lr * sign(delta) * (1 - beta1) / sqrt(1 - beta2)."""
    options = StrategyOptions(server_lr=0.01, tau=1e-6)
    clients = [AdapterUpdate({"w": np.array([5.0, -3.0, 1e-1], np.float32)}, 1)]
    aggregation = FedAdam(options).start({"w": np.zeros(3, np.float32)})
    aggregation.add(clients[0])
    step = 0.01 * 0.1 / np.sqrt(0.01)
    np.testing.assert_allclose(aggregation.result()["w"], [step, -step, step], rtol=1e-4)
