"""FedAvg arithmetic, checked exactly against a sum written out by hand; client selection."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate import FedAvg, select_clients, weighted_mean
from edgeft.errors import ConfigError
from edgeft.update import AdapterUpdate


def test_weighted_mean_by_hand():
    a = AdapterUpdate({"w": np.array([1.0, 2.0], np.float32), "b": np.array([[3.0]], np.float32)}, 1)
    b = AdapterUpdate({"w": np.array([4.0, 8.0], np.float32), "b": np.array([[0.0]], np.float32)}, 3)
    result = weighted_mean([a, b])
    np.testing.assert_array_equal(result["w"], np.array([(1 + 12) / 4, (2 + 24) / 4], np.float32))
    np.testing.assert_array_equal(result["b"], np.array([[3 / 4]], np.float32))
    assert result["w"].dtype == np.float32


def test_streaming_aggregation_equals_the_batch_mean():
    rng = np.random.default_rng(0)
    updates = [AdapterUpdate({"x": rng.normal(size=(8, 3)).astype(np.float32)}, int(rng.integers(1, 100)))
               for _ in range(50)]
    aggregation = FedAvg().start({"x": np.zeros((8, 3), np.float32)})
    for update in updates:
        aggregation.add(update)
    expected = sum(u.n_examples * u.tensors["x"].astype(np.float64) for u in updates) / sum(u.n_examples for u in updates)
    np.testing.assert_allclose(aggregation.result()["x"], expected.astype(np.float32), rtol=1e-6)


def test_no_updates_is_an_error():
    with pytest.raises(ConfigError, match="no updates"):
        weighted_mean([])
    with pytest.raises(ConfigError, match="no updates"):
        FedAvg().start({"x": np.zeros(2, np.float32)}).result()


def test_client_selection_fraction_min_max():
    rng = np.random.default_rng(0)
    clients = [f"d{i}" for i in range(20)]
    assert len(select_clients(clients, 0.5, 2, None, rng)) == 10
    assert len(select_clients(clients, 0.01, 3, None, rng)) == 3
    assert len(select_clients(clients, 1.0, 2, 5, rng)) == 5
    chosen = select_clients(clients, 0.5, 2, None, rng)
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(clients)
    with pytest.raises(ConfigError, match="at least 4"):
        select_clients(clients[:3], 1.0, 4, None, rng)
