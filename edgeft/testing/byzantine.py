"""TEST TOOLING: Byzantine clients for simulated fleets (``SimulationConfig.attack``), never used by a real
device. An attacking agent trains honestly, then corrupts its update before the upload:

    sign_flip[:S]  x' = g - S * (x - g)       the delta reversed (S = 1 by default)
    scaled[:S]     x' = g + S * (x - g)       the delta blown up (S = 10 by default)
    random[:STD]   x' = g + N(0, STD^2)       noise instead of training (STD = 1.0 by default)

g is the round's global adapter, x the honestly trained one. An attacker is a real agent process,

    python -m edgeft.testing.byzantine --attack SPEC [--seed N] AGENT_FLAGS...

(the flags of ``edgeft client``) whose updates pass through ``Corruption``, the agent's ``tamper`` hook; the
statistics round's class statistics are sent honestly.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgeft.errors import ConfigError

if TYPE_CHECKING:
    from edgeft.wire import Task

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


@dataclass
class Corruption:
    """The ``tamper`` hook of an attacking agent: every trained update corrupted by ``attack``."""

    attack: Attack
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def __call__(self, tensors: dict[str, np.ndarray], task: Task) -> dict[str, np.ndarray]:
        if task.statistics:
            return tensors
        return corrupt(tensors, task.global_adapter, self.attack, self.rng)


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeft.testing.byzantine --attack SPEC [--seed N] AGENT_FLAGS...``: ``edgeft client`` as an
    attacker."""
    from edgeft.commands.client import add_arguments, run
    from edgeft.commands.common import execute
    from edgeft.testing.fleet_profile import add_profile_argument, conditions_of

    parser = argparse.ArgumentParser(prog="python -m edgeft.testing.byzantine",
                                     description="TEST TOOLING: a device agent that corrupts its updates")
    parser.add_argument("--attack", required=True, help="sign_flip[:S], scaled[:S] or random[:STD]")
    parser.add_argument("--seed", type=int, default=0, help="the random attack's seed (default 0)")
    add_profile_argument(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return execute("client", lambda: run(args, tamper=Corruption(Attack.parse(args.attack),
                                                                   np.random.default_rng(args.seed)),
                                         conditions=conditions_of(args)))


if __name__ == "__main__":
    sys.exit(main())
