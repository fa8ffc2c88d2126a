"""Fixed-point encoding: the decoded weighted mean is within step / 2 of the true one, negatives and
wrap-around decode right, and overflow is refused instead of giving a wrong sum."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.errors import ConfigError, SecAggError
from edgeft.secagg.fixedpoint import FixedPoint, ring_bits_for


def ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return total


@pytest.mark.parametrize("bits,ring", [(16, 32), (16, 64), (8, 32), (12, 64)])
def test_weighted_mean_within_half_a_step(bits, ring):
    codec = FixedPoint(bits=bits, clip=0.5, ring_bits=ring)
    rng = np.random.default_rng(bits + ring)
    xs = [rng.uniform(-0.5, 0.5, size=1000) for _ in range(7)]
    weights = [int(w) for w in rng.integers(1, 200, size=7)]
    mean, total = codec.decode(ring_sum([codec.encode(x, w) for x, w in zip(xs, weights)]))
    plain = sum(w * x for x, w in zip(xs, weights)) / sum(weights)
    assert total == sum(weights)
    assert np.max(np.abs(mean - plain)) <= codec.step / 2 + 1e-12
    assert codec.step == pytest.approx(0.5 / (2 ** (bits - 1) - 1))


def test_exact_values_and_negatives_round_trip():
    codec = FixedPoint(bits=8, clip=1.27, ring_bits=32)  # step 0.01
    x = np.array([-1.27, -0.01, 0.0, 0.01, 1.27])
    encoded = codec.encode(x, 3)
    assert encoded.dtype == np.uint32 and encoded[-1] == 3
    assert encoded[0] == 2 ** 32 - 3 * 127  # two's complement in the ring
    mean, weight = codec.decode(encoded)
    np.testing.assert_allclose(mean, x, atol=1e-12)
    assert weight == 3


def test_values_outside_the_range_are_clipped():
    codec = FixedPoint(bits=8, clip=1.0)
    mean, _ = codec.decode(codec.encode(np.array([-5.0, 5.0, np.float32(0.5)])))
    np.testing.assert_allclose(mean, [-1.0, 1.0, 64 / 127], atol=1e-12)


def test_sum_at_the_overflow_bound_decodes_and_beyond_is_refused():
    codec = FixedPoint(bits=16, clip=1.0, ring_bits=32)
    assert codec.max_total_weight == (2 ** 31 - 1) // 32767
    top = codec.encode(np.full(3, 1.0), codec.max_total_weight)  # the largest sum: every value at +clip
    bottom = codec.encode(np.full(3, -1.0), codec.max_total_weight)
    np.testing.assert_allclose(codec.decode(top)[0], 1.0)
    np.testing.assert_allclose(codec.decode(bottom)[0], -1.0)
    with pytest.raises(SecAggError, match="weight"):
        codec.encode(np.zeros(3), codec.max_total_weight + 1)
    with pytest.raises(SecAggError, match="overflowed"):
        codec.decode(ring_sum([top, top]))


def test_ring_bits_for_picks_the_smallest_ring():
    assert ring_bits_for(16, 60_000) == 32
    assert ring_bits_for(16, 100_000) == 64
    assert ring_bits_for(8, 10_000_000) == 32
    with pytest.raises(ConfigError):
        ring_bits_for(24, 2 ** 50)


@pytest.mark.parametrize("field,value", [("bits", 1), ("bits", 40), ("clip", 0), ("clip", float("inf")),
                                         ("ring_bits", 16)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"secure_aggregation.{field}"):
        FixedPoint(**{field: value})
