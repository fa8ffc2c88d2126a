"""Make part of a model trainable: LoRA adapters (via PEFT), the task head only, or everything."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from edgeft.config import AdapterConfig
from edgeft.errors import ConfigError
from edgeft.export.source import DEFAULT_HEADS, ModelSource


@dataclass
class AdaptedModel:
    """The model to export and what in it trains.

    trainable: parameter names (as the exported graph names them) in model order.
    peft_keys: for LoRA, each trainable name's key in a PEFT ``adapter_model.safetensors``.
    peft_config: for LoRA, PEFT's ``adapter_config.json`` content.
    """

    model: nn.Module
    trainable: list[str]
    target_modules: list[str]
    trainable_modules: list[str]
    peft_keys: dict[str, str] | None = None
    peft_config: dict | None = None


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def adaptable_modules(model: nn.Module) -> str:
    """What LoRA can adapt in ``model``, for error messages: Linear-like modules by their last name, Conv2d
    modules by their full name."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if n and (isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D")})
    convs = [n for n, m in model.named_modules() if n and isinstance(m, nn.Conv2d)]
    parts = [f"Linear-like modules in this model: {', '.join(linear[:40])}"] if linear else []
    if convs:
        more = f" (the last 40 of {len(convs)})" if len(convs) > 40 else ""
        parts.append(f"Conv2d modules{more}: {', '.join(convs[-40:])}")
    return "; ".join(parts) or "this model has no Linear or Conv2d modules"


def _resolve(model: nn.Module, patterns: tuple[str, ...], what: str, field_name: str) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(_matches(pattern, n) for n in names):
            raise ConfigError(f"unknown {what} {pattern!r} in {field_name}: no module of the model matches it; "
                              f"{adaptable_modules(model)}")


# LoRA targets of Hugging Face image models, which PEFT has no default for. Vision transformers: attention's query
# and value. CNNs: the convolutions (and linear layers) of the last stage, depthwise ones excepted: the stage list
# by its path in the model (its last item is the last stage).
VISION_TRANSFORMER_TARGETS = {t: ("query", "value") for t in
                              ("vit", "deit", "beit", "dinov2", "swin", "swinv2", "vit_msn", "vit_mae", "data2vec-vision")}
CNN_STAGES = {"resnet": "resnet.encoder.stages", "regnet": "regnet.encoder.stages",
              "mobilenet_v1": "mobilenet_v1.layer", "mobilenet_v2": "mobilenet_v2.layer",
              "efficientnet": "efficientnet.encoder.blocks", "convnext": "convnext.encoder.stages",
              "convnextv2": "convnextv2.encoder.stages"}


def last_stage_layers(model: nn.Module, stages: str) -> tuple[str, ...]:
    """The full names of the Conv2d (groups 1) and Linear modules in the last item of ``model``'s module list
    ``stages`` (none when the model has no such list)."""
    modules = dict(model.named_modules())
    stage_list = modules.get(stages)
    if not isinstance(stage_list, (nn.ModuleList, nn.Sequential)) or len(stage_list) == 0:
        return ()
    prefix = f"{stages}.{len(stage_list) - 1}."
    return tuple(n for n, m in modules.items() if n.startswith(prefix) and (
        isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)))


# Causal LMs: every attention and MLP projection (QLoRA's finding: LoRA on all linear layers matches full
# fine-tuning where query/value alone falls short), by architecture; the output layer and embeddings stay frozen.
LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CAUSAL_LM_TARGETS = {**{t: LLAMA_LIKE for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "olmo",
                                                "granite")},
                     "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                     "gpt2": ("c_attn", "c_proj", "c_fc")}


def default_lora_targets(model_type: str | None, model: nn.Module | None = None,
                         task: str | None = None) -> tuple[str, ...] | None:
    """The default LoRA targets of a Hugging Face architecture: for causal LMs every attention and MLP projection
    (``CAUSAL_LM_TARGETS``); else PEFT's (query/value for BERT-likes); query/value for vision transformers; for CNNs
    (given ``model``) the last stage's convolutions, by full name."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    targets = (CAUSAL_LM_TARGETS.get(model_type or "") if task == "causal-lm" else None) \
        or mapping.get(model_type or "") or VISION_TRANSFORMER_TARGETS.get(model_type or "")
    if not targets and model is not None and model_type in CNN_STAGES:
        targets = last_stage_layers(model, CNN_STAGES[model_type])
    return tuple(targets) if targets else None


def default_heads(model: nn.Module, task: str) -> tuple[str, ...]:
    """The task head modules that exist in ``model`` (e.g. ``classifier`` for BERT)."""
    names = {n for n, _ in model.named_modules()}
    return tuple(h for h in DEFAULT_HEADS.get(task, ()) if h in names)


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer on its stored statistics, written as plain arithmetic: a BatchNormalization node in a
    training graph makes ONNX Runtime's training build normalise with batch statistics and update the running
    ones (so the eval model, which reads the stored ones, disagrees with what was trained); here both engines and
    the eval model compute ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``. Same parameter and
    buffer names as the layer it replaces, so state dicts and PEFT keys are unchanged."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.weight = bn.weight if bn.affine else None
        self.bias = bn.bias if bn.affine else None
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def forward(self, x):  # noqa: ANN001, ANN201
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(self.running_var + self.eps)
        y = (x - self.running_mean.reshape(shape)) * scale.reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def freeze_batch_norm(model: nn.Module) -> int:
    """Replace every BatchNorm layer of ``model`` by a ``FrozenBatchNorm``; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.track_running_stats:
                setattr(parent, name, FrozenBatchNorm(child))
                count += 1
    return count


def apply_adapter(source: ModelSource, config: AdapterConfig, task: str) -> AdaptedModel:
    """Freeze ``source.model`` and make the adapter's parameters trainable, per ``config``. BatchNorm layers run
    on their stored statistics (``FrozenBatchNorm``); their affine parameters train where the adapter says."""
    model = source.model
    freeze_batch_norm(model)
    heads = config.trainable_modules if config.trainable_modules is not None else default_heads(model, task)
    _resolve(model, heads, "trainable module", "adapter.trainable_modules")
    for p in model.parameters():
        p.requires_grad_(False)

    if config.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return AdaptedModel(model, _trainable_names(model), [], list(heads))

    if config.kind == "head":
        if not heads:
            raise ConfigError("adapter.kind='head' needs trainable_modules: this model has no default task head")
        for name, p in model.named_parameters():
            if any(_matches(h, name.rsplit(".", 1)[0]) or name.startswith(h + ".") for h in heads):
                p.requires_grad_(True)
        return AdaptedModel(model, _trainable_names(model), [], list(heads))

    targets = config.target_modules or default_lora_targets(source.model_type, model, task)
    if not targets:
        raise ConfigError("adapter.target_modules is required: there is no default LoRA target for "
                          f"model type {source.model_type!r}; name the modules to adapt ({adaptable_modules(model)})")
    _resolve(model, targets, "target module", "adapter.target_modules")
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules()
                 if any(_matches(t, n) for t in targets))  # GPT-2 stores Linear weights transposed
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(targets), modules_to_save=list(heads) or None,
                      task_type=source.peft_task_type, bias="none", fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, lora)
    peft_model.eval()
    _expose_conv_geometry(peft_model)
    trainable = _trainable_names(peft_model)
    saved = set(get_peft_model_state_dict(peft_model))
    peft_keys = {}
    for name in trainable:
        key = name.replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if key not in saved:
            raise ConfigError(f"cannot map trainable parameter {name} to a PEFT adapter key")
        peft_keys[name] = key
    peft_config = peft_model.peft_config["default"].to_dict()
    peft_config["base_model_name_or_path"] = source.base_id
    peft_config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}
    return AdaptedModel(peft_model, trainable, list(targets), list(heads), peft_keys, peft_config)


CONV_GEOMETRY = ("stride", "kernel_size", "dilation", "padding", "groups")


def _expose_conv_geometry(model: nn.Module) -> None:
    """LoRA layers wrapping a Conv2d show its stride, kernel size, dilation, padding and groups, as model code that
    pads by the convolution's geometry reads them (MobileNet's TensorFlow-style padding)."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Conv2d) and module is not base:
            for attribute in CONV_GEOMETRY:
                if attribute not in vars(module):
                    setattr(module, attribute, getattr(base, attribute))


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
