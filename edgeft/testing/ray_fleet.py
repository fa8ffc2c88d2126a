"""TEST TOOLING: ``edgeft simulate --backend ray``: the simulated devices as Ray actors, so that a fleet spreads
over a Ray cluster.

Design. Each device is one actor (asking for ``num_cpus`` = the simulation's ``threads``) whose ``run`` starts, on
the actor's node, exactly the agent process the process backend starts (``AgentSpec.command()`` with
``AgentSpec.environment()``: ``python -m edgeft.client FLAGS``, or the fleet-profile or Byzantine module, with the
node's torch stand-ins first on PYTHONPATH) and waits for it. The actor is a supervisor: Ray places it and holds
its CPUs; the device is the same real ONNX Runtime agent, in an OS process of its own, as everywhere else. Running
the agent's main inside the actor's worker instead would share that process with Ray's worker (its imports, its
output, its signals) and make it a device unlike the others.

Files. Nothing on this machine's disk is assumed visible on a node: the actor receives the bytes of every file the
agent's flags name (its data shard, the development CA, the client certificate and key, the job token, its cache's
device id) and writes them into a temporary folder on its node. The agent's cache folder is there too, and so are
its training slots: at most ``concurrency`` agents train at once on each node. When the agent ends (or is
stopped), ``run`` hands back its exit status and its log text, written here to ``out/devices/client-NNN/agent.log``
as the process backend has it.

Ray. Without ``ray_address`` a local instance with ``clients x threads`` CPUs is started and shut down at the end
(every agent runs for the whole job, so every actor must be placed at once); ``ray_address`` (``ray://HEAD:10001``
through Ray Client, ``HEAD:6379`` or ``auto``) connects to a running cluster, which must have that many CPUs.
Its nodes need edgeft installed in the Python Ray runs (the base, device-side install suffices) and must reach the
coordinator: agents dial ``advertise_host`` (default 127.0.0.1, right for a local instance or a cluster on this
machine only); give it an address of this machine the nodes reach, and the coordinator listens on every interface
with a TLS certificate that names it. Ray is imported in this module only, lazily: nothing else needs it.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

from edgeft.errors import ConfigError, EdgeftError
from edgeft.testing.agents import AgentSpec, agent_specs, start_agent

INSTALL = "the ray backend needs Ray: pip install 'edgeft[ray]'"
# the agent's flags whose values are files the node must hold
FILE_FLAGS = ("--data", "--ca-cert", "--client-cert", "--client-key", "--token-file")


def import_ray():  # noqa: ANN201 - the ray module
    """Ray, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(INSTALL) from exc
    return ray


class RayFleet:
    """A simulation's Ray connection (a context manager): ``start_agents`` places one actor per client;
    leaving stops them and disconnects, shutting down a local instance."""

    def __init__(self, config) -> None:  # noqa: ANN001 - a runner.SimulationConfig
        self.ray = import_ray()
        self.config = config
        self.agents: list[ActorAgent] = []
        self._connect()

    def __enter__(self) -> RayFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        config, ray = self.config, self.ray
        need = config.clients * config.threads
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        if config.ray_address is None:
            ray.init(address="local", num_cpus=need, include_dashboard=False, **quiet)
            where = "the local Ray instance"
        else:
            _check_reachable(config.ray_address)
            try:
                ray.init(address=config.ray_address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EdgeftError(f"cannot connect to the Ray cluster at {config.ray_address}: {exc}. "
                                  f"{_ADDRESS_HELP}") from exc
            where = f"the Ray cluster at {config.ray_address}"
        have = ray.cluster_resources().get("CPU", 0)
        if have < need:
            self.close()
            raise ConfigError(f"{where} has {have:g} CPUs; {config.clients} devices x {config.threads} thread(s) "
                              f"need {need}, all at once (every agent runs for the whole job): add nodes, or "
                              "lower --clients or --threads")

    def start_agents(self, config, port: int,  # noqa: ANN001 - a runner.SimulationConfig
                     transport_flags: list[str]) -> list[tuple[ActorAgent, Path]]:
        """One actor per client running its agent (``agents.agent_specs``) on its node: (agent, log) pairs as
        ``agents.start_agents`` gives (process, log) pairs."""
        device = self.ray.remote(_Device)
        run = uuid.uuid4().hex[:12]  # this simulation's training slots on each node
        for spec, cache in agent_specs(config, port, transport_flags):
            files = {i + 1: (f"{i:02d}-{Path(spec.flags[i + 1]).name}", Path(spec.flags[i + 1]).read_bytes())
                     for i, flag in enumerate(spec.flags) if flag in FILE_FLAGS}
            cache_files = {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}
            actor = device.options(num_cpus=config.threads, max_concurrency=2).remote()
            ref = actor.run.remote(spec, files, cache_files, run)
            self.agents.append(ActorAgent(self.ray, actor, ref, cache / "agent.log"))
        return [(agent, agent.log) for agent in self.agents]

    def close(self) -> None:
        """Stop every agent still running (its log comes back) and disconnect from Ray."""
        for agent in self.agents:
            agent.kill()
            self.ray.kill(agent.actor)
        self.agents = []
        if self.ray.is_initialized():
            self.ray.shutdown()


_ADDRESS_HELP = ("Give the head node's Ray Client address (ray://HEAD:10001) or its GCS address (HEAD:6379) from "
                 "`ray start --head`, or leave out --address to start a local Ray instance")


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at ``address``."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"invalid Ray address {address!r}: expected ray://HOST:PORT, HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise EdgeftError(f"cannot reach the Ray cluster at {address} ({exc}). {_ADDRESS_HELP}") from exc


class ActorAgent:
    """An agent in a Ray actor, watched as the runner watches an agent process (``poll``, ``returncode``,
    ``wait``, ``kill``); once it has ended, its log is in ``log``."""

    def __init__(self, ray, actor, ref, log: Path) -> None:  # noqa: ANN001 - the ray module, an actor, an ObjectRef
        self.ray, self.actor, self.ref, self.log = ray, actor, ref, log
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.ray.wait([self.ref], timeout=0)[0]:
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self.ray.wait([self.ref], timeout=timeout)[0]:
                raise subprocess.TimeoutExpired(f"agent {self.log.parent.name} (Ray actor)", timeout)
            self._collect()
        return self.returncode

    def kill(self) -> None:
        """Stop the agent process (the actor's ``stop``) and collect its log; the actor itself if that fails."""
        if self.returncode is not None:
            return
        self.actor.stop.remote()
        try:
            self.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.ray.kill(self.actor)
            self.returncode = -9
            self.log.write_text("the agent's Ray actor did not stop its agent within 30 s and was killed\n")

    def _collect(self) -> None:
        try:
            self.returncode, text = self.ray.get(self.ref)
        except self.ray.exceptions.RayError as exc:
            self.returncode, text = -1, f"the agent's Ray actor failed: {exc}\n"
        self.log.write_text(text)


class _Device:
    """The actor (on its node): writes the agent's files into a temporary folder, runs the agent there and hands
    back its exit status and log."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def run(self, spec: AgentSpec, files: dict[int, tuple[str, bytes]], cache_files: dict[str, bytes],
            run: str) -> tuple[int, str]:
        with tempfile.TemporaryDirectory(prefix="edgeft-device-") as tmp:
            folder = Path(tmp)
            flags = list(spec.flags)
            for i, (name, data) in files.items():
                (folder / name).write_bytes(data)
                flags[i] = str(folder / name)
            cache = folder / "cache"
            cache.mkdir()
            for name, data in cache_files.items():
                (cache / name).write_bytes(data)
            flags[flags.index("--cache-dir") + 1] = str(cache)
            slots = flags.index("--training-slots") + 1  # FOLDER:N -> a folder all this run's agents here share
            shared = Path(tempfile.gettempdir()) / f"edgeft-slots-{run}"
            shared.mkdir(exist_ok=True)
            flags[slots] = f"{shared}:{flags[slots].rpartition(':')[2]}"
            log = folder / "agent.log"
            if self.stopped:
                return -9, "stopped before the agent started\n"
            self.proc = start_agent(replace(spec, flags=tuple(flags)), log)
            code = self.proc.wait()
            return code, log.read_text(errors="replace")

    def stop(self) -> None:
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
