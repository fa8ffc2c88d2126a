"""``edgeft simulate`` with a fleet of mixed training engines: the model is exported for each engine, and clients
whose agents run the plain onnxruntime (a device virtualenv) train the portable bundle beside clients on the
training build."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig
from edgeft.errors import ConfigError
from edgeft.testing import SimulationConfig, run_simulation



def test_engine_settings_are_checked(tmp_path, tiny_bundle, tiny_bert_dir, small_banking):
    data = DataConfig(small_banking["train"], label_column="category")
    with pytest.raises(ConfigError, match="engines=.*with model"):
        SimulationConfig(out=tmp_path, train=data, bundle=tiny_bundle.path, engines=("portable",))
    with pytest.raises(ConfigError, match=r"engines=\['tflite'\]"):
        SimulationConfig(out=tmp_path, train=data, model=tiny_bert_dir, engines=("tflite",))
    with pytest.raises(ConfigError, match="without client_ranks"):
        SimulationConfig(out=tmp_path, train=data, model=tiny_bert_dir, engines=("ort-training", "portable"),
                         client_ranks=(8, 4))


@pytest.mark.slow
def test_simulated_fleet_of_mixed_engines(tmp_path, tiny_bert_dir, tiny_config, small_banking, device_python):
    config = SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(small_banking["train"], label_column="category"),
        test=DataConfig(small_banking["test"], label_column="category"), model=tiny_bert_dir, export=tiny_config,
        engines=("ort-training", "portable"), client_pythons=(device_python, Path(sys.executable)),
        clients=3, rounds=1, concurrency=2, baseline=False,
        local=TrainConfig(epochs=1, batch_size=16, learning_rate=3e-2, progress=False))
    history = run_simulation(config)["history"]
    assert history["status"] == "finished", history["message"]
    assert len(history["rounds"][1]["clients"]) == 3
    devices = tmp_path / "sim" / "devices"
    for i, engine in enumerate(["portable", "ort-training", "portable"]):  # clients 0 and 2 on the plain runtime
        assert f"training on the {engine} engine" in (devices / f"client-{i:03d}" / "agent.log").read_text()
    assert (tmp_path / "sim" / "bundle-portable" / "manifest.json").is_file()
    assert "Training engines: the job serves ort-training, portable" in (tmp_path / "sim" / "report.md").read_text()
