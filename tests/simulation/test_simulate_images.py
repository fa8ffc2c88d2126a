"""edgeft simulate on an image model: the digits PNG folders split among devices (iid), a CNN
trained federated with torch unimportable on the agents, evaluated by the coordinator on the test folder."""

from __future__ import annotations

from pathlib import Path

import torch

import edgeft.datasets
from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
from edgeft.data import DataConfig
from edgeft.export import export_module
from edgeft.images import ImagePreprocessing
from edgeft.testing import SimulationConfig, run_simulation
from small_models import SmallCNN

DIGITS = Path(edgeft.datasets.__file__).parent / "digits"


def test_simulated_fleet_on_image_folders(tmp_path):
    torch.manual_seed(0)
    spec = ImagePreprocessing(size=16, resize=16, channels="L", mean=(0.5,), std=(0.5,), augment=False)
    bundle = export_module(SmallCNN(), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "cnn",
                           ExportConfig(task="classification", labels=tuple(str(i) for i in range(10)),
                                        adapter=AdapterConfig(kind="full")), preprocessing=spec)
    summary = run_simulation(SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(DIGITS / "train"), test=DataConfig(DIGITS / "test"),
        bundle=bundle.path, clients=3, rounds=3, partition="iid", head_init="none", baseline=False,
        local=TrainConfig(epochs=6, batch_size=32, learning_rate=5e-2, progress=False)))
    partition = summary["partition"]
    assert sum(partition["sizes"]) == 1437 and len(partition["sizes"]) == 3
    rounds = [r for r in summary["history"]["rounds"] if r["round"] > 0]
    assert [r["status"] for r in rounds] == ["closed"] * 3
    accuracy = [r["evaluation"]["accuracy"] for r in summary["history"]["rounds"]]
    assert accuracy[-1] > accuracy[0] + 0.15, accuracy  # the federated CNN learns the digits
