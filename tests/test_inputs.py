"""Models that do not read text: a tabular MLP and a small CNN, exported from plain torch modules, trained on
the device (torch unimportable) from feature columns, .npz arrays and image folders, on both engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeft.datasets
from edgeft.bundle import load_bundle
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.errors import DataError, ExportError
from edgeft.export import export_module
from edgeft.testing.agents import NO_TORCH
from small_models import SmallCNN, TabularMLP

CANCER = Path(edgeft.datasets.__file__).parent / "breast_cancer"
ENGINES = ("portable", "ort-training")


class OneFeature(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


def cancer_stats() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CANCER / "train.npz") as data:
        features = data["features"]
    return features.mean(axis=0), features.std(axis=0) + 1e-6


def mlp_bundle(tmp: Path, engine: str):  # noqa: ANN201
    torch.manual_seed(0)
    config = ExportConfig(task="classification", labels=("malignant", "benign"), engine=engine,
                          adapter=AdapterConfig(kind="full"))
    return export_module(TabularMLP(*cancer_stats()), {"features": torch.zeros(2, 30)}, tmp / f"mlp-{engine}", config)


def device_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``edgeft train ...`` in a process where torch, transformers and peft cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(NO_TORCH)}
    return subprocess.run([sys.executable, "-m", "edgeft.cli", "train", *args, "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_mlp_trains_on_feature_columns_on_the_device(tmp_path, engine):
    """A fully trainable MLP (its cross-entropy used to fail ORT's gradient builder) learns breast-cancer
    diagnosis from the CSV's 30 feature columns, torch unimportable."""
    bundle = mlp_bundle(tmp_path, engine)
    assert bundle.manifest.input_kind == "features" and bundle.manifest.engine == engine
    out = tmp_path / "out"
    proc = device_train(str(bundle.path), "--data", str(CANCER / "train.csv"), "--test", str(CANCER / "test.csv"),
                        "--feature-columns", "all", "--epochs", "5", "--batch-size", "16", "--lr", "1e-2",
                        "--val-fraction", "0", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [epoch["train_loss"] for epoch in metrics["history"]]
    assert losses[-1] < losses[0] and metrics["test"]["accuracy"] > 0.9, metrics


def test_npz_arrays_and_csv_columns_give_the_same_batches(tmp_path):
    bundle = mlp_bundle(tmp_path, "portable")
    from_csv = load_dataset(DataConfig(CANCER / "test.csv", feature_columns=("all",)), bundle)
    from_npz = load_dataset(DataConfig(CANCER / "test.npz"), bundle)
    np.testing.assert_array_equal(from_csv.inputs["features"], from_npz.inputs["features"])
    np.testing.assert_array_equal(from_csv.targets, from_npz.targets)
    batch = next(batches(from_npz, 8, 0))
    assert batch["features"].shape == (8, 30) and batch["labels"].dtype == np.int64


def test_bad_tabular_input_is_one_clear_line(tmp_path):
    bundle = mlp_bundle(tmp_path, "portable")
    with pytest.raises(DataError, match="--feature-columns"):
        load_dataset(DataConfig(CANCER / "train.csv"), bundle)
    with pytest.raises(DataError, match="no_such_column"):
        load_dataset(DataConfig(CANCER / "train.csv", feature_columns=("no_such_column",)), bundle)
    with pytest.raises(DataError, match="2 feature columns, but the bundle's model reads 30"):
        load_dataset(DataConfig(CANCER / "train.csv", feature_columns=("mean_radius", "mean_texture")), bundle)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("a,label\n1.0,tumour\n")
    other = tmp_path / "mlp1"
    with pytest.raises(DataError, match="unknown label"):
        load_dataset(DataConfig(unknown, feature_columns=("a",)), export_module(
            OneFeature(), {"features": torch.zeros(2, 1)}, other,
            ExportConfig(task="classification", labels=("malignant", "benign"), adapter=AdapterConfig(kind="full"))))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["lora", "head"])
def test_a_cnn_trains_with_lora_on_its_convolutions_or_its_head(tmp_path, engine, kind):
    """LoRA on Conv2d layers (the portable engine writes convolution_backward as forward convolutions) and
    head-only training; BatchNorm runs on its frozen statistics; the loss falls on a fixed batch."""
    from edgeft.train.engines import open_session

    torch.manual_seed(0)
    adapter = AdapterConfig(kind=kind, target_modules=("features.0", "features.4") if kind == "lora" else None,
                            trainable_modules=("fc",))
    config = ExportConfig(task="classification", labels=tuple(str(i) for i in range(10)), engine=engine,
                          adapter=adapter)
    bundle = export_module(SmallCNN(), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "cnn", config,
                           input_kind="arrays")
    trainable = bundle.manifest.trainable_names
    assert any("lora_A" in n for n in trainable) == (kind == "lora") and any("fc" in n for n in trainable)
    session = open_session(bundle, threads=1)
    rng = np.random.default_rng(0)
    batch = {"pixel_values": rng.standard_normal((8, 1, 16, 16)).astype(np.float32), "labels": np.arange(8) % 10}
    losses = []
    for _ in range(6):
        loss, _ = session.train_step(batch)
        session.optimizer_step(1e-2)
        losses.append(loss)
    assert losses[-1] < losses[0], losses


def test_export_refuses_an_image_model_without_preprocessing(tmp_path):
    with pytest.raises(ExportError, match="needs preprocessing"):
        export_module(SmallCNN(), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "b",
                      ExportConfig(task="classification", labels=("a", "b")), input_kind="image")


def test_old_bundles_read_tokens(tiny_bundle):
    manifest = load_bundle(tiny_bundle.path).manifest
    assert manifest.input_kind == "tokens" and manifest.preprocessing is None
    assert "input_kind" not in manifest.to_json()  # a text bundle's manifest (and digest) is as before


DIGITS = Path(edgeft.datasets.__file__).parent / "digits"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_cnn_learns_digits_from_an_image_folder_on_the_device(tmp_path, engine):
    """Real scanned digits: PNG class folders in, the bundle's preprocessing (resize, centre crop, normalise;
    augmentation off here) applied with Pillow and numpy, torch unimportable. A fresh session given the trained
    parameters evaluates what was trained: BatchNorm runs on its stored statistics in both engines
    (``FrozenBatchNorm``; ORT's training build used to normalise with batch statistics and drift)."""
    from edgeft.images import ImagePreprocessing

    torch.manual_seed(0)
    spec = ImagePreprocessing(size=16, resize=16, channels="L", mean=(0.5,), std=(0.5,), augment=False)
    config = ExportConfig(task="classification", labels=tuple(str(i) for i in range(10)), engine=engine,
                          adapter=AdapterConfig(kind="full"))
    bundle = export_module(SmallCNN(), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "cnn", config,
                           preprocessing=spec)
    assert bundle.manifest.input_kind == "image" and bundle.manifest.preprocessing["size"] == 16
    out = tmp_path / "out"
    proc = device_train(str(bundle.path), "--data", str(DIGITS / "train"), "--test", str(DIGITS / "test"),
                        "--epochs", "6", "--batch-size", "32", "--lr", "3e-2", "--val-fraction", "0",
                        "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.6, metrics  # 0.78 measured on both engines (10 classes, from scratch)


def test_bad_images_are_one_clear_line(tmp_path):
    from edgeft.images import ImagePreprocessing

    config = ExportConfig(task="classification", labels=("0", "1"), adapter=AdapterConfig(kind="full"))
    bundle = export_module(SmallCNN(classes=2), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "b", config,
                           preprocessing=ImagePreprocessing(size=16, resize=16, channels="L", mean=(0.5,),
                                                            std=(0.5,)))
    folder = tmp_path / "images"
    for label in ("0", "7"):
        (folder / label).mkdir(parents=True)
        (folder / label / "a.png").write_bytes((DIGITS / "train" / "0").glob("*.png").__next__().read_bytes())
    with pytest.raises(DataError, match="unknown label"):
        load_dataset(DataConfig(folder), bundle)
    (folder / "7" / "a.png").unlink()
    (folder / "7").rmdir()
    (folder / "1").mkdir()
    (folder / "1" / "broken.png").write_bytes(b"not a png")
    data = load_dataset(DataConfig(folder), bundle)
    with pytest.raises(DataError, match="broken.png"):
        next(batches(data, 4, 0))


@pytest.mark.parametrize("engine", ENGINES)
def test_an_image_classifier_outputs_its_heads_input(tmp_path, engine):
    """A classifier whose head is one Linear module outputs that module's input as ``features`` (for the statistics
    round and head-only training on cached features), equal to the torch backbone's output."""
    from edgeft.train.engines import open_session
    from edgeft.train.trainer import class_statistics

    torch.manual_seed(0)
    model = SmallCNN()
    bundle = export_module(model, {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "cnn",
                           ExportConfig(task="classification", labels=tuple(str(i) for i in range(10)), engine=engine,
                                        adapter=AdapterConfig(kind="head", trainable_modules=("fc",))),
                           input_kind="arrays")
    assert bundle.manifest.pooling == {"mode": "head_input", "module": "fc", "normalize": False, "dimension": 16,
                                       "head_bundle": "head"}
    assert bundle.manifest.head() == ("fc.weight", "fc.bias")
    session = open_session(bundle, threads=1)
    pixels = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    features = session.features({"pixel_values": pixels, "labels": np.zeros(4, dtype=np.int64)})
    with torch.no_grad():
        expected = torch.flatten(model.features(torch.from_numpy(pixels)), 1).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)
    from edgeft.inputs import ArrayDataset

    stats, count = class_statistics(session, ArrayDataset({"pixel_values": pixels}, np.array([0, 1, 1, 3])), 10, 0)
    assert count == 4 and stats["statistics.counts"].tolist()[:4] == [1, 2, 0, 1]
