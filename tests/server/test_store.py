"""The coordinator's database (edgeft.server.store, edgeft.server.state): [server] database, several writers on one
database (two engines, as two coordinator processes would have), a database that cannot be reached at start or
stops during calls."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1.health_pb2 import HealthCheckResponse
from sqlalchemy import func, select

from edgeft.cli import main
from edgeft.errors import ConfigError
from edgeft.server.config import ServerConfig, load_server_config
from edgeft.server.coordinator import Coordinator
from edgeft.server.state import State
from edgeft.server import store
from edgeft.server.store import adapters, connect, open_database, transaction, updates
from edgeft.testing import postgres
from edgeft.testing.ports import free_port
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.wire import UploadHeader, update_to_parts

from conftest_server import enrol, health_status, race, start, stub, wait_for

THREADS = 16


SERVING, NOT_SERVING = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING


def test_the_database_setting_is_read_and_checked_without_echoing_its_password(tmp_path):
    config = tmp_path / "jobs.toml"
    config.write_text('[server]\ninsecure = true\ndatabase = "postgresql+psycopg://edgeft:s3cret@db.example:5433/fl"\n')
    assert load_server_config(config).database_url == "postgresql+psycopg://edgeft:s3cret@db.example:5433/fl"
    config.write_text('[server]\ninsecure = true\nstate_dir = "st"\ndatabase = "sqlite:///elsewhere/state.db"\n')
    assert load_server_config(config).database_url == f"sqlite:///{tmp_path / 'elsewhere' / 'state.db'}"
    config.write_text('[server]\ninsecure = true\nstate_dir = "st"\n')  # the default: the state folder's file
    assert load_server_config(config).database_url == f"sqlite:///{tmp_path / 'st' / 'state.db'}"
    for bad in ("postgresql+psycopg://edgeft:s3cret@db:port/fl", "::not a url::s3cret"):
        with pytest.raises(ConfigError, match="server.database") as info:
            ServerConfig(insecure=True, database=bad)
        assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match=r"no driver 'postgresql\+nope'") as info:
        Coordinator(ServerConfig(insecure=True, state_dir=tmp_path / "x", database="postgresql+nope://u:s3cret@h/d"))
    assert "s3cret" not in str(info.value)


def test_an_unreachable_database_is_named_at_start_with_what_to_do(tmp_path, tiny_bundle, capsys):
    url = f"postgresql+psycopg://edgeft:s3cret@127.0.0.1:{free_port()}/fl"
    (tmp_path / "jobs.toml").write_text(f'[server]\naddress = "127.0.0.1:0"\ninsecure = true\ndatabase = "{url}"\n'
                                        f'[[job]]\nid = "banking"\nbundle = "{tiny_bundle.path}"\n')
    assert main(["server", "--config", str(tmp_path / "jobs.toml")]) == 2
    error = capsys.readouterr().err
    assert "cannot reach the coordinator's database postgresql+psycopg://edgeft:***@127.0.0.1:" in error, error
    assert "start the database server" in error and "s3cret" not in error and "Traceback" not in error


def test_the_coordinator_logs_its_database_without_the_password(postgres_cluster, tmp_path, tiny_bundle, caplog):
    url = postgres_cluster.create_database().replace("edgeft@", "edgeft:unused-password@")  # trust ignores it
    with caplog.at_level(logging.INFO, logger="edgeft.server"):
        server, _, coordinator = start(tmp_path, tiny_bundle, database=url)
    server.stop(grace=None)
    coordinator.close()
    assert f"state database postgresql+psycopg://edgeft:***@127.0.0.1:{postgres_cluster.port}/" in caplog.text
    assert "unused-password" not in caplog.text


def test_two_writers_on_one_database_store_one_update_per_device_and_one_global_adapter_per_round(database, tmp_path):
    url = database or f"sqlite:///{tmp_path / 'state.db'}"
    replicas = [State(open_database(url)) for _ in range(2)]  # two engines: two coordinator processes
    one, other = replicas
    try:
        one.create_job("job", "digest", 2, 1, "blob0", {}, {})
        assert not other.create_job("job", "digest", 2, 1, "blob0", {}, {})  # created once
        opened = race([lambda s=replicas[i % 2]: s.open_round("job", 1, [f"d{i}"], 60) for i in range(THREADS)])
        assert len({tuple(row.selected) for row in opened}) == 1  # every writer got the one row stored
        for i in range(THREADS):
            replicas[i % 2].enrol("d", {"os": "test"}, "job", f"tok{i}")  # re-enrolments upsert
        stored = race([lambda i=i: replicas[i % 2].add_update("job", 1, "d", f"upload{i}", 10, {}, f"b{i}", 1)
                        for i in range(THREADS)])
        assert sorted(stored) == [0] * (THREADS - 1) + [1], stored  # stored once: the round then holds 1 update
        counted = race([lambda i=i: replicas[i % 2].count_rejection("job", "duplicate", "again")
                         for i in range(THREADS)])
        assert counted == [None] * THREADS and one.rejections("job") == {"duplicate": THREADS}
        closed = race([lambda i=i: replicas[i % 2].close_round("job", 1, f"adapter{i}", None, {}, False, 1)
                        for i in range(THREADS)])
        assert sorted(map(str, closed)) == ["False"] * (THREADS - 1) + ["True"], closed
        with one.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(adapters).where(adapters.c.version == 1)).scalar() == 1
            assert conn.execute(select(func.count()).select_from(updates)).scalar() == 1
        winner = one.adapter("job", 1).blob
        assert winner == f"adapter{closed.index(True)}"
        assert not one.add_update("job", 1, "late", "u", 10, {}, "b", 1)  # a closed round stores nothing more
        assert one.job("job").current_round == 2
        # round 2: an update stored between the aggregation and the closing is never left out
        one.open_round("job", 2, ["d", "e"], 60)
        assert one.add_update("job", 2, "d", "u", 10, {}, "b", 1)
        assert other.add_update("job", 2, "e", "u", 10, {}, "b", 1)  # came in after "aggregating" one update
        assert not one.close_round("job", 2, "stale", None, {}, True, updates_aggregated=1)
        assert one.round("job", 2).status == "open"
        outcomes = race([lambda: one.close_round("job", 2, "fresh", None, {}, True, 2),
                          lambda: other.fail_round("job", 2, "deadline")])
        assert sorted(outcomes) == [False, True]  # closed or failed, once
    finally:
        for state in replicas:
            state.engine.dispose()


@pytest.mark.postgres
def test_an_idle_connection_to_a_restarted_database_is_replaced_before_use(monkeypatch):
    monkeypatch.setattr(store, "IDLE_PING_S", 0.0)  # every pooled connection counts as idle: tested before use
    cluster = postgres.PostgresCluster()
    try:
        cluster.start()
        engine = connect(cluster.create_database())
        with transaction(engine) as conn:
            assert conn.execute(select(1)).scalar() == 1
        cluster.stop()  # the pooled connection dies with the server
        cluster.start()
        with transaction(engine) as conn:  # tested, discarded, replaced: no error reaches the caller
            assert conn.execute(select(1)).scalar() == 1
        engine.dispose()
    finally:
        cluster.close()


@pytest.mark.postgres
def test_a_database_outage_is_unavailable_and_the_round_finishes_afterwards(tmp_path, tiny_bundle):
    cluster = postgres.PostgresCluster()  # its own server, to stop and start again
    try:
        cluster.start()
        server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=1,
                                          database=cluster.create_database())
        try:
            device = stub(port, enrol(coordinator, tmp_path))
            device_id = device.Register(pb.RegisterRequest()).device_id
            task = device.PollTask(pb.PollTaskRequest(device_id=device_id, wait_seconds=1)).task
            assert task.round == 1
            update = AdapterUpdate(coordinator.global_adapter("banking", 0), 10)
            assert health_status(port) == SERVING
            cluster.stop()
            wait_for(lambda: health_status(port) == NOT_SERVING)
            calls = {"Heartbeat": lambda: device.Heartbeat(pb.HeartbeatRequest(device_id=device_id), timeout=30),
                     "UploadUpdate": lambda: device.UploadUpdate(
                         update_to_parts(UploadHeader("banking", 1, device_id, "u1"), update), timeout=30)}
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (name, info.value.details())
                assert info.value.details() == "the coordinator's database is unavailable; retry later"
            cluster.start()
            wait_for(lambda: health_status(port) == SERVING)
            receipt = device.UploadUpdate(update_to_parts(UploadHeader("banking", 1, device_id, "u1"), update),
                                          timeout=30)
            assert not receipt.duplicate
            coordinator.wait_until_finished(timeout=30)
            assert len(coordinator.round_updates("banking", 1)) == 1
            assert coordinator.rejections("banking") == {}  # the outage counted no refusal
            np.testing.assert_allclose(coordinator.global_adapter("banking", 1)[next(iter(update.tensors))],
                                       next(iter(update.tensors.values())))
        finally:
            server.stop(grace=None)
            coordinator.close()
    finally:
        cluster.close()

