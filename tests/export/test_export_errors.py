"""Export refuses bad input with an EdgeftError that names the problem."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from edgeft import EdgeftError
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.errors import ConfigError, ExportError
from edgeft.export import export_hf, export_module


def test_unknown_target_module(tmp_path, tiny_bert_dir, tiny_config):
    config = ExportConfig(labels=tiny_config.labels, adapter=AdapterConfig(target_modules=("query", "qkv_proj")), engine="ort-training")
    with pytest.raises(ConfigError, match="unknown target module 'qkv_proj'"):
        export_hf(tiny_bert_dir, tmp_path / "b", config)


def test_model_folder_without_weights(tmp_path, tiny_bert_dir, tiny_config):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="has no weights"):
        export_hf(folder, tmp_path / "b", tiny_config)


def test_missing_model_folder(tmp_path, tiny_config):
    with pytest.raises(ExportError, match="does not exist"):
        export_hf(tmp_path / "nowhere", tmp_path / "b", tiny_config)


class NonDifferentiable(nn.Module):
    """Rounds inside the trainable path: ONNX Runtime has no gradient for Round."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.round(self.proj(x)))


def test_operator_without_gradient(tmp_path):
    config = ExportConfig(labels=("a", "b"), adapter=AdapterConfig(kind="full"), engine="ort-training")
    with pytest.raises(ExportError, match="gradient builder") as info:
        export_module(NonDifferentiable(), {"x": torch.randn(2, 4)}, tmp_path / "b", config)
    assert "Round" in str(info.value)


def test_output_folder_must_be_empty(tmp_path, tiny_bert_dir, tiny_config):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(tiny_bert_dir, out, tiny_config)
    assert (out / "keep.txt").read_text() == "precious"


def test_config_validation_names_field_and_value():
    with pytest.raises(EdgeftError, match=r"opset=17"):
        ExportConfig(labels=("a", "b"), opset=17, engine="ort-training")
    with pytest.raises(EdgeftError, match=r"adapter.rank=0"):
        AdapterConfig(rank=0)
    with pytest.raises(EdgeftError, match=r"labels"):
        ExportConfig(task="classification", labels=("a",))


class SpecialFunction(nn.Module):
    """torch.lgamma in the trainable path: torch.onnx has no ONNX translation for it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.lgamma(self.proj(x).abs() + 1.0))


def test_portable_names_the_operator_without_onnx_translation(tmp_path):
    config = ExportConfig(labels=("a", "b"), adapter=AdapterConfig(kind="full"), engine="portable")
    with pytest.raises(ExportError, match=r"^the portable engine cannot translate this model to ONNX: operator "
                                          r"prims\.lgamma\.default \(node lgamma\) has no ONNX translation") as info:
        export_module(SpecialFunction(), {"x": torch.randn(2, 4)}, tmp_path / "b", config)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)  # one line, no terminal colours
    assert not (tmp_path / "b").exists()


class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight (as GPT-2's wte and lm_head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.embed(x).mean(dim=1))


def test_portable_refuses_trainable_tied_weights_in_one_line(tmp_path):
    config = ExportConfig(labels=tuple("abcdefghijklmnop"), adapter=AdapterConfig(kind="full"), engine="portable")
    with pytest.raises(ExportError, match=r"^the portable engine cannot train tied weights: trainable parameter "
                                          r"embed\.weight is also out\.weight"):
        export_module(TiedLM(), {"x": torch.ones(2, 3, dtype=torch.long)}, tmp_path / "b", config)


class PooledCNN(nn.Module):
    """A convolution, a 2x2 average pool (not global), then the head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_ort_training_refuses_a_gradient_through_average_pool_naming_it(tmp_path):
    """onnxruntime-training 1.19.2's AveragePoolGrad kills the process (SIGFPE): export refuses it in one line when a
    gradient would flow through the pool, and exports the model when only the head after it trains."""
    example = {"x": torch.zeros(2, 1, 8, 8)}
    lora = ExportConfig(task="classification", labels=("a", "b", "c"), engine="ort-training",
                        adapter=AdapterConfig(target_modules=("conv",), trainable_modules=("fc",)))
    with pytest.raises(ExportError, match="cannot train through operator AveragePool .*global average pool"):
        export_module(PooledCNN(), example, tmp_path / "lora", lora)
    head = ExportConfig(task="classification", labels=("a", "b", "c"), engine="ort-training",
                        adapter=AdapterConfig(kind="head", trainable_modules=("fc",)))
    assert export_module(PooledCNN(), example, tmp_path / "head", head).manifest.trainable_names == ["fc.weight",
                                                                                                     "fc.bias"]
