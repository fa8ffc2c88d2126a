"""Merge a trained adapter into its base model: W + scale * B @ A, no adapter operators left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeft.bundle import Bundle
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.errors import ConfigError
from edgeft.export.adapters import apply_adapter
from edgeft.export.source import from_hf_folder


def export_config_of(bundle: Bundle) -> ExportConfig:
    """The ExportConfig a bundle was made with (from its manifest)."""
    m = bundle.manifest
    adapter = {k: v for k, v in m.adapter.items() if k in AdapterConfig.__dataclass_fields__}
    return ExportConfig(task=m.task, labels=tuple(m.labels), loss=m.loss, opset=m.opset, engine=m.engine,
                        max_length=m.tokenizer["max_length"] if m.tokenizer else 128,
                        adapter=AdapterConfig(**adapter), pooling="sentence" if m.pooling else "cls")


def merged_model(model_dir: str | Path, bundle: Bundle, tensors: dict[str, np.ndarray]) -> torch.nn.Module:
    """The base model with ``tensors`` (trained adapter, by manifest name) merged in, in eval mode."""
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
    model = adapted.model.merge_and_unload() if adapted.peft_config is not None else adapted.model
    return model.eval()
