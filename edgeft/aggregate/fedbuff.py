"""FedBuff's arithmetic (Nguyen et al., AISTATS 2022): a buffer of K updates, each trained from an older global
version, becomes one step of the global adapter, each update weighted down by its staleness.

    staleness_k = t - tau_k              (t: the current global version; tau_k: the version update k trained from)
    s(staleness) = 1                                              constant
                 = (1 + staleness)^(-a)                           polynomial, a = exponent
                 = 1 if staleness <= b else 1 / (a (staleness - b) + 1)   hinge, a = hinge_slope, b = hinge_start
    w_k = s(staleness_k) * n_k / sum_j n_j                          (n_k: update k's example count)
    step = server_lr * sum_k w_k * delta_k                        (delta_k: update k's adapter minus its base)

and the new global adapter is x + step (``edgeft.aggregate.delta.plain_step``). The staleness functions are Xie
et al.'s (FedAsync, 2019); updates staler than ``max_staleness`` are refused. The paper's step is the
staleness-scaled sum of the K deltas divided by K; here each delta counts by its share of the buffer's examples
instead of 1/K (the same when the counts are equal), so stale updates shorten the step, as in the paper, and a
buffer of fresh updates with ``constant`` weighting takes FedAvg's step.

Pure functions only: the coordinator's asynchronous jobs (``mode = "async"``) run them in
``edgeft.server.async_rounds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np

from edgeft.aggregate.delta import State
from edgeft.aggregate.options import is_integer, is_number
from edgeft.aggregate.vectors import accumulate
from edgeft.errors import ConfigError, Rejected, check_config

Staleness = Literal["constant", "polynomial", "hinge"]
STALENESS_FUNCTIONS: tuple[str, ...] = get_args(Staleness)
TABLE = "job.async"  # where a job file holds these settings (validation messages name TABLE.field)


def constant(staleness: int) -> float:  # noqa: ARG001
    """1: every update counts fully, however stale."""
    return 1.0


def polynomial(staleness: int, exponent: float) -> float:
    """(1 + staleness)^(-exponent)."""
    return (1.0 + staleness) ** -exponent


def hinge(staleness: int, slope: float, start: int) -> float:
    """1 up to ``start`` versions behind, then 1 / (slope * (staleness - start) + 1)."""
    return 1.0 if staleness <= start else 1.0 / (slope * (staleness - start) + 1.0)


def _check(cond: bool, name: str, value: object, why: str) -> None:
    check_config(cond, f"{TABLE}.{name}", value, why)


@dataclass(frozen=True)
class FedBuffOptions:
    """The settings of an asynchronous (FedBuff) job.

    buffer_size: K, the accepted updates that make one new global version.
    staleness: how an update is weighted by how many versions old its base is: ``constant``, ``polynomial``
      ((1 + staleness)^-exponent) or ``hinge`` (1 up to hinge_start, then 1 / (hinge_slope (staleness -
      hinge_start) + 1)).
    exponent: polynomial's a. hinge_slope, hinge_start: hinge's a and b.
    max_staleness: updates trained from a version more than this many versions old are refused.
    server_lr: the step is server_lr times the weighted mean delta (1: the mean itself, as FedAvg).
    """

    buffer_size: int = 10
    staleness: Staleness = "polynomial"
    exponent: float = 0.5
    hinge_slope: float = 10.0
    hinge_start: int = 4
    max_staleness: int = 10
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        _check(is_integer(self.buffer_size) and self.buffer_size >= 1, "buffer_size", self.buffer_size,
               "must be an integer >= 1")
        _check(self.staleness in STALENESS_FUNCTIONS, "staleness", self.staleness,
               f"expected one of {', '.join(STALENESS_FUNCTIONS)}")
        _check(is_number(self.exponent) and self.exponent > 0, "exponent", self.exponent,
               "must be positive (staleness = 'constant' weighs every update 1)")
        _check(is_number(self.hinge_slope) and self.hinge_slope > 0, "hinge_slope", self.hinge_slope,
               "must be positive")
        _check(is_integer(self.hinge_start) and self.hinge_start >= 0, "hinge_start", self.hinge_start,
               "must be an integer >= 0")
        _check(is_integer(self.max_staleness) and self.max_staleness >= 0, "max_staleness", self.max_staleness,
               "must be an integer >= 0")
        _check(is_number(self.server_lr) and self.server_lr > 0, "server_lr", self.server_lr, "must be positive")
        owners = {"exponent": "polynomial", "hinge_slope": "hinge", "hinge_start": "hinge"}
        for name, owner in owners.items():
            default = getattr(FedBuffOptions, name)
            _check(self.staleness == owner or getattr(self, name) == default, name, getattr(self, name),
                   f"applies to staleness = {owner!r} only, not {self.staleness!r}")

    def weight(self, staleness: int) -> float:
        """The staleness function chosen, at ``staleness``."""
        if self.staleness == "polynomial":
            return polynomial(staleness, self.exponent)
        if self.staleness == "hinge":
            return hinge(staleness, self.hinge_slope, self.hinge_start)
        return constant(staleness)


@dataclass(frozen=True)
class BufferedUpdate:
    """One accepted update waiting in the buffer: the global version it trained from, its example count, and
    its delta (its adapter minus that version's global adapter), tensor by name."""

    version: int
    n_examples: int
    delta: dict[str, np.ndarray]


def check_staleness(current_version: int, trained_from: int, options: FedBuffOptions) -> int:
    """How many versions behind ``current_version`` an update trained from ``trained_from`` is; ``Rejected``
    (reason ``"stale"``, or ``"version"`` for a version not made yet) when it cannot be accepted."""
    staleness = current_version - trained_from
    if staleness < 0:
        raise Rejected(f"update trained from version {trained_from}, but the latest global version is "
                       f"{current_version}", reason="version")
    if staleness > options.max_staleness:
        raise Rejected(f"update trained from version {trained_from} is {staleness} versions behind version "
                       f"{current_version}; {TABLE}.max_staleness is {options.max_staleness}", reason="stale")
    return staleness


@dataclass(frozen=True)
class BufferStep:
    """A buffer's aggregate. step: server_lr * the weighted mean delta, float64 (add it to the global adapter);
    weights: each buffered update's normalised weight (0 for a refused one); staleness: each update's;
    refused: (position in the buffer, why) for each refused update."""

    step: State
    weights: tuple[float, ...]
    staleness: tuple[int, ...]
    refused: tuple[tuple[int, Rejected], ...]

    def report(self) -> dict:
        """JSON-ready facts about the buffer, for the version's record."""
        return {"updates": len(self.weights) - len(self.refused), "weights": list(self.weights),
                "staleness": list(self.staleness),
                "refused": [{"index": i, "reason": e.reason, "message": str(e)} for i, e in self.refused]}


def aggregate_buffer(current_version: int, buffer: Sequence[BufferedUpdate], options: FedBuffOptions) -> BufferStep:
    """FedBuff's server step for ``buffer`` (at most ``buffer_size`` updates) at ``current_version``: see the
    module docstring. Updates ``check_staleness`` refuses are left out and listed; ConfigError when none is left."""
    if len(buffer) > options.buffer_size:
        raise ConfigError(f"a buffer of {len(buffer)} updates is larger than {TABLE}.buffer_size="
                          f"{options.buffer_size}")
    staleness, raw, refused = [], [], []
    total: State | None = None
    for index, update in enumerate(buffer):
        staleness.append(current_version - update.version)
        try:
            check_staleness(current_version, update.version, options)
        except Rejected as exc:
            refused.append((index, exc))
            raw.append(0.0)
            continue
        weight = options.weight(staleness[-1]) * update.n_examples
        if total is None:
            total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in update.delta.items()}
        accumulate(total, update.delta, weight)
        raw.append(weight)
    examples = sum(u.n_examples for i, u in enumerate(buffer) if i not in {r for r, _ in refused})
    if total is None or examples <= 0:
        why = "; ".join(str(exc) for _, exc in refused)
        raise ConfigError(f"no updates to average{': ' + why if why else ''}")
    step = {k: options.server_lr * (v / examples) for k, v in total.items()}
    return BufferStep(step, tuple(w / examples for w in raw), tuple(staleness), tuple(refused))
