"""The artifact store in an S3 bucket (a real SeaweedFS server): content addresses verified on read, clear errors
for a store that is missing or not there, and a coordinator that rides out the store's outage mid-round."""

from __future__ import annotations

import logging
import shutil
import time

import grpc
import numpy as np
import pytest

from edgeft.cli import main
from edgeft.errors import BundleError, ConfigError, Unavailable
from edgeft.server.config import S3Settings, ServerConfig
from edgeft.server.s3 import S3Store, parse_location
from edgeft.testing import seaweedfs
from edgeft.testing.ports import free_port
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.wire import UploadHeader, update_to_parts

from conftest import BUCKET
from conftest_server import enrol, health_status, start, stub, wait_for

pytestmark = pytest.mark.s3


def store(s3_artifacts: dict, tmp_path) -> S3Store:
    return S3Store(s3_artifacts["artifacts"], s3_artifacts["s3"], cache=tmp_path / "cache")


def test_location_and_config():
    assert parse_location("s3://b/some/prefix/") == ("b", "some/prefix/")
    assert parse_location("s3://b") == ("b", "")
    with pytest.raises(ConfigError, match="server.artifacts"):
        ServerConfig(insecure=True, artifacts="/some/folder")
    with pytest.raises(ConfigError, match="together"):
        S3Settings(access_key_id="key")
    assert "secret" not in repr(S3Settings(access_key_id="key", secret_access_key="secret"))


def test_blobs_and_bundles_are_verified_on_read(s3_artifacts, seaweed, tmp_path, tiny_bundle):
    artifacts = store(s3_artifacts, tmp_path)
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    digest = artifacts.put_tensors(tensors)
    np.testing.assert_array_equal(artifacts.get_tensors(digest)["a"], tensors["a"])
    assert artifacts.has_blobs()
    key = artifacts._blob_key(digest)
    client = seaweed.client()
    client.put_object(Bucket=BUCKET, Key=key, Body=b"not the tensors")  # someone overwrote the object
    with pytest.raises(BundleError, match=f"{digest[:12]}.*corrupt \\(sha256 mismatch\\)"):
        artifacts.get(digest)
    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(BundleError, match=f"{digest[:12]}.*missing from s3://{BUCKET}/"):
        artifacts.get(digest)
    # a bundle is kept locally and in the bucket; a new coordinator (empty local folder) fetches and verifies it
    bundle = artifacts.add_bundle(tiny_bundle.path)
    digest, name = bundle.digest, next(iter(bundle.manifest.files))
    shutil.rmtree(tmp_path / "cache")
    other = store(s3_artifacts, tmp_path)
    assert other.bundle(digest, verify=True).digest == digest
    shutil.rmtree(tmp_path / "cache")
    other = store(s3_artifacts, tmp_path)
    client.put_object(Bucket=BUCKET, Key=f"{other.prefix}bundles/{digest}/{name}", Body=b"corrupt")
    with pytest.raises(BundleError, match=f"{name}.*sha256"):
        other.bundle(digest)
    assert not list((tmp_path / "cache").iterdir())  # nothing of it kept


def test_a_store_that_is_not_there_is_refused_at_start(s3_artifacts, tmp_path, tiny_bundle, capsys):
    port = free_port()  # a loopback port nothing listens on
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", access_key_id="k",
                          secret_access_key="s", connect_timeout_s=1)
    with pytest.raises(Unavailable, match=f"s3://{BUCKET}/x/ at http://127.0.0.1:{port}.*Start the object store"):
        S3Store(f"s3://{BUCKET}/x", settings, cache=tmp_path / "c")
    (tmp_path / "jobs.toml").write_text(  # edgeft server says so and exits 2, without the secret
        f'[server]\naddress = "127.0.0.1:0"\ninsecure = true\nartifacts = "s3://{BUCKET}/x"\n'
        f'[server.s3]\nendpoint_url = "http://127.0.0.1:{port}"\nregion = "us-east-1"\n'
        f'access_key_id = "key"\nsecret_access_key = "sekrit"\nconnect_timeout_s = 1\n'
        f'[[job]]\nid = "banking"\nbundle = "{tiny_bundle.path}"\n')
    assert main(["server", "--config", str(tmp_path / "jobs.toml")]) == 2
    error = capsys.readouterr().err
    assert f"artifact store (s3://{BUCKET}/x/ at http://127.0.0.1:{port}" in error, error
    assert "Start the object store" in error and "sekrit" not in error and "Traceback" not in error
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        S3Store("s3://no-such-bucket/x", s3_artifacts["s3"], cache=tmp_path / "c")


def test_the_store_stops_mid_round_and_comes_back(tmp_path, tiny_bundle, seaweed, s3_artifacts, caplog):
    from grpc_health.v1 import health_pb2

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with caplog.at_level(logging.INFO, logger="edgeft.server"):
        server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=2, **s3_artifacts)
    try:
        assert f"artifacts in {s3_artifacts['artifacts']}/ at {seaweed.endpoint}" in caplog.text
        assert seaweedfs.SECRET_KEY not in caplog.text
        assert health_status(port) == serving
        token = enrol(coordinator, tmp_path)
        devices = []
        for _ in range(2):
            device = stub(port, token)
            device_id = device.Register(pb.RegisterRequest()).device_id
            devices.append((device, device_id))
        for device, device_id in devices:
            assert device.PollTask(pb.PollTaskRequest(device_id=device_id, wait_seconds=1)).task.round == 1
        good = coordinator.global_adapter("banking", 0)
        updates = [{k: v + 0.01 * (i + 1) for k, v in good.items()} for i in range(2)]

        def upload(i: int):  # noqa: ANN202
            device, device_id = devices[i]
            return device.UploadUpdate(update_to_parts(UploadHeader("banking", 1, device_id, f"u{i}"),
                                                       AdapterUpdate(updates[i], 10 * (i + 1))), timeout=30)

        assert upload(0).duplicate is False
        seaweed.stop()
        try:
            wait_for(lambda: health_status(port) == not_serving)
            with pytest.raises(grpc.RpcError) as info:
                upload(1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert info.value.details() == "the coordinator's artifact store is unavailable; retry later"
            assert coordinator.rejections("banking") == {}  # the outage counted no refusal
            assert len(list(coordinator.state.update_rows("banking", 1))) == 1  # nothing half-stored
            assert coordinator.job_status("banking")["current_round"] == 1
        finally:
            seaweed.start()
        wait_for(lambda: health_status(port) == serving)
        assert upload(1).duplicate is False
        wait_for(lambda: coordinator.job_status("banking")["status"] == "finished")
        received = coordinator.round_updates("banking", 1)
        assert sorted(u.n_examples for u in received) == [10, 20]
        for name, value in coordinator.global_adapter("banking", 1).items():
            expected = (10 * updates[0][name].astype(np.float64) + 20 * updates[1][name]) / 30
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)
    finally:
        server.stop(grace=None)



def test_a_round_due_while_the_store_is_away_closes_when_it_is_back(tmp_path, tiny_bundle, seaweed, s3_artifacts):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=1, deadline=2.0, **s3_artifacts)
    try:
        device = stub(port, enrol(coordinator, tmp_path))
        device_ids = [device.Register(pb.RegisterRequest()).device_id for _ in range(2)]
        for device_id in device_ids:
            assert device.PollTask(pb.PollTaskRequest(device_id=device_id, wait_seconds=1)).task.round == 1
        update = {k: v + 0.5 for k, v in coordinator.global_adapter("banking", 0).items()}
        device.UploadUpdate(update_to_parts(UploadHeader("banking", 1, device_ids[0], "u"),
                                            AdapterUpdate(update, 7)), timeout=30)
        seaweed.stop()
        try:
            time.sleep(3.0)  # the deadline passes: the clock cannot read the stored update, and waits
            assert coordinator.job_status("banking")["status"] == "running"
            assert coordinator.state.round("banking", 1).status == "open"
        finally:
            seaweed.start()
        wait_for(lambda: coordinator.job_status("banking")["status"] == "finished")
        for name, value in coordinator.global_adapter("banking", 1).items():
            np.testing.assert_allclose(value, update[name], rtol=0, atol=1e-6, err_msg=name)
    finally:
        server.stop(grace=None)
