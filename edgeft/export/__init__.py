"""Coordinator side: export a model into an ONNX Runtime training bundle with trainable adapters.

Needs the ``export`` extra (torch, transformers, peft). Devices never import this package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from edgeft import __version__
from edgeft.bundle import (FORMAT_VERSION, MANIFEST, TOKENIZER, Bundle, Manifest, TensorSpec, load_bundle, sha256_of,
                           write_manifest)
from edgeft.chat import CHAT_TEMPLATE_FILE
from edgeft.config import ExportConfig, to_dict
from edgeft.errors import ExportError
from edgeft.export import artifacts
from edgeft.export.adapters import AdaptedModel, apply_adapter
from edgeft.export.graph import ANCHOR_PREFIX, export_graph, label_axes
from edgeft.export.losses import LABEL_SPEC
from edgeft.export.source import ModelSource, from_hf_folder, from_module

__all__ = ["export_hf", "export_module", "export_source", "from_hf_folder", "from_module"]

FORWARD_MODEL = "forward_model.onnx"
HEAD_BUNDLE = "head"  # the folder of a head-only bundle's head bundle (cached-feature training)


def export_hf(model_dir: str | Path, out_dir: str | Path, config: ExportConfig) -> Bundle:
    """Export a Hugging Face model folder (text: sequence classification or causal LM; image classification) into a
    bundle."""
    return export_source(from_hf_folder(model_dir, config), out_dir, config)


def export_module(model: torch.nn.Module, example_inputs: dict[str, torch.Tensor], out_dir: str | Path,
                  config: ExportConfig, **source_options: object) -> Bundle:
    """Export any torch.nn.Module whose ``forward(**example_inputs)`` returns logits into a bundle."""
    return export_source(from_module(model, example_inputs, **source_options), out_dir, config)  # type: ignore[arg-type]


def export_source(source: ModelSource, out_dir: str | Path, config: ExportConfig,
                  keep_forward_graph: bool = False) -> Bundle:
    """Apply the adapter, export the (loss, logits) graph, generate ORT artifacts, write the manifest.

    With ``keep_forward_graph`` the exported graph (before ORT adds gradients) stays in the bundle
    directory as ``forward_model.onnx``, outside the manifest (``ort-training`` bundles only).
    ``config.engine`` picks the training engine the bundle is made for.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"output folder {out_dir} is not empty; choose a new folder for the bundle")
    if config.engine == "ort-training":
        artifacts.refuse_oversized(source.model)
    torch.manual_seed(config.seed)
    adapted = apply_adapter(source, config.adapter, config.task)
    source = with_head_features(source, adapted, config)
    head_only = source.pooling is not None and source.pooling.get("head_bundle") is not None
    l2 = config.optimizer.weight_decay if config.optimizer.name == "sgd" else 0.0
    with tempfile.TemporaryDirectory(prefix="edgeft-export-") as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        graph_path = Path(tmp) / FORWARD_MODEL
        segmented = None
        if config.engine == "portable":
            from edgeft.export import portable

            segmented = portable.generate(source, adapted, config, staging)
        else:
            export_graph(adapted.model, source, adapted.trainable, config.loss, config.num_outputs, graph_path,
                         config.onnx_opset, l2=l2, seed=config.seed, proximal_mu=config.proximal_mu,
                         dpo_beta=config.dpo_beta)
            artifacts.generate(graph_path, adapted.trainable, config.optimizer, staging)
        if source.tokenizer_file is not None:
            shutil.copyfile(source.tokenizer_file, staging / TOKENIZER)
            if config.task == "causal-lm":
                _write_chat_template(source.tokenizer_file.parent, staging)
        if head_only:
            _export_head_bundle(adapted, source.pooling, config, staging / source.pooling["head_bundle"])
        manifest = _manifest(source, adapted, config, staging, segmented)
        write_manifest(staging, manifest)
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            shutil.move(str(item), out_dir / item.name)
        if keep_forward_graph and graph_path.exists():
            shutil.move(str(graph_path), out_dir / FORWARD_MODEL)
    return load_bundle(out_dir)


def with_head_features(source: ModelSource, adapted: AdaptedModel, config: ExportConfig) -> ModelSource:
    """A classifier that does not read text, whose head is one Linear module: its graphs also output the
    head's input as ``features`` (the manifest's ``pooling`` says ``{"mode": "head_input", "module", "dimension"}``),
    which the statistics round sums per class. When that head is all that trains (``adapter.kind="head"``), the
    bundle also holds a head bundle (``pooling["head_bundle"]``: a folder) that trains the head alone on cached
    features (``edgeft.train.cached``)."""
    if source.input_kind == "tokens" or source.pooling is not None or config.task != "classification" \
            or len(adapted.trainable_modules) != 1:
        return source
    from edgeft.export.graph import head_module

    name = adapted.trainable_modules[0]
    head = head_module(adapted.model, name)
    head = getattr(head, "original_module", head)  # PEFT's modules_to_save wrapper
    if isinstance(head, torch.nn.Sequential) and config.adapter.kind != "lora" and len(head):
        *rest, (last_name, last) = head.named_children()  # e.g. Flatten + Linear (Hugging Face's ResNet)
        if not any(True for _, module in rest for _ in module.parameters()):
            name, head = f"{name}.{last_name}", last
    if not isinstance(head, torch.nn.Linear) or head.out_features != len(config.labels):
        return source
    from dataclasses import replace

    pooling = {"mode": "head_input", "module": name, "normalize": False, "dimension": head.in_features}
    if config.adapter.kind == "head":
        pooling["head_bundle"] = HEAD_BUNDLE
    return replace(source, pooling=pooling)


class _HeadOnFeatures(torch.nn.Module):
    """A head module on its own, registered at ``path`` (dotted) so that its parameters keep their names."""

    def __init__(self, path: str, head: torch.nn.Module):
        super().__init__()
        *parents, leaf = path.split(".")
        parent: torch.nn.Module = self
        for part in parents:
            parent.add_module(part, torch.nn.Module())
            parent = parent.get_submodule(part)
        parent.add_module(leaf, head)
        self.path = path

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.path)(features)


def _export_head_bundle(adapted: AdaptedModel, pooling: dict, config: ExportConfig, out_dir: Path) -> None:
    """The bundle that trains a head-only bundle's head on cached features: the head (a copy of the Linear module,
    at the same path so that its parameters have the bundle's names) reads ``features`` [batch, dimension], with the
    bundle's loss, optimizer, engine and FedProx term."""
    import copy
    from dataclasses import replace

    from edgeft.config import AdapterConfig
    from edgeft.export.graph import head_module

    root = _HeadOnFeatures(pooling["module"], copy.deepcopy(head_module(adapted.model, pooling["module"])))
    head_names = [n for n, _ in root.named_parameters()]
    if sorted(head_names) != sorted(adapted.trainable):
        raise ExportError(f"the head's parameters {head_names} are not the bundle's trainable ones {adapted.trainable}")
    example = {"features": torch.zeros(2, int(pooling["dimension"]))}
    head = from_module(root, example, base_id="head", input_kind="features")
    export_source(head, out_dir, replace(config, adapter=AdapterConfig(kind="full")))


def _manifest(source: ModelSource, adapted: AdaptedModel, config: ExportConfig, staging: Path,
              segmented: dict | None = None) -> Manifest:
    params = dict(adapted.model.named_parameters())
    trainable = [TensorSpec(name=n, dtype="float32", shape=list(params[n].shape),
                            peft_key=(adapted.peft_keys or {}).get(n)) for n in adapted.trainable]
    inputs = [TensorSpec(name=n, dtype=str(t.dtype).replace("torch.", ""),
                         shape=_axes(t.dim(), source.dynamic_axes.get(n, {}),
                                     sizes=None if source.input_kind == "tokens" else list(t.shape)))
              for n, t in source.example_inputs.items()]
    label_dtype, label_dims = LABEL_SPEC[config.loss]
    inputs.append(TensorSpec(name="labels", dtype=label_dtype,
                             shape=_axes(len(label_dims), label_axes(config.loss),
                                         config.num_outputs if label_dims[-1] == "outputs" else None)))
    outputs = [TensorSpec(name="loss", dtype="float32", shape=[]),
               TensorSpec(name="logits", dtype="float32", shape=["batch", "..."])]
    if source.pooling is not None:
        outputs.append(TensorSpec(name="features", dtype="float32", shape=["batch", source.pooling["dimension"]]))
    tokenizer = None
    if source.tokenizer_file is not None:
        tokenizer = {"file": TOKENIZER, "max_length": config.max_length, "pad_id": _pad_id(source)}
        if (staging / CHAT_TEMPLATE_FILE).is_file():
            tokenizer["chat_template"] = CHAT_TEMPLATE_FILE
        if config.task == "causal-lm":  # prompt/completion examples end with it
            from edgeft.chat import special_tokens

            eos = special_tokens(source.tokenizer_file.parent).get("eos_token")
            if eos:
                tokenizer["eos_token"] = eos
    files = {p.relative_to(staging).as_posix(): sha256_of(p) for p in sorted(staging.rglob("*"))
             if p.is_file() and p != staging / MANIFEST}
    optimizer = to_dict(config.optimizer)
    if config.optimizer.name == "sgd":
        optimizer["weight_decay_mode"] = "l2 term in the training loss"
    return Manifest(
        format_version=FORMAT_VERSION, edgeft_version=__version__,
        base_model={"id": source.base_id, "digest": source.base_digest, "model_type": source.model_type,
                    **({"bits": config.base_bits} if config.base_bits else {})},
        task=config.task, labels=list(config.labels), inputs=inputs, outputs=outputs, trainable=trainable,
        adapter={**to_dict(config.adapter), "target_modules": adapted.target_modules,
                 "trainable_modules": adapted.trainable_modules, "scale": config.adapter.scale},
        loss=config.loss, optimizer=optimizer, opset=config.onnx_opset, tokenizer=tokenizer, files=files,
        peft_config=adapted.peft_config,
        proximal={"mu": config.proximal_mu, "anchor_prefix": ANCHOR_PREFIX} if config.proximal_mu else None,
        pooling=source.pooling, engine=config.engine, input_kind=source.input_kind,
        preprocessing=source.preprocessing, loss_options={"beta": config.dpo_beta} if config.loss == "dpo" else None,
        packing=config.task == "causal-lm" and config.loss != "dpo", segmented=segmented)


def _axes(rank: int, dynamic: dict[int, str], last: int | None = None, sizes: list[int] | None = None
          ) -> list[int | str]:
    """A tensor's manifest shape: named dynamic axes, fixed ones as ``sizes`` gives them (-1 when not given)."""
    dims: list[int | str] = [dynamic.get(i, sizes[i] if sizes else -1) for i in range(rank)]
    if last is not None and rank > 1:
        dims[-1] = last
    return dims


def _write_chat_template(model_dir: Path, staging: Path) -> None:
    """A causal LM's chat template and special tokens (``edgeft.chat``), when its folder has one."""
    from edgeft.chat import read_chat_template

    template = read_chat_template(model_dir)
    if template is not None:
        (staging / CHAT_TEMPLATE_FILE).write_text(json.dumps(template, indent=2, sort_keys=True))


def _pad_id(source: ModelSource) -> int:
    """The pad token id from the tokenizer's files (0 when the tokenizer has none)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source.tokenizer_file))
    if tok.padding and tok.padding.get("pad_id") is not None:
        return int(tok.padding["pad_id"])
    cfg = source.tokenizer_file.parent / "tokenizer_config.json" if source.tokenizer_file else None
    if cfg and cfg.is_file():
        pad = json.loads(cfg.read_text()).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad and tok.token_to_id(pad) is not None:
            return int(tok.token_to_id(pad))
    return 0
