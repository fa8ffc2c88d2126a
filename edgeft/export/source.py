"""Where a model comes from: a Hugging Face model folder, or any torch.nn.Module with example inputs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeft.bundle import sha256_of
from edgeft.config import ExportConfig
from edgeft.errors import ExportError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")

# Task heads trained in full beside LoRA adapters, by task (Hugging Face module names).
DEFAULT_HEADS = {"classification": ("classifier", "score"), "regression": ("classifier", "score"),
                 "multilabel": ("classifier", "score"), "causal-lm": ()}


@dataclass
class ModelSource:
    """A model ready to be wrapped with a loss and exported.

    ``model(**inputs)`` returns logits (a tensor, a tuple whose first item is the logits, or an object
    with a ``.logits`` attribute). ``input_names``/``example_inputs`` describe its inputs, labels excluded.
    """

    model: nn.Module
    input_names: list[str]
    example_inputs: dict[str, torch.Tensor]
    dynamic_axes: dict[str, dict[int, str]]
    base_id: str
    base_digest: str
    tokenizer_file: Path | None = None
    model_type: str | None = None
    peft_task_type: str | None = None
    prepare_inputs: Callable[[dict[str, torch.Tensor]], dict] | None = None


def causal_lm_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    """Turn a 2-D padding mask into the additive 4-D causal mask a decoder accepts as is.

    transformers builds that mask with torch.vmap, which the TorchScript exporter cannot trace; built
    here from plain tensor ops it stays dynamic in batch and sequence length.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    length = ids.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=ids.device))
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    additive = (~allowed).to(torch.float32) * torch.finfo(torch.float32).min
    return {**inputs, "attention_mask": additive, "use_cache": False}


def _weights_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(f.name.encode())
        digest.update(sha256_of(f).encode())
    return digest.hexdigest()


def state_dict_digest(model: nn.Module) -> str:
    """Content digest of a module's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weight_files(model_dir: Path) -> list[Path]:
    weights = [model_dir / f for f in WEIGHT_FILES if (model_dir / f).is_file()]
    if not weights:
        raise ExportError(
            f"model folder {model_dir} has no weights (expected one of {', '.join(WEIGHT_FILES)}); "
            "save the model with save_pretrained() or copy its weight file there")
    if any(w.name.endswith(".index.json") for w in weights):
        index = json.loads(weights[0].read_text())
        weights = sorted({model_dir / f for f in index["weight_map"].values()})
    return weights


def hf_base_digest(model_dir: str | Path) -> str:
    """The base-model digest a bundle exported from this Hugging Face folder records (its weight files'
    sha256), without loading the model."""
    return _weights_digest(_weight_files(Path(model_dir)))


def from_hf_folder(model_dir: str | Path, config: ExportConfig) -> ModelSource:
    """Load a Hugging Face model folder for ``config.task`` (sequence classification or causal LM)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"model folder {model_dir} does not exist; pass a Hugging Face model folder")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"model folder {model_dir} has no config.json; is it a Hugging Face model folder?")
    weights = _weight_files(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportError(f"model folder {model_dir} has no tokenizer.json; the device tokenises with it "
                          "(save a fast tokenizer with tokenizer.save_pretrained())")

    hf_config = AutoConfig.from_pretrained(model_dir)
    try:
        if config.task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
            peft_task = "CAUSAL_LM"
        else:
            problem = {"classification": "single_label_classification", "regression": "regression",
                       "multilabel": "multi_label_classification"}[config.task]
            labels = config.labels or ("value",)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=len(labels), problem_type=problem, attn_implementation="eager",
                id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                ignore_mismatched_sizes=True)
            peft_task = "SEQ_CLS"
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load {model_dir} for task {config.task}: {exc}") from exc
    model.eval()

    batch, seq = 2, 8
    example = {"input_ids": torch.ones(batch, seq, dtype=torch.long),
               "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    axes = {name: {0: "batch", 1: "sequence"} for name in example}
    return ModelSource(model=model, input_names=list(example), example_inputs=example, dynamic_axes=axes,
                       base_id=str(getattr(hf_config, "_name_or_path", "") or model_dir.name),
                       base_digest=_weights_digest(weights), tokenizer_file=tokenizer_file,
                       model_type=hf_config.model_type, peft_task_type=peft_task,
                       prepare_inputs=causal_lm_inputs if config.task == "causal-lm" else None)


def from_module(model: nn.Module, example_inputs: dict[str, torch.Tensor], *, base_id: str = "custom",
                dynamic_axes: dict[str, dict[int, str]] | None = None,
                tokenizer_file: str | Path | None = None) -> ModelSource:
    """Wrap any torch.nn.Module; ``model(**example_inputs)`` must return the logits."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise ExportError("example_inputs is empty: give the module's inputs by name, e.g. {'x': tensor}")
    axes = dynamic_axes if dynamic_axes is not None else {name: {0: "batch"} for name in example_inputs}
    model.eval()
    return ModelSource(model=model, input_names=list(example_inputs), example_inputs=dict(example_inputs),
                       dynamic_axes=axes, base_id=base_id, base_digest=state_dict_digest(model),
                       tokenizer_file=Path(tokenizer_file) if tokenizer_file else None)
