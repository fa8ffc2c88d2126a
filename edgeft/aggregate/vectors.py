"""Adapters as vectors: deltas, norms, weighted sums and a fixed flattening order (the arithmetic every rule
shares)."""

from __future__ import annotations

import numpy as np


def delta(tensors: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """tensors - reference, by name, in float64."""
    return {k: v.astype(np.float64) - reference[k].astype(np.float64, copy=False) for k, v in tensors.items()}


def accumulate(total: dict[str, np.ndarray], tensors: dict[str, np.ndarray], weight: float) -> None:
    """total[name] += weight * tensors[name], in float64, in place."""
    for name, value in tensors.items():
        total[name] += weight * value.astype(np.float64, copy=False)


def global_norm(tensors: dict[str, np.ndarray]) -> float:
    """The L2 norm of all tensors taken together as one vector (summed in name order: the same float whatever the
    order of the dict, e.g. an update as received or as read back from the store)."""
    return float(np.sqrt(sum(float(np.square(tensors[k], dtype=np.float64).sum()) for k in sorted(tensors))))


def flatten(tensors: dict[str, np.ndarray], names: list[str], dtype: type = np.float64) -> np.ndarray:
    """The tensors named in ``names``, in that order, as one vector."""
    return np.concatenate([np.asarray(tensors[n], dtype=dtype).ravel() for n in names])


def unflatten(vector: np.ndarray, template: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The inverse of ``flatten``: float32 tensors shaped like ``template``."""
    out, offset = {}, 0
    for name in names:
        shape = template[name].shape
        size = int(np.prod(shape))
        out[name] = vector[offset:offset + size].reshape(shape).astype(np.float32)
        offset += size
    return out
