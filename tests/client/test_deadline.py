"""The agent honours the round's deadline it is sent: it stops training in time to upload before it, and sends
nothing for a round whose deadline passed (the coordinator would refuse the update)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from edgeft.client.agent import Agent, AgentConfig
from edgeft.client.transport import Transport
from edgeft.config import TrainConfig
from edgeft.server.config import ClientSelection, DataSchema, JobConfig, ServerConfig
from edgeft.server.servicer import create_server
from edgeft.update import AdapterUpdate
from edgeft.wire import Task

DEADLINE_S = 10.0


def test_training_stops_at_a_step_boundary_in_time_for_the_upload(tmp_path, tiny_bundle, small_banking, caplog):
    """A round whose local training (hundreds of epochs) would take minutes, with a 10 s deadline: the agent
    trains until 4 s before it, uploads, and the coordinator closes the round with that update."""
    job = JobConfig(id="banking", bundle=tiny_bundle.path, rounds=1, round_deadline_s=DEADLINE_S,
                    clients=ClientSelection(min=1), data=DataSchema(label_column="category"),
                    train=TrainConfig(epochs=500, batch_size=8, learning_rate=1e-2, progress=False))
    server, port, coordinator = create_server(ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "state",
                                                           jobs=(job,), insecure=True, poll_wait_s=1))
    server.start()
    try:
        _, token = coordinator.tokens.create("banking")
        agent = Agent(AgentConfig(server=f"127.0.0.1:{port}", data=small_banking["train"],
                                  cache_dir=tmp_path / "device", threads=1, poll_wait_s=1, deadline_margin_s=4.0,
                                  transport=Transport(token=token, insecure=True)))
        caplog.set_level(logging.INFO, logger="edgeft.client")
        started = time.monotonic()
        outcome: list[str] = []
        thread = threading.Thread(target=lambda: outcome.append(agent.run()), daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert outcome == ["job banking finished"], coordinator.job_status("banking")
        assert time.monotonic() - started < DEADLINE_S + 30  # not the minutes the 500 epochs would take
        assert agent.rounds_done == [("banking", 1)] and agent.rounds_missed == []
        assert len(coordinator.round_updates("banking", 1)) == 1 and not coordinator.rejections("banking")
        stopped = [r.getMessage() for r in caplog.records if "training stopped at step" in r.getMessage()]
        assert len(stopped) == 1 and "before the round's deadline" in stopped[0], stopped
        steps, planned = (int(x) for x in stopped[0].split("step ")[1].split(",")[0].split(" of "))
        assert 1 <= steps < planned
    finally:
        server.stop(grace=None)


class NoCoordinator:
    """A stub whose every call fails the test: nothing may be fetched or sent."""

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError(f"{name} called")

        return call


def offline_agent(tmp_path) -> Agent:
    agent = Agent(AgentConfig(server="127.0.0.1:1", data=tmp_path / "unused.csv", cache_dir=tmp_path / "device",
                              transport=Transport(token="eft_unused", insecure=True)))
    agent.stub = NoCoordinator()
    agent.device_id = "dev-1"
    return agent


def task(deadline: float) -> Task:
    return Task("job", 3, "d" * 64, TrainConfig(progress=False), {"w": np.zeros(2, np.float32)}, deadline=deadline)


def test_a_task_whose_deadline_passed_is_skipped_and_logged(tmp_path, caplog):
    agent = offline_agent(tmp_path)
    caplog.set_level(logging.WARNING, logger="edgeft.client")
    agent.handle(task(deadline=time.time() - 2))  # neither the bundle is fetched nor anything sent
    assert agent.rounds_missed == [("job", 3)] and agent.rounds_done == []
    assert "round 3 of job job: its deadline passed 2" in caplog.text and "before training started" in caplog.text


def test_an_update_finished_after_the_deadline_is_not_sent(tmp_path, caplog, monkeypatch):
    agent = offline_agent(tmp_path)

    def slow_training(task):  # noqa: ANN001, ANN202
        time.sleep(0.3)
        return AdapterUpdate({"w": np.ones(2, np.float32)}, 10)

    monkeypatch.setattr(agent, "run_task", slow_training)
    caplog.set_level(logging.WARNING, logger="edgeft.client")
    agent.handle(task(deadline=time.time() + 0.1))
    assert agent.rounds_missed == [("job", 3)] and agent.rounds_done == []
    assert "during training; nothing is sent for this round" in caplog.text


@pytest.mark.parametrize("statistics", [False, True])
def test_the_tamper_hook_sees_every_update_before_it_is_sent(tmp_path, statistics):
    """Test tooling's hook (Byzantine clients): the agent sends what ``tamper`` returns."""
    agent = offline_agent(tmp_path)
    sent = []
    agent.tamper = lambda tensors, task: {k: -v for k, v in tensors.items()}
    agent.run_task = lambda task: AdapterUpdate({"w": np.ones(2, np.float32)}, 10)
    agent.upload = lambda task, update: sent.append(update) or type("Receipt", (), {"message": "accepted"})()
    work = task(deadline=time.time() + 60)
    if statistics:
        work = Task(work.job_id, work.round, work.bundle_digest, work.train, work.global_adapter, work.deadline,
                    kind="statistics")
    agent.handle(work)
    assert agent.rounds_done == [("job", 3)] and np.array_equal(sent[0].tensors["w"], [-1.0, -1.0])
