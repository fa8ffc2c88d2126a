"""edgeft simulate: a real coordinator and real agent processes on partitions of real data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig
from edgeft.errors import ConfigError
from edgeft.testing import SimulationConfig, run_simulation


def test_simulated_fleet_records_and_reports_everything(tmp_path, tiny_bundle, small_banking):
    config = SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(small_banking["train"], label_column="category"),
        test=DataConfig(small_banking["test"], label_column="category"), bundle=tiny_bundle.path,
        clients=3, rounds=2, partition="dirichlet:1.0", concurrency=2,
        local=TrainConfig(epochs=2, batch_size=16, learning_rate=3e-2, progress=False))
    summary = run_simulation(config)
    out = tmp_path / "sim"
    history = summary["history"]
    assert history["status"] == "finished"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    for record in history["rounds"]:  # the global adapter is evaluated before training and after every round
        assert 0.0 <= record["evaluation"]["accuracy"] <= 1.0 and "macro_f1" in record["evaluation"]
    for record in history["rounds"][1:]:
        assert record["seconds"] > 0 and len(record["clients"]) == 3
        for client in record["clients"]:
            assert client["bytes_up"] > 0 and client["bytes_down"] > 0 and client["metrics"]["train_loss"] > 0
    assert history["rounds"][2]["evaluation"]["accuracy"] > history["rounds"][0]["evaluation"]["accuracy"]
    # the partitions cover the training data exactly once, with the reported label histogram
    with open(small_banking["train"], newline="") as fh:
        total = len(list(csv.DictReader(fh)))
    sizes = []
    for i in range(3):
        with open(out / "clients" / f"client-{i:03d}.csv", newline="") as fh:
            sizes.append(len(list(csv.DictReader(fh))))
    assert sum(sizes) == total and sizes == summary["partition"]["sizes"]
    assert np.array(summary["partition"]["histogram"]).sum() == total
    # exports and report
    rounds = list(csv.DictReader(open(out / "rounds.csv")))
    assert [int(r["round"]) for r in rounds] == [0, 1, 2] and float(rounds[2]["bytes_up"]) > 0
    assert len(list(csv.DictReader(open(out / "clients.csv")))) == 6
    assert json.loads((out / "history.json").read_text())["job"] == "simulation"
    for name in ("accuracy.png", "bytes.png", "label_skew.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Centralised baseline" in report and "![label skew](label_skew.png)" in report
    assert len(summary["centralised"]) == 4  # 2 rounds x 2 local epochs
    # the agents ran without torch, as devices do
    assert "done: job simulation finished" in (out / "devices" / "client-000" / "agent.log").read_text()
    # a second run into the same folder is refused unless asked for
    with pytest.raises(ConfigError, match="--overwrite"):
        run_simulation(config)


def test_bad_configuration_is_refused(tmp_path, tiny_bundle, small_banking):
    data = DataConfig(small_banking["train"], label_column="category")
    with pytest.raises(ConfigError, match="partition"):
        SimulationConfig(out=tmp_path, train=data, bundle=tiny_bundle.path, partition="dirichlet")
    with pytest.raises(ConfigError, match="exactly one"):
        SimulationConfig(out=tmp_path, train=data)
    with pytest.raises(Exception, match="no column 'nope'|labels the model does not know"):
        run_simulation(SimulationConfig(out=tmp_path / "x", train=DataConfig(small_banking["train"], label_column="nope"),
                                        bundle=tiny_bundle.path, clients=2, baseline=False))


def test_simulated_fleet_with_secure_aggregation(tmp_path, tiny_bundle, small_banking):
    config = SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(small_banking["train"], label_column="category"),
        test=DataConfig(small_banking["test"], label_column="category"), bundle=tiny_bundle.path,
        clients=3, rounds=1, concurrency=2, baseline=False, secure_aggregation={"bits": 16, "clip": 1.0},
        local=TrainConfig(epochs=1, batch_size=16, learning_rate=3e-2, progress=False))
    summary = run_simulation(config)
    history = summary["history"]
    assert history["status"] == "finished", history["message"]
    secure = history["rounds"][1]["aggregation"]["secure_aggregation"]
    assert len(secure["survivors"]) == 3 and secure["threshold"] == 3
    assert history["rounds"][1]["clients"] == []  # the coordinator never saw a single update
    assert (tmp_path / "sim" / "report.md").is_file()
    assert "done: job simulation finished" in (tmp_path / "sim" / "devices" / "client-000" / "agent.log").read_text()


def test_simulated_fleet_of_mixed_lora_ranks(tmp_path, tiny_bert_dir, tiny_config, small_banking):
    from dataclasses import replace

    config = SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(small_banking["train"], label_column="category"),
        test=DataConfig(small_banking["test"], label_column="category"), model=tiny_bert_dir,
        export=replace(tiny_config, adapter=replace(tiny_config.adapter, rank=4)), client_ranks=(4, 2),
        clients=3, rounds=1, concurrency=2, baseline=False,
        local=TrainConfig(epochs=1, batch_size=16, learning_rate=3e-2, progress=False))
    history = run_simulation(config)["history"]
    assert history["status"] == "finished", history["message"]
    assert history["rounds"][1]["aggregation"]["client_ranks"] == [2, 4]  # clients 0 and 2: rank 4; client 1: 2
    assert (tmp_path / "sim" / "bundle-rank2" / "manifest.json").is_file()
    assert "Mixed LoRA ranks: each client's largest rank cycles through 4, 2" in (tmp_path / "sim" / "report.md").read_text()
    with pytest.raises(ConfigError, match="client_ranks"):
        SimulationConfig(out=tmp_path, train=config.train, bundle=tmp_path, client_ranks=(2,))


def test_an_asynchronous_job_on_a_heterogeneous_fleet(tmp_path, tiny_bundle, small_banking):
    from edgeft.testing.fleet_profile import FleetProfile

    fleet = FleetProfile(speed_sigma=1.0, dropout=0.3, seed=1)  # slowdowns 1.41, 1.7, 0.3, 0.9
    summary = run_simulation(SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(small_banking["train"], label_column="category"),
        test=DataConfig(small_banking["test"], label_column="category"), bundle=tiny_bundle.path,
        clients=4, rounds=3, concurrency=2, baseline=False, mode="async", round_deadline_s=30,
        async_options={"buffer_size": 2, "max_staleness": 10}, fleet=fleet,
        local=TrainConfig(epochs=1, batch_size=16, learning_rate=3e-2, progress=False)))
    history = summary["history"]
    assert history["status"] == "finished" and [v["version"] for v in history["versions"]] == [1, 2, 3]
    assert all(len(v["updates"]) == 2 for v in history["versions"])
    assert summary["config"]["mode"] == "async" and summary["config"]["fleet"]["dropout"] == 0.3
    rounds = list(csv.DictReader(open(tmp_path / "sim" / "rounds.csv")))  # versions reported as rounds
    assert [int(r["round"]) for r in rounds] == [0, 1, 2, 3]
    logs = {i: (tmp_path / "sim" / "devices" / f"client-{i:03d}" / "agent.log").read_text() for i in range(4)}
    trained = [i for i in range(4) if ": training" in logs[i]]
    slow = [i for i in trained if fleet.device(i).slowdown > 1]
    assert slow and all("simulated slowdown x" in logs[i] for i in slow)  # a slow device waits after training
    assert not any("simulated slowdown" in logs[i] for i in range(4) if fleet.device(i).slowdown <= 1)


def test_stop_when_ends_a_simulation_early(tmp_path, tiny_bundle, small_banking):
    def first_round_evaluated(history: dict) -> bool:
        return any(r["round"] >= 1 and r.get("evaluation") for r in history["rounds"])

    summary = run_simulation(SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(small_banking["train"], label_column="category"),
        test=DataConfig(small_banking["test"], label_column="category"), bundle=tiny_bundle.path,
        clients=2, rounds=50, concurrency=2, baseline=False, stop_when=first_round_evaluated,
        local=TrainConfig(epochs=1, batch_size=16, learning_rate=3e-2, progress=False)))
    history = summary["history"]
    assert history["status"] == "running" and first_round_evaluated(history)  # stopped there, not after 50 rounds
    assert len(history["rounds"]) < 10 and history["rounds"][1]["closed_at"] > history["rounds"][1]["opened_at"]
