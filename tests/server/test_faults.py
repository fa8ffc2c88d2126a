"""Dropouts and crashes: a client killed mid-round, the coordinator killed with SIGKILL mid-round."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import numpy as np
from sqlalchemy import select

from edgeft.server.auth import TokenStore
from edgeft.server.store import adapters, jobs, open_database, rounds, updates
from conftest_server import agent, enrol, start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_client_killed_mid_round_the_round_completes_with_the_others(tmp_path, tiny_bundle, shards):
    """The round waits for the dead client until its deadline (30 s, room for a slow CI machine), then
    closes with the two survivors' updates."""
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=2, deadline=30, available=3)
    try:
        token = enrol(coordinator, tmp_path)
        procs = [agent(port, shard, tmp_path / f"device{i}", token) for i, shard in enumerate(shards)]
        wait_for(lambda: _round_open(coordinator), 60, "round 1 to open")
        procs[2].send_signal(signal.SIGKILL)
        coordinator.wait_until_finished(timeout=120)
        outputs = [p.communicate(timeout=60)[0] for p in procs[:2]]
        assert coordinator.job_status("banking")["status"] == "finished", (coordinator.job_status("banking"), outputs)
        survivors = coordinator.round_updates("banking", 1)
        assert len(survivors) == 2
        weight = sum(u.n_examples for u in survivors)
        for name, value in coordinator.global_adapter("banking", 1).items():
            expected = sum(u.n_examples * u.tensors[name].astype(np.float64) for u in survivors) / weight
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6)
    finally:
        server.stop(grace=None)
        for p in procs:
            p.kill()


def _round_open(coordinator) -> bool:
    with coordinator.engine.begin() as conn:
        return conn.execute(select(rounds).where(rounds.c.job_id == "banking")).first() is not None


def test_coordinator_sigkilled_mid_round_resumes_without_double_counting(tmp_path, tiny_bundle, shards):
    port = free_port()
    config = tmp_path / "jobs.toml"
    config.write_text(f"""
[server]
address = "127.0.0.1:{port}"
state_dir = "state"
poll_wait_s = 1
insecure = true

[[job]]
id = "banking"
bundle = "{tiny_bundle.path}"
rounds = 3
round_deadline_s = 300
[job.clients]
min = 3
[job.train]
epochs = 2
learning_rate = 0.03
[job.data]
label_column = "category"
""")

    def server() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgeft.cli", "server", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    engine = open_database(tmp_path / "state" / "state.db")
    token = tmp_path / "token"  # made before the coordinator first starts, as an operator may
    token.write_text(TokenStore(engine, ["banking"]).create("banking")[1])

    def closed_rounds() -> int:
        with engine.begin() as conn:
            return len(conn.execute(select(rounds).where(rounds.c.status == "closed")).all())

    first = server()
    clients = [agent(port, shard, tmp_path / f"device{i}", token) for i, shard in enumerate(shards)]
    try:
        wait_for(lambda: closed_rounds() >= 1, 120, "round 1 to close")
        first.send_signal(signal.SIGKILL)  # mid round 2
        first.wait(timeout=10)
        time.sleep(2)
        second = server()
        outputs = [c.communicate(timeout=240)[0] for c in clients]
        assert all(c.returncode == 0 for c in clients), outputs
        second.wait(timeout=60)
    finally:
        for p in [first, *clients]:
            p.kill()
    with engine.begin() as conn:
        assert conn.execute(select(jobs.c.status)).scalar_one() == "finished"
        assert [r.status for r in conn.execute(select(rounds).order_by(rounds.c.number)).all()] == ["closed"] * 3
        assert [r.version for r in conn.execute(select(adapters).order_by(adapters.c.version)).all()] == [0, 1, 2, 3]
        for number in (1, 2, 3):
            rows = conn.execute(select(updates).where(updates.c.round == number)).all()
            assert len(rows) == 3 and len({r.device_id for r in rows}) == 3
    from edgeft.server.config import load_server_config
    from edgeft.server.coordinator import Coordinator

    coordinator = Coordinator(load_server_config(config))
    for number in (1, 2, 3):
        received = coordinator.round_updates("banking", number)
        weight = sum(u.n_examples for u in received)
        for name, value in coordinator.global_adapter("banking", number).items():
            expected = sum(u.n_examples * u.tensors[name].astype(np.float64) for u in received) / weight
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6)



def test_round_below_minimum_fails_cleanly(tmp_path, tiny_bundle, shards):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=2, minimum=2, deadline=5)
    token = enrol(coordinator, tmp_path)
    procs = [agent(port, shard, tmp_path / f"device{i}", token) for i, shard in enumerate(shards[:2])]
    try:
        wait_for(lambda: _round_open(coordinator), 60, "round 1 to open")
        procs[1].send_signal(signal.SIGKILL)
        coordinator.wait_until_finished(timeout=60)
        status = coordinator.job_status("banking")
        assert status["status"] == "failed" and "fewer than the minimum 2" in status["message"]
        output = procs[0].communicate(timeout=60)[0]
        assert procs[0].returncode == 0 and "job banking failed" in output
    finally:
        server.stop(grace=None)
        for p in procs:
            p.kill()


def test_data_that_does_not_fit_the_job_is_named(tmp_path, tiny_bundle, shards):
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1)
    try:
        proc = agent(port, shards[0], tmp_path / "device", enrol(coordinator, tmp_path), "--label-column", "intent")
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 2 and "no column 'intent'" in output
    finally:
        server.stop(grace=None)
