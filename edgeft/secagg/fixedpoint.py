"""Fixed-point encoding of float vectors into the ring Z_{2^k} (k = 32 or 64), where masked sums are taken.

A value x is clipped to [-clip, clip] and quantised to the integer q = round(x / step), with
step = clip / (2^(bits-1) - 1): ``bits`` = 16 gives fp16-like resolution (step = clip / 32767), ``bits`` = 8
int8-like (step = clip / 127). Example-weighted FedAvg: a client with weight w (its example count, or 1 for
an unweighted sum) sends w * q as an exact integer, plus w itself as one more ring element, so the sum
reveals sum_i w_i * q_i and sum_i w_i, and the weighted mean is step * sum_i w_i q_i / sum_i w_i.

Error bound: every client's rounding error is at most step / 2 per coordinate (values inside the clip
range), and a weighted mean of such errors is at most step / 2 too: |decoded mean - true mean| <= step / 2
(plus float64 rounding), whatever the number of clients.

Overflow bound: |sum_i w_i q_i| <= W * (2^(bits-1) - 1) with W = sum_i w_i must stay below 2^(k-1) for the
signed decode to be exact, and W below 2^k. ``ring_bits_for`` picks the smallest ring (32, else 64 bits)
that holds a given bound on W; ``encode`` refuses a weight that could overflow on its own, ``decode``
refuses a total weight above the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeft.errors import ConfigError, SecAggError, check_config

RING_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


def ring_bits_for(bits: int, max_total_weight: int) -> int:
    """The smallest ring (32 or 64 bits) whose signed range holds a sum of total weight ``max_total_weight``
    of ``bits``-bit values; ConfigError when even 64 bits cannot."""
    for ring in (32, 64):
        if max_total_weight * ((1 << (bits - 1)) - 1) < (1 << (ring - 1)):
            return ring
    raise ConfigError(f"a total weight of {max_total_weight} at bits={bits} overflows a 64-bit ring; lower "
                      "bits or job.max_update_examples")


@dataclass(frozen=True)
class FixedPoint:
    """Quantisation of values in [-clip, clip] to ``bits``-bit integers, summed in Z_{2^ring_bits}."""

    bits: int = 16
    clip: float = 1.0
    ring_bits: int = 32

    def __post_init__(self) -> None:
        check_config(isinstance(self.bits, int) and 2 <= self.bits <= 24, "secure_aggregation.bits", self.bits,
               "must be an integer in [2, 24] (16: fp16-like, 8: int8-like)")
        check_config(isinstance(self.clip, (int, float)) and np.isfinite(self.clip) and self.clip > 0,
               "secure_aggregation.clip", self.clip, "must be a positive number (the range of each value)")
        check_config(self.ring_bits in RING_DTYPES, "secure_aggregation.ring_bits", self.ring_bits, "must be 32 or 64")

    @property
    def levels(self) -> int:
        """The largest quantised magnitude, 2^(bits-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def step(self) -> float:
        """The quantisation step: the decoded mean is within step / 2 of the true mean."""
        return self.clip / self.levels

    @property
    def dtype(self) -> np.dtype:
        return RING_DTYPES[self.ring_bits]

    @property
    def max_total_weight(self) -> int:
        """The largest total weight a sum may carry without overflowing the ring."""
        return ((1 << (self.ring_bits - 1)) - 1) // self.levels

    def quantise(self, values: np.ndarray) -> np.ndarray:
        """Integers round(clip(x) / step) as int64 (round half to even)."""
        x = np.clip(np.asarray(values, dtype=np.float64), -self.clip, self.clip)
        return np.rint(x / self.step).astype(np.int64)

    def encode(self, values: np.ndarray, weight: int = 1) -> np.ndarray:
        """The ring vector [w * q(values)..., w] a client masks and sends (flattened, length n + 1)."""
        if not (isinstance(weight, (int, np.integer)) and 1 <= weight <= self.max_total_weight):
            raise SecAggError(f"weight {weight!r} must be an integer in [1, {self.max_total_weight}] for "
                              f"bits={self.bits} in a {self.ring_bits}-bit ring", reason="weight")
        q = self.quantise(np.ravel(values)) * int(weight)
        out = np.empty(q.size + 1, dtype=self.dtype)
        out[:-1] = q.astype(np.int64).view(np.uint64).astype(self.dtype)  # two's complement, reduced mod 2^k
        out[-1] = weight
        return out

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """(weighted mean as float64, total weight) from the ring sum of encoded vectors."""
        total = np.asarray(total, dtype=self.dtype)
        weight = int(total[-1])
        if not 1 <= weight <= self.max_total_weight:
            raise SecAggError(f"the summed weight {weight} is outside [1, {self.max_total_weight}]: the sum "
                              "overflowed or is not a sum of encoded vectors", reason="overflow")
        signed = total[:-1].astype(np.uint64)
        if self.ring_bits == 32:
            signed = signed.astype(np.uint32).view(np.int32).astype(np.int64)
        else:
            signed = signed.view(np.int64)
        return signed.astype(np.float64) * (self.step / weight), weight
