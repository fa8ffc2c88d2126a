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
from edgeft.config import INPUT_KINDS, ExportConfig
from edgeft.errors import ExportError
from edgeft.export.image_models import (IMAGE_PREPROCESSOR, explicit_same_padding, global_average_pools,
                                        image_preprocessing, is_image_folder)

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
    # a SentenceClassifier's pooling ({"mode", "normalize", "dimension"}): the graph also outputs ``features``
    pooling: dict | None = None
    # what the model reads (edgeft.bundle.INPUT_KINDS) and, for images, the ImagePreprocessing as a dict
    input_kind: str = "tokens"
    preprocessing: dict | None = None


POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


def sentence_pooling(model_dir: str | Path) -> dict | None:
    """The sentence embedding a sentence-transformers folder declares (``modules.json``: a Pooling module,
    optionally Normalize after it) as {"mode", "normalize", "dimension"}; None for a plain Hugging Face folder."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
        if pooling is None:
            return None
        config = json.loads((model_dir / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, AttributeError) as exc:
        raise ExportError(f"cannot read the sentence pooling of {model_dir} (modules.json and its Pooling "
                          f"config.json): {exc}") from exc
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise ExportError(f"{model_dir}: edgeft supports exactly one of {', '.join(POOLING_MODES)} in the "
                          f"Pooling config, found {modes or 'none'}; use pooling='cls' for the plain head")
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    return {"mode": modes[0], "normalize": normalize, "dimension": int(config["word_embedding_dimension"])}


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per sequence from the token states [batch, sequence, dim] and the padding mask, as
    sentence-transformers' Pooling computes it."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return (hidden + (weights - 1.0) * 1e9).max(dim=1).values
    total, count = (hidden * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len" else count)


class SentenceClassifier(nn.Module):
    """A task head on the model's own sentence embedding: encoder -> pooling (-> L2 normalisation) ->
    ``classifier`` (Linear). ``forward`` returns (logits, features), features being what the head reads."""

    def __init__(self, encoder: nn.Module, pooling: dict, num_outputs: int, init_std: float = 0.02):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:  # BERT's [CLS] pooler: unused here, so not trained
            encoder.pooler = None
        self.encoder = encoder
        self.pooling = dict(pooling)
        self.classifier = nn.Linear(int(pooling["dimension"]), num_outputs)
        nn.init.normal_(self.classifier.weight, std=init_std)  # as Hugging Face initialises its heads
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        features = pool(hidden, attention_mask, self.pooling["mode"])
        if self.pooling["normalize"]:
            features = nn.functional.normalize(features, p=2.0, dim=-1)
        return self.classifier(features), features


def causal_lm_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    """Turn the 2-D attention mask into the additive 4-D causal mask a decoder accepts as is, and position ids.

    The mask may hold segment ids (``edgeft.data.pack``: examples packed into one row, numbered 1, 2, ...; 0 is
    padding): a token attends to the tokens before it in its own segment only, and positions restart at 0 in
    each segment, so packed examples train exactly as if each had its own row. A 0/1 mask is one segment per row
    (padding on the right), the usual padding mask. transformers builds its mask with torch.vmap, which the
    TorchScript exporter cannot trace; built here from plain tensor ops it stays dynamic in batch and length.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    length = ids.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=ids.device))
    same = (mask[:, :, None] == mask[:, None, :]) & causal[None]  # [B, query, key]: earlier tokens, same segment
    valid = mask > 0
    # padding rows keep attending to every real token before them (their outputs are never used; no empty rows)
    allowed = (same | ~valid[:, :, None]) & valid[:, None, :] & causal[None]
    additive = (~allowed[:, None]).to(torch.float32) * torch.finfo(torch.float32).min
    arange = torch.cumsum(torch.ones_like(mask), dim=1) - 1
    positions = torch.where(valid, same.to(torch.int64).sum(dim=-1) - 1, arange)
    return {**inputs, "attention_mask": additive, "position_ids": positions, "use_cache": False}


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
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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
    """Load a Hugging Face model folder for ``config.task``: sequence classification or causal LM (text folders),
    or image classification (``is_image_folder``: see ``from_hf_image_folder``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"model folder {model_dir} does not exist; pass a Hugging Face model folder")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"model folder {model_dir} has no config.json; is it a Hugging Face model folder?")
    if is_image_folder(model_dir):
        return from_hf_image_folder(model_dir, config)
    weights = _weight_files(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportError(f"model folder {model_dir} has no tokenizer.json; the device tokenises with it "
                          "(save a fast tokenizer with tokenizer.save_pretrained())")

    hf_config = AutoConfig.from_pretrained(model_dir)
    pooling = None
    if config.task != "causal-lm" and config.pooling != "cls":
        pooling = sentence_pooling(model_dir)
        if pooling is None and config.pooling == "sentence":
            raise ExportError(f"pooling='sentence' needs a sentence-transformers folder (modules.json with a "
                              f"Pooling module); {model_dir} has none: use pooling='cls' or 'auto'")
    torch.manual_seed(config.seed)  # a new task head is drawn as the model loads: the same one every export
    try:
        if pooling is not None:
            from transformers import AutoModel

            labels = config.labels or ("value",)
            encoder = AutoModel.from_pretrained(model_dir, attn_implementation="eager")
            model = SentenceClassifier(encoder, pooling, len(labels), getattr(hf_config, "initializer_range", 0.02))
            peft_task = None
        elif config.task == "causal-lm":
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
                       prepare_inputs=causal_lm_inputs if config.task == "causal-lm" else None, pooling=pooling)


def from_hf_image_folder(model_dir: str | Path, config: ExportConfig) -> ModelSource:
    """Load a Hugging Face image-classification folder (``AutoModelForImageClassification``: ResNet, MobileNetV2,
    EfficientNet, ViT, ConvNeXt, ...) with a new head of ``len(config.labels)`` outputs (a pretrained head of
    another size is replaced), reading ``pixel_values`` [batch, channels, size, size] as its
    ``preprocessor_config.json`` prepares them (recorded in the manifest)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    model_dir = Path(model_dir)
    weights = _weight_files(model_dir)
    if config.task not in ("classification", "regression", "multilabel"):
        raise ExportError(f"{model_dir} is an image-classification model: task {config.task!r} does not apply "
                          f"(use classification, regression or multilabel)")
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    preprocessing = {**image_preprocessing(model_dir, int(getattr(hf_config, "num_channels", 3))),
                     "augment": config.augment}
    problem = {"classification": "single_label_classification", "regression": "regression",
               "multilabel": "multi_label_classification"}[config.task]
    labels = config.labels or ("value",)
    torch.manual_seed(config.seed)  # a new head is drawn as the model loads: the same one every export
    try:
        model = AutoModelForImageClassification.from_pretrained(
            model_dir, num_labels=len(labels), problem_type=problem, attn_implementation="eager",
            id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
            ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load {model_dir} as an image classifier: {exc}") from exc
    model.eval()
    channels, size = (1 if preprocessing["channels"] == "L" else 3), preprocessing["size"]
    example = {"pixel_values": torch.zeros(2, channels, size, size)}
    explicit_same_padding(model)
    try:
        global_average_pools(model, example)
    except Exception as exc:  # e.g. a ViT's position embeddings are for another image size
        raise ExportError(f"{model_dir}: the model cannot read [batch, {channels}, {size}, {size}] pixel values as "
                          f"{IMAGE_PREPROCESSOR} prepares them: {type(exc).__name__}: {exc}") from exc
    return ModelSource(model=model, input_names=["pixel_values"], example_inputs=example,
                       dynamic_axes={"pixel_values": {0: "batch"}},
                       base_id=str(getattr(hf_config, "_name_or_path", "") or model_dir.name),
                       base_digest=_weights_digest(weights), model_type=hf_config.model_type,
                       input_kind="image", preprocessing=preprocessing)


def from_module(model: nn.Module, example_inputs: dict[str, torch.Tensor], *, base_id: str = "custom",
                dynamic_axes: dict[str, dict[int, str]] | None = None,
                tokenizer_file: str | Path | None = None, input_kind: str | None = None,
                preprocessing: object | None = None) -> ModelSource:
    """Wrap any torch.nn.Module; ``model(**example_inputs)`` must return the logits.

    ``input_kind`` (edgeft.bundle.INPUT_KINDS): what the device feeds it; default ``tokens`` with a tokenizer
    file, else ``image`` when ``preprocessing`` (an ``edgeft.images.ImagePreprocessing``) is given, else
    ``features`` for one float input of shape [batch, n], else ``arrays`` (.npz files by input name)."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise ExportError("example_inputs is empty: give the module's inputs by name, e.g. {'x': tensor}")
    axes = dynamic_axes if dynamic_axes is not None else {name: {0: "batch"} for name in example_inputs}
    model.eval()
    kind = input_kind or guess_input_kind(example_inputs, tokenizer_file, preprocessing)
    if kind not in INPUT_KINDS:
        raise ExportError(f"input_kind={kind!r} is not one of {', '.join(INPUT_KINDS)}")
    if kind == "image":
        if preprocessing is None:
            raise ExportError("input_kind='image' needs preprocessing (an edgeft.images.ImagePreprocessing): how the "
                              "device resizes, crops and normalises its images")
        if len(example_inputs) != 1:
            raise ExportError(f"an image model reads one input (pixels [batch, channels, height, width]); this one "
                              f"reads {list(example_inputs)}")
    if kind == "features" and (len(example_inputs) != 1 or next(iter(example_inputs.values())).dim() != 2):
        raise ExportError("input_kind='features' needs one input of shape [batch, n_features]")
    if kind == "tokens" and tokenizer_file is None:
        raise ExportError("input_kind='tokens' needs tokenizer_file (the tokenizer.json the device encodes with)")
    if preprocessing is not None and not isinstance(preprocessing, dict):
        preprocessing = preprocessing.to_dict()  # an ImagePreprocessing
    return ModelSource(model=model, input_names=list(example_inputs), example_inputs=dict(example_inputs),
                       dynamic_axes=axes, base_id=base_id, base_digest=state_dict_digest(model),
                       tokenizer_file=Path(tokenizer_file) if tokenizer_file else None, input_kind=kind,
                       preprocessing=preprocessing if kind == "image" else None)


def guess_input_kind(example_inputs: dict[str, torch.Tensor], tokenizer_file: object, preprocessing: object) -> str:
    """What a module's inputs most likely are (see ``from_module``)."""
    if tokenizer_file is not None:
        return "tokens"
    if preprocessing is not None:
        return "image"
    only = next(iter(example_inputs.values())) if len(example_inputs) == 1 else None
    return "features" if only is not None and only.dim() == 2 and only.is_floating_point() else "arrays"
