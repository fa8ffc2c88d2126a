"""``edgeft.deploy.trained_model``: the model a bundle trained, rebuilt in PyTorch, computes the bundle's eval-graph
logits (within 1e-4) for every kind of head: a sentence-pooled text head, the plain Hugging Face classifier head, a
causal LM (GPT-2; Phi-3 with fused projections), a Hugging Face image classifier, a CNN, a feature MLP and a two-input
array model given to export_module; merged and unmerged; wrong base models and adapters are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeft.config import AdapterConfig, ExportConfig
from edgeft.data import DataConfig, batches, load_dataset
from edgeft.deploy import TrainedModel, trained_model
from edgeft.deploy.merge import model_input_specs
from edgeft.errors import ConfigError
from edgeft.export import export_hf, export_module
from edgeft.images import ImagePreprocessing
from edgeft.train.engines import open_session
from edgeft.update import AdapterUpdate, load_update, save_peft_adapter, save_update

IDS = np.array([[101, 2129, 2079, 1045, 102], [101, 4067, 102, 0, 0]])
TEXT_BATCH = {"input_ids": IDS, "attention_mask": (IDS > 0).astype(np.int64)}
TOLERANCE = 1e-4


def moved(bundle, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """The bundle's initial parameters plus seeded noise: every tensor (LoRA B included) away from its start."""
    rng = np.random.default_rng(seed)
    initial = open_session(bundle, threads=1).get_parameters()
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in initial.items()}


def saved(bundle, tensors: dict[str, np.ndarray], path) -> object:  # noqa: ANN001
    """``tensors`` as ``edgeft train`` writes them: update.safetensors in an output folder."""
    save_update(path / "update.safetensors", AdapterUpdate(tensors, 10, {}, bundle.digest))
    return path


def bundle_logits(bundle, tensors: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> np.ndarray:
    """What the bundle's eval graph computes on ``batch`` with ``tensors`` (labels of the manifest's shape)."""
    sizes = {d: batch[s.name].shape[i] for s in model_input_specs(bundle) for i, d in enumerate(s.shape)
             if isinstance(d, str)}
    label = next(s for s in bundle.manifest.inputs if s.name == "labels")
    shape = [sizes[d] if isinstance(d, str) else d for d in label.shape]
    if bundle.manifest.task == "causal-lm":  # next-token labels are [batch, sequence] (the manifest says [batch, 1])
        shape = list(batch["input_ids"].shape)
    labels = np.zeros(shape, dtype=label.dtype)
    session = open_session(bundle, threads=1)
    session.set_parameters(tensors)
    return np.asarray(session.eval_step({**batch, "labels": labels})[1])


def torch_logits(model: TrainedModel, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        logits = model(**batch)
    assert isinstance(logits, torch.Tensor)
    return logits.numpy()


def assert_same_as_bundle(bundle, tensors, model_or_folder, batch, merges=(True, False)) -> np.ndarray:  # noqa: ANN001
    """The loader's logits, merged and unmerged, equal the bundle's on ``batch``; returns them."""
    expected = bundle_logits(bundle, tensors, batch)
    for merge in merges:
        model = trained_model(bundle.path, tensors, model_or_folder, merge=merge)
        assert not model.training
        np.testing.assert_allclose(torch_logits(model, batch), expected, atol=TOLERANCE, rtol=0)
    return expected


def test_sentence_pooled_head_matches_the_bundle_and_the_peft_folder_on_a_plain_head_does_not(
        tiny_sentence_bundle, tiny_sentence_dir, tmp_path):
    """A mean-pooled, normalised head: the loader (from the train output folder) computes the bundle's logits on
    a padded batch; the PEFT folder on AutoModelForSequenceClassification (a [CLS] pooler head) does not."""
    from transformers import AutoModelForSequenceClassification

    bundle = tiny_sentence_bundle
    tensors = moved(bundle)
    out = saved(bundle, tensors, tmp_path)
    expected = bundle_logits(bundle, tensors, TEXT_BATCH)
    for merge in (True, False):
        model = trained_model(bundle, out, tiny_sentence_dir, merge=merge)
        np.testing.assert_allclose(torch_logits(model, TEXT_BATCH), expected, atol=TOLERANCE, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_sentence_dir, num_labels=expected.shape[1])
    with pytest.warns(UserWarning, match="missing adapter keys"):  # PEFT finds none of the encoder's LoRA layers
        peft = peft_logits(base, tensors, bundle, tmp_path / "peft", TEXT_BATCH)
    assert np.abs(peft - expected).max() > 1e-2


def test_plain_classifier_head_with_a_trained_adapter(tiny_bundle, tiny_bert_dir, adapter, small_banking):
    """The tiny BERT's [CLS] head after 15 steps of on-device training, on real padded test rows; None gives the
    bundle's initial model."""
    data = load_dataset(DataConfig(small_banking["test"], label_column="category"), tiny_bundle)
    batch = {k: v for k, v in next(batches(data, 8, 0)).items() if k != "labels"}
    assert (batch["attention_mask"] == 0).any()  # padded rows
    tensors = load_update(adapter).tensors
    trained = assert_same_as_bundle(tiny_bundle, tensors, tiny_bert_dir, batch)
    np.testing.assert_allclose(torch_logits(trained_model(tiny_bundle, adapter, tiny_bert_dir), batch), trained,
                               atol=TOLERANCE, rtol=0)
    initial = torch_logits(trained_model(tiny_bundle, None, tiny_bert_dir), batch)
    np.testing.assert_allclose(initial, bundle_logits(tiny_bundle, moved(tiny_bundle, scale=0.0), batch),
                               atol=TOLERANCE, rtol=0)
    assert np.abs(initial - trained).max() > 1e-3  # the adapter did train


def peft_logits(base: nn.Module, tensors: dict[str, np.ndarray], bundle, folder, batch) -> np.ndarray:  # noqa: ANN001
    """The PEFT folder ``edgeft train`` writes, loaded onto ``base`` with PeftModel.from_pretrained."""
    from peft import PeftModel

    save_peft_adapter(folder, tensors, bundle.manifest)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, folder).eval()(
            **{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()


def test_causal_lm_matches_the_bundle_on_a_padded_batch(tiny_lm_bundle, tiny_gpt2_dir, tmp_path):
    """GPT-2 with LoRA on c_attn: [batch, sequence, vocabulary] logits, padding included; the PEFT folder on
    AutoModelForCausalLM computes them too."""
    from transformers import AutoModelForCausalLM

    ids = np.array([[5, 17, 42, 8, 99, 3], [7, 11, 13, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": np.array([[1] * 6, [1, 1, 1, 0, 0, 0]])}
    tensors = moved(tiny_lm_bundle)
    logits = assert_same_as_bundle(tiny_lm_bundle, tensors, tiny_gpt2_dir, batch)
    assert logits.shape[:2] == (2, 6) and logits.shape[2] > 300
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    np.testing.assert_allclose(peft_logits(base, tensors, tiny_lm_bundle, tmp_path / "peft", batch), logits,
                               atol=TOLERANCE, rtol=0)


def test_phi3_causal_lm_with_fused_projections(shakespeare, tmp_path):
    """A tiny Phi-3 (LoRA on its fused qkv_proj and gate_up_proj, o_proj, down_proj): merged and unmerged, and the
    PEFT folder on AutoModelForCausalLM, compute the bundle's logits on a padded batch."""
    from transformers import AutoModelForCausalLM

    from edgeft.export.toy import tiny_phi3

    folder = tiny_phi3(tmp_path / "phi3", shakespeare.read_text()[:50_000], vocab_size=320)
    config = ExportConfig(task="causal-lm", max_length=32, adapter=AdapterConfig(rank=4), engine="ort-training")
    bundle = export_hf(folder, tmp_path / "bundle", config)  # the portable engine's export takes 30-50 s
    ids = np.array([[5, 17, 42, 8, 99, 3], [7, 11, 13, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": np.array([[1] * 6, [1, 1, 1, 0, 0, 0]])}
    tensors = moved(bundle)
    logits = assert_same_as_bundle(bundle, tensors, folder, batch)
    base = AutoModelForCausalLM.from_pretrained(folder)
    np.testing.assert_allclose(peft_logits(base, tensors, bundle, tmp_path / "peft", batch), logits,
                               atol=TOLERANCE, rtol=0)


def test_hugging_face_image_classifier(tmp_path):
    """A tiny ResNet folder (BatchNorm layers, LoRA on its last stage's convolutions, a new 3-class head); the PEFT
    folder on AutoModelForImageClassification computes the same logits."""
    from transformers import AutoModelForImageClassification, ResNetConfig

    folder = tmp_path / "resnet"
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=1000)
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "crop_pct": 0.875, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    bundle = export_hf(folder, tmp_path / "bundle", ExportConfig(labels=("a", "b", "c"), engine="ort-training"))
    assert bundle.manifest.input_kind == "image"
    batch = {"pixel_values": np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    tensors = moved(bundle)
    logits = assert_same_as_bundle(bundle, tensors, folder, batch)
    base = AutoModelForImageClassification.from_pretrained(folder, num_labels=3, ignore_mismatched_sizes=True)
    np.testing.assert_allclose(peft_logits(base, tensors, bundle, tmp_path / "peft", batch), logits,
                               atol=TOLERANCE, rtol=0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(pixel_values), 1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class TwoInputs(nn.Module):
    """An array model: a sequence of vectors [batch, 6, 4] and per-step weights [batch, 6]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, series: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.head((torch.tanh(self.embed(series)) * weights.unsqueeze(-1)).sum(dim=1))


def pretrained_cnn() -> SmallCNN:
    """Seeded weights and BatchNorm statistics that are not the defaults."""
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 2.0)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_cnn_module_as_export_left_it_and_a_fresh_copy(tmp_path):
    """LoRA on both convolutions, the head trained in full: the module given to export_module (now adapted in
    place) and a fresh module with the same weights give the bundle's logits."""
    module = pretrained_cnn()
    fresh = pretrained_cnn()
    config = ExportConfig(labels=tuple("0123456789"), engine="ort-training", adapter=AdapterConfig(
        kind="lora", rank=4, alpha=8, target_modules=("features.0", "features.4"), trainable_modules=("fc",)))
    spec = ImagePreprocessing(size=16, resize=16, channels="L", mean=(0.5,), std=(0.5,), augment=False)
    bundle = export_module(module, {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "bundle", config,
                           preprocessing=spec)
    tensors = moved(bundle)
    pixels = {"pixel_values": np.random.default_rng(2).standard_normal((3, 1, 16, 16)).astype(np.float32)}
    assert_same_as_bundle(bundle, tensors, module, pixels)
    assert_same_as_bundle(bundle, tensors, fresh, pixels, merges=(True,))


@pytest.mark.parametrize("kind", ["features", "arrays"])
def test_feature_and_array_modules(kind, tmp_path):
    """A feature MLP (LoRA on two layers, the last trained in full) and a two-input array model (LoRA on its
    embedding, head trained in full)."""
    torch.manual_seed(0)
    if kind == "features":
        module, example = MLP(), {"features": torch.zeros(2, 12)}
        adapter = AdapterConfig(kind="lora", rank=2, target_modules=("net.0", "net.2"), trainable_modules=("net.4",))
    else:
        module, example = TwoInputs(), {"series": torch.zeros(2, 6, 4), "weights": torch.zeros(2, 6)}
        adapter = AdapterConfig(kind="lora", rank=2, target_modules=("embed",), trainable_modules=("head",))
    labels = ("a", "b", "c") if kind == "features" else ("x", "y")
    bundle = export_module(module, example, tmp_path / "bundle", ExportConfig(labels=labels, engine="ort-training",
                                                                             adapter=adapter))
    assert bundle.manifest.input_kind == kind
    rng = np.random.default_rng(3)
    batch = {name: rng.standard_normal((4, *value.shape[1:])).astype(np.float32) for name, value in example.items()}
    assert_same_as_bundle(bundle, moved(bundle), module, batch)


def test_wrong_base_models_and_adapters_are_refused(tiny_bundle, tiny_bert_dir, tiny_lm_bundle, adapter, tmp_path):
    from edgeft.demo import minilm_dir
    from edgeft.export.toy import tiny_bert

    other = tiny_bert(tmp_path / "other", minilm_dir() / "tokenizer.json", num_labels=77, seed=1)
    with pytest.raises(ConfigError, match="not the base model"):
        trained_model(tiny_bundle, adapter, other)
    with pytest.raises(ConfigError, match="exported from a Hugging Face folder"):
        trained_model(tiny_bundle, adapter, MLP())
    with pytest.raises(ConfigError, match="trained from another bundle"):
        trained_model(tiny_lm_bundle, adapter, tiny_bert_dir)
    tensors = dict(load_update(adapter).tensors)
    tensors.popitem()
    with pytest.raises(ConfigError, match="not this bundle's adapter"):
        trained_model(tiny_bundle, tensors, tiny_bert_dir)
    model = trained_model(tiny_bundle, adapter, tiny_bert_dir)
    with pytest.raises(ConfigError, match="reads the inputs input_ids, attention_mask"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_a_module_bundle_needs_its_module(tmp_path):
    torch.manual_seed(0)
    head = AdapterConfig(kind="head", trainable_modules=("net.4",))
    bundle = export_module(MLP(), {"features": torch.zeros(2, 12)}, tmp_path / "bundle",
                           ExportConfig(labels=("a", "b", "c"), engine="ort-training", adapter=head))
    with pytest.raises(ConfigError, match="export_module"):
        trained_model(bundle, None, tmp_path)
    torch.manual_seed(1)
    with pytest.raises(ConfigError, match="not the base model"):
        trained_model(bundle, None, MLP())  # other weights
