"""Training engines in federated jobs: a job serves a bundle per engine ([job] engines, engine_bundles), each
device gets the bundle of the first of the job's engines it runs (devices on the plain onnxruntime train the
portable bundle next to devices on the training build), updates of both engines aggregate together, and a
device that runs none of the job's engines is refused at registration with what to do."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeft.aggregate.lora_ranks import check_engine_bundle
from edgeft.errors import ConfigError, Rejected
from edgeft.server.config import ClientSelection, JobConfig, ServerConfig, load_server_config
from edgeft.server.coordinator import Coordinator
from edgeft.update import AdapterUpdate
from edgeft.wire import UploadHeader

from conftest_server import agent, enrol, run_fleet, start



@pytest.fixture(scope="module")
def model_job(tmp_path_factory, tiny_bert_dir, tiny_config) -> Coordinator:
    """A coordinator whose job exports the tiny BERT for both engines (the portable export takes ~30 s)."""
    job = JobConfig(id="j", model=tiny_bert_dir, export=tiny_config, engines=("ort-training", "portable"),
                    clients=ClientSelection(min=2))
    state = tmp_path_factory.mktemp("engines-model-job") / "state"
    return Coordinator(ServerConfig(state_dir=state, insecure=True, jobs=(job,)))


@pytest.fixture(scope="module")
def portable_bundle(model_job):  # noqa: ANN001, ANN201
    """The tiny BERT's portable bundle (``tiny_bundle``'s model and settings, for the other engine)."""
    return model_job.engine_bundles["j"]["portable"]


def two_engine_job(bundle, portable, **settings) -> JobConfig:  # noqa: ANN001
    return JobConfig(id="j", bundle=bundle.path, engine_bundles=(portable.path,), clients=ClientSelection(min=2),
                     **settings)


def test_a_model_job_exports_a_bundle_per_engine_and_a_restart_serves_both(model_job, tiny_bundle):
    served = model_job.engine_bundles["j"]
    assert list(served) == ["ort-training", "portable"]
    assert [b.manifest.engine for b in served.values()] == ["ort-training", "portable"]
    assert model_job.bundles["j"].digest == served["ort-training"].digest  # the first engine: the job's own
    assert check_engine_bundle(served["ort-training"].manifest, served["portable"].manifest) == "portable"
    exports = model_job.config.state_dir / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["j", "j-portable"]
    # updates are the same tensors whichever engine trains them: the two bundles start from the same adapter
    assert set(model_job.served_bundles("j")) == {b.digest for b in served.values()}

    restarted = Coordinator(model_job.config)  # same state folder: the exports are reused, both bundles served
    assert {e: b.digest for e, b in restarted.engine_bundles["j"].items()} == {e: b.digest for e, b in served.items()}
    assert restarted.bundles["j"].digest == served["ort-training"].digest
    # a bundle of either engine matches tiny_bundle (exported the same way from the same model)
    assert check_engine_bundle(tiny_bundle.manifest, served["portable"].manifest) == "portable"


def test_each_device_gets_the_first_engine_it_runs_and_updates_aggregate_together(tmp_path, tiny_bundle,
                                                                                portable_bundle):
    config = ServerConfig(state_dir=tmp_path / "state", insecure=True,
                          jobs=(two_engine_job(tiny_bundle, portable_bundle),))
    coordinator = Coordinator(config)
    assert list(coordinator.engine_bundles["j"]) == ["ort-training", "portable"]  # bundle's engine first
    coordinator.register("plain", {"engines": ["portable"], "ort_version": "1.32.0"}, "j")
    coordinator.register("both", {"engines": ["portable", "ort-training"]}, "j")  # the job's order decides
    coordinator.register("old", {}, "j")  # an agent from before engines runs ort-training
    tasks = {d: coordinator.poll(d, "j") for d in ("plain", "both", "old")}
    assert {d: t.bundle_digest for d, t in tasks.items()} == {
        "plain": portable_bundle.digest, "both": tiny_bundle.digest, "old": tiny_bundle.digest}
    start_adapter = tasks["plain"].global_adapter
    for name, value in tasks["both"].global_adapter.items():  # one global adapter for every engine
        np.testing.assert_array_equal(start_adapter[name], value)

    rng = np.random.default_rng(0)
    trained = {d: {n: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for n, v in start_adapter.items()}
               for d in tasks}
    examples = {"plain": 10, "both": 30, "old": 60}
    for device, tensors in trained.items():  # each checked against the bundle its device was given
        assert coordinator.submit(UploadHeader("j", 1, device, f"u-{device}"), AdapterUpdate(tensors, examples[device]))
    result = coordinator.global_adapter("j", 1)
    for name, value in result.items():
        expected = sum(examples[d] * trained[d][name].astype(np.float64) for d in trained) / 100
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)

    restarted = Coordinator(config)  # the engines come back from the state
    assert {e: b.digest for e, b in restarted.engine_bundles["j"].items()} == {
        "ort-training": tiny_bundle.digest, "portable": portable_bundle.digest}
    assert set(restarted.served_bundles("j")) == {tiny_bundle.digest, portable_bundle.digest}


def test_an_asynchronous_job_checks_each_upload_against_the_bundle_of_its_devices_engine(tmp_path, tiny_bundle,
                                                                                         portable_bundle):
    """Several bundles: an upload's checks read its device's capabilities (the bundle it was given) first."""
    job = JobConfig(id="j", bundle=tiny_bundle.path, engine_bundles=(portable_bundle.path,), mode="async",
                    asynchronous={"buffer_size": 2, "versions": 5}, head_init="none")
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(job,)))
    assert coordinator.rounds.jobs.one_bundle("j") is None
    coordinator.register("plain", {"engines": ["portable"]}, "j")
    coordinator.register("old", {}, "j")
    tasks = {d: coordinator.poll(d, "j") for d in ("plain", "old")}
    assert {d: t.bundle_digest for d, t in tasks.items()} == {"plain": portable_bundle.digest,
                                                               "old": tiny_bundle.digest}
    for device, task in tasks.items():
        work = task.asynchronous
        header = UploadHeader("j", 1, device, work.upload_id, work.base_version)
        assert coordinator.submit(header, AdapterUpdate(task.global_adapter, 10)) is True
        assert coordinator.submit(header, AdapterUpdate(task.global_adapter, 10)) is False  # a replay
    assert coordinator.job_status("j")["current_round"] == 2  # version 1 made from both
    assert coordinator.history("j")["duplicates"] == 2
    coordinator.close()


def test_a_device_that_runs_none_of_the_jobs_engines_is_refused_with_what_to_do(tmp_path, tiny_bundle,
                                                                               portable_bundle):
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "a", insecure=True, jobs=(
        JobConfig(id="j", bundle=tiny_bundle.path),)))
    with pytest.raises(Rejected, match=r"job 'j' trains with the ort-training engine; this device runs portable "
                                       r"\(onnxruntime 1.32.0\)\. Install the ONNX Runtime training build .*"
                                       r"onnxruntime-training-cpu==1.19.2.* or ask the coordinator's operator to "
                                       r"serve the device's engine too: \[job\] engines = \[\"ort-training\", "
                                       r"\"portable\"\]") as info:
        coordinator.register("plain", {"engines": ["portable"], "ort_version": "1.32.0"}, "j")
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    coordinator.register("trainer", {"engines": ["portable", "ort-training"]}, "j")
    # a job that serves the portable engine only refuses an agent too old to report its engines
    only_portable = Coordinator(ServerConfig(state_dir=tmp_path / "b", insecure=True, jobs=(
        JobConfig(id="p", bundle=portable_bundle.path),)))
    with pytest.raises(Rejected, match=r"trains with the portable engine; this device runs ort-training only \(its "
                                       r"agent does not report its engines\)\. Install onnxruntime 1.19 or later.*"
                                       r"engines = \[\"portable\", \"ort-training\"\]"):
        only_portable.register("old", {}, "p")


def test_engine_settings_are_checked(tmp_path, tiny_bundle, tiny_bundle_rank2, portable_bundle, tiny_bert_dir,
                                     tiny_config):
    with pytest.raises(ConfigError, match=r"invalid job.engines=\['onnx-mobile'\]: expected engines among "
                                          r"ort-training, portable"):
        JobConfig(id="j", model=tiny_bert_dir, export=tiny_config, engines=("onnx-mobile",))
    with pytest.raises(ConfigError, match="each engine once"):
        JobConfig(id="j", model=tiny_bert_dir, export=tiny_config, engines=("portable", "portable"))
    with pytest.raises(ConfigError, match="job.engine_bundles.*goes with job.bundle"):
        JobConfig(id="j", model=tiny_bert_dir, export=tiny_config, engine_bundles=(portable_bundle.path,))
    with pytest.raises(ConfigError, match="several training engines serve the job's own LoRA rank only"):
        JobConfig(id="j", model=tiny_bert_dir, export=tiny_config, engines=("ort-training", "portable"),
                  device_ranks=(2,))
    with pytest.raises(ConfigError, match="several training engines serve the job's own LoRA rank only"):
        two_engine_job(tiny_bundle, portable_bundle, device_bundles=(tiny_bundle_rank2.path,))
    with pytest.raises(ConfigError, match="list the engines of bundle and its 1 engine_bundles"):
        two_engine_job(tiny_bundle, portable_bundle, engines=("portable",))
    # with a model, the first engine listed is what [job.export] exports (its opset the engine's default)
    job = JobConfig(id="j", model=tiny_bert_dir, export=replace(tiny_config, opset=15),
                    engines=("portable", "ort-training"))
    assert (job.export.engine, job.export.onnx_opset) == ("portable", 18)
    assert JobConfig(id="j", model=tiny_bert_dir, export=tiny_config).engines == ("ort-training",)

    # bundles that differ in more than the engine: refused when the job starts, naming what differs
    with pytest.raises(ConfigError, match="an engine bundle must be for another engine"):
        check_engine_bundle(tiny_bundle.manifest, tiny_bundle_rank2.manifest)
    with pytest.raises(ConfigError, match=r"the 'portable' bundle differs from the job's 'ort-training' bundle in "
                                          r"its adapter section \(rank: 8, the job's 2; scale: 2.0, the job's 8.0\)"):
        check_engine_bundle(tiny_bundle_rank2.manifest, portable_bundle.manifest)
    with pytest.raises(ConfigError, match="differs from the job's 'ort-training' bundle in its base model"):
        check_engine_bundle(tiny_bundle.manifest, replace(portable_bundle.manifest, base_model={"digest": "x"}))
    optimizer = {**portable_bundle.manifest.optimizer, "weight_decay": 0.0}
    with pytest.raises(ConfigError, match="in optimizer: export it from the same model with the same settings, "
                                          "changing only the engine"):
        check_engine_bundle(tiny_bundle.manifest, replace(portable_bundle.manifest, optimizer=optimizer))
    other = tmp_path / "portable-other-labels"
    shutil.copytree(portable_bundle.path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["labels"] = list(reversed(manifest["labels"]))
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"job 'j': .*portable-other-labels: the 'portable' bundle differs from "
                                          r"the job's 'ort-training' bundle in labels"):
        Coordinator(ServerConfig(state_dir=tmp_path / "s", insecure=True, jobs=(
            JobConfig(id="j", bundle=tiny_bundle.path, engine_bundles=(other,)),)))

    # the TOML keys: engine_bundles relative to the file, engines in the order of preference
    shutil.copytree(portable_bundle.path, tmp_path / "portable")
    (tmp_path / "jobs.toml").write_text(f"""
[server]
insecure = true
[[job]]
id = "j"
bundle = "{tiny_bundle.path}"
engine_bundles = ["portable"]
engines = ["portable", "ort-training"]
""")
    job = load_server_config(tmp_path / "jobs.toml").jobs[0]
    assert job.engine_bundles == (tmp_path / "portable",) and job.engines == ("portable", "ort-training")
    coordinator = Coordinator(replace(load_server_config(tmp_path / "jobs.toml"), state_dir=tmp_path / "t"))
    assert list(coordinator.engine_bundles["j"]) == ["portable", "ort-training"]
    coordinator.register("both", {"engines": ["ort-training", "portable"]}, "j")
    assert coordinator.poll("both", "j").bundle_digest == portable_bundle.digest  # the job's preference


def test_a_restart_adds_the_engines_the_configuration_lists_now_and_old_states_open(tmp_path, tiny_bundle,
                                                                                  portable_bundle):
    one = ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(JobConfig(id="j", bundle=tiny_bundle.path),))
    first = Coordinator(one)
    assert list(first.engine_bundles["j"]) == ["ort-training"]
    first.engine.dispose()
    # a state from before engines (and schema versions) has no job_engines table: it opens, the job serves its
    # bundle's engine
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        db.execute("DROP TABLE job_engines")
        db.execute("DROP TABLE alembic_version")
    assert list(Coordinator(one).engine_bundles["j"]) == ["ort-training"]
    # the operator adds the portable engine: the restarted job serves both, and keeps doing so
    both = replace(one, jobs=(two_engine_job(tiny_bundle, portable_bundle),))
    assert list(Coordinator(both).engine_bundles["j"]) == ["ort-training", "portable"]
    restarted = Coordinator(both)
    assert restarted.engine_bundles["j"]["portable"].digest == portable_bundle.digest
    restarted.register("plain", {"engines": ["portable"]}, "j")


def test_devices_on_the_plain_runtime_and_the_training_build_train_one_round(tmp_path, tiny_bundle, portable_bundle,
                                                                            shards, device_python,
                                                                            device_runtime_version):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1,
                                      job_settings={"engine_bundles": (portable_bundle.path,)})
    try:
        token = enrol(coordinator, tmp_path)
        outputs = run_fleet(coordinator, port, shards, tmp_path, token,
                            pythons=[device_python, device_python, None])
        for i, digest in enumerate([portable_bundle.digest, portable_bundle.digest, tiny_bundle.digest]):
            assert [p.name for p in (tmp_path / f"device{i}" / "bundles").iterdir()] == [digest], outputs[i]
        for output in outputs[:2]:
            assert "training on the portable engine, execution provider CPUExecutionProvider (onnxruntime " \
                   f"{device_runtime_version})" in output, output
        assert "training on the ort-training engine, execution provider CPUExecutionProvider (onnxruntime " \
               "1.19.2)" in outputs[2], outputs[2]
        engines = sorted(tuple(coordinator.device(c["device_id"])["capabilities"]["engines"])
                         for c in coordinator.history("banking")["rounds"][-1]["clients"])
        assert engines == [("portable",), ("portable",), ("portable", "ort-training")]
        received = coordinator.round_updates("banking", 1)
        assert len(received) == 3 and sorted(u.n_examples for u in received) == [150, 190, 230]
        weight = sum(u.n_examples for u in received)
        result = coordinator.global_adapter("banking", 1)
        start_adapter = coordinator.global_adapter("banking", 0)
        for name, value in result.items():
            expected = sum(u.n_examples * u.tensors[name].astype(np.float64) for u in received) / weight
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)
        assert any(not np.allclose(result[n], start_adapter[n]) for n in result)  # every engine trained
        for update in received:
            assert any(not np.allclose(update.tensors[n], start_adapter[n]) for n in start_adapter)
    finally:
        server.stop(grace=None)


def test_an_agent_on_the_plain_runtime_is_refused_by_an_ort_training_job(tmp_path, tiny_bundle, shards,
                                                                       device_python):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1)
    try:
        token = enrol(coordinator, tmp_path)
        proc = agent(port, shards[0], tmp_path / "device", token, python=device_python)
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 2, output
        assert ("register refused by 127.0.0.1:" in output and "FAILED_PRECONDITION: job 'banking' trains with the "
                "ort-training engine; this device runs portable (onnxruntime 1.32.0). Install the ONNX Runtime "
                "training build" in output), output
        assert '[job] engines = ["ort-training", "portable"]' in output, output
        assert not (tmp_path / "device" / "bundles").exists()
    finally:
        server.stop(grace=None)
