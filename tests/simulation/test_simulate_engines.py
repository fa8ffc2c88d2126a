"""``edgeft simulate`` with a fleet of mixed training engines: the model is exported for each engine, and clients
whose agents run the plain onnxruntime (a device virtualenv) train the portable bundle beside clients on the
training build."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig
from edgeft.errors import ConfigError
from edgeft.simulation import SimulationConfig, run_simulation

REPO = Path(__file__).resolve().parents[2]
DEVICE_RUNTIME = "onnxruntime==1.32.0"


def test_engine_settings_are_checked(tmp_path, tiny_bundle, tiny_bert_dir, small_banking):
    data = DataConfig(small_banking["train"], label_column="category")
    with pytest.raises(ConfigError, match="engines=.*with model"):
        SimulationConfig(out=tmp_path, train=data, bundle=tiny_bundle.path, engines=("portable",))
    with pytest.raises(ConfigError, match=r"engines=\['tflite'\]"):
        SimulationConfig(out=tmp_path, train=data, model=tiny_bert_dir, engines=("tflite",))
    with pytest.raises(ConfigError, match="without client_ranks"):
        SimulationConfig(out=tmp_path, train=data, model=tiny_bert_dir, engines=("ort-training", "portable"),
                         client_ranks=(8, 4))


@pytest.fixture(scope="module")
def device_python(pytestconfig, tmp_path_factory) -> Path:
    """A device virtualenv: Python 3.13, the plain onnxruntime, this checkout's edgeft (scripts/device_venv.py)."""
    spec = importlib.util.spec_from_file_location("device_venv", REPO / "scripts" / "device_venv.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("device-venvs") if cache is not None else tmp_path_factory.mktemp("device-venvs")
    try:
        return tools.device_venv(root, "python3.13", DEVICE_RUNTIME)
    except tools.IndexUnreachable as exc:
        pytest.skip(f"cannot install {DEVICE_RUNTIME} and edgeft's device dependencies: {exc}")


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
