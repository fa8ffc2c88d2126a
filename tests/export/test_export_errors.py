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
    config = ExportConfig(labels=tiny_config.labels, adapter=AdapterConfig(target_modules=("query", "qkv_proj")))
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
    config = ExportConfig(labels=("a", "b"), adapter=AdapterConfig(kind="full"))
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
        ExportConfig(labels=("a", "b"), opset=17)
    with pytest.raises(EdgeftError, match=r"adapter.rank=0"):
        AdapterConfig(rank=0)
    with pytest.raises(EdgeftError, match=r"labels"):
        ExportConfig(task="classification", labels=("a",))
