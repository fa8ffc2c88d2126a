"""The classic transfer-learning recipe end to end on the CLI: a ResNet-18-architecture image classifier (a Hugging
Face folder built from ResNet-18's configuration: random weights, as no pretrained checkpoint can be downloaded here)
with a new 10-class head, exported head-only without augmentation, trained on a digits image folder on the device
(torch unimportable; the head trains on cached features), deployed as an int8 static package, and ``edgeft predict``
on PNG files with torch unimportable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edgeft.datasets
from edgeft.bundle import load_bundle
from edgeft.testing.agents import NO_TORCH

DIGITS = Path(edgeft.datasets.__file__).parent / "digits"
LABELS = ",".join(str(i) for i in range(10))
SIZE = 64
PREPROCESSOR = {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
                "crop_pct": 0.875, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def edgeft(*args: str, device: bool = False) -> subprocess.CompletedProcess:
    """``python -m edgeft.cli ARGS``; with ``device`` torch, transformers and peft cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(NO_TORCH)} if device else dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "edgeft.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def digits_subset(folder: Path, split: str, per_class: int) -> Path:
    for label in range(10):
        (folder / str(label)).mkdir(parents=True)
        for path in sorted((DIGITS / split / str(label)).glob("*.png"))[:per_class]:
            shutil.copyfile(path, folder / str(label) / path.name)
    return folder


@pytest.mark.slow
def test_resnet18_head_only_from_image_folder_to_predict(tmp_path):
    from transformers import AutoModelForImageClassification, ResNetConfig

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                          num_labels=1000)  # ResNet-18's layout (microsoft/resnet-18), with an ImageNet-sized head
    model_dir = tmp_path / "resnet-18"
    AutoModelForImageClassification.from_config(config).save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    train, test = digits_subset(tmp_path / "train", "train", 12), digits_subset(tmp_path / "test", "test", 3)

    edgeft("export", str(model_dir), "--out", str(tmp_path / "bundle"), "--labels", LABELS, "--adapter", "head",
           "--no-augment")
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.manifest.input_kind == "image" and bundle.manifest.preprocessing["augment"] is False
    assert bundle.manifest.trainable_names == ["classifier.1.weight", "classifier.1.bias"]
    assert bundle.manifest.pooling["head_bundle"] == "head"  # ResNet's head is Flatten + Linear: trained alone

    done = edgeft("train", str(tmp_path / "bundle"), "--data", str(train), "--val-fraction", "0", "--epochs", "3",
                  "--lr", "1e-2", "--batch-size", "16", "--out", str(tmp_path / "run"), "--no-progress", device=True)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"], done.stdout

    edgeft("deploy", "--model", str(model_dir), "--bundle", str(tmp_path / "bundle"), "--adapter",
           str(tmp_path / "run"), "--mode", "int8-static", "--eval-data", str(test), "--calibration-data", str(train),
           "--accuracy-budget", "100", "--out", str(tmp_path / "package"))
    package = json.loads((tmp_path / "package" / "package.json").read_text())
    assert package["input_kind"] == "image" and package["mode"] == "int8-static"

    pngs = sorted(str(p) for p in test.glob("*/*.png"))[:5]
    done = edgeft("predict", "--model", str(tmp_path / "package"), *pngs, device=True)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["file"] for r in records] == pngs
    assert all(r["label"] in LABELS.split(",") and 0 <= r["score"] <= 1 for r in records)
