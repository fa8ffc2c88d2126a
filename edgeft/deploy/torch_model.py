"""The model a bundle trained, rebuilt in PyTorch: ``trained_model(bundle, adapter, model)`` computes what the
bundle's eval graph computes with that adapter, for every kind of bundle (text heads on the [CLS] pooler or on the
model's own sentence pooling, image classifiers, feature and array models, causal language models), whether it was
exported from a Hugging Face folder or from a torch module with ``export_module``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from edgeft.bundle import Bundle, load_bundle
from edgeft.deploy.merge import adapted_model, adapted_module, model_input_specs
from edgeft.deploy.merge import merge as merge_adapter
from edgeft.errors import ConfigError
from edgeft.export.graph import logits_of
from edgeft.update import UPDATE_FILE, AdapterUpdate, load_update

__all__ = ["TrainedModel", "adapter_tensors", "trained_model"]

AdapterLike = Union[str, Path, AdapterUpdate, Mapping, None]


class TrainedModel(nn.Module):
    """A bundle's model with its trained adapter, in torch. ``forward(**inputs)`` takes the bundle's inputs by their
    manifest names (labels excluded; tensors or numpy arrays, shaped as the manifest says) and returns the logits as
    one tensor, as the bundle's eval graph returns them: [batch, outputs] for classification, regression and
    multilabel heads (before any softmax or sigmoid), [batch, sequence, vocabulary] for causal LMs.

    ``model`` is the underlying torch model (a transformers model for Hugging Face folders, except for
    sentence-pooled heads, which are an ``edgeft.export.source.SentenceClassifier``; a copy of the exported module
    otherwise; PEFT-wrapped when built with ``merge=False``)."""

    def __init__(self, model: nn.Module, input_names: list[str],
                 prepare_inputs: Callable[[dict[str, torch.Tensor]], dict] | None = None):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.prepare_inputs = prepare_inputs  # a causal LM's additive mask, built as the bundle's graph builds it

    def forward(self, **inputs: object) -> torch.Tensor:
        if set(inputs) != set(self.input_names):
            raise ConfigError(f"this model reads the inputs {', '.join(self.input_names)} (the bundle's, labels "
                              f"excluded); got {', '.join(sorted(inputs)) or 'none'}")
        feed = {name: torch.as_tensor(value) for name, value in inputs.items()}
        if self.prepare_inputs is not None:
            feed = self.prepare_inputs(feed)
        return logits_of(self.model(**feed))


def adapter_tensors(bundle: Bundle, adapter: AdapterLike) -> dict[str, np.ndarray]:
    """The trained tensors by manifest name from ``adapter``: an ``edgeft train`` output folder or its
    update.safetensors (checked to come from ``bundle``), an AdapterUpdate, a mapping of tensors by manifest name, or
    None for the bundle's initial parameters (read with the bundle's training engine, so that needs onnxruntime)."""
    if adapter is None:
        from edgeft.train.engines import open_session

        return open_session(bundle, threads=1).get_parameters()
    if isinstance(adapter, (str, Path)):
        path = Path(adapter)
        path = path / UPDATE_FILE if path.is_dir() else path
        adapter = load_update(path)
        where = str(path)
    else:
        where = "the adapter"
    if isinstance(adapter, AdapterUpdate):
        if adapter.bundle_digest and adapter.bundle_digest != bundle.digest:
            raise ConfigError(f"{where} was trained from another bundle ({adapter.bundle_digest[:12]}...), not "
                              f"{bundle.digest[:12]}...")
        adapter = adapter.tensors
    if not isinstance(adapter, Mapping):
        raise ConfigError(f"adapter: expected an update.safetensors path, an edgeft train folder, an AdapterUpdate, "
                          f"a mapping of tensors or None, got {type(adapter).__name__}")
    tensors = {name: (value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
               for name, value in adapter.items()}
    specs = {spec.name: spec for spec in bundle.manifest.trainable}
    expected = {name: tuple(spec.shape) for name, spec in specs.items()}
    if set(tensors) != set(expected):
        unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ConfigError(f"{where} is not this bundle's adapter (it does not fit the base model): "
                          f"{len(unknown)} unknown tensors "
                          f"({', '.join(unknown[:3])}{'...' if len(unknown) > 3 else ''}) and {len(missing)} missing "
                          f"({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
    for name, value in tensors.items():
        if tuple(value.shape) != expected[name]:
            raise ConfigError(f"{where}: tensor {name} has shape {tuple(value.shape)}, the bundle's is "
                              f"{expected[name]}")
    return {name: value.astype(np.dtype(specs[name].dtype), copy=False) for name, value in tensors.items()}


def trained_model(bundle: str | Path | Bundle, adapter: AdapterLike, model: str | Path | nn.Module, *,
                  merge: bool = True) -> TrainedModel:
    """The model ``bundle`` trained, in PyTorch, in eval mode: ``forward(**inputs)`` returns the logits the bundle's
    eval graph computes with ``adapter`` (within float rounding; see ``TrainedModel``).

    ``bundle``: the bundle folder or a loaded Bundle. ``adapter``: what ``edgeft train --out`` wrote (the folder or
    its update.safetensors), an AdapterUpdate, the tensors by manifest name, or None for the bundle's initial
    parameters (``adapter_tensors``). ``model``: the base model the bundle was exported from: its Hugging Face folder
    (``edgeft export`` / ``export_hf``), or the torch module given to ``export_module`` (as export left it, or one with
    the same weights; it is not changed). With ``merge`` LoRA is merged into the weights (``W + scale * B @ A``,
    checked against the unmerged model) and BatchNorm layers are ordinary again; without it the model keeps its PEFT
    LoRA layers (and frozen BatchNorm layers), as trained. ConfigError when ``model`` is not the bundle's base model or
    the adapter is not the bundle's."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    tensors = adapter_tensors(bundle, adapter)
    base = bundle.manifest.base_model
    if isinstance(model, nn.Module):
        adapted, sample = adapted_module(model, bundle, tensors)
        prepare = None
    elif not base.get("model_type"):
        raise ConfigError(f"this bundle ({bundle.manifest.input_kind} inputs, base {base.get('id')!r}) was exported "
                          f"from a torch module with export_module, not a Hugging Face folder: pass that module "
                          f"(or one with the same weights), not {model!r}")
    else:
        adapted, source = adapted_model(model, bundle, tensors)
        sample, prepare = source.example_inputs, source.prepare_inputs
    if merge:
        module = merge_adapter(adapted, prepare(sample) if prepare else sample)
    else:
        module = adapted.model.eval()
    return TrainedModel(module, [spec.name for spec in model_input_specs(bundle)], prepare).eval()
