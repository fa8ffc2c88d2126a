"""TEST TOOLING: the device agents of a simulated fleet, as separate processes run the way a device runs them.

An honest agent is ``python -m edgeft.client FLAGS``, an attacker ``python -m edgeft.testing.byzantine --attack
SPEC --seed N FLAGS``, a device with simulated conditions (``edgeft.testing.fleet_profile``) ``python -m
edgeft.testing.fleet_profile --device-profile JSON --fleet-started T FLAGS`` (an attacker takes those flags too). Neither can import torch, transformers or peft (devices have none): ``NO_TORCH``, a
folder of stand-ins whose import fails, comes first on their PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NO_TORCH = Path(__file__).resolve().parent / "no_torch"


@dataclass(frozen=True)
class AgentSpec:
    """One simulated device: its ``edgeft client`` flags, the Python it runs with (None: this one) and, for a
    Byzantine client, its attack (``edgeft.testing.byzantine.Attack`` spec) and seed; for a device with simulated
    conditions, its ``DeviceProfile`` as JSON and the Unix time its fleet's availability clock started."""

    flags: tuple[str, ...]
    python: Path | None = None
    attack: str | None = None
    seed: int = 0
    profile: str | None = None
    started: float | None = None

    def command(self) -> list[str]:
        conditions = [] if self.profile is None else ["--device-profile", self.profile, "--fleet-started",
                                                      str(self.started if self.started is not None else 0.0)]
        if self.attack is not None:
            module = ["-m", "edgeft.testing.byzantine", "--attack", self.attack, "--seed", str(self.seed), *conditions]
        elif conditions:
            module = ["-m", "edgeft.testing.fleet_profile", *conditions]
        else:
            module = ["-m", "edgeft.client"]
        return [str(self.python or sys.executable), *module, *self.flags]

    def environment(self) -> dict[str, str]:
        """This process's environment with the stand-ins first on PYTHONPATH; for another Python (a device
        virtualenv with edgeft installed) none of this environment's paths, nor a checkout in the working folder."""
        if self.python is None:
            paths = [str(NO_TORCH), *filter(None, [os.environ.get("PYTHONPATH")])]
            return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        return {**env, "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1", "PYTHONPATH": str(NO_TORCH)}


def start_agent(spec: AgentSpec, log: Path) -> subprocess.Popen:
    """Start the agent with its output (stdout and stderr) in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(spec.command(), stdout=out, stderr=subprocess.STDOUT, env=spec.environment())
