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
        with pytest.raises(CoordinatorError, match="PERMISSION_DENIED: bundle ffffffffffff... is not the bundle"):
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

    bundle = export_hf(minilm_dir(), tmp_path / "full", ExportConfig(labels=LABELS, adapter=AdapterConfig(kind="full")))
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
