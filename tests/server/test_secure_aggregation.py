"""Secure aggregation through the real coordinator on a loopback port with real agents (in threads, so the
test can keep the updates they computed): the new global adapter equals plain FedAvg of those updates to
the fixed-point precision; a device that vanishes after the key phase does not stop the round; too many
vanishing abort it; the state folder never holds an individual update; a restart fails the open round."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors

from edgeft.client.agent import Agent, AgentConfig
from edgeft.client.transport import Transport
from edgeft.errors import ConfigError, Rejected
from edgeft.secagg.fixedpoint import FixedPoint
from edgeft.server.config import ClientSelection, JobConfig, SecureAggregation, ServerConfig, load_server_config
from edgeft.server.coordinator import Coordinator
from edgeft.update import AdapterUpdate
from edgeft.wire import SecAggHeader, UploadHeader

from conftest_server import enrol, five_intents, start, write_csv

CLIP = 1.0
SECURE = {"secure_aggregation": SecureAggregation(max_dropout_fraction=0.3, bits=16, clip=CLIP, phase_timeout_s=3)}


class Vanished(Exception):
    """A device that dies mid-protocol."""


class RecordingAgent(Agent):
    """A real agent that keeps each round's global adapter and the update it computed; with ``vanish_after``
    set it dies once that phase's answer came (it never sends the next message)."""

    vanish_after: str | None = None
    hold_before: str | None = None  # wait for ``release`` before asking for this answer
    release: threading.Event | None = None

    def run_task(self, task):  # noqa: ANN001, ANN201
        update = super().run_task(task)
        self.seen = getattr(self, "seen", {})
        self.seen[task.round] = (dict(task.global_adapter), update)
        return update

    def _secure_call(self, header, step, expect):  # noqa: ANN001, ANN202
        if expect == self.hold_before:
            self.holding = True
            self.release.wait(timeout=120)
        answer = super()._secure_call(header, step, expect)
        if expect == self.vanish_after:
            raise Vanished(f"{self.device_id} vanished after the {expect} answer")
        return answer


def shards(tmp_path: Path, count: int) -> list[Path]:
    rows = five_intents("train")
    return [write_csv(tmp_path / f"shard{i}.csv", rows[i::count][: 60 + 20 * i]) for i in range(count)]


def run_agents(tmp_path, port, token, data, vanish: dict[int, str] | None = None) -> list[RecordingAgent]:
    agents = []
    for i, shard in enumerate(data):
        agent = RecordingAgent(AgentConfig(server=f"127.0.0.1:{port}", data=shard, cache_dir=tmp_path / f"device{i}",
                                           threads=1, poll_wait_s=1, give_up_after_s=60,
                                           transport=Transport(token=Path(token).read_text().strip(), insecure=True)))
        agent.vanish_after = (vanish or {}).get(i)
        agents.append(agent)
    def serve(agent: RecordingAgent) -> None:
        try:
            agent.finished = agent.run()
        except Vanished:
            agent.finished = None

    for agent in agents:
        agent.thread = threading.Thread(target=serve, args=(agent,), daemon=True)
        agent.thread.start()
    return agents


def agents_stopped(agents: list[RecordingAgent]) -> list[str | None]:
    """Each agent's final word from the coordinator (None: it vanished) once its thread ended."""
    for agent in agents:
        agent.thread.join(timeout=30)
        assert not agent.thread.is_alive()
    return [agent.finished for agent in agents]


def state_holds_no_update(state_dir: Path, agents: list[RecordingAgent]) -> None:
    """No blob of the artifact store and no byte run of the database is an agent's update, or its delta."""
    individual = []
    for agent in agents:
        for global_adapter, update in getattr(agent, "seen", {}).values():
            for name, value in update.tensors.items():
                individual.append(value.astype(np.float32))
                individual.append((value - global_adapter[name]).astype(np.float32))
    assert individual
    blobs = [p for p in (state_dir / "artifacts").rglob("*") if p.is_file()]
    for path in blobs:
        raw = path.read_bytes()
        try:
            tensors = load_tensors(raw)
        except Exception:  # bundle files (ONNX, checkpoint), not tensors
            tensors = {}
        for stored in tensors.values():
            for value in individual:
                assert stored.shape != value.shape or not np.allclose(stored, value, atol=1e-7), path
        for value in individual:
            if value.size >= 4 and np.any(value):
                assert value.tobytes()[:16] not in raw, path
    database = b"".join(p.read_bytes() for p in state_dir.glob("state.db*"))
    for value in individual:
        if value.size >= 4 and np.any(value):
            assert value.tobytes()[:16] not in database
    with sqlite3.connect(state_dir / "state.db") as conn:
        assert conn.execute("select count(*) from updates").fetchone() == (0,)


def test_secure_rounds_give_fedavg_of_the_updates_and_store_none_of_them(tmp_path, tiny_bundle):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=2, minimum=3, job_settings=SECURE)
    try:
        agents = run_agents(tmp_path, port, enrol(coordinator, tmp_path), shards(tmp_path, 3))
        coordinator.wait_until_finished(timeout=240)
        assert coordinator.job_status("banking")["status"] == "finished", coordinator.job_status("banking")
        step = FixedPoint(bits=16, clip=CLIP).step
        for number in (1, 2):
            seen = [a.seen[number] for a in agents]
            start_adapter = coordinator.global_adapter("banking", number - 1)
            for global_adapter, update in seen:
                for name, value in update.tensors.items():
                    assert np.array_equal(global_adapter[name], start_adapter[name])
                    assert np.max(np.abs(value - global_adapter[name])) < CLIP  # nothing clipped: exact test
            weight = sum(u.n_examples for _, u in seen)
            new = coordinator.global_adapter("banking", number)
            for name, value in new.items():
                fedavg = sum(u.n_examples * u.tensors[name].astype(np.float64) for _, u in seen) / weight
                error = np.max(np.abs(value - fedavg))
                assert error <= step / 2 + 1e-6, (name, error)
            report = coordinator.history("banking")["rounds"][number]["aggregation"]["secure_aggregation"]
            assert report["survivors"] == sorted(a.device_id for a in agents) and report["total_weight"] == weight
        state_holds_no_update(tmp_path / "state", agents)
    finally:
        server.stop(grace=None)


def test_a_device_vanishing_after_the_key_phase_does_not_stop_the_round(tmp_path, tiny_bundle):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=4, job_settings=SECURE)
    try:
        agents = run_agents(tmp_path, port, enrol(coordinator, tmp_path), shards(tmp_path, 4), vanish={3: "inbox"})
        coordinator.wait_until_finished(timeout=240)
        assert coordinator.job_status("banking")["status"] == "finished", coordinator.job_status("banking")
        report = coordinator.history("banking")["rounds"][1]["aggregation"]["secure_aggregation"]
        assert report["threshold"] == 3 and report["dropped_after_sharing"] == [agents[3].device_id]
        assert agents_stopped(agents)[3] is None
        survivors = [a.seen[1] for a in agents[:3]]
        weight = sum(u.n_examples for _, u in survivors)
        step = FixedPoint(bits=16, clip=CLIP).step
        for name, value in coordinator.global_adapter("banking", 1).items():
            fedavg = sum(u.n_examples * u.tensors[name].astype(np.float64) for _, u in survivors) / weight
            assert np.max(np.abs(value - fedavg)) <= step / 2 + 1e-6, name
        state_holds_no_update(tmp_path / "state", agents)
    finally:
        server.stop(grace=None)


def test_too_many_vanishing_devices_abort_the_round_without_unmasking(tmp_path, tiny_bundle):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=4, job_settings=SECURE)
    try:
        agents = run_agents(tmp_path, port, enrol(coordinator, tmp_path), shards(tmp_path, 4),
                            vanish={2: "inbox", 3: "inbox"})
        coordinator.wait_until_finished(timeout=240)
        status = coordinator.job_status("banking")
        assert status["status"] == "failed" and "fewer than the threshold 3" in status["message"], status
        words = agents_stopped(agents)
        assert words[2:] == [None, None] and all("job banking failed" in w for w in words[:2]), words
        history = coordinator.history("banking")
        assert history["rounds"][1]["status"] == "failed"
        with pytest.raises(Exception, match="no round 1"):
            coordinator.global_adapter("banking", 1)
        state_holds_no_update(tmp_path / "state", agents)
    finally:
        server.stop(grace=None)


def secure_job(bundle, **kw) -> JobConfig:
    return JobConfig(id="j", bundle=bundle.path, rounds=1, clients=ClientSelection(min=3), **SECURE, **kw)


def test_a_restart_mid_round_fails_the_round_cleanly(tmp_path, tiny_bundle):
    from edgeft.secagg import SecAggClient
    from edgeft.secagg.updates import round_context

    config = ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(secure_job(tiny_bundle),))
    first = Coordinator(config)
    for device in ("a", "b", "c"):
        first.register(device, {}, "j")
    tasks = [first.poll(device, "j") for device in ("a", "b", "c")]
    assert all(t.secure is not None and t.secure.threshold == 3 for t in tasks)
    with pytest.raises(Rejected, match="aggregates securely"):
        first.submit(UploadHeader("j", 1, "a", "u"), AdapterUpdate(tasks[0].global_adapter, 5))
    for device in ("a", "b"):
        assert first.secure_step(SecAggHeader("j", 1, device),
                                 SecAggClient(device, round_context("j", 1)).advertise()) is None
    assert first.poll("a", "j") is None  # no second task for a device in the protocol
    first.engine.dispose()
    second = Coordinator(config)  # the protocol state was in the first process only
    status = second.job_status("j")
    assert status["status"] == "failed" and "lives in memory only" in status["message"]
    assert second.history("j")["rounds"][1]["status"] == "failed"
    assert second.global_adapter("j").keys() == tasks[0].global_adapter.keys()  # round 0 intact


def test_secure_aggregation_settings_are_checked(tmp_path, tiny_bundle):
    with pytest.raises(ConfigError, match="only mean strategies"):
        secure_job(tiny_bundle, strategy="median")
    with pytest.raises(ConfigError, match="max_dropout_fraction"):
        SecureAggregation(max_dropout_fraction=0.5)
    with pytest.raises(ConfigError, match="secure_aggregation.bits"):
        SecureAggregation(bits=40)
    with pytest.raises(ConfigError, match="clients.min"):
        JobConfig(id="j", bundle=tiny_bundle.path, clients=ClientSelection(min=1), **SECURE)
    (tmp_path / "jobs.toml").write_text(f"""
[server]
insecure = true
[[job]]
id = "j"
bundle = "{tiny_bundle.path}"
strategy = "fedadam"
[job.clients]
min = 3
[job.strategy_options]
clip_norm = 1.0
noise_multiplier = 0.5
[job.secure_aggregation]
bits = 8
clip = 0.05
""")
    job = load_server_config(tmp_path / "jobs.toml").jobs[0]
    assert job.secure_aggregation == SecureAggregation(bits=8, clip=0.05)
    from edgeft.server.secure import round_settings

    settings = round_settings(job, 10)  # DP: unweighted sums of deltas the devices clip to norm 1.0
    assert (settings.weighted, settings.max_weight, settings.clip_norm, settings.threshold, settings.ring_bits) == (
        False, 1, 1.0, 7, 32)
    (tmp_path / "bad.toml").write_text((tmp_path / "jobs.toml").read_text() + "typo = 1\n")
    with pytest.raises(ConfigError, match="typo"):
        load_server_config(tmp_path / "bad.toml")


def play_secure_round(coordinator: Coordinator, deltas: dict[str, float], examples: int = 10) -> int:
    """Devices in ``deltas`` train (global adapter + a constant offset per value) and take part in the four
    phases through the coordinator's methods (no network); returns the round number."""
    from edgeft.secagg import SecAggClient
    from edgeft.secagg.updates import encode_update, round_context

    tasks = {d: coordinator.poll(d, "j") for d in deltas}
    number = next(iter(tasks.values())).round
    clients = {d: SecAggClient(d, round_context("j", number)) for d in deltas}
    vectors = {}
    for d, task in tasks.items():
        rng = np.random.default_rng(len(d))
        update = {k: v + np.float32(deltas[d]) * rng.choice([-1, 1], size=v.shape).astype(np.float32)
                  for k, v in task.global_adapter.items()}
        vectors[d] = encode_update(update, examples, task.global_adapter, task.secure)[0]
    headers = {d: SecAggHeader("j", number, d) for d in deltas}
    answers: dict = {}
    for phase, make in (("advertise", lambda d: clients[d].advertise()),
                        ("share_keys", lambda d: clients[d].share_keys(answers[d])),
                        ("masked_input", lambda d: clients[d].masked_input(answers[d], vectors[d])),
                        ("unmask", lambda d: clients[d].unmask(answers[d]))):
        for d in deltas:
            coordinator.secure_step(headers[d], make(d))
        answers = {d: coordinator.secure_answer(headers[d], phase) for d in deltas}
    return number


def test_a_secure_round_with_differential_privacy_noises_the_unmasked_sum(tmp_path, tiny_bundle):
    from edgeft.aggregate import StrategyOptions
    from edgeft.aggregate.base import RoundContext
    from edgeft.aggregate.delta import DeltaMean

    options = {"clip_norm": 0.5, "noise_multiplier": 1.0, "noise_seed": 3}
    config = ServerConfig(state_dir=tmp_path / "state", insecure=True,
                          jobs=(secure_job(tiny_bundle, strategy_options=options),))
    coordinator = Coordinator(config)
    deltas = {"a": 0.02, "b": 0.0001, "c": 0.03}  # a and c exceed the clip norm: the devices clip them
    for device in deltas:
        coordinator.register(device, {}, "j")
    start_adapter = coordinator.global_adapter("j", 0)
    assert play_secure_round(coordinator, deltas) == 1
    assert coordinator.job_status("j")["status"] == "finished", coordinator.job_status("j")
    report = coordinator.history("j")["rounds"][1]["aggregation"]
    assert report["privacy"]["noise_std"] == 0.5 and report["privacy"]["epsilon"] > 0
    assert report["secure_aggregation"]["total_weight"] == 3  # unweighted: one per device
    # the same round aggregated in the clear (the coordinator clipping) with the same noise
    plain = DeltaMean(start_adapter, StrategyOptions(**options), RoundContext(round=1, selected=3))
    for d, offset in deltas.items():
        rng = np.random.default_rng(len(d))
        plain.add(AdapterUpdate({k: v + np.float32(offset) * rng.choice([-1, 1], size=v.shape).astype(np.float32)
                                 for k, v in start_adapter.items()}, 10))
    expected = plain.result()
    step = FixedPoint(bits=16, clip=CLIP).step
    for name, value in coordinator.global_adapter("j", 1).items():
        assert np.max(np.abs(value - expected[name])) <= step / 2 + 1e-6, name
    state_holds_no_update_of(tmp_path / "state")


def test_fedadam_runs_on_the_unmasked_mean_delta(tmp_path, tiny_bundle):
    config = ServerConfig(state_dir=tmp_path / "state", insecure=True,
                          jobs=(secure_job(tiny_bundle, strategy="fedadam", strategy_options={"server_lr": 0.05}),))
    coordinator = Coordinator(config)
    for device in ("a", "b", "c"):
        coordinator.register(device, {}, "j")
    play_secure_round(coordinator, {"a": 0.01, "b": 0.02, "c": 0.03})
    assert coordinator.job_status("j")["status"] == "finished"
    assert {k.split("/")[0] for k in coordinator.strategy_state("j", 1)} == {"m", "v"}


def state_holds_no_update_of(state_dir: Path) -> None:
    with sqlite3.connect(state_dir / "state.db") as conn:
        assert conn.execute("select count(*) from updates").fetchone() == (0,)


def test_the_rounds_deadline_ends_the_key_phase_only(tmp_path, tiny_bundle):
    """Training may take the round's whole deadline: then the first phase closes with the devices that
    advertised, and every later phase still gets its own phase_timeout_s."""
    import time

    from edgeft.secagg import SecAggClient
    from edgeft.secagg.updates import round_context

    job = JobConfig(id="j", bundle=tiny_bundle.path, rounds=1, round_deadline_s=1.0, clients=ClientSelection(min=4),
                    secure_aggregation=SecureAggregation(phase_timeout_s=30))
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(job,)))
    devices = ("a", "b", "c", "d")
    for device in devices:
        coordinator.register(device, {}, "j")
    for device in devices:
        assert coordinator.poll(device, "j").secure.threshold == 3
    for device in devices[:3]:  # d is still training
        coordinator.secure_step(SecAggHeader("j", 1, device), SecAggClient(device, round_context("j", 1)).advertise())
    time.sleep(1.2)
    coordinator.tick()  # the round's deadline: the key phase closes with a, b and c
    secure = coordinator.secure_rounds.open_rounds[("j", 1)]
    assert secure.server.phase == "share_keys" and secure.server.u1 == ("a", "b", "c")
    coordinator.tick()  # the round's deadline has passed, but share_keys waits for its own timeout
    assert secure.server.phase == "share_keys" and coordinator.job_status("j")["status"] == "running"
    with pytest.raises(Exception, match="after it closed"):  # d finished training too late
        coordinator.secure_step(SecAggHeader("j", 1, "d"), SecAggClient("d", round_context("j", 1)).advertise())


def test_a_coordinator_restart_mid_protocol_fails_the_round_and_the_agents_stop_cleanly(tmp_path, tiny_bundle):
    import dataclasses
    import time

    from edgeft.server.servicer import create_server

    patient = {"secure_aggregation": SecureAggregation(bits=16, clip=CLIP, phase_timeout_s=120)}
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=2, minimum=3, job_settings=patient)
    release = threading.Event()
    agents = run_agents(tmp_path, port, enrol(coordinator, tmp_path), shards(tmp_path, 3))
    agents[2].hold_before, agents[2].release = "survivors", release  # it will not send its masked input yet
    try:
        end = time.monotonic() + 180
        while not getattr(agents[2], "holding", False) and time.monotonic() < end:
            time.sleep(0.2)
        secure = coordinator.secure_rounds.open_rounds[("banking", 1)]
        assert secure.server.phase == "masked_input"
        server.stop(grace=None)  # the coordinator goes down mid-protocol
        coordinator.engine.dispose()
        server, _, coordinator = create_server(dataclasses.replace(coordinator.config, address=f"127.0.0.1:{port}"))
        server.start()
        release.set()
        status = coordinator.job_status("banking")
        assert status["status"] == "failed" and "lives in memory only" in status["message"], status
        words = agents_stopped(agents)
        assert all(w is not None and "job banking failed" in w for w in words), words
        assert coordinator.global_adapter("banking").keys() and coordinator.history("banking")["rounds"][1][
            "status"] == "failed"
        state_holds_no_update(tmp_path / "state", agents)
    finally:
        release.set()
        server.stop(grace=None)
