"""Coordinator.history(): when each round opened and closed, as Unix times beside its wall time (what a benchmark
plots accuracy against)."""

from __future__ import annotations

import time

import pytest

from edgeft.server.config import ClientSelection, JobConfig, ServerConfig
from edgeft.server.coordinator import Coordinator
from edgeft.update import AdapterUpdate
from edgeft.wire import UploadHeader


def test_rounds_record_when_they_opened_and_closed(tmp_path, tiny_bundle):
    job = JobConfig(id="j", bundle=tiny_bundle.path, rounds=3, head_init="none", clients=ClientSelection(min=2))
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(job,)))
    before = time.time()
    for device in ("dev-a", "dev-b"):
        coordinator.register(device, {}, "j")
    for _ in range(2):
        for device in ("dev-a", "dev-b"):
            task = coordinator.poll(device, "j")
            assert task is not None and not isinstance(task, str), task
            assert coordinator.submit(UploadHeader("j", task.round, device, f"{device}:{task.round}"),
                                      AdapterUpdate(dict(task.global_adapter), 10))
    history = coordinator.history("j")
    first, second = history["rounds"][1], history["rounds"][2]
    assert before <= first["opened_at"] <= first["closed_at"] <= second["opened_at"] <= second["closed_at"]
    assert first["seconds"] == pytest.approx(first["closed_at"] - first["opened_at"], abs=0.01)
    assert second["closed_at"] <= time.time()
    coordinator.close()
