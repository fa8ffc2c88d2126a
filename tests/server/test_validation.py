"""Validation and hygiene: every update checked against the manifest and its round, every refusal counted under
its reason; bundles checked before the coordinator or a device uses them; a bundle for another base model
refused.

Transport and identity (wrong CA, no/expired/revoked token, another job's token) are in test_security.py; replays,
fuzzing and crashes in test_fault_injection.py.
"""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest

from edgeft.bundle import load_bundle, sha256_of
from edgeft.client.agent import Agent, AgentConfig
from edgeft.client.transport import Transport, open_channel
from edgeft.errors import BundleError, ConfigError
from edgeft.server.config import JobConfig, ServerConfig
from edgeft.server.coordinator import Coordinator
from edgeft.update import AdapterUpdate, update_norm
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.wire import UploadHeader, update_to_parts

from conftest_server import enrol, start, stub


def trained_like(reference: dict[str, np.ndarray], seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    """An honest-looking update: the global adapter plus a small change."""
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in reference.items()}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the float16 case, on purpose
def test_updates_are_checked_against_the_manifest_and_the_round_and_refusals_are_counted(tmp_path, tiny_bundle):
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1, job_settings={"max_update_examples": 5000})
    try:
        token = enrol(coordinator, tmp_path)
        device_stub = stub(port, token)
        device = device_stub.Register(pb.RegisterRequest()).device_id
        assert device_stub.PollTask(pb.PollTaskRequest(device_id=device, wait_seconds=1)).task.round == 1
        reference = coordinator.global_adapter("banking", 0)
        good = trained_like(reference)
        name = next(iter(good))
        bound = 10.0 * update_norm(reference)  # the default: max_update_norm_ratio = 10 x the global adapter's norm
        boosted = {k: reference[k] + 1.5 * bound / update_norm(good, reference) * (v - reference[k])
                   for k, v in good.items()}

        def upload(tensors, n=100, round_number=1, upload_id="u1", dtype="float32"):
            parts = update_to_parts(UploadHeader("banking", round_number, device, upload_id), AdapterUpdate(tensors, n),
                                    dtype)
            return device_stub.UploadUpdate(parts, timeout=10)

        cases = {  # what a device sends -> (status, words of the answer, counted reason)
            "norm": (dict(tensors=boosted), grpc.StatusCode.INVALID_ARGUMENT, "above the job's bound", "norm"),
            "examples": (dict(tensors=good, n=10**9), grpc.StatusCode.INVALID_ARGUMENT, "max_update_examples=5000",
                         "n_examples"),
            "negative": (dict(tensors=good, n=-3), grpc.StatusCode.INVALID_ARGUMENT, "must be positive", "n_examples"),
            "shape": (dict(tensors={**good, name: good[name][:1]}), grpc.StatusCode.INVALID_ARGUMENT, "has shape",
                      "shape"),
            "dtype": (dict(tensors=good, dtype="int64"), grpc.StatusCode.INVALID_ARGUMENT, "has dtype int64", "dtype"),
            "inf": (dict(tensors={**good, name: np.full_like(good[name], np.inf)}), grpc.StatusCode.INVALID_ARGUMENT,
                    "NaN or infinite", "non_finite"),
            "fp16 overflow": (dict(tensors={**good, name: np.full_like(good[name], 1e6)}, dtype="float16"),
                              grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite", "non_finite"),
            "names": (dict(tensors={**good, "rogue": np.zeros(3, np.float32)}), grpc.StatusCode.INVALID_ARGUMENT,
                      "unknown tensors ['rogue']", "names"),
            "future round": (dict(tensors=good, round_number=2), grpc.StatusCode.FAILED_PRECONDITION, "not open",
                             "round"),
        }
        for what, (kwargs, code, words, _) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                upload(**kwargs)
            assert info.value.code() == code and words in info.value.details(), (what, info.value.details())
        # bytes that do not parse, for every method: INVALID_ARGUMENT after authentication, never INTERNAL
        channel = open_channel(f"127.0.0.1:{port}", Transport(token=token.read_text().strip(), insecure=True))
        for method in ("Register", "PollTask", "GetBundle", "Heartbeat"):
            call = channel.unary_unary(f"/edgeft.v1.Coordinator/{method}", request_serializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in info.value.details()
        raw_upload = channel.stream_unary("/edgeft.v1.Coordinator/UploadUpdate", request_serializer=lambda b: b)
        header = next(update_to_parts(UploadHeader("banking", 1, device, "u9"), AdapterUpdate(good, 1)))
        with pytest.raises(grpc.RpcError) as info:
            raw_upload(iter([header.SerializeToString()[:-2]]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        unauthenticated = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(
            "/edgeft.v1.Coordinator/Register", request_serializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:  # no token: refused before a byte of the request is parsed
            unauthenticated(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the honest update is accepted; every refusal above was counted under its reason
        assert upload(good).duplicate is False
        history = coordinator.history("banking")
        expected: dict[str, int] = {}
        for _, _, _, reason in cases.values():
            expected[reason] = expected.get(reason, 0) + 1
        expected["malformed"] = 1  # the truncated upload (the unary methods' garbage is not an upload)
        assert history["rejections"] == expected and history["duplicates"] == 0
        assert [c["device_id"] for c in history["rounds"][1]["clients"]] == [device]
    finally:
        server.stop(grace=None)


def test_norm_bounds_and_example_limits_are_job_settings(tmp_path, tiny_bundle):
    from edgeft.server.config import load_server_config

    config = tmp_path / "jobs.toml"
    config.write_text(f"""
[server]
insecure = true
[[job]]
id = "a"
bundle = "{tiny_bundle.path}"
max_update_norm = 2.5
max_update_examples = 100
base_model_digest = "{tiny_bundle.manifest.base_model['digest']}"
""")
    job = load_server_config(config).jobs[0]
    assert (job.max_update_norm, job.max_update_norm_ratio, job.max_update_examples) == (2.5, 10.0, 100)
    for bad, message in ((dict(max_update_norm=0), "job.max_update_norm=0"),
                         (dict(max_update_norm_ratio=-1), "job.max_update_norm_ratio=-1"),
                         (dict(max_update_examples=0), "job.max_update_examples=0")):
        with pytest.raises(ConfigError, match=message):
            JobConfig(id="a", bundle=tiny_bundle.path, **bad)


def test_bundles_for_another_base_model_or_with_bad_onnx_files_are_refused(tmp_path, tiny_bundle, tiny_lm_bundle):
    def config(bundle_path, state="state", **job) -> ServerConfig:
        return ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / state, insecure=True,
                            jobs=(JobConfig(id="banking", bundle=bundle_path, **job),))

    with pytest.raises(BundleError, match="not the job's base_model_digest"):
        Coordinator(config(tiny_bundle.path, base_model_digest="0" * 64))
    Coordinator(config(tiny_bundle.path)).engine.dispose()  # the job starts on the tiny BERT ...
    with pytest.raises(BundleError, match="a job keeps its base model"):  # ... and never goes on with a GPT-2
        Coordinator(config(tiny_lm_bundle.path))
    # a bundle whose ONNX file onnx.checker refuses is never added
    bad = tmp_path / "bad-bundle"
    shutil.copytree(tiny_bundle.path, bad)
    (bad / "eval_model.onnx").write_bytes(b"\x08\x07 not a model")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["eval_model.onnx"] = sha256_of(bad / "eval_model.onnx")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="eval_model.onnx"):
        Coordinator(config(bad, state="state2"))


def test_a_device_checks_a_bundle_after_download(tmp_path, tiny_bundle):
    """A coordinator that serves a bundle whose ONNX file keeps its data outside the bundle (its manifest
    consistent, so every sha256 matches): the device refuses it and keeps nothing."""
    import onnx

    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1)
    try:
        bad = tmp_path / "bad"
        shutil.copytree(tiny_bundle.path, bad)
        model = onnx.load(str(bad / "forward_model.onnx"))
        onnx.save_model(model, str(bad / "forward_model.onnx"), save_as_external_data=True, location="w.bin",
                        size_threshold=1024)
        model = onnx.load(str(bad / "forward_model.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../../state/state.db"
        onnx.save_model(model, str(bad / "forward_model.onnx"))
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["files"].update({n: sha256_of(bad / n) for n in ("forward_model.onnx", "w.bin")})
        (bad / "manifest.json").write_text(json.dumps(manifest))
        bundle = load_bundle(bad)
        shutil.copytree(bad, coordinator.artifacts.root / "bundles" / bundle.digest)  # past add_bundle's checks
        coordinator.rank_bundles["banking"] = {8: coordinator.artifacts.bundle(bundle.digest)}
        token = enrol(coordinator, tmp_path).read_text().strip()
        device = Agent(AgentConfig(server=f"127.0.0.1:{port}", data=tmp_path / "unused.csv",
                                   cache_dir=tmp_path / "device", transport=Transport(token=token, insecure=True)))
        with pytest.raises(BundleError, match="outside the bundle"):
            device.fetch_bundle(bundle.digest)
        assert not (tmp_path / "device" / "bundles" / bundle.digest).exists()
        assert not (tmp_path / "device" / "partial" / bundle.digest).exists()
    finally:
        server.stop(grace=None)
