"""A training-free task head from class statistics (the statistics round, round 0 of a job with a head init).

Each device runs the frozen model over its own data once and sends sums, never examples: per class, the sum
of the sentence embeddings the head reads (``sums``, [C, d]) and how many there were (``counts``, [C]);
whether it has the class at all (``present``, [C]); and the second moment of its class means weighted by
their counts, sum_c S_c S_c^T / n_c (``second_moment``, [d, d]). Sums over devices are all the coordinator
needs, so the round works with secure aggregation and noise could be added like any other sum.

Two heads are built from the summed statistics (logits = W f + b, f the embedding):

- ``class_means``: a cosine classifier (nearest class mean; FedNCM, Legate et al., NeurIPS 2023):
  W_c = scale * mu_c / ||mu_c||, b = 0.
- ``fedcof``: ridge regression on the features with class covariances estimated from the devices' class
  means (FedCOF, Goswami et al., 2024): a class mean over n examples scatters around the global class mean
  with covariance Sigma_c / n, so sum_k n_kc (mu_kc - mu_c)(mu_kc - mu_c)^T / (K_c - 1) estimates Sigma_c.
  With the second moments summed over devices, sum_k n_kc (mu_kc - mu_c)(...)^T = Q_c - N_c mu_c mu_c^T; the
  classes share one ratio r = sum_c (N_c - 1) / sum_c (K_c - 1) (K_c: devices holding class c) so one [d, d]
  sum suffices: G = M + r (Q - M), M = sum_c N_c mu_c mu_c^T, and W = scale * ((G + ridge I)^-1 S)^T.
  Fewer than two devices holding any class (no scatter to estimate from): r = 0, G = M.

Classes no device has seen keep the exported head's initial rows (small random weights, zero bias): their
logits stay near zero, below a seen class's, until devices holding them train them in the LoRA rounds.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from edgeft.errors import DataError

PREFIX = "statistics."
SUMS, COUNTS, PRESENT, SECOND_MOMENT = (PREFIX + n for n in ("sums", "counts", "present", "second_moment"))
HEADS = ("class_means", "fedcof")
# A job's head_init: a head, "auto" (the default head where the bundle allows one) or "none" (no statistics round)
HEAD_INIT_METHODS = ("auto", *HEADS, "none")


def statistics_shapes(num_classes: int, dimension: int) -> dict[str, tuple[int, ...]]:
    """The tensors one device sends in the statistics round, by name, with their shapes."""
    return {SUMS: (num_classes, dimension), COUNTS: (num_classes,), PRESENT: (num_classes,),
            SECOND_MOMENT: (dimension, dimension)}


class StatisticsAccumulator:
    """One device's class statistics, added up batch by batch (float64 sums)."""

    def __init__(self, num_classes: int, dimension: int):
        self.sums = np.zeros((num_classes, dimension))
        self.counts = np.zeros(num_classes)

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if features.ndim != 2 or features.shape[0] != labels.shape[0] or features.shape[1] != self.sums.shape[1]:
            raise DataError(f"features of shape {features.shape} do not fit labels of shape {labels.shape} and "
                            f"dimension {self.sums.shape[1]}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.counts)):
            raise DataError(f"labels must be class indices in [0, {len(self.counts)})")
        np.add.at(self.sums, labels, features.astype(np.float64))
        np.add.at(self.counts, labels, 1.0)

    def tensors(self) -> dict[str, np.ndarray]:
        """What the device sends (float32)."""
        scaled = self.sums / np.sqrt(np.maximum(self.counts, 1.0))[:, None]  # S_c / sqrt(n_c)
        return {SUMS: self.sums.astype(np.float32), COUNTS: self.counts.astype(np.float32),
                PRESENT: (self.counts > 0).astype(np.float32), SECOND_MOMENT: (scaled.T @ scaled).astype(np.float32)}


def check_statistics(tensors: Mapping[str, np.ndarray], num_classes: int, dimension: int, n_examples: int) -> None:
    """A device's statistics: the four tensors with their shapes, finite, counts whole and summing to
    ``n_examples``, ``present`` 0/1 and matching the counts. DataError (with a ``reason``) otherwise."""
    expected = statistics_shapes(num_classes, dimension)
    if set(tensors) != set(expected):
        raise DataError(f"class statistics must be exactly {sorted(expected)}; got {sorted(tensors)}", reason="names")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise DataError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}", reason="shape")
        if not np.all(np.isfinite(tensors[name])):
            raise DataError(f"{name} has NaN or infinite values", reason="non_finite")
    counts, present = tensors[COUNTS].astype(np.float64), tensors[PRESENT]
    if np.any(counts < 0) or np.any(counts != np.round(counts)) or counts.sum() != n_examples:
        raise DataError(f"class counts must be whole numbers >= 0 summing to n_examples={n_examples} "
                        f"(they sum to {counts.sum():g})", reason="n_examples")
    if not np.array_equal(present, (counts > 0).astype(present.dtype)):
        raise DataError("statistics.present must be 1 exactly for the classes with examples", reason="shape")


def sum_statistics(devices: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The element-wise sum of the devices' statistics (float64)."""
    if not devices:
        raise DataError("no class statistics to sum")
    return {name: sum(d[name].astype(np.float64) for d in devices) for name in devices[0]}


def class_mean_head(total: Mapping[str, np.ndarray], scale: float) -> np.ndarray:
    """W [C, d] of the cosine classifier: scale x the unit class means (zero rows for unseen classes)."""
    means = total[SUMS] / np.maximum(total[COUNTS], 1.0)[:, None]
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return scale * np.divide(means, norms, out=np.zeros_like(means), where=norms > 0)


def fedcof_gram(total: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """FedCOF's estimate of the feature Gram matrix sum_i f_i f_i^T from the summed statistics, and the
    shared ratio r it used (see the module docstring)."""
    counts, present = total[COUNTS], total[PRESENT]
    means = total[SUMS] / np.maximum(counts, 1.0)[:, None]
    between = (means * counts[:, None]).T @ means  # M = sum_c N_c mu_c mu_c^T
    scattered = present >= 2
    ratio = float((counts[scattered] - 1).sum() / (present[scattered] - 1).sum()) if scattered.any() else 0.0
    return between + ratio * (total[SECOND_MOMENT] - between), ratio


def fedcof_head(total: Mapping[str, np.ndarray], scale: float, ridge: float) -> np.ndarray:
    """W [C, d] of the FedCOF-style ridge classifier: scale x ((G + ridge I)^-1 S)^T."""
    gram, _ = fedcof_gram(total)
    dimension = gram.shape[0]
    return scale * np.linalg.solve(gram + ridge * np.eye(dimension), total[SUMS].T).T


def head_from_statistics(total: Mapping[str, np.ndarray], method: str, scale: float, ridge: float,
                         initial_weight: np.ndarray, initial_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """The head (weight [C, d], bias [C]) ``method`` builds from the summed statistics, unseen classes
    keeping ``initial_weight``/``initial_bias`` rows; and a report of what was done."""
    if method not in HEADS:
        raise ValueError(f"unknown head method {method!r}; expected one of {', '.join(HEADS)}")
    seen = total[COUNTS] > 0
    if not seen.any():
        raise DataError("the statistics round saw no examples at all: no head can be built")
    weight = class_mean_head(total, scale) if method == "class_means" else fedcof_head(total, scale, ridge)
    weight = np.where(seen[:, None], weight, initial_weight.astype(np.float64))
    bias = np.where(seen, 0.0, initial_bias.astype(np.float64))
    report = {"head_init": method, "scale": scale, "classes_seen": int(seen.sum()),
              "classes_unseen": int((~seen).sum()), "examples": int(total[COUNTS].sum())}
    if method == "fedcof":
        report.update(ridge=ridge, fedcof_ratio=round(fedcof_gram(total)[1], 4))
    return weight.astype(np.float32), bias.astype(np.float32), report
