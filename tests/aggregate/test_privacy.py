"""Norm clipping and client-level differential privacy: clipping by hand, the noise's measured standard
deviation against sigma * C / n, and the (epsilon, delta) ledger across rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeft.aggregate import FedAdam, FedAvg, RoundContext, StrategyOptions
from edgeft.aggregate.delta import LEDGER
from edgeft.aggregate.privacy import clip_to_norm, epsilon
from edgeft.update import AdapterUpdate


def run(strategy, global_adapter, updates, context=None):  # noqa: ANN001, ANN201
    aggregation = strategy.start(global_adapter, context)
    for update in updates:
        aggregation.add(update)
    return aggregation.result(), aggregation.state(), aggregation.report()


def test_clip_to_norm_by_hand():
    clipped, norm = clip_to_norm({"a": np.array([3.0, 0.0]), "b": np.array([4.0])}, 1.0)  # one norm over both
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["b"], [0.8])
    same, _ = clip_to_norm({"a": np.array([3.0, 0.0]), "b": np.array([4.0])}, 10.0)
    np.testing.assert_array_equal(same["a"], [3.0, 0.0])


def test_norm_clipping_then_weighted_mean_by_hand():
    g = {"w": np.array([1.0, 1.0], np.float32)}
    far = AdapterUpdate({"w": np.array([4.0, 5.0], np.float32)}, 1)  # delta (3, 4), norm 5 -> (0.6, 0.8)
    near = AdapterUpdate({"w": np.array([1.5, 1.0], np.float32)}, 3)  # delta (0.5, 0), kept
    result, state, report = run(FedAvg(StrategyOptions(clip_norm=1.0)), g, [far, near])
    np.testing.assert_allclose(result["w"], [1 + (0.6 + 3 * 0.5) / 4, 1 + 0.8 / 4], rtol=1e-6)
    assert report["clipped"] == 1 and report["delta_norm_max"] == 5.0
    assert state is None  # nothing to carry without privacy


def test_measured_noise_std_is_sigma_c_over_n():
    """Ten clients whose deltas are zero: what is left of the private mean is the noise, N(0, (sigma C / n)^2)."""
    sigma, clip, n, size = 1.3, 0.2, 10, 400_000
    g = {"a": np.zeros(size // 2, np.float32), "b": np.zeros((size // 4, 2), np.float32)}
    options = StrategyOptions(clip_norm=clip, noise_multiplier=sigma, noise_seed=7)
    result, _, report = run(FedAvg(options), g, [AdapterUpdate(dict(g), 50) for _ in range(n)], RoundContext(1, n))
    noise = np.concatenate([result["a"].ravel(), result["b"].ravel()]).astype(np.float64)
    expected = sigma * clip / n
    # the sample std of 400k normals is within 0.5% of the true one with probability > 0.99
    assert noise.std() == pytest.approx(expected, rel=5e-3)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(size)
    assert report["privacy"]["noise_std"] == pytest.approx(sigma * clip)


def test_fixed_denominator_is_the_selected_count():
    """Four selected, two answered (deltas 0.1 and 0.3 along w, under C): the sum is divided by four."""
    g = {"w": np.zeros(1, np.float32)}
    ups = [AdapterUpdate({"w": np.array([v], np.float32)}, n) for v, n in ((0.1, 1), (0.3, 100))]
    options = StrategyOptions(clip_norm=1.0, noise_multiplier=1e-9, noise_seed=0)  # (almost) no noise: see the mean
    result, _, report = run(FedAvg(options), g, ups, RoundContext(1, 4))
    assert result["w"][0] == pytest.approx((0.1 + 0.3) / 4)  # unweighted: example counts play no part
    assert report["privacy"]["denominator"] == 4


def test_epsilon_per_round_and_cumulative():
    one = epsilon([1.0], 1e-5)
    ten = epsilon([1.0] * 10, 1e-5)
    assert 0 < one < ten < 10 * one  # RDP composes sub-linearly
    # the classic RDP conversion gives an upper bound by hand: min over alpha of
    # k * alpha / (2 sigma^2) + log(1 / delta) / (alpha - 1)
    bound = min(10 * a / 2 + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 100, 10_000))
    assert ten <= bound
    assert epsilon([2.0], 1e-5) < one  # more noise, less privacy spent
    assert epsilon([1.0, 0.0], 1e-5) is None  # a round without noise: no finite guarantee


def test_ledger_goes_on_across_rounds_and_through_the_server_optimiser():
    g = {"w": np.zeros(4, np.float32)}
    ups = [AdapterUpdate({"w": np.full(4, 0.1, np.float32)}, 1) for _ in range(3)]
    options = StrategyOptions(clip_norm=1.0, noise_multiplier=1.1, noise_seed=1)
    _, state1, report1 = run(FedAdam(options), g, ups, RoundContext(1, 3))
    _, state2, report2 = run(FedAdam(options), g, ups, RoundContext(2, 3, state1))
    np.testing.assert_array_equal(state2[LEDGER], [1.1, 1.1])
    assert "m/w" in state2 and "v/w" in state2
    assert report1["privacy"]["epsilon"] == report2["privacy"]["epsilon"] == report1["privacy"]["epsilon_cumulative"]
    assert report2["privacy"]["epsilon_cumulative"] == pytest.approx(epsilon([1.1, 1.1], 1e-5))
    assert report2["privacy"]["rounds_accounted"] == 2
    # privacy switched on in round 3 of a job whose first rounds had no noise: no finite cumulative bound
    _, _, late = run(FedAvg(options), g, ups, RoundContext(3, 3, None))
    assert late["privacy"]["epsilon_cumulative"] is None and late["privacy"]["epsilon"] > 0
