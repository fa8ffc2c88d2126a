"""Hugging Face image-classification folders (tiny ResNet, ViT, MobileNetV2 and EfficientNet built from their
configs, saved with a 1000-class head and a preprocessor_config.json) export with ``edgeft export`` on both
engines, head-only and with LoRA; the bundles train on the shipped digits PNGs with torch unimportable, and the
eval graph with the trained values computes the PyTorch model's logits."""

from __future__ import annotations

import json
import math
import os
import shutil
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
from edgeft.errors import ConfigError, ExportError
from edgeft.export import from_hf_folder
from edgeft.export.adapters import apply_adapter, default_lora_targets
from edgeft.export.graph import logits_of
from edgeft.export.image_models import explicit_same_padding, global_average_pools, is_image_folder
from edgeft.images import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing
from edgeft.testing.agents import NO_TORCH
from edgeft.update import load_update

DIGITS = Path(edgeft.datasets.__file__).parent / "digits"
LABELS = tuple(str(i) for i in range(10))
SIZE = 32
slow = pytest.mark.slow

# ViT's processor squashes to size x size; ResNet's (ConvNeXt-style) resizes the shorter side to size / crop_pct
# (36) and crops the centre, bicubic, with ImageNet statistics
VIT_PREPROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
                    "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
CNN_PREPROCESSOR = {"image_processor_type": "ConvNextImageProcessor", "do_resize": True,
                    "size": {"shortest_edge": SIZE}, "crop_pct": 0.875, "resample": 3, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
                    "image_std": list(IMAGENET_STD)}


def hf_config(arch: str, **overrides: object):  # noqa: ANN201
    """A tiny configuration of ``arch`` with a 1000-class head (as ImageNet checkpoints have)."""
    import transformers

    configs = {
        "resnet": lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        "vit": lambda: transformers.ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64),
        "convnext": lambda: transformers.ConvNextConfig(image_size=SIZE, hidden_sizes=[8, 16], depths=[1, 1],
                                                        num_stages=2),
        "mobilenet_v2": lambda: transformers.MobileNetV2Config(image_size=SIZE, depth_multiplier=0.35),
        # hidden_dim: the top convolution's width, round_filters(1280) at width 0.1
        "efficientnet": lambda: transformers.EfficientNetConfig(image_size=SIZE, width_coefficient=0.1,
                                                                depth_coefficient=0.1, hidden_dim=128),
    }
    config = configs[arch]()
    config.num_labels = 1000
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_folder(path: Path, arch: str, preprocessor: dict | None = None, **overrides: object) -> Path:
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(hf_config(arch, **overrides)).save_pretrained(path)
    preprocessor = preprocessor if preprocessor is not None else (VIT_PREPROCESSOR if arch == "vit" else CNN_PREPROCESSOR)
    if preprocessor:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return path


class Folders(dict):
    """The tiny model folders by architecture, each saved when first asked for."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        self[arch] = save_folder(self.root / arch, arch)
        return self[arch]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    return Folders(tmp_path_factory.mktemp("hf-images"))


def edgeft(*args: str, device: bool = False) -> subprocess.CompletedProcess:
    """``python -m edgeft.cli ARGS``; with ``device`` torch, transformers and peft cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(NO_TORCH)} if device else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "edgeft.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def config_for(engine: str, kind: str) -> ExportConfig:
    """What ``edgeft export --labels 0,...,9 --engine ENGINE --adapter KIND`` builds."""
    return ExportConfig(labels=LABELS, engine=engine, adapter=AdapterConfig(kind=kind))


def export_train_and_compare(folder: Path, tmp_path: Path, engine: str, kind: str) -> tuple[dict, list[str]]:
    """Export with the CLI, train 5 steps on the digits with torch unimportable, and check the eval graph's logits
    against the PyTorch model holding the trained values. Returns the manifest's adapter and trainable names."""
    from edgeft.train.engines import open_session

    bundle_dir, out = tmp_path / "bundle", tmp_path / "trained"
    proc = edgeft("export", str(folder), "--out", str(bundle_dir), "--labels", ",".join(LABELS), "--engine", engine,
                  "--adapter", kind)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RGB {SIZE}x{SIZE} images" in proc.stdout, proc.stdout
    manifest = load_bundle(bundle_dir).manifest
    assert manifest.input_kind == "image" and manifest.engine == engine and manifest.tokenizer is None
    assert manifest.preprocessing == ImagePreprocessing.from_hf(folder).to_dict()
    assert [(t.name, t.shape) for t in manifest.inputs[:1]] == [("pixel_values", ["batch", 3, SIZE, SIZE])]

    proc = edgeft("train", str(bundle_dir), "--data", str(DIGITS / "train"), "--max-steps", "5", "--batch-size", "16",
                  "--val-fraction", "0", "--threads", "1", "--no-progress", "--out", str(out), device=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history and all(math.isfinite(epoch["train_loss"]) for epoch in history), history
    trained = load_update(out / "update.safetensors").tensors
    assert sorted(trained) == sorted(manifest.trainable_names)

    bundle = load_bundle(bundle_dir)
    session = open_session(bundle, threads=1)
    initial = session.get_parameters()
    assert any(not np.array_equal(initial[n], trained[n]) for n in trained), "5 steps changed nothing"
    session.set_parameters(trained)
    batch = next(batches(load_dataset(DataConfig(DIGITS / "test"), bundle), 16, 0))
    _, graph_logits = session.eval_step(batch)

    config = config_for(engine, kind)
    adapted = apply_adapter(from_hf_folder(folder, config), config.adapter, config.task)
    params = dict(adapted.model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(torch.from_numpy(value))
        torch_logits = logits_of(adapted.model(pixel_values=torch.from_numpy(batch["pixel_values"]))).numpy()
    assert graph_logits.shape == (16, len(LABELS))
    np.testing.assert_allclose(graph_logits, torch_logits, atol=1e-4, rtol=0)
    return manifest.adapter, manifest.trainable_names


ENGINES = ("portable", "ort-training")
# a few CLI runs in the quick tier (each is two processes that load torch or onnxruntime); the rest
# of each engine x adapter matrix is slow
MATRIX = ("engine,kind", [("portable", "lora"), ("ort-training", "lora"), ("portable", "head"), ("ort-training", "head")])


def quick(*cases: tuple[str, str]) -> list:
    return [pytest.param(*case, marks=() if case in cases else slow) for case in MATRIX[1]]


@pytest.mark.parametrize(MATRIX[0], quick(("portable", "lora"), ("ort-training", "head")))
def test_resnet_folder_exports_trains_and_matches_pytorch(folders, tmp_path, engine, kind):
    """LoRA on the last stage's convolutions (the default) and the classifier; BatchNorm frozen."""
    adapter, trainable = export_train_and_compare(folders["resnet"], tmp_path, engine, kind)
    assert adapter["trainable_modules"] == ["classifier"]
    assert all(n.startswith(("classifier.", "base_model.model.classifier.")) or "lora_" in n for n in trainable)
    if kind == "lora":
        assert adapter["target_modules"] == [f"resnet.encoder.stages.1.layers.0.{m}.convolution"
                                             for m in ("shortcut", "layer.0", "layer.1", "layer.2")]
        assert sum("lora_A" in n for n in trainable) == 4
    else:
        assert trainable == ["classifier.1.weight", "classifier.1.bias"]


@pytest.mark.parametrize(MATRIX[0], quick(("ort-training", "lora")))
def test_vit_folder_exports_trains_and_matches_pytorch(folders, tmp_path, engine, kind):
    """Eager attention on both engines; LoRA on query and value by default."""
    adapter, trainable = export_train_and_compare(folders["vit"], tmp_path, engine, kind)
    if kind == "lora":
        assert adapter["target_modules"] == ["query", "value"]
        assert sum("lora_A" in n for n in trainable) == 4  # 2 layers x (query, value)
    else:
        assert trainable == ["classifier.weight", "classifier.bias"]


@slow
@pytest.mark.parametrize(*MATRIX)
def test_mobilenet_v2_folder_exports_trains_and_matches_pytorch(folders, tmp_path, engine, kind):
    """TensorFlow-style padding reads the (LoRA-wrapped) convolutions' geometry; depthwise ones are not targets."""
    adapter, _ = export_train_and_compare(folders["mobilenet_v2"], tmp_path, engine, kind)
    if kind == "lora":
        assert adapter["target_modules"] == ["mobilenet_v2.layer.15.expand_1x1.convolution",
                                             "mobilenet_v2.layer.15.reduce_1x1.convolution"]


@slow
@pytest.mark.parametrize(*MATRIX)
def test_convnext_folder_exports_trains_and_matches_pytorch(folders, tmp_path, engine, kind):
    """LayerNorm, depthwise convolutions; LoRA on the last stage's downsampling convolution and pointwise linears."""
    adapter, _ = export_train_and_compare(folders["convnext"], tmp_path, engine, kind)
    if kind == "lora":
        assert adapter["target_modules"] == ["convnext.encoder.stages.1.downsampling_layer.1",
                                             "convnext.encoder.stages.1.layers.0.pwconv1",
                                             "convnext.encoder.stages.1.layers.0.pwconv2"]


@slow
@pytest.mark.parametrize(*MATRIX)
def test_efficientnet_folder_exports_trains_and_matches_pytorch(folders, tmp_path, engine, kind):
    """Its AvgPool2d pooler runs as a global average pool (AveragePool's gradient: no ONNX translation for the
    portable engine, a floating-point exception in onnxruntime-training 1.19.2) and its "same"-padded depthwise
    convolutions with numeric pads (ORT training's ConvGrad with auto_pad never returned)."""
    export_train_and_compare(folders["efficientnet"], tmp_path, engine, kind)


class Pools(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


def test_average_pools_over_the_whole_input_become_global_pools(folders):
    """The same numbers: a window over the whole input (ceil_mode lets it be larger) is the global mean."""
    model = Pools(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.AvgPool2d(8, ceil_mode=True))
    pixels = torch.randn(2, 3, 10, 10)  # 5x5 after the first pool
    expected = model(pixels)
    assert global_average_pools(model, {"pixel_values": pixels}) == 1
    assert type(model.layers[1]) is nn.AvgPool2d and isinstance(model.layers[2], nn.AdaptiveAvgPool2d)
    torch.testing.assert_close(model(pixels), expected, rtol=0, atol=1e-6)
    assert global_average_pools(Pools(nn.AvgPool2d(2)), {"pixel_values": torch.randn(1, 3, 4, 4)}) == 0
    source = from_hf_folder(folders["efficientnet"], config_for("portable", "lora"))
    assert isinstance(source.model.efficientnet.pooler, nn.AdaptiveAvgPool2d)


def test_same_padding_becomes_numbers_where_symmetric():
    """ONNX's auto_pad=SAME_UPPER in a convolution's gradient never returns in onnxruntime-training 1.19.2."""
    model = Pools(nn.Conv2d(3, 6, 3, padding="same", groups=3), nn.Conv2d(6, 6, 5, padding="same", dilation=2),
                  nn.Conv2d(6, 6, 2, padding="same"))
    pixels = torch.randn(2, 3, 9, 9)
    expected = model(pixels)
    assert explicit_same_padding(model) == 2
    assert [conv.padding for conv in model.layers] == [(1, 1), (4, 4), "same"]  # a 2-wide kernel pads one side
    torch.testing.assert_close(model(pixels), expected, rtol=0, atol=0)


def test_image_folders_are_told_from_text_folders(folders, tiny_bert_dir, tmp_path):
    assert all(is_image_folder(folder) for folder in folders.values())
    assert not is_image_folder(tiny_bert_dir)
    bare = tmp_path / "bare"  # no architectures in config.json: an image preprocessor and no tokenizer decide
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (bare / "preprocessor_config.json").write_text(json.dumps(VIT_PREPROCESSOR))
    assert is_image_folder(bare)


def test_default_lora_targets_of_image_models(folders):
    source = from_hf_folder(folders["mobilenet_v2"], config_for("portable", "lora"))
    assert default_lora_targets("vit") == ("query", "value")
    assert default_lora_targets("resnet") is None  # CNN targets are found in the model
    assert default_lora_targets("mobilenet_v2", source.model) == ("mobilenet_v2.layer.15.expand_1x1.convolution",
                                                                  "mobilenet_v2.layer.15.reduce_1x1.convolution")


def test_the_source_reads_pixels_as_the_preprocessor_says(folders):
    source = from_hf_folder(folders["resnet"], config_for("portable", "head"))
    assert source.input_kind == "image" and source.tokenizer_file is None and source.input_names == ["pixel_values"]
    assert source.preprocessing == {**ImagePreprocessing().to_dict(), "size": SIZE, "resize": 36,
                                    "interpolation": "bicubic"}
    assert source.model.config.num_labels == 10 and source.model.config.id2label[3] == "3"  # the 1000 are gone
    assert source.dynamic_axes == {"pixel_values": {0: "batch"}}


def test_a_grey_model_reads_one_channel(tmp_path):
    folder = save_folder(tmp_path / "grey", "resnet", {**CNN_PREPROCESSOR, "image_mean": [0.5], "image_std": [0.5]},
                         num_channels=1)
    source = from_hf_folder(folder, config_for("portable", "head"))
    assert source.preprocessing["channels"] == "L" and source.example_inputs["pixel_values"].shape[1] == 1


def test_a_folder_without_preprocessor_config_is_one_clear_error(folders, tmp_path):
    folder = tmp_path / "resnet"
    shutil.copytree(folders["resnet"], folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ExportError, match=r"no preprocessor_config.json.*AutoImageProcessor.*shortest_edge"):
        from_hf_folder(folder, config_for("portable", "head"))


def test_image_folder_errors_name_the_problem(folders, tmp_path):
    with pytest.raises(ExportError, match="image-classification model: task 'causal-lm' does not apply"):
        from_hf_folder(folders["vit"], ExportConfig(task="causal-lm"))
    big = save_folder(tmp_path / "vit48", "vit", {**VIT_PREPROCESSOR, "size": {"height": 48, "width": 48}})
    with pytest.raises(ExportError, match=r"cannot read \[batch, 3, 48, 48\] pixel values.*doesn't match model"):
        from_hf_folder(big, config_for("portable", "head"))
    oblong = save_folder(tmp_path / "oblong", "resnet", {**VIT_PREPROCESSOR, "size": {"height": 32, "width": 48}})
    with pytest.raises(ExportError, match="height == width"):
        from_hf_folder(oblong, config_for("portable", "head"))
    source = from_hf_folder(folders["resnet"], config_for("portable", "lora"))
    with pytest.raises(ConfigError, match=r"Conv2d modules: .*resnet\.encoder\.stages\.1\.layers\.0\.layer\.2\.convolution"):
        apply_adapter(source, AdapterConfig(target_modules=("no_such_conv",)), "classification")
