"""Client-level differential privacy (DP-FedAvg, McMahan et al., 2018), central model.

Each client's delta (its adapter minus the global one) is clipped to L2 norm C; the clipped deltas are
summed unweighted, Gaussian noise of std sigma * C is added to the sum, and the sum is divided by a fixed
denominator: the number of clients selected for the round, known before any client trains. Under the
add-or-remove-one-client relation the sum's sensitivity is C, so each round is a Gaussian mechanism with
noise multiplier sigma. (Dividing by the number of updates that arrived instead would make the denominator
depend on who took part; the fixed one keeps the estimate's noise at sigma * C / n and is unbiased when
everyone selected answers; dropouts shrink the step.)

Privacy is accounted with Google's ``dp-accounting`` RDP accountant, per round and composed over the job's
rounds, without amplification by sampling (the coordinator picks a fixed number of clients among those
connected, which is not the Poisson sampling the amplification theorems assume): the reported epsilon is
an upper bound.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeft.aggregate.vectors import global_norm
from edgeft.errors import ConfigError


def clip_to_norm(tensors: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``tensors`` scaled by min(1, clip_norm / ||tensors||) (one norm over all of them), and that norm."""
    norm = global_norm(tensors)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in tensors.items()}, norm


def gaussian_noise(template: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Independent N(0, std^2) noise shaped like ``template``, in float64, drawn in sorted name order."""
    return {name: rng.normal(0.0, std, size=template[name].shape) for name in sorted(template)}


def private_mean(total: dict[str, np.ndarray], noise: dict[str, np.ndarray], denominator: int) -> dict[str, np.ndarray]:
    """(sum of clipped deltas + noise) / denominator: the fixed-denominator estimate of the mean delta."""
    if denominator <= 0:
        raise ConfigError("no updates to average")
    return {k: (v + noise[k]) / denominator for k, v in total.items()}


def epsilon(noise_multipliers: Sequence[float], delta: float) -> float | None:
    """The epsilon at ``delta`` of composing one Gaussian mechanism per round with these noise multipliers
    (RDP accountant, no sampling amplification); None when a round had no noise (no finite bound)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return None
    accountant = _accountant()
    for sigma in noise_multipliers:
        accountant.compose(_gaussian(float(sigma)))
    return float(accountant.get_epsilon(delta))


def require_accountant() -> None:
    """Raise ConfigError when the privacy accountant library is missing."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError as exc:
        raise ConfigError("differential privacy (noise_multiplier > 0) needs the dp-accounting package: "
                          "pip install 'edgeft[server]'") from exc


def _accountant():  # noqa: ANN202
    require_accountant()
    from dp_accounting import rdp

    return rdp.RdpAccountant()


def _gaussian(sigma: float):  # noqa: ANN202
    import dp_accounting

    return dp_accounting.GaussianDpEvent(sigma)
