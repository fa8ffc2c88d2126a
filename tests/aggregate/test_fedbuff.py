"""FedBuff's arithmetic (asynchronous buffers weighted by staleness) against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate import BufferedUpdate, FedAvg, FedBuffOptions, aggregate_buffer
from edgeft.aggregate.delta import plain_step
from edgeft.aggregate.fedbuff import check_staleness, constant, hinge, polynomial
from edgeft.aggregate.vectors import delta
from edgeft.errors import ConfigError, Rejected
from edgeft.update import AdapterUpdate


def test_staleness_functions_by_hand():
    assert [constant(s) for s in (0, 1, 7)] == [1.0, 1.0, 1.0]
    # (1 + s)^-a
    assert [polynomial(s, 0.5) for s in (0, 3, 8)] == pytest.approx([1.0, 1 / 2, 1 / 3])
    assert [polynomial(s, 1.0) for s in (0, 1, 4)] == pytest.approx([1.0, 1 / 2, 1 / 5])
    assert polynomial(3, 2.0) == pytest.approx(1 / 16)
    # 1 up to b = 4, then 1 / (a (s - b) + 1) with a = 10
    assert [hinge(s, 10.0, 4) for s in (0, 4, 5, 6)] == pytest.approx([1.0, 1.0, 1 / 11, 1 / 21])
    assert hinge(3, 0.5, 1) == pytest.approx(1 / 2)  # 1 / (0.5 * 2 + 1)


def test_options_pick_the_staleness_function():
    assert FedBuffOptions(staleness="constant").weight(9) == 1.0
    assert FedBuffOptions(staleness="polynomial", exponent=1.0).weight(4) == pytest.approx(1 / 5)
    assert FedBuffOptions(staleness="hinge", hinge_slope=2.0, hinge_start=1).weight(3) == pytest.approx(1 / 5)


def test_buffer_of_three_by_hand():
    # version 6; updates trained from versions 6, 5 and 2: staleness 0, 1, 4 (4 = max_staleness: accepted)
    # polynomial, a = 1: s = 1, 1/2, 1/5; examples 10, 20, 20 (sum 50): s * n / 50 = 0.2, 0.2, 0.08
    # sum: w = 0.2 * 1 + 0.2 * 3 + 0.08 * -5 = 0.4; 0.2 * -2 + 0.2 * 0 + 0.08 * 10 = 0.4; b: 0.2 * 1 = 0.2
    # server_lr 0.5: step = 0.2, 0.2; b 0.1 (the stale update shortens the step: its weights sum to 0.48)
    options = FedBuffOptions(buffer_size=3, staleness="polynomial", exponent=1.0, max_staleness=4, server_lr=0.5)
    buffer = [BufferedUpdate(6, 10, {"w": np.array([1.0, -2.0], np.float32), "b": np.array([1.0], np.float32)}),
              BufferedUpdate(5, 20, {"w": np.array([3.0, 0.0], np.float32), "b": np.array([0.0], np.float32)}),
              BufferedUpdate(2, 20, {"w": np.array([-5.0, 10.0], np.float32), "b": np.array([0.0], np.float32)})]
    result = aggregate_buffer(6, buffer, options)
    assert result.staleness == (0, 1, 4)
    assert result.weights == pytest.approx((0.2, 0.2, 0.08), rel=1e-15)
    np.testing.assert_allclose(result.step["w"], [0.2, 0.2], rtol=1e-15)
    np.testing.assert_allclose(result.step["b"], [0.1], rtol=1e-15)
    assert result.step["w"].dtype == np.float64 and result.refused == ()
    new, state = plain_step({"w": np.array([1.0, 1.0]), "b": np.array([0.0])}, result.step, None)
    np.testing.assert_allclose(new["w"], [1.2, 1.2], rtol=1e-15)
    assert state == {}
    assert result.report()["weights"] == pytest.approx([0.2, 0.2, 0.08])


def test_updates_past_max_staleness_are_refused_and_listed():
    options = FedBuffOptions(buffer_size=3, staleness="constant", max_staleness=3)
    with pytest.raises(Rejected, match="4 versions behind version 6; job.async.max_staleness is 3") as refusal:
        check_staleness(6, 2, options)
    assert refusal.value.reason == "stale"
    assert check_staleness(6, 3, options) == 3
    with pytest.raises(Rejected, match="latest global version is 6") as future:
        check_staleness(6, 7, options)
    assert future.value.reason == "version"

    buffer = [BufferedUpdate(6, 1, {"w": np.array([2.0])}), BufferedUpdate(5, 3, {"w": np.array([-2.0])}),
              BufferedUpdate(2, 100, {"w": np.array([1000.0])})]
    result = aggregate_buffer(6, buffer, options)
    assert result.weights == (0.25, 0.75, 0.0) and result.staleness == (0, 1, 4)
    np.testing.assert_array_equal(result.step["w"], [(1 * 2.0 + 3 * -2.0) / 4])
    [(index, error)] = result.refused
    assert index == 2 and error.reason == "stale"
    assert result.report()["refused"][0]["reason"] == "stale" and result.report()["updates"] == 2

    with pytest.raises(ConfigError, match="no updates to average: .*4 versions behind"):
        aggregate_buffer(6, buffer[2:], options)
    with pytest.raises(ConfigError, match="larger than job.async.buffer_size=2"):
        aggregate_buffer(6, buffer, FedBuffOptions(buffer_size=2))


@pytest.mark.parametrize("raw, message", [
    ({"buffer_size": 0}, r"job.async.buffer_size=0: must be an integer >= 1"),
    ({"buffer_size": 2.5}, r"job.async.buffer_size=2.5"),
    ({"staleness": "linear"}, r"job.async.staleness='linear': expected one of constant, polynomial, hinge"),
    ({"exponent": -1.0}, r"job.async.exponent=-1.0: must be positive"),
    ({"exponent": float("nan")}, r"job.async.exponent=nan"),
    ({"staleness": "hinge", "hinge_slope": 0}, r"job.async.hinge_slope=0: must be positive"),
    ({"staleness": "hinge", "hinge_start": -1}, r"job.async.hinge_start=-1: must be an integer >= 0"),
    ({"max_staleness": -1}, r"job.async.max_staleness=-1: must be an integer >= 0"),
    ({"max_staleness": True}, r"job.async.max_staleness=True"),
    ({"server_lr": 0.0}, r"job.async.server_lr=0.0: must be positive"),
    ({"staleness": "constant", "exponent": 2.0}, r"job.async.exponent=2.0: applies to staleness = 'polynomial' only"),
    ({"hinge_start": 2}, r"job.async.hinge_start=2: applies to staleness = 'hinge' only, not 'polynomial'"),
])
def test_bad_options_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        FedBuffOptions(**raw)


def test_fresh_updates_with_constant_weights_give_fedavg():
    rng = np.random.default_rng(0)
    global_adapter = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    clients = [AdapterUpdate({k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in global_adapter.items()},
                             int(rng.integers(1, 50))) for _ in range(5)]
    fedavg = FedAvg().start(global_adapter)
    for update in clients:
        fedavg.add(update)
    expected = fedavg.result()

    buffer = [BufferedUpdate(3, u.n_examples, delta(u.tensors, global_adapter)) for u in clients]
    result = aggregate_buffer(3, buffer, FedBuffOptions(buffer_size=5, staleness="constant", server_lr=1.0))
    new, _ = plain_step({k: v.astype(np.float64) for k, v in global_adapter.items()}, result.step, None)
    total = sum(u.n_examples for u in clients)
    assert result.weights == pytest.approx([u.n_examples / total for u in clients])
    for name, value in expected.items():
        np.testing.assert_allclose(new[name].astype(np.float32), value, rtol=1e-6, atol=1e-7)
