"""The statistics round (round 0): real agents send class statistics of their own data, the coordinator
builds the head from their sums, the LoRA rounds start from it; bad statistics are refused; a restart in the
middle of round 0 loses nothing; the method resolves from the bundle."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate.statistics import (SUMS, StatisticsAccumulator, head_from_statistics, statistics_shapes,
                                         sum_statistics)
from edgeft.data import DataConfig, load_dataset
from edgeft.errors import ConfigError, DataError
from edgeft.server.config import ClientSelection, HeadInit, JobConfig, ServerConfig
from edgeft.server.coordinator import Coordinator
from edgeft.train.session import TrainingSession
from edgeft.train.trainer import class_statistics
from edgeft.update import AdapterUpdate
from edgeft.wire import UploadHeader

from conftest_server import enrol, run_fleet, start

DEVICES = ("dev-a", "dev-b")


def test_agents_statistics_make_the_head_then_training_starts_from_it(tmp_path, tiny_sentence_bundle, shards):
    server, port, coordinator = start(tmp_path, tiny_sentence_bundle, rounds=1, job_settings={"head_init": "fedcof"})
    try:
        token = enrol(coordinator, tmp_path)
        outputs = run_fleet(coordinator, port, shards, tmp_path, token)
        # what each device's statistics must be, computed here from the same shards and bundle
        manifest = tiny_sentence_bundle.manifest
        expected_devices = []
        for shard in shards:
            data = load_dataset(DataConfig(shard, label_column="category"), tiny_sentence_bundle)
            stats, n = class_statistics(TrainingSession(tiny_sentence_bundle, threads=1), data, len(manifest.labels), 0)
            expected_devices.append(stats)
        received = coordinator.round_updates("banking", 0)
        assert sorted(u.n_examples for u in received) == [150, 190, 230]
        np.testing.assert_allclose(sum_statistics([u.tensors for u in received])[SUMS],
                                   sum_statistics(expected_devices)[SUMS], atol=1e-3)
        exported, head = coordinator.global_adapter("banking", -1), coordinator.global_adapter("banking", 0)
        weight, bias = manifest.head()
        w, b, _ = head_from_statistics(sum_statistics([u.tensors for u in received]), "fedcof", 20.0, 1.0,
                                       exported[weight], exported[bias])
        np.testing.assert_allclose(head[weight], w, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(head[bias], b)
        assert np.abs(head[weight] - exported[weight]).max() > 0.1  # the head changed ...
        for name in set(head) - {weight, bias}:  # ... and nothing else did
            np.testing.assert_array_equal(head[name], exported[name])
        history = coordinator.history("banking")
        assert history["head_init"] == "fedcof"
        assert [r["round"] for r in history["rounds"]] == [0, 1]
        assert history["rounds"][0]["aggregation"]["head_init"] == "fedcof"
        assert all(c["bytes_up"] > 0 for c in history["rounds"][0]["clients"])
        assert "class statistics" in outputs[0]
    finally:
        server.stop(grace=None)


def sentence_job(bundle, method: str = "class_means", rounds: int = 1) -> JobConfig:  # noqa: ANN001
    return JobConfig(id="j", bundle=bundle.path, rounds=rounds, clients=ClientSelection(min=2), head_init=method)


def coordinator_for(tmp_path, job: JobConfig) -> Coordinator:
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(job,)))
    for device in DEVICES:
        coordinator.register(device, {}, job.id)
    return coordinator


def statistics(bundle, seed: int, n: int = 12) -> AdapterUpdate:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    labels = len(bundle.manifest.labels)
    acc = StatisticsAccumulator(labels, bundle.manifest.pooling["dimension"])
    acc.add(rng.normal(size=(n, bundle.manifest.pooling["dimension"])), rng.integers(0, labels, n))
    return AdapterUpdate(acc.tensors(), n)


def test_round_zero_survives_a_restart_and_refuses_bad_statistics(tmp_path, tiny_sentence_bundle):
    job = sentence_job(tiny_sentence_bundle)
    coordinator = coordinator_for(tmp_path, job)
    task = coordinator.poll("dev-a", "j")
    assert task.round == 0 and task.statistics
    bad = statistics(tiny_sentence_bundle, 0)
    bad.tensors["statistics.sums"] = bad.tensors["statistics.sums"][:, :3]
    with pytest.raises(DataError, match="shape"):
        coordinator.submit(UploadHeader("j", 0, "dev-a", "a0-bad"), bad)
    assert coordinator.rejections("j") == {"shape": 1}
    first = statistics(tiny_sentence_bundle, 1)
    assert coordinator.submit(UploadHeader("j", 0, "dev-a", "a0"), first)

    coordinator = Coordinator(coordinator.config)  # a restart between the two uploads
    second = statistics(tiny_sentence_bundle, 2)
    assert coordinator.poll("dev-b", "j").statistics
    assert coordinator.submit(UploadHeader("j", 0, "dev-b", "b0"), second)
    task = coordinator.poll("dev-a", "j")
    assert task.round == 1 and not task.statistics
    weight, _ = tiny_sentence_bundle.manifest.head()
    total = sum_statistics([first.tensors, second.tensors])
    expected, _, _ = head_from_statistics(total, "class_means", 20.0, 1.0, np.zeros_like(task.global_adapter[weight]),
                                          np.zeros(len(tiny_sentence_bundle.manifest.labels)))
    seen = total["statistics.counts"] > 0
    np.testing.assert_allclose(task.global_adapter[weight][seen], expected[seen], rtol=1e-5)


def test_the_statistics_shapes_follow_the_bundle(tiny_sentence_bundle):
    shapes = statistics_shapes(len(tiny_sentence_bundle.manifest.labels), 32)
    assert shapes["statistics.second_moment"] == (32, 32) and shapes["statistics.sums"] == (77, 32)


def test_head_init_resolves_from_the_bundle(tmp_path, tiny_bundle, tiny_sentence_bundle):
    assert HeadInit().resolve(tiny_sentence_bundle.manifest) == "class_means"
    assert HeadInit().resolve(tiny_bundle.manifest) == "none"  # a [CLS] head: nothing to build
    coordinator = coordinator_for(tmp_path / "cls", sentence_job(tiny_bundle, "auto"))
    assert coordinator.poll("dev-a", "j").round == 1
    assert coordinator.history("j")["rounds"][0]["status"] == "initial"
    with pytest.raises(ConfigError, match="sentence-pooled"):
        coordinator_for(tmp_path / "fedcof", sentence_job(tiny_bundle, "fedcof"))
    coordinator = coordinator_for(tmp_path / "none", sentence_job(tiny_sentence_bundle, "none"))
    assert coordinator.poll("dev-a", "j").round == 1
    with pytest.raises(ConfigError, match="head_init.method"):
        HeadInit(method="knn")
