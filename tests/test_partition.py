"""Partitions: disjoint, complete, reproducible, skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.errors import ConfigError, DataError
from edgeft.partition import label_histogram, parse_scheme, partition


@pytest.fixture()
def labels():
    return np.random.default_rng(0).integers(0, 20, size=2000)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "dirichlet:0.1", "shards:2"])
def test_partitions_are_disjoint_complete_and_reproducible(labels, scheme):
    parts = partition(labels, 10, scheme, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert all(len(p) >= 10 for p in parts)
    again = partition(labels, 10, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert label_histogram(labels, parts, 20).sum() == len(labels)


def test_skew_grows_as_alpha_shrinks(labels):
    def classes(scheme):
        return (label_histogram(labels, partition(labels, 10, scheme), 20) > 0).sum(1).mean()

    assert classes("iid") == 20
    assert classes("dirichlet:100") > classes("dirichlet:0.5") > classes("dirichlet:0.05")
    assert classes("shards:2") <= 4  # two label-sorted shards each span one or two classes


def test_iid_sizes_are_balanced(labels):
    assert {len(p) for p in partition(labels, 7, "iid")} <= {285, 286}


def test_bad_schemes_and_sizes(labels):
    for bad in ("zipf", "dirichlet", "dirichlet:-1", "shards:1.5", "iid:3"):
        with pytest.raises(ConfigError):
            parse_scheme(bad)
    with pytest.raises(DataError, match="cannot give"):
        partition(labels[:50], 10, "iid")
    with pytest.raises(DataError, match="one class label"):
        partition(labels.reshape(-1, 2), 2)
