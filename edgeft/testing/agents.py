"""TEST TOOLING: the device agents of a simulated fleet, as separate processes run the way a device runs them.

An honest agent is ``python -m edgeft.client FLAGS``, an attacker ``python -m edgeft.testing.byzantine --attack
SPEC --seed N FLAGS``, a device with simulated conditions (``edgeft.testing.fleet_profile``) ``python -m
edgeft.testing.fleet_profile --device-profile JSON --fleet-started T FLAGS`` (an attacker takes those flags too).
None can import torch, transformers or peft (devices have none): ``NO_TORCH``, a
folder of stand-ins whose import fails, comes first on their PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def simulation_tls(out: Path, hosts: tuple[str, ...] = ()):  # noqa: ANN202
    """A development CA, a server certificate for the loopback address (and ``hosts``: the address agents on other
    machines dial) and one client certificate that all agents share, in ``out/tls``: the TLS files (mutual TLS)
    and the agents' flags for them."""
    from edgeft.server.certs import CertsConfig, make_certs
    from edgeft.server.config import TlsConfig

    hosts = tuple(dict.fromkeys(("127.0.0.1", "localhost", *hosts)))
    files = make_certs(CertsConfig(out=out / "tls", hosts=hosts, clients=("device",), days=30))
    flags = ["--ca-cert", str(files["ca"]), "--client-cert", str(files["device"]),
             "--client-key", str(files["device_key"])]
    return TlsConfig(cert=files["server"], key=files["server_key"], client_ca=files["ca"]), flags


def write_token(coordinator, job_id: str, path: Path) -> Path:  # noqa: ANN001
    """One enrolment token for the simulated job, in a file only its owner can read."""
    _, token = coordinator.tokens.create(job_id, note="edgeft simulate")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


def start_agents(config, port: int,  # noqa: ANN001 - a runner.SimulationConfig
                 transport_flags: list[str]) -> list[tuple[subprocess.Popen, Path]]:
    """One agent process per client (``edgeft.testing.agents``), its output in its cache folder's agent.log; each
    under its device profile of ``config.fleet`` unless the fleet is uniform."""
    return [(start_agent(spec, cache / "agent.log"), cache / "agent.log")
            for spec, cache in agent_specs(config, port, transport_flags)]


def agent_specs(config, port: int,  # noqa: ANN001 - a runner.SimulationConfig
                transport_flags: list[str]) -> list[tuple[AgentSpec, Path]]:
    """Each client's agent and its cache folder (made here, with the client's readable device id), which holds
    the agent's log; agents dial the coordinator at ``config.advertise_host`` (default 127.0.0.1)."""
    agents, started = [], time.time()
    for i in range(config.clients):
        cache = config.out / "devices" / f"client-{i:03d}"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "device_id").write_text(f"client-{i:03d}")  # readable ids in the records
        shard = next((config.out / "clients").glob(f"client-{i:03d}.*"))  # .csv, or .jsonl for a causal LM
        flags = ["--server", f"{config.advertise_host or '127.0.0.1'}:{port}", "--data", str(shard),
                 "--cache-dir", str(cache), "--threads", str(config.threads),
                 "--training-slots", f"{config.out / 'slots'}:{config.slots}", "--give-up-after", "120",
                 *transport_flags]
        if config.client_ranks:
            flags += ["--max-lora-rank", str(config.client_ranks[i % len(config.client_ranks)])]
        # a device virtualenv's edgeft: not this environment's, nor a checkout's in the working folder
        python = config.client_pythons[i % len(config.client_pythons)] if config.client_pythons else None
        attacker = i < config.attackers  # test tooling: a Byzantine client
        profile = None if config.fleet.uniform else config.fleet.device(i).to_json()
        spec = AgentSpec(tuple(flags), python, config.attack if attacker else None, config.seed + i, profile, started)
        agents.append((spec, cache))
    return agents
