"""The statistics round's arithmetic: one device's sums, their checks, and the heads built from the sums,
against hand-computed values and a direct per-class implementation of FedCOF's estimator."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate.statistics import (COUNTS, PRESENT, SECOND_MOMENT, SUMS, StatisticsAccumulator,
                                         check_statistics, class_mean_head, fedcof_gram, fedcof_head,
                                         head_from_statistics, sum_statistics)
from edgeft.errors import DataError


def device(features, labels, classes=3):  # noqa: ANN001, ANN201
    acc = StatisticsAccumulator(classes, np.asarray(features).shape[1])
    acc.add(np.asarray(features, dtype=np.float32), np.asarray(labels))
    return acc.tensors()


def test_one_device_by_hand():
    stats = device([[1, 0], [3, 0], [0, 2]], [0, 0, 2])
    np.testing.assert_array_equal(stats[SUMS], [[4, 0], [0, 0], [0, 2]])
    np.testing.assert_array_equal(stats[COUNTS], [2, 0, 1])
    np.testing.assert_array_equal(stats[PRESENT], [1, 0, 1])
    # sum_c S_c S_c^T / n_c = [4,0][4,0]^T / 2 + [0,2][0,2]^T / 1
    np.testing.assert_allclose(stats[SECOND_MOMENT], [[8, 0], [0, 4]])
    check_statistics(stats, 3, 2, n_examples=3)


def test_batches_add_up():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    acc = StatisticsAccumulator(3, 4)
    acc.add(x[:7], y[:7])
    acc.add(x[7:], y[7:])
    whole = device(x, y)
    for name, value in acc.tensors().items():
        np.testing.assert_allclose(value, whole[name], rtol=1e-6)


@pytest.mark.parametrize("damage, reason", [
    (lambda s: s.pop(PRESENT), "names"),
    (lambda s: s.update({SUMS: np.zeros((3, 3), np.float32)}), "shape"),
    (lambda s: s[SECOND_MOMENT].__setitem__((0, 0), np.nan), "non_finite"),
    (lambda s: s[COUNTS].__setitem__(1, 0.5), "n_examples"),
    (lambda s: s[COUNTS].__setitem__(1, 7), "n_examples"),
    (lambda s: s[PRESENT].__setitem__(1, 1), "shape"),
])
def test_bad_statistics_are_refused(damage, reason):
    stats = device([[1, 0], [3, 0], [0, 2]], [0, 0, 2])
    damage(stats)
    with pytest.raises(DataError) as info:
        check_statistics(stats, 3, 2, n_examples=3)
    assert info.value.reason == reason


def test_class_mean_head_is_a_scaled_cosine_classifier():
    total = sum_statistics([device([[2, 0], [0, 1]], [0, 1]), device([[4, 0]], [0])])
    weight = class_mean_head(total, scale=10.0)
    np.testing.assert_allclose(weight, [[10, 0], [0, 10], [0, 0]])  # class 2 unseen: a zero row here


def per_class_fedcof_gram(devices, classes):  # noqa: ANN001, ANN201
    """FedCOF's estimator written per class, from the devices' individual class means."""
    total = sum_statistics(devices)
    counts = total[COUNTS]
    mu = total[SUMS] / np.maximum(counts, 1)[:, None]
    gram = np.zeros((mu.shape[1],) * 2)
    for c in range(classes):
        gram += counts[c] * np.outer(mu[c], mu[c])
        holders = [d for d in devices if d[COUNTS][c] > 0]
        if len(holders) < 2:
            continue
        scatter = sum(d[COUNTS][c] * np.outer(d[SUMS][c] / d[COUNTS][c] - mu[c], d[SUMS][c] / d[COUNTS][c] - mu[c])
                      for d in holders)
        gram += (counts[c] - 1) * scatter / (len(holders) - 1)
    return gram


def test_fedcof_gram_matches_the_per_class_estimator_when_classes_share_the_ratio():
    rng = np.random.default_rng(1)
    # every class: 3 devices with 2 examples each, so (N_c - 1) / (K_c - 1) = 5 / 2 for all classes
    devices = []
    for _ in range(3):
        labels = np.repeat(np.arange(4), 2)
        devices.append(device(rng.normal(size=(8, 5)), labels, classes=4))
    gram, ratio = fedcof_gram(sum_statistics(devices))
    assert ratio == pytest.approx(2.5)
    np.testing.assert_allclose(gram, per_class_fedcof_gram(devices, 4), rtol=1e-5, atol=1e-6)


def test_fedcof_with_one_device_has_no_scatter_to_estimate():
    stats = device([[1, 0], [0, 1], [1, 1]], [0, 1, 1])
    gram, ratio = fedcof_gram(sum_statistics([stats]))
    assert ratio == 0.0
    np.testing.assert_allclose(gram, [[1, 0], [0, 0]] + np.outer([0.5, 1], [0.5, 1]) * 2)


def test_fedcof_head_is_ridge_regression_on_the_estimated_gram():
    rng = np.random.default_rng(2)
    devices = [device(rng.normal(size=(12, 4)), rng.integers(0, 3, 12)) for _ in range(4)]
    total = sum_statistics(devices)
    gram, _ = fedcof_gram(total)
    weight = fedcof_head(total, scale=3.0, ridge=0.5)
    np.testing.assert_allclose(weight, 3.0 * np.linalg.solve(gram + 0.5 * np.eye(4), total[SUMS].T).T, rtol=1e-8)


@pytest.mark.parametrize("method", ["class_means", "fedcof"])
def test_unseen_classes_keep_the_initial_head(method):
    total = sum_statistics([device([[1, 0], [0, 1]], [0, 1]), device([[2, 0]], [0])])
    initial_w, initial_b = np.full((3, 2), 0.01, np.float32), np.full(3, -0.5, np.float32)
    weight, bias, report = head_from_statistics(total, method, 20.0, 1.0, initial_w, initial_b)
    np.testing.assert_array_equal(weight[2], initial_w[2])
    np.testing.assert_array_equal(bias, [0, 0, -0.5])
    assert weight.dtype == np.float32 and bias.dtype == np.float32
    assert report["classes_seen"] == 2 and report["classes_unseen"] == 1 and report["head_init"] == method


def test_no_examples_at_all_is_an_error():
    empty = StatisticsAccumulator(3, 2).tensors()
    with pytest.raises(DataError, match="no examples"):
        head_from_statistics(sum_statistics([empty]), "class_means", 20.0, 1.0, np.zeros((3, 2)), np.zeros(3))
