"""Image and table models against PyTorch: EfficientNet-Lite0 with its real ImageNet weights (head-only, and LoRA on
its last 1x1 convolutions) on the digits, and an MLP on the breast-cancer feature columns, trained on the device
(a process where torch cannot be imported) give the first 20 losses PyTorch gives from the same initial weights and
batches (1e-3 relative)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeft.datasets
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.export import export_module, from_module
from edgeft.export.reference import reference_for
from edgeft.testing.agents import NO_TORCH
from small_models import TabularMLP

DATASETS = Path(edgeft.datasets.__file__).parent
STEPS = 20
LOSS_RTOL = 1e-3
SIZE = 64  # digits upscaled to 64x64 (parity does not depend on the size; 224 would only be slower)

DEVICE = """
import json, sys
from edgeft.bundle import load_bundle
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.train.engines import open_session
bundle, data, columns, lr, batch, steps = json.loads(sys.argv[1])
bundle = load_bundle(bundle)
dataset = load_dataset(DataConfig(data, feature_columns=columns), bundle)
session = open_session(bundle, threads=2)
losses = []
for b in list(batches(dataset, batch, 0, shuffle=True, seed=1, train=True))[:steps]:
    losses.append(session.train_step(b)[0])
    session.optimizer_step(lr)
print(json.dumps({"losses": losses, "torch": "torch" in sys.modules and sys.modules["torch"] is not None}))
"""


def device_losses(bundle: Path, data: Path, lr: float, batch: int, columns: tuple[str, ...] | None = None) -> list:
    env = {**os.environ, "PYTHONPATH": str(NO_TORCH)}
    done = subprocess.run([sys.executable, "-c", DEVICE, json.dumps([str(bundle), str(data), columns, lr, batch, STEPS])],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    return result["losses"]


def reference_losses(source, config: ExportConfig, bundle, data: Path, lr: float, batch: int,  # noqa: ANN001
                     columns: tuple[str, ...] | None = None) -> list:
    reference = reference_for(source, config, bundle)
    dataset = load_dataset(DataConfig(data, feature_columns=columns), bundle)
    return [reference.step(b, lr) for b in list(batches(dataset, batch, 0, shuffle=True, seed=1, train=True))[:STEPS]]


def check(device: list, reference: list) -> None:
    np.testing.assert_allclose(device, reference, rtol=LOSS_RTOL)
    assert np.mean(device[-5:]) < np.mean(device[:5]), device  # and it learns


def efficientnet(recipe: str, engine: str, tmp_path: Path):  # noqa: ANN201
    from edgeft.export.efficientnet_lite import EFFICIENTNET_LITE0_PREPROCESSING, efficientnet_lite0

    spec = replace(EFFICIENTNET_LITE0_PREPROCESSING, size=SIZE, resize=0, augment=False)
    adapter = (AdapterConfig(kind="head") if recipe == "head" else
               AdapterConfig(target_modules=("_conv_head", "_blocks.15._project_conv"), trainable_modules=("classifier",)))
    config = ExportConfig(task="classification", labels=tuple("0123456789"), adapter=adapter, engine=engine)
    example = {"pixel_values": torch.zeros(2, 3, SIZE, SIZE)}

    def model():  # noqa: ANN202
        torch.manual_seed(0)
        return efficientnet_lite0(num_classes=10)

    bundle = export_module(model(), example, tmp_path / f"{recipe}-{engine}", config, preprocessing=spec)
    return bundle, from_module(model(), example, preprocessing=spec), config


@pytest.mark.slow
@pytest.mark.parametrize("recipe,engine", [("head", "ort-training"), ("head", "portable"), ("lora", "portable")])
def test_efficientnet_lite0_on_the_digits_matches_pytorch(tmp_path, recipe, engine):
    bundle, source, config = efficientnet(recipe, engine, tmp_path)
    data, lr = DATASETS / "digits" / "train", 3e-3
    check(device_losses(bundle.path, data, lr, 16), reference_losses(source, config, bundle, data, lr, 16))


@pytest.mark.parametrize("engine", ["ort-training", "portable"])
def test_mlp_on_breast_cancer_columns_matches_pytorch(tmp_path, engine):
    import csv

    train = DATASETS / "breast_cancer" / "train.csv"
    with open(train) as fh:
        rows = list(csv.DictReader(fh))
    columns = tuple(c for c in rows[0] if c != "label")
    values = np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float32)
    mean, std = values.mean(0), values.std(0)
    config = ExportConfig(task="classification", labels=("malignant", "benign"), engine=engine,
                          adapter=AdapterConfig(kind="full"))
    example = {"features": torch.zeros(2, len(columns))}
    torch.manual_seed(0)
    bundle = export_module(TabularMLP(mean, std), example, tmp_path / engine, config)
    torch.manual_seed(0)
    source = from_module(TabularMLP(mean, std), example)
    lr = 1e-2
    check(device_losses(bundle.path, train, lr, 32, columns),
          reference_losses(source, config, bundle, train, lr, 32, columns))
