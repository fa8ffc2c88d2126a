"""A real coordinator on a loopback port and real device agents in their own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from edgeft.data import DataConfig, batches, load_dataset
from edgeft.errors import NotFound
from edgeft.train.session import TrainingSession
from edgeft.train.trainer import evaluate
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.wire import UploadHeader, update_to_parts

from conftest_server import agent, enrol, five_intents, run_fleet, start, stub, write_csv



def test_three_clients_two_rounds_fedavg(tmp_path, tiny_bundle, tiny_bert_dir, shards, backend, monkeypatch):
    server, port, coordinator = start(tmp_path, tiny_bundle, **backend)
    try:
        token = enrol(coordinator, tmp_path)
        outputs = run_fleet(coordinator, port, shards, tmp_path, token)
        for number in (1, 2):
            received = coordinator.round_updates("banking", number)
            assert len(received) == 3 and sorted(u.n_examples for u in received) == [150, 190, 230]
            weight = sum(u.n_examples for u in received)
            global_adapter = coordinator.global_adapter("banking", number)
            for name, value in global_adapter.items():
                expected = sum(u.n_examples * u.tensors[name].astype(np.float64) for u in received) / weight
                np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)
        test_rows = write_csv(tmp_path / "test.csv", five_intents("test"))
        data = load_dataset(DataConfig(test_rows, label_column="category"), tiny_bundle)
        accuracy = []
        for version in (0, 2):
            session = TrainingSession(tiny_bundle)
            session.set_parameters(coordinator.global_adapter("banking", version))
            accuracy.append(evaluate(session, data, "classification", 0)["accuracy"])
        assert accuracy[1] > accuracy[0] + 0.1, accuracy
        assert "job banking finished" in outputs[0]
        # a late update, for a round that has closed, is refused and changes nothing
        device = stub(port, token)
        late = device.Register(pb.RegisterRequest()).device_id
        before = coordinator.global_adapter("banking", 1)
        with pytest.raises(grpc.RpcError) as info:
            device.UploadUpdate(update_to_parts(UploadHeader("banking", 1, late, "late"), AdapterUpdate(before, 9)))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not open" in info.value.details()
        assert len(coordinator.round_updates("banking", 1)) == 3
        # edgeft deploy takes the global adapter straight from the coordinator's state (it may be running)
        from edgeft.deploy import DeployConfig, deploy
        from edgeft.predict import Predictor

        database, where, state = backend.get("database"), {}, tmp_path / "state"
        if "artifacts" in backend:  # the bucket, named as [server] artifacts, its credentials from AWS_* variables
            with pytest.raises(NotFound, match="artifacts in an S3 bucket.*--artifacts s3://bucket/prefix"):
                deploy(DeployConfig(model_dir=tiny_bert_dir, out=tmp_path / "pkg", state_dir=tmp_path / "state",
                                    database=database, job="banking", mode="none"))
            s3 = backend["s3"]
            for name, value in (("AWS_ACCESS_KEY_ID", s3.access_key_id), ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key),
                                ("AWS_REGION", s3.region)):
                monkeypatch.setenv(name, value)
            where = {"artifacts": backend["artifacts"], "s3_endpoint": s3.endpoint_url}
            state = tmp_path / "deployer"  # another machine: the bundle comes from the bucket, verified
        deploy(DeployConfig(model_dir=tiny_bert_dir, out=tmp_path / "pkg", state_dir=state,
                            database=database, job="banking", mode="none", **where))
        assert json.loads((tmp_path / "pkg" / "package.json").read_text())["adapter_source"]["round"] == 2
        session = TrainingSession(tiny_bundle)
        session.set_parameters(coordinator.global_adapter("banking", 2))
        batch = next(batches(data, 16, 0))
        np.testing.assert_allclose(Predictor(tmp_path / "pkg").run({k: batch[k] for k in ("input_ids", "attention_mask")}),
                                   session.eval_step(batch)[1], atol=1e-4, rtol=0)
        with pytest.raises(NotFound, match="has no round 7"):
            deploy(DeployConfig(model_dir=tiny_bert_dir, out=tmp_path / "x", state_dir=state,
                                database=database, job="banking", round=7, **where))
        with pytest.raises(NotFound, match="no job 'nope'"):
            deploy(DeployConfig(model_dir=tiny_bert_dir, out=tmp_path / "x", state_dir=state,
                                database=database, job="nope", **where))
    finally:
        server.stop(grace=None)


def test_malformed_and_forged_uploads_get_the_right_status(tmp_path, tiny_bundle, shards, backend):
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1, **backend)
    try:
        coordinator_stub = stub(port, enrol(coordinator, tmp_path))
        device = coordinator_stub.Register(pb.RegisterRequest()).device_id
        task = coordinator_stub.PollTask(pb.PollTaskRequest(device_id=device, wait_seconds=1)).task
        assert task.round == 1 and len(task.global_adapter) == 10
        good = coordinator.global_adapter("banking", 0)
        name = next(iter(good))

        def upload(tensors, job="banking", round_number=1, n=10, upload_id="u1"):
            parts = update_to_parts(UploadHeader(job, round_number, device, upload_id), AdapterUpdate(tensors, n))
            return coordinator_stub.UploadUpdate(parts)

        cases = [
            (dict(tensors=good, job="nope"), grpc.StatusCode.PERMISSION_DENIED),  # not the token's job
            (dict(tensors=good, round_number=7), grpc.StatusCode.FAILED_PRECONDITION),
            (dict(tensors={**good, name: np.zeros((3, 3), np.float32)}), grpc.StatusCode.INVALID_ARGUMENT),
            (dict(tensors={**good, name: np.full_like(good[name], np.nan)}), grpc.StatusCode.INVALID_ARGUMENT),
            (dict(tensors=good, n=0), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for kwargs, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                upload(**kwargs)
            assert info.value.code() == code, (kwargs.keys(), info.value.details())
        truncated = list(update_to_parts(UploadHeader("banking", 1, device, "u2"), AdapterUpdate(good, 5)))
        truncated[-1].chunk.data = truncated[-1].chunk.data[:-4]  # the last tensor loses its last float
        with pytest.raises(grpc.RpcError) as info:
            coordinator_stub.UploadUpdate(iter(truncated))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # not this job's bundle (whether it exists or not)
            list(coordinator_stub.DownloadBundle(pb.DownloadRequest(bundle_digest="0" * 64, file="checkpoint")))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        digest = coordinator.bundles["banking"].digest
        with pytest.raises(grpc.RpcError) as info:
            list(coordinator_stub.DownloadBundle(pb.DownloadRequest(bundle_digest=digest, file="../state.db")))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # an honest upload still works, and the same upload twice counts once
        assert upload(good).duplicate is False
        assert upload(good).duplicate is True
        assert len(coordinator.round_updates("banking", 1)) == 1
    finally:
        server.stop(grace=None)


def test_health_and_unreachable_server(tmp_path, tiny_bundle, shards):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port, _ = start(tmp_path, tiny_bundle)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        reply = health.Check(health_pb2.HealthCheckRequest(service="edgeft.v1.Coordinator"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edgeft.cli", "client", "--server", "127.0.0.1:1", "--data",
                           str(shards[0]), "--label-column", "category", "--cache-dir", str(tmp_path / "d"),
                           "--give-up-after", "3", "--insecure"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "EDGEFT_TOKEN": "eft_unused"})
    assert proc.returncode == 2 and "unreachable" in proc.stderr and time.monotonic() - started < 60


def test_two_jobs_share_a_coordinator_and_heartbeats_are_kept(tmp_path, tiny_bundle, shards):
    from edgeft.config import TrainConfig
    from edgeft.server.config import ClientSelection, DataSchema, JobConfig, ServerConfig
    from edgeft.server.servicer import create_server

    jobs = tuple(JobConfig(id=name, bundle=tiny_bundle.path, rounds=1, clients=ClientSelection(min=1),
                           data=DataSchema(label_column="category"), train=TrainConfig(max_steps=2, progress=False))
                 for name in ("first", "second"))
    server, port, coordinator = create_server(ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "s", jobs=jobs,
                                                           poll_wait_s=1, insecure=True))
    server.start()
    try:  # one agent per job (a token enrols a device in one job), the same device data
        procs = [agent(port, shards[0], tmp_path / f"device-{name}", enrol(coordinator, tmp_path, name))
                 for name in ("first", "second")]
        coordinator.wait_until_finished(timeout=120)
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), outputs
        assert "job first finished" in outputs[0] and "job second finished" in outputs[1]
        for name in ("first", "second"):
            assert coordinator.job_status(name)["status"] == "finished"
            assert len(coordinator.round_updates(name, 1)) == 1
        first = stub(port, enrol(coordinator, tmp_path, "first"))
        device = first.Register(pb.RegisterRequest(capabilities=pb.Capabilities(os="test", cores=2))).device_id
        first.Heartbeat(pb.HeartbeatRequest(device_id=device, metrics={"battery": 0.8}))
        record = coordinator.device(device)
        assert record["metrics"] == {"battery": 0.8} and record["capabilities"]["cores"] == 2
    finally:
        server.stop(grace=None)
