"""Lightweight simulated devices (edgeft.testing.lightweight): 50 of them in this process, over real gRPC on a
loopback port, finish a synchronous job of 2 rounds and an asynchronous one of several versions, and the
coordinator's global adapters are exactly the aggregates of what they sent."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sqlalchemy import select

from edgeft.client.transport import Transport
from edgeft.config import TrainConfig
from edgeft.errors import ConfigError
from edgeft.server.config import ClientSelection, JobConfig, ServerConfig
from edgeft.server.servicer import create_server
from edgeft.server.store import async_updates, open_database
from edgeft.testing.fleet_profile import FleetProfile
from edgeft.testing.lightweight import LightFleet, LightFleetConfig, synthetic_update

DEVICES = 50


def coordinator_for(tmp_path, bundle, **job_settings):
    job_settings.setdefault("round_deadline_s", 60)
    job = JobConfig(id="light", bundle=bundle.path, head_init="none", train=TrainConfig(epochs=1, progress=False),
                    **job_settings)
    config = ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "state", jobs=(job,), insecure=True,
                          poll_wait_s=1)
    server, port, coordinator = create_server(config)
    server.start()
    _, token = coordinator.tokens.create("light")
    return server, port, coordinator, Transport(token=token, insecure=True)


def fleet(port: int, transport: Transport, **settings) -> LightFleet:
    return LightFleet(LightFleetConfig(server=f"127.0.0.1:{port}", transport=transport, devices=DEVICES,
                                       train_s=0.05, poll_wait_s=1, keep_updates=True, **settings))


def test_fifty_devices_finish_two_synchronous_rounds_and_fedavg_is_the_mean_of_what_they_sent(tmp_path, tiny_bundle):
    server, port, coordinator, transport = coordinator_for(
        tmp_path, tiny_bundle, rounds=2, clients=ClientSelection(fraction=1.0, min=DEVICES))
    try:
        report = fleet(port, transport, start_together=True).run()  # the round needs all 50 anyway
        coordinator.wait_until_finished(timeout=60)
        assert coordinator.history("light")["status"] == "finished"
        assert report.registered == DEVICES and report.finished == DEVICES and not report.errors
        assert report.accepted == 2 * DEVICES and not report.refused
        for number in (1, 2):
            sent = [s.update for s in report.sent if s.round == number]
            assert len(sent) == DEVICES
            total = sum(u.n_examples for u in sent)
            for name, value in coordinator.global_adapter("light", number).items():
                mean = sum(u.n_examples / total * u.tensors[name].astype(np.float64) for u in sent)
                np.testing.assert_allclose(value, mean, rtol=0, atol=1e-6, err_msg=f"round {number} {name}")
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_fifty_devices_drive_an_asynchronous_job_whose_versions_are_the_buffers_aggregates(tmp_path, tiny_bundle):
    """With a concurrency cap of 20 (the others are told when to ask again) and updates drawn from a pool of 3 per
    version (their tensors shared, their example counts their own)."""
    server, port, coordinator, transport = coordinator_for(
        tmp_path, tiny_bundle, mode="async",
        asynchronous={"buffer_size": 10, "staleness": "constant", "max_staleness": 100, "max_concurrency": 20,
                      "versions": 4})
    try:
        report = fleet(port, transport, profile=FleetProfile(speed_sigma=0.5, seed=1), update_pool=3).run()
        coordinator.wait_until_finished(timeout=60)
        assert coordinator.history("light")["status"] == "finished"
        assert report.registered == DEVICES and not report.errors and report.accepted >= 40
        assert report.waits > 0  # the cap was reached
        sent = {s.upload_id: s for s in report.sent}
        engine = open_database(tmp_path / "state" / "state.db")
        with engine.begin() as conn:
            rows = conn.execute(select(async_updates.c.upload_id, async_updates.c.version)
                                .where(async_updates.c.job_id == "light")).all()
        engine.dispose()
        adapters = {v: coordinator.global_adapter("light", v) for v in range(5)}
        for version in range(1, 5):
            members = [sent[r.upload_id] for r in rows if r.version == version]
            assert len(members) == 10
            total = sum(s.update.n_examples for s in members)
            for name, previous in adapters[version - 1].items():
                step = sum(s.update.n_examples / total * (s.update.tensors[name].astype(np.float64)
                                                          - adapters[s.base_version][name]) for s in members)
                np.testing.assert_allclose(adapters[version][name], previous + step, rtol=0, atol=1e-6,
                                           err_msg=f"version {version} {name}")
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_a_synthetic_update_has_the_adapters_names_shapes_and_a_plausible_example_count():
    adapter = {"a": np.zeros((4, 3), np.float32), "b": np.ones(5, np.float32)}
    update = synthetic_update(adapter, np.random.default_rng(0), 1e-3, (10, 20))
    assert {k: v.shape for k, v in update.tensors.items()} == {"a": (4, 3), "b": (5,)}
    assert all(v.dtype == np.float32 for v in update.tensors.values()) and 10 <= update.n_examples <= 20
    assert 0 < np.abs(update.tensors["b"] - 1).max() < 0.01


def test_fleet_settings_are_checked_by_name():
    transport = Transport(token="t", insecure=True)
    with pytest.raises(ConfigError, match="invalid devices=0"):
        LightFleetConfig(server="x:1", transport=transport, devices=0)
    with pytest.raises(ConfigError, match="invalid examples"):
        LightFleetConfig(server="x:1", transport=transport, devices=1, examples=(5, 2))


def test_dropouts_leave_a_synchronous_round_to_close_at_its_deadline_with_the_rest(tmp_path, tiny_bundle):
    profile = FleetProfile(dropout=0.3, speed_sigma=1.0, seed=2)
    dropping = sum(profile.device(i).drops() for i in range(20))  # each device's first draw: its one task
    assert 0 < dropping < 20
    server, port, coordinator, transport = coordinator_for(
        tmp_path, tiny_bundle, rounds=1, clients=ClientSelection(fraction=1.0, min=1, min_available=20),
        round_deadline_s=4)
    try:
        started = time.monotonic()
        report = LightFleet(LightFleetConfig(server=f"127.0.0.1:{port}", transport=transport, devices=20,
                                             train_s=0.05, poll_wait_s=1, keep_updates=True, profile=profile)).run()
        assert time.monotonic() - started > 3.5  # the round waited for the dropped devices until its deadline
        assert report.tasks == 20 and report.dropped == dropping and report.accepted == 20 - dropping
        sent = [s.update for s in report.sent]
        total = sum(u.n_examples for u in sent)
        for name, value in coordinator.global_adapter("light", 1).items():
            mean = sum(u.n_examples / total * u.tensors[name].astype(np.float64) for u in sent)
            np.testing.assert_allclose(value, mean, rtol=0, atol=1e-6, err_msg=name)
    finally:
        server.stop(grace=None)
        coordinator.close()
