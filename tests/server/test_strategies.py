"""Strategies in the coordinator: [job.strategy_options] from TOML, server optimiser moments that survive a
restart, privacy spent per round in the database and in history(), robust rules naming Krum's pick, and
the checks a job's strategy makes of its clients and bundle."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.aggregate import StrategyOptions
from edgeft.aggregate.fedopt import optimiser_update
from edgeft.errors import ConfigError
from edgeft.server.config import ClientSelection, JobConfig, ServerConfig, load_server_config
from edgeft.server.coordinator import Coordinator
from edgeft.update import AdapterUpdate
from edgeft.wire import UploadHeader

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e")


def job(bundle, strategy: str, options: dict | None = None, rounds: int = 2, minimum: int = 2, **kw) -> JobConfig:
    return JobConfig(id="j", bundle=bundle.path, rounds=rounds, strategy=strategy, strategy_options=options or {},
                     clients=ClientSelection(min=minimum), **kw)


def coordinator_for(tmp_path, config: JobConfig, devices=DEVICES[:2]) -> Coordinator:  # noqa: ANN001
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(config,)))
    for device in devices:
        coordinator.register(device, {}, config.id)
    return coordinator


def play_round(coordinator: Coordinator, offsets: dict[str, float], examples: int = 10) -> dict[str, np.ndarray]:
    """Every device in ``offsets`` answers with the global adapter + its offset; returns the new global adapter."""
    number = None
    for device, offset in offsets.items():
        task = coordinator.poll(device, "j")
        assert not isinstance(task, str) and task is not None, task
        number = task.round
        tensors = {k: (v + np.float32(offset)).astype(np.float32) for k, v in task.global_adapter.items()}
        header = UploadHeader("j", task.round, device, f"{device}:{task.round}")
        assert coordinator.submit(header, AdapterUpdate(tensors, examples))
    return coordinator.global_adapter("j", number)


def test_strategy_options_from_toml(tmp_path, tiny_bundle):
    (tmp_path / "jobs.toml").write_text(f"""
[server]
insecure = true
[[job]]
id = "j"
bundle = "{tiny_bundle.path}"
strategy = "fedyogi"
[job.strategy_options]
server_lr = 0.05
tau = 1e-4
clip_norm = 2.0
""")
    options = load_server_config(tmp_path / "jobs.toml").jobs[0].strategy_options
    assert options == StrategyOptions(server_lr=0.05, tau=1e-4, clip_norm=2.0)
    (tmp_path / "bad.toml").write_text(f'[server]\ninsecure = true\n[[job]]\nid = "j"\nbundle = "{tiny_bundle.path}"\nstrategy = "median"\n'
                                       "[job.strategy_options]\nserver_lr = 0.05\n")
    with pytest.raises(ConfigError, match="server_lr does not apply to strategy 'median'"):
        load_server_config(tmp_path / "bad.toml")


def test_fedadam_moments_survive_a_restart(tmp_path, tiny_bundle):
    options = {"server_lr": 0.05, "tau": 0.01}
    config = job(tiny_bundle, "fedadam", options)
    first = coordinator_for(tmp_path, config)
    start = first.global_adapter("j", 0)
    after_one = play_round(first, {"dev-a": 0.1, "dev-b": 0.3})
    stored = first.strategy_state("j", 1)
    assert set(stored) == {f"{p}/{name}" for p in "mv" for name in start}
    first.engine.dispose()

    second = coordinator_for(tmp_path, config)  # a restarted coordinator on the same state folder
    after_two = play_round(second, {"dev-a": -0.2, "dev-b": -0.2})

    typed = StrategyOptions(**options)
    as64 = {k: v.astype(np.float64) for k, v in start.items()}
    x1, state1 = optimiser_update("fedadam", typed, as64, {k: np.full(v.shape, 0.2) for k, v in start.items()}, None)
    x2, _ = optimiser_update("fedadam", typed, {k: v.astype(np.float32).astype(np.float64) for k, v in x1.items()},
                             {k: np.full(v.shape, -0.2) for k, v in start.items()}, state1)
    for name in start:
        np.testing.assert_allclose(after_one[name], x1[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after_two[name], x2[name], rtol=1e-5, atol=1e-6)
    assert second.history("j")["rounds"][2]["aggregation"]["updates"] == 2


def test_privacy_per_round_in_history(tmp_path, tiny_bundle):
    options = {"clip_norm": 0.5, "noise_multiplier": 1.2, "dp_delta": 1e-6}
    coordinator = coordinator_for(tmp_path, job(tiny_bundle, "fedavg", options))
    play_round(coordinator, {"dev-a": 0.01, "dev-b": 0.02})
    play_round(coordinator, {"dev-a": 0.01, "dev-b": 0.02})
    history = coordinator.history("j")
    first, second = (history["rounds"][i]["privacy"] for i in (1, 2))
    assert first["epsilon"] == second["epsilon"] == first["epsilon_cumulative"] > 0
    assert second["epsilon_cumulative"] > first["epsilon_cumulative"]
    assert first["delta"] == 1e-6 and first["noise_std"] == pytest.approx(0.6) and first["denominator"] == 2
    assert history["privacy"] == {"epsilon": second["epsilon_cumulative"], "delta": 1e-6, "rounds": 2}
    assert history["rounds"][1]["aggregation"]["clipped"] == 2  # 0.01 on every coordinate is far above 0.5
    np.testing.assert_array_equal(coordinator.strategy_state("j", 2)["privacy/noise_multipliers"], [1.2, 1.2])


def test_krum_names_the_device_it_picked(tmp_path, tiny_bundle):
    # a bound loose enough to let the outlier through validation: Krum has to deal with it
    config = job(tiny_bundle, "krum", {"byzantine": 1}, rounds=1, minimum=5, max_update_norm=1e6)
    coordinator = coordinator_for(tmp_path, config, DEVICES)
    start = coordinator.global_adapter("j", 0)
    result = play_round(coordinator, {"dev-a": 0.0, "dev-b": 0.01, "dev-c": 0.02, "dev-d": 0.04, "dev-e": 50.0})
    assert coordinator.history("j")["rounds"][1]["aggregation"]["krum_selected"] == ["dev-b"]
    for name, value in start.items():
        np.testing.assert_allclose(result[name], value + np.float32(0.01), atol=1e-6)


def test_strategy_checks_its_job(tmp_path, tiny_bundle):
    with pytest.raises(ConfigError, match="invalid clients.min=3: strategy 'krum' with byzantine=1 needs rounds of at "
                                          "least 5 updates"):
        job(tiny_bundle, "krum", {"byzantine": 1}, minimum=3)
    with pytest.raises(ConfigError, match=r"selected=5: must be <= clients.min - byzantine = 4"):
        job(tiny_bundle, "multikrum", {"byzantine": 1, "selected": 5}, minimum=5)
    with pytest.raises(ConfigError, match="needs a bundle exported with a proximal term"):
        Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(job(tiny_bundle, "fedprox"),)))


def test_fedprox_job_exports_its_model_with_the_proximal_term(tmp_path, tiny_bert_dir):
    from edgeft.config import ExportConfig

    config = JobConfig(id="j", model=tiny_bert_dir, strategy="fedprox", strategy_options={"mu": 0.1},
                       export=ExportConfig(labels=("a", "b"), max_length=16))
    assert config.export.proximal_mu == 0.1
    coordinator = Coordinator(ServerConfig(state_dir=tmp_path / "state", insecure=True, jobs=(config,)))
    assert coordinator.bundles["j"].manifest.proximal["mu"] == 0.1
    with pytest.raises(ConfigError, match="differs from"):
        JobConfig(id="j", model=tiny_bert_dir, strategy="fedprox", strategy_options={"mu": 0.1},
                  export=ExportConfig(labels=("a", "b"), proximal_mu=0.2))
