"""Mixed LoRA ranks in one job: devices that ask for a smaller rank get the job's bundle at that rank and a
truncated global adapter; the coordinator aggregates all ranks as the mean of their LoRA products."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgeft.aggregate import HeteroRankFedAvg
from edgeft.aggregate.lora_ranks import check_rank_bundle, lora_pairs, lora_product
from edgeft.errors import ConfigError, DataError
from edgeft.server.config import ClientSelection, JobConfig, ServerConfig
from edgeft.server.coordinator import Coordinator
from edgeft.update import AdapterUpdate
from edgeft.wire import UploadHeader

from conftest_server import enrol, run_fleet, start


def test_devices_of_two_ranks_train_one_job(tmp_path, tiny_bundle, tiny_bundle_rank2, shards):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=1,
                                      job_settings={"device_bundles": (tiny_bundle_rank2.path,)})
    try:
        assert sorted(coordinator.rank_bundles["banking"]) == [2, 8]
        token = enrol(coordinator, tmp_path)
        flags = [("--max-lora-rank", "2"), ("--max-lora-rank", "5"), ()]  # rank 2, 2 (largest <= 5), 8
        run_fleet(coordinator, port, shards, tmp_path, token, flags)
        for i, digest in enumerate([tiny_bundle_rank2.digest, tiny_bundle_rank2.digest, tiny_bundle.digest]):
            assert [p.name for p in (tmp_path / f"device{i}" / "bundles").iterdir()] == [digest]
        received = coordinator.round_updates("banking", 1)
        pairs = lora_pairs(list(tiny_bundle.manifest.trainable_names))
        a_name = next(iter(pairs.values()))[0]
        assert sorted(u.tensors[a_name].shape[0] for u in received) == [2, 2, 8]
        # the global adapter is the best rank-8 approximation of the example-weighted mean of the products
        start_adapter = coordinator.global_adapter("banking", 0)
        expected = HeteroRankFedAvg(rank=8, alpha=16.0).start(start_adapter)
        for update in received:
            expected.add(update)
        result = coordinator.global_adapter("banking", 1)
        for name, value in expected.result().items():
            np.testing.assert_allclose(result[name], value, rtol=1e-5, atol=1e-6)
        total = sum(u.n_examples for u in received)
        for module, (a, b) in pairs.items():
            mean = sum(u.n_examples * lora_product(u.tensors[a], u.tensors[b], 16.0 / u.tensors[a].shape[0])
                       for u in received) / total
            u, s, vt = np.linalg.svd(mean)
            np.testing.assert_allclose(lora_product(result[a], result[b], 16.0 / 8), (u[:, :8] * s[:8]) @ vt[:8],
                                       atol=1e-5)
        report = coordinator.history("banking")["rounds"][1]["aggregation"]
        assert report["client_ranks"] == [2, 8] and report["global_rank"] == 8
    finally:
        server.stop(grace=None)


def mixed_job(bundle, small, **settings) -> JobConfig:  # noqa: ANN001
    return JobConfig(id="j", bundle=bundle.path, device_bundles=(small.path,), clients=ClientSelection(min=2),
                     **settings)


def test_a_small_device_gets_a_truncated_adapter_and_its_updates_are_checked(tmp_path, tiny_bundle,
                                                                            tiny_bundle_rank2):
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True,
                                           jobs=(mixed_job(tiny_bundle, tiny_bundle_rank2),)))
    coordinator.register("small", {"max_lora_rank": 3}, "j")
    coordinator.register("big", {}, "j")
    with pytest.raises(ConfigError, match=r"ranks \[8, 2\].*at most rank 1.*--max-lora-rank"):
        coordinator.register("tiny", {"max_lora_rank": 1}, "j")
    small, big = coordinator.poll("small", "j"), coordinator.poll("big", "j")
    assert (small.bundle_digest, big.bundle_digest) == (tiny_bundle_rank2.digest, tiny_bundle.digest)
    pairs = lora_pairs(list(big.global_adapter))
    for a, b in pairs.values():  # the same weight change as the global adapter's first two components
        assert small.global_adapter[a].shape[0] == 2 and small.global_adapter[b].shape[1] == 2
        np.testing.assert_allclose(lora_product(small.global_adapter[a], small.global_adapter[b], 16.0 / 2),
                                   lora_product(big.global_adapter[a][:2], big.global_adapter[b][:, :2], 16.0 / 8),
                                   atol=1e-6)
    # an update of a rank the job does not serve is refused and counted; nothing is stored
    wrong = {n: v.copy() for n, v in big.global_adapter.items()}
    for a, b in pairs.values():
        wrong[a], wrong[b] = wrong[a][:3], wrong[b][:, :3]
    with pytest.raises(DataError, match=r"rank 3 is not one the job serves \(\[2, 8\]\)"):
        coordinator.submit(UploadHeader("j", 1, "small", "u-wrong"), AdapterUpdate(wrong, 10))
    assert coordinator.rejections("j") == {"shape": 1} and coordinator.round_updates("j", 1) == []
    # each rank is checked against its own bundle: the small device's adapter passes, the big one's too
    assert coordinator.submit(UploadHeader("j", 1, "small", "u-small"), AdapterUpdate(small.global_adapter, 10))
    assert coordinator.submit(UploadHeader("j", 1, "big", "u-big"), AdapterUpdate(big.global_adapter, 30))
    after = coordinator.global_adapter("j", 1)
    for a, b in pairs.values():  # unchanged updates: the mean of their products (rank <= 8 here, so exact)
        expected = (10 * lora_product(small.global_adapter[a], small.global_adapter[b], 8.0)
                    + 30 * lora_product(big.global_adapter[a], big.global_adapter[b], 2.0)) / 40
        np.testing.assert_allclose(lora_product(after[a], after[b], 2.0), expected, atol=1e-5)

    restarted = Coordinator(coordinator.config)  # the ranks come back from the state, checked
    assert {r: b.digest for r, b in restarted.rank_bundles["j"].items()} == {
        2: tiny_bundle_rank2.digest, 8: tiny_bundle.digest}


def test_rank_bundles_must_be_the_same_model_at_a_smaller_rank(tmp_path, tiny_bundle, tiny_bundle_rank2,
                                                               tiny_lm_bundle):
    assert check_rank_bundle(tiny_bundle.manifest, tiny_bundle_rank2.manifest) == 2
    with pytest.raises(ConfigError, match="below the job's rank 2"):
        check_rank_bundle(tiny_bundle_rank2.manifest, tiny_bundle.manifest)
    with pytest.raises(ConfigError, match="differs from the job's rank-8 bundle in its base model"):
        check_rank_bundle(tiny_bundle.manifest, replace(tiny_bundle_rank2.manifest, base_model={"digest": "x"}))
    with pytest.raises(ConfigError, match="adapter.alpha"):
        check_rank_bundle(tiny_bundle.manifest, replace(tiny_bundle_rank2.manifest,
                                                        adapter={**tiny_bundle_rank2.manifest.adapter, "alpha": 4.0}))
    with pytest.raises(ConfigError, match="differs from the job.s rank-8 bundle"):
        check_rank_bundle(tiny_bundle.manifest, replace(tiny_lm_bundle.manifest,
                                                        adapter={**tiny_lm_bundle.manifest.adapter, "rank": 2}))
    with pytest.raises(ConfigError, match="job 'j'.*below the job's rank"):  # refused when the job starts
        Coordinator(ServerConfig(state_dir=tmp_path / "s", insecure=True, jobs=(
            JobConfig(id="j", bundle=tiny_bundle_rank2.path, device_bundles=(tiny_bundle.path,)),)))


def test_a_model_job_exports_its_device_ranks(tmp_path, tiny_bert_dir, tiny_config):
    job = JobConfig(id="j", model=tiny_bert_dir, export=tiny_config, device_ranks=(4, 2),
                    clients=ClientSelection(min=2))
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(job,)))
    bundles = coordinator.rank_bundles["j"]
    assert sorted(bundles) == [2, 4, 8]
    assert all(check_rank_bundle(bundles[8].manifest, bundles[r].manifest) == r for r in (2, 4))
    assert (tmp_path / "state" / "exports" / "j-rank4" / "manifest.json").is_file()
