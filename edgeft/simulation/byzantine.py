"""TEST TOOLING: Byzantine clients for simulated fleets (``SimulationConfig.attack``), never used by a real
device. An attacking agent trains honestly, then corrupts its update before the upload:

    sign_flip[:S]  x' = g - S * (x - g)       the delta reversed (S = 1 by default)
    scaled[:S]     x' = g + S * (x - g)       the delta blown up (S = 10 by default)
    random[:STD]   x' = g + N(0, STD^2)       noise instead of training (STD = 1.0 by default)

g is the round's global adapter, x the honestly trained one. The attack runs inside the simulated agent's
own process, by wrapping ``Agent.run_task`` there; the production agent code is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeft.errors import ConfigError

DEFAULT_STRENGTH = {"sign_flip": 1.0, "scaled": 10.0, "random": 1.0}


@dataclass(frozen=True)
class Attack:
    """A Byzantine behaviour: ``kind`` (sign_flip, scaled, random) and its strength (scale or noise std)."""

    kind: str
    strength: float

    @classmethod
    def parse(cls, spec: str) -> Attack:
        """``kind`` or ``kind:strength``, e.g. ``sign_flip``, ``scaled:10``, ``random:0.5``."""
        kind, _, value = spec.partition(":")
        if kind not in DEFAULT_STRENGTH:
            raise ConfigError(f"invalid attack={spec!r}: expected {', '.join(DEFAULT_STRENGTH)} (optionally :STRENGTH)")
        try:
            strength = float(value) if value else DEFAULT_STRENGTH[kind]
        except ValueError as exc:
            raise ConfigError(f"invalid attack={spec!r}: the strength after ':' must be a number") from exc
        if not np.isfinite(strength) or strength <= 0:
            raise ConfigError(f"invalid attack={spec!r}: the strength must be positive")
        return cls(kind, strength)

    def __str__(self) -> str:
        return f"{self.kind}:{self.strength:g}"


def corrupt(trained: dict[str, np.ndarray], global_adapter: dict[str, np.ndarray], attack: Attack,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The update an attacker sends instead of ``trained`` (float32, the same names and shapes)."""
    out = {}
    for name, x in trained.items():
        g = global_adapter[name].astype(np.float64)
        if attack.kind == "sign_flip":
            value = g - attack.strength * (x - g)
        elif attack.kind == "scaled":
            value = g + attack.strength * (x - g)
        else:
            value = g + rng.normal(0.0, attack.strength, size=x.shape)
        out[name] = value.astype(np.float32)
    return out


def run_agent(argv: list[str], spec: str, seed: int = 0) -> int:
    """``edgeft client`` with ``argv``, as an attacker: every trained update is corrupted before its upload
    (the statistics round's class statistics are sent honestly)."""
    from edgeft.client import agent as agent_module
    from edgeft.v1 import edgeft_pb2 as pb
    from edgeft.wire import tensor_from_pb

    attack, rng = Attack.parse(spec), np.random.default_rng(seed)
    honest = agent_module.Agent.run_task

    def run_task(self, task):  # noqa: ANN001, ANN202
        update = honest(self, task)
        if task.kind == pb.STATISTICS:
            return update
        global_adapter = dict(tensor_from_pb(t) for t in task.global_adapter)
        update.tensors = corrupt(update.tensors, global_adapter, attack, rng)
        return update

    agent_module.Agent.run_task = run_task  # this (simulated) agent process only
    from edgeft.cli import main

    return main(argv)
