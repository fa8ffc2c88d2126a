"""The device agent's bundle download: chunked, verified, resumable, cached by digest."""

from __future__ import annotations

import pytest

from edgeft.bundle import load_bundle
from edgeft.client.agent import Agent, AgentConfig
from edgeft.client.transport import Transport
from edgeft.errors import CoordinatorError
from edgeft.server.config import JobConfig, ServerConfig, ServerLimits
from edgeft.server.servicer import create_server


def serve(tmp_path, bundle, **settings):
    job = JobConfig(id="job", bundle=bundle.path)
    server, port, coordinator = create_server(ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "state",
                                                           jobs=(job,), insecure=True, **settings))
    server.start()
    _, token = coordinator.tokens.create("job")
    return server, port, coordinator.bundles["job"], token


def make_agent(tmp_path, port, token):
    return Agent(AgentConfig(server=f"127.0.0.1:{port}", data=tmp_path / "unused.csv",
                             cache_dir=tmp_path / "device", give_up_after_s=5,
                             transport=Transport(token=token, insecure=True)))


def test_download_resumes_and_repairs(tmp_path, tiny_bundle):
    server, port, stored, token = serve(tmp_path, tiny_bundle)
    try:
        agent = make_agent(tmp_path, port, token)
        partial = tmp_path / "device" / "partial" / stored.digest
        partial.mkdir(parents=True)
        checkpoint = stored.file("checkpoint").read_bytes()
        (partial / "checkpoint").write_bytes(checkpoint[: len(checkpoint) // 2])  # an interrupted download
        (partial / "eval_model.onnx").write_bytes(b"garbage that is not the file")  # a damaged one
        bundle = agent.fetch_bundle(stored.digest)
        assert bundle.digest == stored.digest
        load_bundle(bundle.path)  # every file verified
        assert agent.fetch_bundle(stored.digest).path == bundle.path  # cached by digest
        with pytest.raises(CoordinatorError, match="PERMISSION_DENIED: bundle ffffffffffff... is not a bundle of job"):
            agent.fetch_bundle("f" * 64)  # only the bundle of the token's job
    finally:
        server.stop(grace=None)


@pytest.mark.slow
def test_full_finetuning_bundle_of_90_mb_arrives_intact(tmp_path):
    from edgeft.datasets import banking77_labels

    LABELS = tuple(banking77_labels())

    from edgeft.config import AdapterConfig, ExportConfig
    from edgeft.demo import minilm_dir
    from edgeft.export import export_hf

    bundle = export_hf(minilm_dir(), tmp_path / "full", ExportConfig(labels=LABELS, adapter=AdapterConfig(kind="full"), engine="ort-training"))
    size = sum(bundle.file(f).stat().st_size for f in bundle.manifest.files)
    assert size >= 90_000_000  # 92 MB: all of MiniLM trainable
    # every weight is trainable: the global adapter (92 MB) needs larger task messages than the default 8 MiB
    server, port, stored, token = serve(tmp_path, bundle, limits=ServerLimits(max_message_bytes=128 << 20))
    try:
        received = make_agent(tmp_path, port, token).fetch_bundle(stored.digest)
        load_bundle(received.path)
        for name in bundle.manifest.files:
            assert received.file(name).read_bytes() == bundle.file(name).read_bytes()
    finally:
        server.stop(grace=None)


def rpc_error(status, message: str) -> type:  # noqa: ANN001
    """A grpc.RpcError class whose calls answer ``status`` with ``message`` (what a failed call raises)."""
    import grpc

    return type("FailedCall", (grpc.RpcError,), {"code": lambda self: status, "details": lambda self: message})


def test_a_coordinator_going_down_is_retried_not_read_as_a_tls_refusal(tmp_path, monkeypatch):
    """Calls in flight when a coordinator dies end UNAVAILABLE "Socket closed", as a TLS refusal does. An agent
    that never got through stops after three in a row (its TLS settings are wrong); one that did keeps retrying
    (a coordinator crash-looping through restarts stopped agents for good, found by the fault-injection suite)."""
    import grpc

    monkeypatch.setattr("edgeft.client.agent.time.sleep", lambda seconds: None)

    Closed = rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")

    def flaky(failures: int):  # noqa: ANN202
        left = [failures]

        def call(timeout):  # noqa: ANN001, ANN202
            if left[0]:
                left[0] -= 1
                raise Closed()
            return "ok"

        return call

    agent = make_agent(tmp_path, 1, "eft_unused")
    with pytest.raises(CoordinatorError, match="closed the plaintext connection"):
        agent._call("poll", flaky(5))
    assert agent._call("register", flaky(0)) == "ok"
    assert agent._call("poll", flaky(5)) == "ok"


def test_internal_is_asked_again_a_few_times_then_refused(tmp_path, monkeypatch):
    """gRPC answers INTERNAL "Internal error from Core" when a coordinator at its max_concurrent_rpcs refuses an
    upload whose parts are still being sent (seen by bench/scale.py at 3,000 devices). A device's calls are
    idempotent, so INTERNAL is asked again INTERNAL_RETRIES times; a coordinator that keeps answering it is a
    refusal."""
    import grpc

    from edgeft.client.transport import INTERNAL_RETRIES

    monkeypatch.setattr("edgeft.client.agent.time.sleep", lambda seconds: None)

    Internal = rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core")

    def failing(times: int):  # noqa: ANN202
        calls = [0]

        def call(timeout):  # noqa: ANN001, ANN202
            calls[0] += 1
            if calls[0] <= times:
                raise Internal()
            return "ok"

        call.calls = calls
        return call

    agent = make_agent(tmp_path, 1, "eft_unused")
    assert agent._call("upload", failing(INTERNAL_RETRIES)) == "ok"
    always = failing(100)
    with pytest.raises(CoordinatorError, match="Internal error from Core"):
        agent._call("upload", always)
    assert always.calls[0] == INTERNAL_RETRIES + 1
