"""Transport and identity: TLS and mutual TLS, enrolment tokens per job, the concurrent-call limit, keepalive.

A real coordinator on a loopback port; agents as processes (`edgeft client`) or in this process, and raw
stubs for the calls an agent would never make.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgeft.client.agent import Agent, AgentConfig
from edgeft.client.transport import Transport, open_channel
from edgeft.errors import CoordinatorError
from edgeft.server.certs import CertsConfig, make_certs
from edgeft.server.config import ClientSelection, DataSchema, JobConfig, ServerConfig, ServerLimits, TlsConfig
from edgeft.server.servicer import create_server
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.v1 import edgeft_pb2_grpc as pb_grpc
from edgeft.wire import UploadHeader, update_to_parts

from conftest_server import agent, enrol, start, stub


@pytest.fixture()
def certs(tmp_path):
    """Two development CAs: "good" (the coordinator's) and "other" (a stranger's), each with a device cert."""
    return {name: make_certs(CertsConfig(out=tmp_path / name)) for name in ("good", "other")}


def tls_config(files, mutual: bool) -> TlsConfig:
    return TlsConfig(cert=files["server"], key=files["server_key"], client_ca=files["ca"] if mutual else None)


def in_process_agent(tmp_path, port, **transport) -> Agent:
    transport.setdefault("token", "eft_unused")
    return Agent(AgentConfig(server=f"127.0.0.1:{port}", data=tmp_path / "unused.csv", cache_dir=tmp_path / "device",
                             give_up_after_s=30, transport=Transport(**transport)))


def test_an_agent_trains_a_round_over_mutual_tls(tmp_path, tiny_bundle, shards, certs):
    good = certs["good"]
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1, minimum=1, tls=tls_config(good, mutual=True))
    try:
        proc = agent(port, shards[0], tmp_path / "device", enrol(coordinator, tmp_path), "--ca-cert", str(good["ca"]),
                     "--client-cert", str(good["device"]), "--client-key", str(good["device_key"]), tls=True)
        coordinator.wait_until_finished(timeout=120)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "job banking finished" in output, output
        assert "PLAINTEXT" not in output
        assert len(coordinator.round_updates("banking", 1)) == 1
    finally:
        server.stop(grace=None)


def test_mutual_tls_refuses_devices_without_a_certificate_of_its_ca(tmp_path, tiny_bundle, certs):
    good, other = certs["good"], certs["other"]
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1, tls=tls_config(good, mutual=True))
    token = enrol(coordinator, tmp_path)
    try:
        ok = stub(port, token, ca_cert=good["ca"], client_cert=good["device"], client_key=good["device_key"])
        assert ok.Register(pb.RegisterRequest(), timeout=10).device_id
        # grpc refuses both at the handshake; the client sees UNAVAILABLE ("Socket closed"), nothing is served
        for name, cert, key in (("no certificate", None, None), ("another CA's", other["device"], other["device_key"])):
            refused = stub(port, token, ca_cert=good["ca"], client_cert=cert, client_key=key)
            with pytest.raises(grpc.RpcError) as info:
                refused.Register(pb.RegisterRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, name
            assert "Socket closed" in info.value.details(), (name, info.value.details())
        # the agent stops after a few such refusals (not after --give-up-after) and says what to do
        started = time.monotonic()
        with pytest.raises(CoordinatorError, match="requires a client certificate .*--client-cert and --client-key"):
            in_process_agent(tmp_path, port, token=token.read_text().strip(), ca_cert=good["ca"]).register()
        assert time.monotonic() - started < 20
    finally:
        server.stop(grace=None)


def test_tls_misconfigurations_name_the_fix(tmp_path, tiny_bundle, certs):
    good, other = certs["good"], certs["other"]
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1, tls=tls_config(good, mutual=False))
    plain, plain_port, _ = start(tmp_path / "plain", tiny_bundle, minimum=1)
    token = enrol(coordinator, tmp_path).read_text().strip()
    try:  # TLS without client certificates: the token is the device's credential
        assert stub(port, token, ca_cert=good["ca"]).Register(pb.RegisterRequest(), timeout=10).device_id
        cases = [(port, dict(ca_cert=other["ca"]), "not signed by a CA this device trusts; pass --ca-cert"),
                 (port, dict(insecure=True), "probably serves TLS; drop --insecure"),
                 (plain_port, dict(ca_cert=good["ca"]), "does not speak TLS .*pass --insecure"),
                 (port, dict(ca_cert=good["ca"], server_name="elsewhere.example"), "--server-name")]
        for target, transport, message in cases:
            with pytest.raises(CoordinatorError, match=message):
                in_process_agent(tmp_path, target, token=token, **transport).register()
    finally:
        server.stop(grace=None)
        plain.stop(grace=None)


def _calls(coordinator_stub, digest: str, device: str = "d", metadata=None):  # noqa: ANN001
    """One call of every Coordinator method (unary, server-streaming, client-streaming)."""
    update = AdapterUpdate({"w": np.zeros(2, np.float32)}, 1)
    kw = {"timeout": 10, "metadata": metadata}
    return {
        "Register": lambda: coordinator_stub.Register(pb.RegisterRequest(device_id=device), **kw),
        "PollTask": lambda: coordinator_stub.PollTask(pb.PollTaskRequest(device_id=device), **kw),
        "GetBundle": lambda: coordinator_stub.GetBundle(pb.GetBundleRequest(bundle_digest=digest), **kw),
        "DownloadBundle": lambda: list(coordinator_stub.DownloadBundle(
            pb.DownloadRequest(bundle_digest=digest, file="checkpoint"), **kw)),
        "UploadUpdate": lambda: coordinator_stub.UploadUpdate(
            update_to_parts(UploadHeader("banking", 1, device, "u"), update), **kw),
        "Heartbeat": lambda: coordinator_stub.Heartbeat(pb.HeartbeatRequest(device_id=device), **kw),
    }


def test_calls_without_a_valid_token_are_unauthenticated(tmp_path, tiny_bundle, backend):
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1, **backend)
    digest = coordinator.bundles["banking"].digest
    try:
        revoked_info, revoked = coordinator.tokens.create("banking")
        _, expiring = coordinator.tokens.create("banking", expires_in_s=1.0)
        for token in (revoked, expiring):  # both work while they are valid
            assert stub(port, token).Register(pb.RegisterRequest(), timeout=10).device_id
        coordinator.tokens.revoke(revoked_info.id)
        time.sleep(1.2)
        bare = pb_grpc.CoordinatorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        callers = {"no token": (bare, None, "no enrolment token"),
                   "not a bearer token": (bare, [("authorization", "Basic dXNlcjpwYXNz")], "Bearer <enrolment token>"),
                   "unknown token": (stub(port, "eft_" + "x" * 43), None, "unknown enrolment token"),
                   "revoked token": (stub(port, revoked), None, f"{revoked_info.id} was revoked at"),
                   "expired token": (stub(port, expiring), None, "expired at")}
        for who, (caller, metadata, message) in callers.items():
            for method, call in _calls(caller, digest, metadata=metadata).items():
                with pytest.raises(grpc.RpcError) as raised:
                    call()
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, (who, method, raised.value.details())
                assert message in raised.value.details(), (who, method, raised.value.details())
        assert [t.status() for t in coordinator.tokens.list()] == ["revoked", "expired"]
        # health checking needs no token (load balancers and probes have none)
        reply = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Check(
            health_pb2.HealthCheckRequest(service="edgeft.v1.Coordinator"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=None)


def test_another_jobs_token_is_permission_denied(tmp_path, tiny_bundle, tiny_lm_bundle):
    jobs = (JobConfig(id="banking", bundle=tiny_bundle.path, clients=ClientSelection(min=1),
                      data=DataSchema(label_column="category")),
            JobConfig(id="stories", bundle=tiny_lm_bundle.path, clients=ClientSelection(min=1)))
    server, port, coordinator = create_server(ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "state",
                                                           jobs=jobs, poll_wait_s=1, insecure=True))
    server.start()
    try:
        banking = stub(port, enrol(coordinator, tmp_path, "banking"))
        stories = stub(port, enrol(coordinator, tmp_path, "stories"))
        device = banking.Register(pb.RegisterRequest(), timeout=10).device_id
        task = banking.PollTask(pb.PollTaskRequest(device_id=device, wait_seconds=1), timeout=10).task
        assert task.job_id == "banking" and task.bundle_digest == tiny_bundle.digest
        assert banking.GetBundle(pb.GetBundleRequest(bundle_digest=tiny_bundle.digest), timeout=10).files
        # the same device with the other job's token: banking's bundle, rounds, uploads and heartbeats are closed
        for method, call in _calls(stories, tiny_bundle.digest, device).items():
            if method == "Register":
                continue
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, raised.value.details())
        # and the other way round: the stories bundle is not for a banking token
        with pytest.raises(grpc.RpcError) as raised:
            banking.GetBundle(pb.GetBundleRequest(bundle_digest=tiny_lm_bundle.digest), timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # a device enrolled in banking only is never selected for a stories round
        stories_device = stories.Register(pb.RegisterRequest(), timeout=10).device_id
        reply = stories.PollTask(pb.PollTaskRequest(device_id=stories_device, wait_seconds=1), timeout=10)
        assert reply.task.job_id == "stories"
        assert device not in coordinator.history("stories")["rounds"][1]["selected"]
    finally:
        server.stop(grace=None)


@contextlib.contextmanager
def _long_polls(tmp_path, bundle, limits: ServerLimits, polls: int):  # noqa: ANN001, ANN202
    """A coordinator with ``limits`` whose job needs 5 devices (no round ever opens), one registered device and
    ``polls`` long polls of it, each holding its call for 3 s; yields (stub, device id, coordinator, a function
    that waits until the polls ended) once they hold their calls."""
    server, port, coordinator = start(tmp_path, bundle, minimum=5, poll_wait_s=3, limits=limits)
    try:
        device_stub = stub(port, enrol(coordinator, tmp_path))
        device = device_stub.Register(pb.RegisterRequest(), timeout=10).device_id
        poll = pb.PollTaskRequest(device_id=device, wait_seconds=3)
        threads = [threading.Thread(target=device_stub.PollTask, args=(poll,), kwargs={"timeout": 10})
                   for _ in range(polls)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        yield device_stub, device, coordinator, lambda: [thread.join() for thread in threads]
        for thread in threads:
            thread.join()
    finally:
        server.stop(grace=None)


def test_the_concurrent_call_limit_answers_resource_exhausted_at_once(tmp_path, tiny_bundle):
    with _long_polls(tmp_path, tiny_bundle, ServerLimits(max_workers=4, max_concurrent_rpcs=2), 2) as (
            device_stub, device, _, polls_ended):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            device_stub.Register(pb.RegisterRequest(device_id=device), timeout=10)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1.0  # refused at once, not queued
        polls_ended()
        assert device_stub.Register(pb.RegisterRequest(device_id=device), timeout=10).device_id == device


def test_long_polls_never_hold_up_an_upload(tmp_path, tiny_bundle):
    """Eight long polls waiting 3 s each (coroutines on the server's event loop, no thread held): an upload is still
    answered at once."""
    with _long_polls(tmp_path, tiny_bundle, ServerLimits(max_workers=1, upload_workers=1), 8) as (
            device_stub, device, coordinator, _):
        started = time.monotonic()
        update = AdapterUpdate(coordinator.global_adapter("banking"), 9)
        with pytest.raises(grpc.RpcError) as raised:  # for a round that never opened: refused
            device_stub.UploadUpdate(update_to_parts(UploadHeader("banking", 1, device, "u1"), update), timeout=10)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, raised.value.details()
        assert time.monotonic() - started < 1.5  # not queued behind the poll


def test_an_idle_agents_keepalive_pings_never_earn_a_goaway(tmp_path, tiny_bundle):
    """The defaults at a 60x smaller scale (client pings every 1 s, the server accepts every 0.5 s): the
    channel stays READY through idle time, as it must through a 15-minute training round. The control, a
    server with grpc's default ping policy, sends GOAWAY "too_many_pings" and the channel drops."""
    assert Transport(token="t").keepalive_time_s >= 2 * ServerLimits().min_client_ping_interval_s

    def dropped_while_idle(port: int) -> bool:
        """Whether the channel left READY (a GOAWAY closes the connection) between two calls 4 s apart."""
        channel = open_channel(f"127.0.0.1:{port}", Transport(token="t", insecure=True, keepalive_time_s=1,
                                                              keepalive_timeout_s=1))
        states: list[str] = []
        channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
        health_stub = health_pb2_grpc.HealthStub(channel)
        health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        time.sleep(4)
        health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        channel.close()
        assert "READY" in states, states
        return any(state != "READY" for state in states[states.index("READY"):])

    limits = ServerLimits(min_client_ping_interval_s=0.5)
    server, port, _ = start(tmp_path, tiny_bundle, limits=limits)
    try:
        assert not dropped_while_idle(port)
    finally:
        server.stop(grace=None)
    control = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), control)
    control_port = control.add_insecure_port("127.0.0.1:0")
    control.start()
    try:
        assert dropped_while_idle(control_port)
    finally:
        control.stop(grace=None)


def test_tokens_are_made_listed_and_revoked_from_the_command_line_and_stored_only_as_hashes(tmp_path, tiny_bundle,
                                                                                             capsys):
    from edgeft.cli import main
    from edgeft.server.auth import hash_token

    config = tmp_path / "jobs.toml"
    config.write_text(f'[server]\nstate_dir = "state"\ninsecure = true\n[[job]]\nid = "banking"\n'
                      f'bundle = "{tiny_bundle.path}"\n')
    assert main(["server", "token", "create", "--config", str(config), "--job", "banking", "--expires-in", "30d",
                 "--note", "kiosk fleet"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("eft_") and len(token) >= 40 and "shown only now" in err
    token_id = err.split()[1]
    assert main(["server", "token", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert token_id in listing and "valid" in listing and "kiosk fleet" in listing and token not in listing
    state = tmp_path / "state"
    raw = b"".join(path.read_bytes() for path in state.glob("state.db*"))  # the database and its WAL
    assert token.encode() not in raw and token[4:].encode() not in raw
    assert hash_token(token).encode() in raw
    assert main(["server", "token", "revoke", "--config", str(config), token_id]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["server", "token", "list", "--config", str(config), "--job", "banking"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["server", "token", "create", "--config", str(config), "--job", "nope"]) == 2
    assert "no job 'nope'" in capsys.readouterr().err
    assert main(["server", "token", "create", "--config", str(config), "--job", "banking", "--expires-in", "soon"]) == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_message_chunk_and_upload_sizes_are_bounded(tmp_path, tiny_bundle):
    limits = ServerLimits(max_message_bytes=256 << 10, chunk_bytes=64 << 10, max_upload_bytes=512 << 10)
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1, limits=limits)
    try:
        device_stub = stub(port, enrol(coordinator, tmp_path))
        device = device_stub.Register(pb.RegisterRequest(), timeout=10).device_id
        chunks = list(device_stub.DownloadBundle(pb.DownloadRequest(bundle_digest=tiny_bundle.digest,
                                                                    file="checkpoint"), timeout=10))
        assert len(chunks) > 1 and max(len(c.data) for c in chunks) == 64 << 10
        big = AdapterUpdate({"w": np.zeros(100_000, np.float32)}, 1)  # 400 KB of tensor bytes
        header = UploadHeader("banking", 1, device, "u")
        with pytest.raises(grpc.RpcError) as raised:  # one message over max_message_bytes: grpc refuses it
            device_stub.UploadUpdate(update_to_parts(header, big, chunk_bytes=300 << 10), timeout=10)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        bigger = AdapterUpdate({"w": np.zeros(150_000, np.float32)}, 1)  # 600 KB in 32 KB messages
        with pytest.raises(grpc.RpcError) as raised:
            device_stub.UploadUpdate(update_to_parts(header, bigger, chunk_bytes=32 << 10), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_upload_bytes" in raised.value.details()
    finally:
        server.stop(grace=None)
