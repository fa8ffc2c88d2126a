"""Deploying models that do not read text: a small CNN (LoRA on its convolutions, trained on the shipped digits) and
a tabular MLP (breast-cancer features), from the torch modules they were exported from (``deploy_module``), in fp32,
dynamic int8 and static int8 QDQ; ``edgeft predict`` on PNG files, CSV columns and .npz arrays with torch
unimportable; bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import edgeft.datasets
from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.deploy import DeployConfig, deploy, deploy_module
from edgeft.deploy.merge import merged_module
from edgeft.errors import ConfigError, DataError
from edgeft.export import export_module
from edgeft.images import ImagePreprocessing, preprocess_batch, read_image_folder
from edgeft.predict import Predictor, predict_files
from edgeft.testing.agents import NO_TORCH
from edgeft.train.engines import open_session
from edgeft.train.trainer import train
from edgeft.update import AdapterUpdate, load_update, save_update
from small_models import SmallCNN, TabularMLP

DATASETS = Path(edgeft.datasets.__file__).parent
DIGITS, CANCER = DATASETS / "digits", DATASETS / "breast_cancer"
SPEC = ImagePreprocessing(size=16, resize=16, channels="L", mean=(0.5,), std=(0.5,), augment=False)
LABELS = tuple(str(i) for i in range(10))


def pretrained_cnn() -> SmallCNN:
    """The base model a user brings: a SmallCNN trained in torch for 3 epochs on the digits (its BatchNorm layers
    with real running statistics)."""
    pairs = read_image_folder(DIGITS / "train")
    x = torch.from_numpy(preprocess_batch([p for p, _ in pairs], SPEC))
    y = torch.tensor([int(label) for _, label in pairs])
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(3):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 32):
            index = order[start: start + 32]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """(module, bundle, adapter file, folder, base weights): the pretrained CNN exported with LoRA on both
    convolutions and the head trained in full, then 20 steps of on-device training on the digits (edgeft's
    trainer)."""
    tmp = tmp_path_factory.mktemp("cnn")
    module = pretrained_cnn()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    config = ExportConfig(task="classification", labels=LABELS, adapter=AdapterConfig(
        kind="lora", rank=4, alpha=8, target_modules=("features.0", "features.4"), trainable_modules=("fc",)))
    bundle = export_module(module, {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp / "bundle", config,
                           preprocessing=SPEC)
    data = load_dataset(DataConfig(DIGITS / "train"), bundle)
    result = train(bundle, data, TrainConfig(max_steps=20, learning_rate=1e-2, threads=1, progress=False))
    assert any(np.abs(v).max() > 0 for k, v in result.parameters.items() if "lora_B" in k)  # the LoRA trained
    adapter = tmp / "update.safetensors"
    save_update(adapter, AdapterUpdate(result.parameters, result.n_examples, {}, bundle.digest))
    return module, bundle, adapter, tmp, base


@pytest.fixture(scope="module")
def packages(cnn):
    """{mode: report} for none (fp32), int8 (dynamic) and int8-static (QDQ, calibrated on the training images)."""
    module, bundle, adapter, tmp, _ = cnn
    reports = {}
    for mode in ("none", "int8", "int8-static"):
        reports[mode] = deploy_module(module, DeployConfig(
            out=tmp / mode, bundle=bundle.path, adapter=adapter, mode=mode, eval_data=DataConfig(DIGITS / "test"),
            calibration_data=DataConfig(DIGITS / "train"), accuracy_budget=100, threads=1))
    return reports


def no_torch_predict(*args: str) -> subprocess.CompletedProcess:
    """``edgeft predict ...`` in a process where torch, transformers and peft cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(NO_TORCH)}
    return subprocess.run([sys.executable, "-m", "edgeft.cli", "predict", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_fp32_package_computes_what_the_bundle_computes(cnn, packages):
    """Merged LoRA convolutions and BatchNorm folded into them: the fp32 package's logits on the test images are
    the bundle's eval graph's with the trained adapter."""
    _, bundle, adapter, tmp, _ = cnn
    graph = onnx.load(str(tmp / "none" / "model.onnx")).graph
    assert not [i.name for i in graph.initializer if "lora" in i.name.lower()]
    assert [n.op_type for n in graph.node].count("Conv") == 2
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    session = open_session(bundle, threads=1)
    session.set_parameters(load_update(adapter).tensors)
    predictor = Predictor(tmp / "none")
    for batch in list(batches(load_dataset(DataConfig(DIGITS / "test"), bundle), 64, 0))[:3]:
        _, expected = session.eval_step(batch)
        np.testing.assert_allclose(predictor.run({"pixel_values": batch["pixel_values"]}), expected, atol=1e-4,
                                   rtol=0)
    package = json.loads((tmp / "none" / "package.json").read_text())
    assert package["input_kind"] == "image" and package["preprocessing"] == bundle.manifest.preprocessing
    assert package["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 1, 16, 16]}]


def test_quantised_packages_on_digits(cnn, packages):
    """Dynamic int8 leaves the convolutions fp32 (and says so); static int8 puts every convolution between
    DequantizeLinear nodes (QDQ, per-channel weights) and stays within 3 accuracy points of fp32 on the digits."""
    _, _, _, tmp, _ = cnn
    fp32, dynamic, static = packages["none"], packages["int8"], packages["int8-static"]
    assert fp32["fp32"]["accuracy"] > 0.75, fp32["fp32"]  # ~0.87: a real model, not chance
    assert fp32["deployed"]["accuracy"] == fp32["fp32"]["accuracy"]
    assert any("convolutions stay fp32" in note for note in dynamic["notes"])
    graph = onnx.load(str(tmp / "int8" / "model.onnx")).graph
    assert [n.op_type for n in graph.node].count("Conv") == 2 and "MatMulInteger" in {n.op_type for n in graph.node}
    assert abs(dynamic["accuracy_loss_points"]) <= 3
    graph = onnx.load(str(tmp / "int8-static" / "model.onnx")).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and all(producers.get(i) == "DequantizeLinear" for n in convs for i in n.input[:2])
    inits = {i.name: i for i in graph.initializer}
    weight_scales = [n.input[1] for n in graph.node if n.op_type == "DequantizeLinear"
                     and producers.get(n.input[0]) is None and n.input[0] in inits and len(inits[n.input[0]].dims) == 4]
    assert weight_scales and all(len(inits[s].dims) == 1 and inits[s].dims[0] > 1 for s in weight_scales)  # per channel
    assert abs(static["accuracy_loss_points"]) <= 3, static
    assert static["calibration"].endswith("train") and static["top1_agreement"] > 0.9
    assert (tmp / "int8-static" / "report.md").read_text().count("MB") == 2


def test_predict_png_files_without_torch(cnn, packages, tmp_path):
    """``edgeft predict PACKAGE files folders`` with torch unimportable: one JSON line per image (file, label, score),
    the labels the in-process predictor gives; an image that does not decode is named on stderr, the others are
    predicted, and the exit code is 1."""
    _, _, _, tmp, _ = cnn
    files = sorted((DIGITS / "test" / "3").glob("*.png"))[:3]
    folder = DIGITS / "test" / "7"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    proc = no_torch_predict(str(tmp / "int8-static"), *map(str, files), str(folder))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = list(predict_files(Predictor(tmp / "int8-static"), [*files, folder]))
    assert len(lines) == 3 + len(list(folder.glob("*.png"))) == len(expected)
    assert [(r["file"], r["label"]) for r in lines] == [(r["file"], r["label"]) for r in expected]
    assert sum(r["label"] == "7" for r in lines[3:]) > 0.7 * len(lines[3:])
    proc = no_torch_predict("--model", str(tmp / "none"), str(files[0]), str(broken), str(files[1]))
    assert proc.returncode == 1
    assert [json.loads(line)["file"] for line in proc.stdout.splitlines()] == [str(files[0]), str(files[1])]
    assert [line for line in proc.stderr.splitlines() if "broken.png" in line] == [
        f"edgeft predict: skipped: {broken} is not a readable image (cannot identify image file '{broken}')"]


def test_merging_takes_the_exported_module_or_a_fresh_copy_and_refuses_another(cnn):
    """The module as export left it (PEFT layers inside, BatchNorm frozen) and a fresh module with the same weights
    give the same merged model; a module with other weights is refused; the caller's module is not changed."""
    module, bundle, adapter, _, base = cnn
    tensors = load_update(adapter).tensors
    before = {k: v.clone() for k, v in module.state_dict().items()}
    from_exported = merged_module(module, bundle, tensors)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    fresh = SmallCNN()
    fresh.load_state_dict(base)
    from_fresh = merged_module(fresh, bundle, tensors)
    x = torch.from_numpy(preprocess_batch(sorted((DIGITS / "test" / "5").glob("*.png"))[:4], SPEC))
    with torch.no_grad():
        torch.testing.assert_close(from_exported(x), from_fresh(x), atol=1e-5, rtol=0)
    torch.manual_seed(1)
    with pytest.raises(ConfigError, match="not the base model"):
        merged_module(SmallCNN(), bundle, tensors)
    with pytest.raises(ConfigError, match="does not fit"):
        merged_module(module, bundle, {k: v for k, v in tensors.items() if "lora_A" not in k})


def test_modes_and_commands_that_cannot_apply_are_refused(cnn, tmp_path):
    module, bundle, adapter, _, _ = cnn
    with pytest.raises(ConfigError, match="no 4-bit kernel"):
        deploy_module(module, DeployConfig(out=tmp_path / "int4", bundle=bundle.path, adapter=adapter, mode="int4"))
    with pytest.raises(ConfigError, match="deploy_module"):  # the CLI's path: no folder holds this model
        deploy(DeployConfig(out=tmp_path / "x", model_dir=tmp_path, bundle=bundle.path, adapter=adapter))
    with pytest.raises(ConfigError, match=r"\(batch,\)"):
        deploy_module(module, DeployConfig(out=tmp_path / "x", bundle=bundle.path, adapter=adapter,
                                           fixed_shape=(1, 128)))
    with pytest.raises(ConfigError, match="calibration data"):
        deploy_module(module, DeployConfig(out=tmp_path / "x", bundle=bundle.path, adapter=adapter,
                                           mode="int8-static"))
    proc = subprocess.run([sys.executable, "-m", "edgeft.cli", "deploy", "--bundle", str(bundle.path), "--adapter",
                           str(adapter), "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "edgeft.deploy.deploy_module" in proc.stderr, proc.stderr[-2000:]


def test_fixed_batch_qdq_package(cnn, tmp_path):
    """An NPU-style package: batch frozen at 4, QDQ; predict pads and slices (5 images: a batch and a padded one)."""
    module, bundle, adapter, _, _ = cnn
    report = deploy_module(module, DeployConfig(out=tmp_path / "npu", bundle=bundle.path, adapter=adapter,
                                                mode="int8-static", fixed_shape=(4,), accuracy_budget=100,
                                                eval_data=DataConfig(DIGITS / "test"), threads=1))
    model = onnx.load(str(tmp_path / "npu" / "model.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [4, 1, 16, 16]
    assert report["fixed_shape"] == [4] and "evaluation data" in report["calibration"]
    predictor = Predictor(tmp_path / "npu")
    files = sorted((DIGITS / "test" / "1").glob("*.png"))[:5]
    pixels = predictor.images(files)
    np.testing.assert_allclose(predictor.run({"pixel_values": pixels})[4],
                               predictor.run({"pixel_values": pixels[4:]})[0], atol=1e-5)


def cancer_stats() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CANCER / "train.npz") as data:
        features = data["features"]
    return features.mean(axis=0), features.std(axis=0) + 1e-6


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A fully trainable MLP on the 30 breast-cancer features, trained 60 steps on the device, deployed int8
    (its Linear layers: Gemm, rewritten as MatMul for dynamic quantisation) and int4."""
    tmp = tmp_path_factory.mktemp("mlp")
    torch.manual_seed(0)
    module = TabularMLP(*cancer_stats())
    config = ExportConfig(task="classification", labels=("malignant", "benign"), adapter=AdapterConfig(kind="full"))
    bundle = export_module(module, {"features": torch.zeros(2, 30)}, tmp / "bundle", config)
    data = load_dataset(DataConfig(CANCER / "train.npz"), bundle)
    result = train(bundle, data, TrainConfig(max_steps=60, batch_size=16, learning_rate=1e-2, threads=1,
                                             progress=False))
    adapter = tmp / "update.safetensors"
    save_update(adapter, AdapterUpdate(result.parameters, result.n_examples, {}, bundle.digest))
    reports = {mode: deploy_module(module, DeployConfig(
        out=tmp / mode, bundle=bundle.path, adapter=adapter, mode=mode, accuracy_budget=100, threads=1,
        eval_data=DataConfig(CANCER / "test.csv", feature_columns=("all",)))) for mode in ("int8", "int4")}
    return tmp, reports


def test_features_package_predicts_from_csv_and_npz_without_torch(mlp, tmp_path):
    tmp, reports = mlp
    assert reports["int8"]["fp32"]["accuracy"] > 0.9 and abs(reports["int8"]["accuracy_loss_points"]) <= 2
    graph = onnx.load(str(tmp / "int8" / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Gemm"]
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(tmp / "int4" / "model.onnx")).graph.node) == 2
    assert abs(reports["int4"]["accuracy_loss_points"]) <= 3  # the 30 -> 32 layer (K not a multiple of 32) stays fp32
    proc = no_torch_predict(str(tmp / "int8"), str(CANCER / "test.csv"), "--feature-columns", "all")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_csv = [json.loads(line) for line in proc.stdout.splitlines()]
    proc = no_torch_predict(str(tmp / "int8"), str(CANCER / "test.npz"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_npz = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(from_csv) == len(from_npz) == 114 and from_csv[0] == {**from_npz[0], "file": str(CANCER / "test.csv")}
    with open(CANCER / "test.csv") as fh:
        truth = [line.rstrip("\n").split(",")[-1] for line in fh][1:]
    assert np.mean([r["label"] == t for r, t in zip(from_csv, truth)]) > 0.9
    out = tmp_path / "predictions.csv"
    proc = no_torch_predict("--model", str(tmp / "int8"), str(CANCER / "test.npz"), "--output", str(out))
    assert proc.returncode == 0 and out.read_text().splitlines()[0] == "file,row,label,score"


def test_bad_array_inputs_are_one_clear_line(mlp, tmp_path):
    tmp, _ = mlp
    predictor = Predictor(tmp / "int8")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, features=np.zeros((3, 29), dtype=np.float32))
    with pytest.raises(DataError, match=r"wrong.npz: input 'features' has shape \[3, 29\].*axis 1 is 29, not 30"):
        list(predict_files(predictor, [wrong]))
    with pytest.raises(DataError, match="no column 'no_such_column'"):
        list(predict_files(predictor, [CANCER / "test.csv"], ["no_such_column"]))
    with pytest.raises(DataError, match="--feature-columns"):
        list(predict_files(predictor, [CANCER / "test.csv"]))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1.0,x\n")
    with pytest.raises(DataError, match="row 1, column 'b': 'x' is not a number"):
        list(predict_files(predictor, [bad], ["a", "b"]))
    proc = no_torch_predict(str(tmp / "int8"), str(wrong))
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("edgeft predict: error: ")
    assert "axis 1 is 29, not 30" in proc.stderr
