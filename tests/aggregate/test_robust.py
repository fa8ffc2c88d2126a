"""Median, trimmed mean, Krum and multi-Krum against small examples computed by hand, and a round with
Byzantine clients that drags FedAvg away but not the robust rules."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate import FedAvg, Krum, Median, MultiKrum, StrategyOptions, TrimmedMean
from edgeft.aggregate.robust import coordinate_median, krum_scores, multikrum_select, trimmed_mean
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate


def column(*values: float) -> np.ndarray:
    return np.array(values, np.float64)[:, None]


def test_coordinate_median_by_hand():
    stack = np.array([[1.0, 10.0], [2.0, 20.0], [100.0, -5.0]])
    np.testing.assert_array_equal(coordinate_median(stack), [2.0, 10.0])
    assert coordinate_median(column(1, 2, 3, 10))[0] == 2.5  # even count: mean of the middle two


def test_trimmed_mean_by_hand():
    assert trimmed_mean(column(10, 1, 3, 2), 0.25)[0] == 2.5  # cut 1 at each end of 1 2 3 10
    assert trimmed_mean(column(10, 1, 3, 2), 0.2)[0] == 4.0  # floor(0.8) = 0: plain mean
    assert trimmed_mean(column(-50, 1, 2, 3, 4, 60), 0.34)[0] == 2.5  # floor(2.04) = 2 cut at each end


def test_krum_scores_and_selection_by_hand():
    # points 0 1 2 4 100 with f = 1: each score sums the squared distances to the n - f - 2 = 2 nearest others
    stack = column(0, 1, 2, 4, 100)
    np.testing.assert_array_equal(krum_scores(stack, 1), [1 + 4, 1 + 1, 1 + 4, 4 + 9, 96 ** 2 + 98 ** 2])
    assert list(multikrum_select(stack, 1, 1)) == [1]
    assert sorted(multikrum_select(stack, 1, 3)) == [0, 1, 2]


def test_krum_needs_2f_plus_3_updates():
    with pytest.raises(ConfigError, match="at least 7 updates, got 6"):
        krum_scores(np.zeros((6, 2)), 2)


def aggregate(strategy, updates):  # noqa: ANN001, ANN201
    aggregation = strategy.start({"w": np.zeros(2, np.float32)})
    for update in updates:
        aggregation.add(update)
    return aggregation.result()["w"], aggregation.report()


def test_strategies_through_the_interface():
    updates = [AdapterUpdate({"w": np.array(v, np.float32)}, n)
               for v, n in (([0.0, 0.0], 1), ([1.0, 1.0], 1), ([2.0, 2.0], 1), ([4.0, 4.0], 1), ([100, 100], 1000))]
    np.testing.assert_array_equal(aggregate(Median(), updates)[0], [2.0, 2.0])  # n_examples play no part
    np.testing.assert_allclose(aggregate(TrimmedMean(StrategyOptions(trim=0.2)), updates)[0], [7 / 3, 7 / 3])
    result, report = aggregate(Krum(StrategyOptions(byzantine=1)), updates)
    np.testing.assert_array_equal(result, [1.0, 1.0])
    assert report == {"updates": 5, "krum_selected": [1]}
    result, report = aggregate(MultiKrum(StrategyOptions(byzantine=1)), updates)  # default m = n - f = 4
    np.testing.assert_allclose(result, [7 / 4, 7 / 4])
    assert report["krum_selected"] == [0, 1, 2, 3]
    result, _ = aggregate(MultiKrum(StrategyOptions(byzantine=1, selected=3)), updates)
    np.testing.assert_allclose(result, [1.0, 1.0])


@pytest.mark.parametrize("attack", ["sign_flip", "scaled", "random"])
def test_byzantine_clients_move_fedavg_but_not_robust_rules(attack):
    rng = np.random.default_rng(0)
    honest_mean = np.linspace(-1, 1, 200)
    honest = [honest_mean + rng.normal(0, 0.05, 200) for _ in range(8)]
    bad = {"sign_flip": [-h for h in honest[:2]], "scaled": [10 * h for h in honest[:2]],
           "random": [rng.normal(0, 10, 200) for _ in range(2)]}[attack]
    updates = [AdapterUpdate({"w": x.astype(np.float32)}, 100) for x in honest + bad]

    def error(strategy) -> float:  # noqa: ANN001
        aggregation = strategy.start({"w": np.zeros(200, np.float32)})
        for update in updates:
            aggregation.add(update)
        return float(np.abs(aggregation.result()["w"] - honest_mean).max())

    assert error(FedAvg()) > 0.3
    for strategy in (Median(), TrimmedMean(StrategyOptions(trim=0.2)), Krum(StrategyOptions(byzantine=2)),
                     MultiKrum(StrategyOptions(byzantine=2))):
        assert error(strategy) < 0.2, strategy.name
