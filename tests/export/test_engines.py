"""The two training engines side by side: the portable engine's graphs are standard ONNX that ONNX Runtime 1.19
loads; every loss, SGD with weight decay, FedProx and full fine-tuning train on it as in PyTorch; what an engine
cannot do is refused in one line at export; bad input on a device is refused before anything trains.

(Parity on Hugging Face models, FedProx and pooling on both engines: test_parity, test_fedprox, test_pooling.)"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeft.bundle import (PORTABLE_EVAL, PORTABLE_FROZEN, PORTABLE_GRADIENT, PORTABLE_OPTIMIZER, check_bundle,
                           load_bundle)
from edgeft.config import AdapterConfig, ExportConfig, OptimizerConfig
from edgeft.errors import BundleError, ConfigError, ExportError, TrainingError
from edgeft.export import export_module, from_module
from edgeft.export.reference import reference_for
from edgeft.train.engines import open_session

BUNDLES = ["tiny_bundle", "tiny_portable_bundle"]  # the tiny BERT with LoRA, one per engine
BATCH = {"input_ids": np.array([[101, 2054, 2003, 102], [101, 7592, 102, 0]], np.int64),
         "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int64), "labels": np.array([3, 7], np.int64)}


def subgraphs(graph: onnx.GraphProto):
    """``graph`` and every graph nested in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from subgraphs(sub)


def test_portable_graphs_are_standard_onnx_that_ort_119_loads(tiny_portable_bundle):
    """Only the default ONNX domain, opset 18, IR version 10 at most (ONNX Runtime 1.19 reads up to 10)."""
    for name in (PORTABLE_GRADIENT, PORTABLE_EVAL, PORTABLE_OPTIMIZER):
        model = onnx.load(str(tiny_portable_bundle.file(name)), load_external_data=False)
        assert model.ir_version <= 10, name
        assert [(o.domain, o.version) for o in model.opset_import] in ([("", 18)], [("ai.onnx", 18)]), name
        nodes = [n for g in subgraphs(model.graph) for n in g.node] + [n for f in model.functions for n in f.node]
        assert len(nodes) > 20, name
        foreign = {(n.domain, n.op_type) for n in nodes if n.domain not in ("", "ai.onnx")}
        assert not foreign, f"{name}: operators outside the default ONNX domain: {sorted(foreign)}"
    check_bundle(tiny_portable_bundle)  # onnx.checker, and external data only in files the manifest pins
    assert tiny_portable_bundle.manifest.engine == "portable" and tiny_portable_bundle.manifest.opset == 18


class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear: every parameter trains (full fine-tuning)."""

    def __init__(self, outputs: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Regressor(nn.Module):
    """A frozen body, a LoRA-adapted projection and a trained head."""

    def __init__(self, outputs: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.body(x)))


def toy_data(task: str) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    if task == "regression":
        return {"x": x, "labels": x[:, :1] * 2.0}
    if task == "multilabel":
        return {"x": x, "labels": (x[:, :3] > 0).astype(np.float32)}
    return {"x": x, "labels": np.argmax(x[:, :3], axis=1).astype(np.int64)}


def train_beside_reference(model: nn.Module, config: ExportConfig, task: str, tmp_path, learning_rate: float,
                           steps: int = 150, compared: int = 20) -> tuple[float, float]:
    """Export ``model`` for the portable engine and train it on toy data for ``steps`` steps, the first
    ``compared`` of them beside the PyTorch twin (losses within 1e-4, updates within 0.1%); returns the eval
    loss before and after."""
    twin = copy.deepcopy(model)
    example = {"x": torch.randn(4, 6)}
    bundle = export_module(model, example, tmp_path / "bundle", config)
    assert bundle.manifest.engine == "portable"
    reference = reference_for(from_module(twin, example), config, bundle)
    session = open_session(bundle, threads=1)
    batch = toy_data(task)
    first = session.eval_step(batch)[0]
    start = session.get_parameters()
    losses, expected_losses = [], []
    for _ in range(compared):
        losses.append(session.train_step(batch)[0])
        session.optimizer_step(learning_rate)
        expected_losses.append(reference.step(batch, learning_rate))
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    trained, expected = session.get_parameters(), reference.parameters()
    for name, value in start.items():
        gap = np.linalg.norm((trained[name] - value) - (expected[name] - value)) / np.linalg.norm(expected[name] - value)
        assert gap < 1e-3, f"{name}: updates differ by {gap:.3%}"
    for _ in range(steps - compared):
        session.train_step(batch)
        session.optimizer_step(learning_rate)
    return first, session.eval_step(batch)[0]


def test_full_finetuning_of_an_mlp_trains_on_both_engines(tmp_path):
    """Every layer of an MLP trains with cross-entropy on both engines. (ORT's gradient builder used to refuse it:
    torch exported F.cross_entropy as SoftmaxCrossEntropyLoss with one output and the builder asked for its second;
    edgeft's cross-entropy is now the labels' negative log-softmax.)"""
    torch.manual_seed(0)
    model = MLP()
    config = ExportConfig(labels=("a", "b", "c"), adapter=AdapterConfig(kind="full", trainable_modules=()),
                          optimizer=OptimizerConfig(name="adamw", weight_decay=0.01), engine="ort-training")
    bundle = export_module(copy.deepcopy(model), {"x": torch.randn(4, 6)}, tmp_path / "ort", config)
    session = open_session(bundle, threads=1)
    batch = toy_data("classification")
    first = session.eval_step(batch)[0]
    for _ in range(150):
        session.train_step(batch)
        session.optimizer_step(0.02)
    assert session.eval_step(batch)[0] < 0.1 * first
    portable = ExportConfig(labels=("a", "b", "c"), adapter=AdapterConfig(kind="full", trainable_modules=()),
                            engine="portable")
    first, last = train_beside_reference(model, portable, "classification", tmp_path, 0.02)
    assert last < 0.1 * first


@pytest.mark.parametrize("task,loss,optimizer,mu", [
    ("regression", "mse", OptimizerConfig(name="adamw", weight_decay=0.01), 0.0),
    # SGD's weight decay is an L2 term in the loss; FedProx adds its proximal term beside it
    ("multilabel", "bce", OptimizerConfig(name="sgd", weight_decay=0.01), 0.01),
])
def test_each_loss_trains_on_portable_as_in_pytorch(task, loss, optimizer, mu, tmp_path):
    torch.manual_seed(0)
    outputs = 1 if task == "regression" else 3
    config = ExportConfig(task=task, labels=() if task == "regression" else ("a", "b", "c"), loss=loss,
                          optimizer=optimizer, proximal_mu=mu, engine="portable",
                          adapter=AdapterConfig(kind="lora", rank=2, target_modules=("proj",),
                                                trainable_modules=("head",)))
    first, last = train_beside_reference(Regressor(outputs), config, task, tmp_path,
                                         0.2 if optimizer.name == "sgd" else 0.02)
    assert last < 0.8 * first


# -- what a device refuses before anything trains ------------------------------------------------------------


@pytest.mark.parametrize("bundle", BUNDLES)
def test_unavailable_provider_is_refused_by_name(bundle, request):
    with pytest.raises(ConfigError, match=r"execution provider 'cuda' is not available here; this runtime offers "
                                          r".*CPUExecutionProvider"):
        open_session(request.getfixturevalue(bundle), provider="cuda")


def copy_of(bundle, tmp_path):
    return shutil.copytree(bundle.path, tmp_path / "copy")


def test_altered_frozen_weight_fails_the_sha256_check(tiny_portable_bundle, tmp_path):
    folder = copy_of(tiny_portable_bundle, tmp_path)
    data = bytearray((folder / PORTABLE_FROZEN).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one frozen weight
    (folder / PORTABLE_FROZEN).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"bundle file {PORTABLE_FROZEN} is corrupt: sha256 .* does not match"):
        load_bundle(folder)


def test_altered_optimizer_constant_fails_the_sha256_check(tiny_portable_bundle, tmp_path):
    folder = copy_of(tiny_portable_bundle, tmp_path)
    model = onnx.load(str(folder / PORTABLE_OPTIMIZER))
    eps = next(t for t in model.graph.initializer if t.name == "eps")
    eps.CopyFrom(onnx.numpy_helper.from_array(np.array(1.0, np.float32), "eps"))  # a step that barely moves
    onnx.save(model, str(folder / PORTABLE_OPTIMIZER))
    with pytest.raises(BundleError, match=rf"bundle file {PORTABLE_OPTIMIZER} is corrupt: sha256"):
        load_bundle(folder)


def test_unknown_engine_in_the_manifest(tiny_portable_bundle, tmp_path):
    folder = copy_of(tiny_portable_bundle, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"] = "tensor-cores-2"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"bundle engine 'tensor-cores-2' is unknown .* knows ort-training, portable"):
        load_bundle(folder)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_batch_missing_an_input_trains_nothing(bundle, request):
    session = open_session(request.getfixturevalue(bundle), threads=1)
    start = session.get_parameters()
    with pytest.raises(TrainingError, match=r"batch lacks the model input 'attention_mask'"):
        session.train_step({k: v for k, v in BATCH.items() if k != "attention_mask"})
    with pytest.raises(TrainingError, match=r"batch lacks the model input 'labels'"):
        session.eval_step({k: v for k, v in BATCH.items() if k != "labels"})
    session.train_step(BATCH)  # the session still works, and nothing of the refused batches was accumulated
    session.optimizer_step(1e-2)
    again = open_session(request.getfixturevalue(bundle), threads=1)
    again.train_step(BATCH)
    again.optimizer_step(1e-2)
    for name, value in session.get_parameters().items():
        np.testing.assert_allclose(value, again.get_parameters()[name], rtol=1e-6, atol=1e-7, err_msg=name)
        assert start[name].shape == value.shape


def test_portable_names_the_bad_input(tiny_portable_bundle):
    session = open_session(tiny_portable_bundle, threads=1)
    with pytest.raises(TrainingError, match=r"batch input 'input_ids' is int32; the bundle expects int64"):
        session.train_step({**BATCH, "input_ids": BATCH["input_ids"].astype(np.int32)})
    with pytest.raises(TrainingError, match=r"disagree on the sequence axis: 'input_ids' has 4, 'attention_mask' has 3"):
        session.train_step({**BATCH, "attention_mask": BATCH["attention_mask"][:, :3]})
    with pytest.raises(TrainingError, match=r"disagree on the batch axis: 'input_ids' has 2, 'labels' has 1"):
        session.eval_step({**BATCH, "labels": BATCH["labels"][:1]})


# -- models --------------------------------------------------------------------------------------------------


def test_default_lora_targets_of_the_decoder_and_distilbert(tmp_path, tiny_distilbert_dir, tiny_config):
    """PEFT's defaults for classifiers: q_proj and v_proj for Llama; every attention and MLP projection for causal
    LMs; none for DistilBERT, whose export then asks for target_modules (test_parity: q_lin, v_lin)."""
    from edgeft.export import export_hf
    from edgeft.export.adapters import default_lora_targets

    assert default_lora_targets("llama") == ("q_proj", "v_proj")
    assert default_lora_targets("llama", task="causal-lm") == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj")
    assert default_lora_targets("qwen2", task="causal-lm") == default_lora_targets("llama", task="causal-lm")
    assert default_lora_targets("phi3", task="causal-lm") == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert default_lora_targets("gpt2", task="causal-lm") == ("c_attn", "c_proj", "c_fc")
    assert default_lora_targets("distilbert") is None
    with pytest.raises(ConfigError, match=r"adapter.target_modules is required: there is no default LoRA target for "
                                          r"model type 'distilbert'"):
        export_hf(tiny_distilbert_dir, tmp_path / "b", tiny_config)
