"""Export: every trainable parameter survives under its own name; the manifest describes the bundle;
the eval graph computes what the model computes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeft.bundle import sha256_of
from edgeft.config import AdapterConfig, ExportConfig, OptimizerConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.export import export_module, export_source, from_hf_folder
from edgeft.bundle import CHECKPOINT
from edgeft.train.session import TrainingSession


def checkpoint_parameters(bundle) -> dict:
    from edgeft.train.session import training_api

    state = training_api().CheckpointState.load_checkpoint(str(bundle.file(CHECKPOINT)))
    return {name: state.parameters[name] for name in bundle.manifest.trainable_names}


def test_every_lora_parameter_in_checkpoint_under_its_own_name(tiny_bundle, tiny_bert_dir, tiny_config):
    names = tiny_bundle.manifest.trainable_names
    # 2 layers x (query, value) x (A, B) + classifier weight and bias
    assert len(names) == 10 and len(set(names)) == 10
    assert sum("lora_B" in n for n in names) == 4
    params = checkpoint_parameters(tiny_bundle)
    for name, param in params.items():
        assert param.requires_grad, name
    values = TrainingSession(tiny_bundle).get_parameters()
    for name in names:
        if "lora_B" in name:
            assert np.all(values[name] == 0), f"{name} should start at zero"
    lora_a = [values[n] for n in names if "lora_A" in n]
    assert all(a.std() > 0 for a in lora_a)
    # the exported graph feeds every parameter to its own consumers: zero B's were not merged
    graph = onnx.load(str(tiny_bundle.file("eval_model.onnx")))
    used = {i for node in graph.graph.node for i in node.input}
    assert set(names) <= used


def test_full_finetuning_keeps_identical_initializers_apart(tmp_path, tiny_bert_dir, tiny_config):
    """A fresh model's LayerNorm weights are all ones: full fine-tuning must still see each of them."""
    config = ExportConfig(labels=tiny_config.labels, adapter=AdapterConfig(kind="full"), max_length=32, engine="ort-training")
    bundle = export_source(from_hf_folder(tiny_bert_dir, config), tmp_path / "b", config)
    source = from_hf_folder(tiny_bert_dir, config)
    expected = {n for n, _ in source.model.named_parameters()}
    assert set(bundle.manifest.trainable_names) == expected
    layer_norms = [n for n in expected if "LayerNorm.weight" in n]
    assert len(layer_norms) >= 5
    values = TrainingSession(bundle).get_parameters()
    state = source.model.state_dict()
    for name in expected:
        np.testing.assert_array_equal(values[name], state[name].numpy(), err_msg=name)


def test_head_only_trains_the_classifier(tmp_path, tiny_bert_dir, tiny_config):
    config = ExportConfig(labels=tiny_config.labels, adapter=AdapterConfig(kind="head"), max_length=32, engine="ort-training")
    bundle = export_source(from_hf_folder(tiny_bert_dir, config), tmp_path / "b", config)
    assert bundle.manifest.trainable_names == ["classifier.weight", "classifier.bias"]
    assert bundle.manifest.peft_config is None


def test_manifest_describes_the_bundle(tiny_bundle):
    m = tiny_bundle.manifest
    data = json.loads(tiny_bundle.file("manifest.json").read_text())
    for key in ("format_version", "edgeft_version", "base_model", "task", "labels", "inputs", "outputs",
                "trainable", "adapter", "loss", "optimizer", "opset", "files", "tokenizer"):
        assert key in data, key
    assert m.task == "classification" and m.loss == "cross-entropy" and m.opset == 14
    assert len(m.labels) == 77 and m.base_model["digest"] and m.base_model["model_type"] == "bert"
    assert [i.name for i in m.inputs] == ["input_ids", "attention_mask", "labels"]
    assert m.inputs[0].dtype == "int64" and m.inputs[0].shape == ["batch", "sequence"]
    assert m.adapter["kind"] == "lora" and m.adapter["target_modules"] == ["query", "value"]
    assert m.adapter["trainable_modules"] == ["classifier"] and m.adapter["rank"] == 8
    assert m.optimizer["name"] == "adamw" and m.optimizer["weight_decay"] == 0.01
    assert set(m.files) == {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
                            "tokenizer.json"}
    for name, digest in m.files.items():
        assert sha256_of(tiny_bundle.file(name)) == digest
    for spec in m.trainable:
        assert spec.dtype == "float32" and spec.peft_key and ".default." not in spec.peft_key


def test_eval_logits_equal_forward_graph_and_torch(tiny_bundle, tiny_bert_dir, tiny_config, small_banking):
    import onnxruntime as ort

    from edgeft.export.reference import reference_for

    data = load_dataset(DataConfig(small_banking["test"], label_column="category"), tiny_bundle)
    batch = next(batches(data, 16, 0))
    _, eval_logits = TrainingSession(tiny_bundle).eval_step(batch)
    forward = ort.InferenceSession(str(tiny_bundle.path / "forward_model.onnx"), providers=["CPUExecutionProvider"])
    _, forward_logits = forward.run(None, batch)
    np.testing.assert_allclose(eval_logits, forward_logits, atol=1e-5, rtol=0)
    reference = reference_for(from_hf_folder(tiny_bert_dir, tiny_config), tiny_config, tiny_bundle)
    np.testing.assert_allclose(eval_logits, reference.logits(batch), atol=1e-5, rtol=0)


class TinyRegressor(nn.Module):
    def __init__(self, outputs: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, outputs)

    def forward(self, x):
        return self.head(self.proj(self.body(x)))


@pytest.mark.parametrize("task,loss,optimizer", [
    ("regression", "mse", "adamw"),
    ("multilabel", "bce", "sgd"),
    ("classification", "cross-entropy", "sgd"),
])
def test_torch_module_source_trains_with_each_loss(tmp_path, task, loss, optimizer):
    torch.manual_seed(0)
    outputs = 1 if task == "regression" else 3
    labels = () if task == "regression" else ("a", "b", "c")
    model = TinyRegressor(outputs)
    config = ExportConfig(task=task, labels=labels, loss=loss, optimizer=OptimizerConfig(name=optimizer),
                          adapter=AdapterConfig(kind="lora", rank=2, target_modules=("proj",),
                                                trainable_modules=("head",)), engine="ort-training")
    bundle = export_module(model, {"x": torch.randn(4, 6)}, tmp_path / "b", config)
    assert bundle.manifest.loss == loss and bundle.manifest.tokenizer is None
    assert len(bundle.manifest.trainable_names) == 4  # proj lora_A, lora_B; head weight, bias
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    if task == "regression":
        y = x[:, :1] * 2.0
    elif task == "multilabel":
        y = (x[:, :3] > 0).astype(np.float32)
    else:
        y = np.argmax(x[:, :3], axis=1).astype(np.int64)
    session = TrainingSession(bundle)
    first = session.eval_step({"x": x, "labels": y})[0]
    for _ in range(150):
        session.train_step({"x": x, "labels": y})
        session.optimizer_step(0.2 if optimizer == "sgd" else 0.02)
    assert session.eval_step({"x": x, "labels": y})[0] < 0.8 * first


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_hf_folder_for_regression_and_multilabel(tmp_path, tiny_bert_dir, task):
    from edgeft.config import TrainConfig
    from edgeft.export import export_hf
    from edgeft.train.trainer import train

    labels = () if task == "regression" else ("card", "cash", "fee")
    bundle = export_hf(tiny_bert_dir, tmp_path / "b", ExportConfig(task=task, labels=labels, max_length=32, engine="ort-training"))
    assert bundle.manifest.loss == ("mse" if task == "regression" else "bce")
    rows = [("my card is lost", "0.5", "card"), ("withdraw cash abroad", "1.5", "cash;fee"),
            ("why was I charged a fee", "2.0", "fee"), ("card and cash both gone", "0.1", '["card", "cash"]')]
    path = tmp_path / "d.csv"
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([(t, v if task == "regression" else l) for t, v, l in rows])
    data = load_dataset(DataConfig(path), bundle)
    if task == "multilabel":
        assert data.targets.tolist()[1] == [0.0, 1.0, 1.0] and data.targets.tolist()[3] == [1.0, 1.0, 0.0]
    result = train(bundle, data, TrainConfig(max_steps=3, batch_size=2, progress=False), data)
    assert ("val_mse" if task == "regression" else "val_macro_f1") in result.history[0]
