"""Merge a trained adapter into its base model: W + scale * B @ A (for LoRA on Linear and Conv2d layers alike, with
PEFT's merge), no adapter operators left, checked against the unmerged model.

The base model comes from a Hugging Face folder (``merged_model``) or, for bundles exported from a torch module with
``edgeft.export.export_module``, from that module (``merged_module``); ``adapted_model`` / ``adapted_module`` give
it with the adapter loaded but not merged (``edgeft.deploy.trained_model`` offers both to users).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeft.bundle import TOKENIZER, Bundle, TensorSpec
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.errors import ConfigError
from edgeft.export.adapters import AdaptedModel, FrozenBatchNorm, apply_adapter
from edgeft.export.graph import logits_of
from edgeft.export.source import ModelSource, from_hf_folder, from_module

MERGE_TOLERANCE = 1e-5  # merged vs unmerged logits, relative to the logits' magnitude (at least 1)
BUNDLE_TOLERANCE = 1e-4  # the rebuilt module vs the bundle's own eval graph, likewise
SAMPLE_BATCH = 2


def export_config_of(bundle: Bundle) -> ExportConfig:
    """The ExportConfig a bundle was made with (from its manifest)."""
    m = bundle.manifest
    adapter = {k: v for k, v in m.adapter.items() if k in AdapterConfig.__dataclass_fields__}
    return ExportConfig(task=m.task, labels=tuple(m.labels), loss=m.loss, opset=m.opset, engine=m.engine,
                        max_length=m.tokenizer["max_length"] if m.tokenizer else 128,
                        adapter=AdapterConfig(**adapter), pooling="sentence" if m.pooling else "cls")


def model_input_specs(bundle: Bundle) -> list[TensorSpec]:
    """The model's inputs as the manifest records them (labels excluded)."""
    return [spec for spec in bundle.manifest.inputs if spec.name != "labels"]


def sample_inputs(specs: list[TensorSpec], batch: int = SAMPLE_BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the recorded shapes (named axes: ``batch`` rows, 8 elsewhere) to check a model with: standard
    normal floats, integer inputs all ones (a valid token id and an all-ones attention mask)."""
    rng = np.random.default_rng(seed)
    sample = {}
    for spec in specs:
        shape = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 8) for i, d in enumerate(spec.shape)]
        dtype = np.dtype(spec.dtype)
        value = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype=dtype)
        sample[spec.name] = torch.from_numpy(value)
    return sample


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return logits_of(model(**inputs)).detach().float().numpy()


def _max_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, the tolerance scale: max |b|, at least 1)."""
    return float(np.abs(a - b).max()), max(1.0, float(np.abs(b).max()))


def load_tensors(adapted: AdaptedModel, tensors: dict[str, np.ndarray]) -> None:
    """Copy the trained adapter ``tensors`` (by manifest name) into the adapted model's parameters."""
    params = dict(adapted.model.named_parameters())
    expected = set(adapted.trainable)
    if set(tensors) != expected:
        raise ConfigError(f"the adapter does not fit the base model: {len(set(tensors) - expected)} unknown and "
                          f"{len(expected - set(tensors))} missing tensors")
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(params[name].shape) != tuple(value.shape):
                raise ConfigError(f"adapter tensor {name} has shape {value.shape}, the model needs "
                                  f"{tuple(params[name].shape)}")
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def merge(adapted: AdaptedModel, sample: dict[str, torch.Tensor]) -> nn.Module:
    """The adapted model with its LoRA weights merged in (PEFT's merge_and_unload: Linear, Conv1D and Conv2d) and
    its frozen BatchNorm layers turned back into BatchNorm (so the inference export folds them into the
    convolutions before them), in eval mode; ConfigError when it computes other logits than before on ``sample``."""
    adapted.model.eval()
    before = _logits(adapted.model, sample)
    model = adapted.model.merge_and_unload(safe_merge=True) if adapted.peft_config is not None else adapted.model
    unfreeze_batch_norm(model)
    model.eval()
    difference, scale = _max_difference(_logits(model, sample), before)
    if not difference <= MERGE_TOLERANCE * scale:
        raise ConfigError(f"merging the adapter changed the model's logits by {difference:.3g} (more than "
                          f"{MERGE_TOLERANCE:g} x {scale:.3g}); the package would not compute what was trained")
    return model


class InferenceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm on stored statistics for inputs of any rank (a FrozenBatchNorm does not record its rank): exported
    as BatchNormalization, which torch's ONNX export folds into the convolution before it."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002  (torch's signature)
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")


def unfreeze_batch_norm(model: nn.Module) -> int:
    """Replace every ``FrozenBatchNorm`` (what export puts in place of BatchNorm layers) by an eval-mode
    ``InferenceBatchNorm`` computing the same; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm):
                affine = child.weight is not None
                layer = InferenceBatchNorm(child.running_mean.numel(), eps=child.eps, affine=affine)
                with torch.no_grad():
                    layer.running_mean.copy_(child.running_mean)
                    layer.running_var.copy_(child.running_var)
                    if affine:
                        layer.weight.copy_(child.weight)
                        layer.bias.copy_(child.bias)
                setattr(parent, name, layer.eval())
                count += 1
    return count


def adapted_model(model_dir: str | Path, bundle: Bundle, tensors: dict[str, np.ndarray]
                  ) -> tuple[AdaptedModel, ModelSource]:
    """The base model of a bundle exported from a Hugging Face folder, adapted as the export adapted it and holding
    ``tensors`` (trained adapter, by manifest name), unmerged; with its source (inputs, input preparation)."""
    from transformers.utils import logging as hf_logging

    config = export_config_of(bundle)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized": the adapter brings the trained head
    try:
        source = from_hf_folder(model_dir, config)
    finally:
        hf_logging.set_verbosity(previous)
    if source.base_digest != bundle.manifest.base_model["digest"]:
        raise ConfigError(f"{model_dir} is not the base model this bundle was exported from (weights digest "
                          f"{source.base_digest[:12]}... vs {bundle.manifest.base_model['digest'][:12]}...)")
    adapted = apply_adapter(source, config.adapter, config.task)
    load_tensors(adapted, tensors)
    return adapted, source


def merged_model(model_dir: str | Path, bundle: Bundle, tensors: dict[str, np.ndarray]) -> nn.Module:
    """The base model with ``tensors`` (trained adapter, by manifest name) merged in, in eval mode."""
    adapted, source = adapted_model(model_dir, bundle, tensors)
    return merge(adapted, source.example_inputs)


def base_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` as it was before export: ``export_module`` adapts the module it is given in place
    (PEFT wraps the LoRA targets and the trained heads; BatchNorm layers become FrozenBatchNorm), so the layers
    PEFT wrapped are put back. The caller's module is not changed."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(module, nn.Module):
        raise ConfigError(f"expected the torch.nn.Module the bundle was exported from, got {type(module).__name__}")
    model = copy.deepcopy(module)
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, name, child.get_base_layer())
            elif isinstance(child, ModulesToSaveWrapper):
                setattr(parent, name, child.original_module)
    if "peft_config" in vars(model):  # PEFT's note on the module it adapted: a second adaptation would warn
        del model.peft_config
    return model.eval()


def _bundle_logits(bundle: Bundle, tensors: dict[str, np.ndarray], sample: dict[str, torch.Tensor]) -> np.ndarray:
    """What the bundle's own eval graph computes on ``sample`` with the trained adapter."""
    from edgeft.train.engines import open_session

    label = next(spec for spec in bundle.manifest.inputs if spec.name == "labels")
    shape = [SAMPLE_BATCH if isinstance(d, str) else d for d in label.shape]
    session = open_session(bundle, threads=1)
    session.set_parameters(tensors)
    batch = {name: value.numpy() for name, value in sample.items()}
    _, logits = session.eval_step({**batch, "labels": np.zeros(shape, dtype=label.dtype)})
    return np.asarray(logits)


def adapted_module(module: nn.Module, bundle: Bundle, tensors: dict[str, np.ndarray]
                   ) -> tuple[AdaptedModel, dict[str, torch.Tensor]]:
    """A copy of the torch module a bundle was exported from (``export_module``), adapted as the export adapted it
    and holding ``tensors``, unmerged; with sample inputs of the bundle's shapes.

    A module whose weights digest is the bundle's base digest is taken as it is. A module that went through
    ``export_module`` (which adapts it in place, so its digest no longer matches) is accepted when, with the
    adapter, it computes what the bundle's eval graph computes; any other module is refused."""
    manifest = bundle.manifest
    if manifest.base_model.get("model_type"):
        raise ConfigError(f"this bundle was exported from a Hugging Face folder ({manifest.base_model['id']}): "
                          "rebuild it from that folder (edgeft deploy --model, or the folder's path), not a module")
    config = export_config_of(bundle)
    model = base_module(module)
    specs = model_input_specs(bundle)
    sample = sample_inputs(specs)
    source = from_module(model, sample, base_id=manifest.base_model["id"], input_kind=manifest.input_kind,
                         preprocessing=manifest.preprocessing,
                         tokenizer_file=bundle.file(TOKENIZER) if manifest.input_kind == "tokens" else None,
                         dynamic_axes={s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
                                       for s in specs})
    digest_matches = source.base_digest == manifest.base_model["digest"]
    adapted_by_export = any(isinstance(m, FrozenBatchNorm) for m in model.modules())
    if not digest_matches and not adapted_by_export:
        raise ConfigError(f"this module is not the base model the bundle was exported from (weights digest "
                          f"{source.base_digest[:12]}... vs {manifest.base_model['digest'][:12]}...): pass the "
                          "module given to export_module, or one with the same weights")
    adapted = apply_adapter(source, config.adapter, config.task)  # fresh LoRA weights, overwritten just below
    load_tensors(adapted, tensors)
    if not digest_matches:  # BatchNorm layers frozen by export: their step counters (in the digest) are gone
        difference, scale = _max_difference(_logits(adapted.model, sample), _bundle_logits(bundle, tensors, sample))
        if not difference <= BUNDLE_TOLERANCE * scale:
            raise ConfigError(f"this module is not the one the bundle was exported from: with the adapter its "
                              f"logits differ from the bundle's by {difference:.3g}")
    return adapted, sample


def merged_module(module: nn.Module, bundle: Bundle, tensors: dict[str, np.ndarray]) -> nn.Module:
    """The torch module a bundle was exported from (``export_module``), with ``tensors`` merged in, in eval mode
    (which modules are accepted: ``adapted_module``)."""
    return merge(*adapted_module(module, bundle, tensors))
