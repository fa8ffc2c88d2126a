"""Dropouts: a client killed mid-round, a round below its minimum, data that does not fit the job.

The coordinator killed with SIGKILL (at random points, mid-write included), clients killed mid-upload, corrupt
state, replays and fuzzing are in test_fault_injection.py."""

from __future__ import annotations

import signal

import numpy as np
from sqlalchemy import select

from edgeft.server.store import rounds
from conftest_server import agent, enrol, start
from faults import wait_for


def test_client_killed_mid_round_the_round_completes_with_the_others(tmp_path, tiny_bundle, shards):
    """The round waits for the dead client until its deadline (15 s: the survivors deliver about 2 s after the
    round opens, so there is room for a slow CI machine), then closes with the two survivors' updates."""
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=2, deadline=15, available=3)
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
