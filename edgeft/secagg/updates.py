"""Adapter updates <-> ring vectors for a secure round.

A device encodes its *delta* (its adapter minus the round's global adapter, every tensor flattened in
sorted name order, optionally clipped to an L2 norm first) with the round's ``FixedPoint``, weighted by its
example count (FedAvg) or by 1 (differential privacy's unweighted sum). The coordinator decodes the
unmasked sum into the weighted mean delta and the total weight, and hands them to the job's strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeft.aggregate.privacy import clip_to_norm
from edgeft.errors import SecAggError
from edgeft.secagg.fixedpoint import FixedPoint

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class SecAggSettings:
    """How the devices of a secure round encode their updates (travels in the task)."""

    bits: int
    clip: float
    ring_bits: int
    threshold: int
    weighted: bool = True
    max_weight: int = 1_000_000
    clip_norm: float | None = None

    @property
    def codec(self) -> FixedPoint:
        return FixedPoint(bits=self.bits, clip=self.clip, ring_bits=self.ring_bits)


def round_context(job_id: str, round_number: int) -> bytes:
    """What binds every key, seed and ciphertext of a round to that round."""
    return f"edgeft/secagg/v1:{job_id}:{round_number}".encode()


def vector_length(template: Tensors) -> int:
    """Ring elements of one masked input: every adapter value, then the weight."""
    return sum(int(np.prod(v.shape)) for v in template.values()) + 1


def encode_update(tensors: Tensors, n_examples: int, global_adapter: Tensors,
                  settings: SecAggSettings) -> tuple[np.ndarray, dict[str, float]]:
    """The ring vector a device masks, and facts about the encoding (its delta's norm, values clipped)."""
    if sorted(tensors) != sorted(global_adapter):
        raise SecAggError("the update's tensors are not the global adapter's", reason="shape")
    delta = {k: tensors[k].astype(np.float64) - global_adapter[k].astype(np.float64) for k in sorted(tensors)}
    for k in delta:
        if delta[k].shape != global_adapter[k].shape:
            raise SecAggError(f"tensor {k!r} has shape {delta[k].shape}, not {global_adapter[k].shape}",
                              reason="shape")
    facts: dict[str, float] = {}
    if settings.clip_norm:
        delta, norm = clip_to_norm(delta, settings.clip_norm)
        facts["delta_norm"] = float(norm)
    flat = np.concatenate([delta[k].ravel() for k in sorted(delta)]) if delta else np.zeros(0)
    if not np.all(np.isfinite(flat)):
        raise SecAggError("the update has non-finite values", reason="finite")
    facts["values_clipped"] = float(np.count_nonzero(np.abs(flat) > settings.clip))
    weight = min(int(n_examples), settings.max_weight) if settings.weighted else 1
    return settings.codec.encode(flat, weight), facts


def decode_sum(total: np.ndarray, settings: SecAggSettings, template: Tensors) -> tuple[Tensors, int]:
    """(the weighted sum of the deltas as float64 tensors shaped like ``template``, the total weight) from an
    unmasked ring sum; the weighted mean delta is the first divided by the second."""
    mean, weight = settings.codec.decode(total)
    out, offset = {}, 0
    for name in sorted(template):
        size = int(np.prod(template[name].shape))
        out[name] = (mean[offset: offset + size] * weight).reshape(template[name].shape)
        offset += size
    if offset != mean.size:
        raise SecAggError(f"the unmasked sum has {mean.size} values, the adapter {offset}", reason="shape")
    return out, weight
