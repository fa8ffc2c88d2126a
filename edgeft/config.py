"""Typed configuration: frozen dataclasses whose validation names the bad field and value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

from edgeft.errors import check_config

Task = Literal["classification", "causal-lm", "regression", "multilabel"]
AdapterKind = Literal["lora", "head", "full"]
OptimizerName = Literal["adamw", "sgd"]
Pooling = Literal["auto", "sentence", "cls"]
# How a bundle trains on the device: ``ort-training`` (ONNX Runtime's training artifacts, onnxruntime-training
# 1.19.2) or ``portable`` (the whole training step as standard ONNX graphs, run by any onnxruntime >= 1.19).
Engine = Literal["ort-training", "portable"]

TASKS: tuple[str, ...] = get_args(Task)
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
POOLINGS: tuple[str, ...] = get_args(Pooling)
ENGINES: tuple[str, ...] = get_args(Engine)
# What a model reads: token ids (a tokenizer in the bundle), images, numeric feature columns, arrays by input name
InputKind = Literal["tokens", "image", "features", "arrays"]
INPUT_KINDS: tuple[str, ...] = get_args(InputKind)
# The ONNX opset of each engine's graphs: ORT's gradient builder needs 14-16 (17+ breaks LayerNormalization
# gradients); the portable engine is exported by torch.onnx's dynamo exporter, which writes 18 and later.
OPSETS = {"ort-training": (14, 16), "portable": (18, 21)}
DEFAULT_OPSET = {"ort-training": 14, "portable": 18}

# The loss each task trains with; a torch.nn.Module source may pick any of them.
LOSS_FOR_TASK = {
    "classification": "cross-entropy",
    "causal-lm": "causal-lm-cross-entropy",
    "regression": "mse",
    "multilabel": "bce",
}
# dpo: Direct Preference Optimization (Rafailov et al., 2023) for causal LMs on prompt/chosen/rejected pairs
LOSSES: tuple[str, ...] = (*LOSS_FOR_TASK.values(), "dpo")


def _check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    check_config(value in choices, field_name, value, f"expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class AdapterConfig:
    """What becomes trainable.

    kind: ``lora`` (low-rank adapters on ``target_modules`` plus ``trainable_modules``), ``head``
    (only ``trainable_modules``), or ``full`` (every parameter).
    target_modules: module-name patterns LoRA wraps (PEFT semantics: a name suffix or a regex);
    ``None`` picks the architecture's default (query/value for BERT-likes, c_attn for GPT-2...).
    trainable_modules: modules trained in full besides the adapters; ``None`` picks the task head.
    """

    kind: AdapterKind = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    trainable_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_choice("adapter.kind", self.kind, ADAPTER_KINDS)
        check_config(self.rank >= 1, "adapter.rank", self.rank, "must be a positive integer")
        check_config(self.alpha > 0, "adapter.alpha", self.alpha, "must be positive")
        check_config(self.dropout == 0.0, "adapter.dropout", self.dropout,
               "on-device training runs the graph in eval mode; LoRA dropout is not supported yet")
        for name in ("target_modules", "trainable_modules"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class OptimizerConfig:
    """The on-device optimizer, baked into the bundle's optimizer graph."""

    name: OptimizerName = "adamw"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optimizer.name", self.name, OPTIMIZERS)
        check_config(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        check_config(self.name != "sgd" or self.momentum == 0.0, "optimizer.momentum", self.momentum,
               "ONNX Runtime's on-device SGD has no momentum; use adamw")


@dataclass(frozen=True)
class ExportConfig:
    """How ``edgeft export`` turns a model into a training bundle."""

    task: Task = "classification"
    labels: tuple[str, ...] = ()
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: str | None = None
    # the training engine the bundle is made for (see ``Engine``): portable by default, chosen on evidence
    # (docs/engines.md: as fast or faster, less memory, the same results, and every runtime and platform)
    engine: Engine = "portable"
    # None: the engine's default (14 for ort-training, 18 for portable)
    opset: int | None = None
    max_length: int = 128
    seed: int = 0
    # FedProx (Li et al., 2020): mu/2 * ||w - w_global||^2 is added to the training loss, w_global being the
    # adapter the device's round started from (set with the global adapter). 0: no proximal term, and the
    # bundle is exactly what it was without this option.
    proximal_mu: float = 0.0
    # What the task head reads (classification, regression, multilabel): ``sentence`` is the model's own
    # sentence embedding as a sentence-transformers folder declares it (``modules.json``: Pooling, e.g. the
    # mean of the token states, then Normalize), ``cls`` the Hugging Face head (the [CLS] pooler);
    # ``auto`` is ``sentence`` where the folder declares a pooling, ``cls`` otherwise.
    pooling: Pooling = "auto"
    # Image models from a Hugging Face folder: training batches get a seeded random resized crop and horizontal
    # flip. False: they are preprocessed as evaluation batches are (so a head-only bundle trains on cached
    # features, edgeft.train.cached). Modules given to export_module take it in their ImagePreprocessing.
    augment: bool = True
    # loss="dpo": beta, how far the policy may move from the reference (the frozen base) per unit of reward
    dpo_beta: float = 0.1
    # The frozen base's weight matrices stored as int8 or int4 and dequantised in the training graph (portable engine;
    # edgeft.export.lowbit): the device holds a quarter or an eighth of their fp32 bytes. None: fp32.
    base_bits: int | None = None
    # Causal LMs of the Llama family (Llama, SmolLM2, Qwen2, Phi-3, Mistral) on the portable engine: the training
    # step as one graph per decoder layer (edgeft.export.segmented), so that a device keeps each layer's input only
    # between the forward and the backward pass and recomputes the rest, as PyTorch's gradient checkpointing does.
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: each layer's forward pass also hands the backward pass the outputs of its input
    # projections (q, k, v, gate, up), so the backward recomputes the attention scores and elementwise operations,
    # not the layer's matrix products (selective activation checkpointing: faster, at 45 MB a layer more at
    # Qwen2.5-0.5B's widths and 4 x 256 tokens).
    keep_projections: bool = False

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        check_config(isinstance(self.augment, bool), "augment", self.augment, "expected true or false")
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("engine", self.engine, ENGINES)
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.loss is None:
            object.__setattr__(self, "loss", LOSS_FOR_TASK[self.task])
        _check_choice("loss", self.loss, LOSSES)
        check_config(self.loss != "dpo" or self.task == "causal-lm", "loss", self.loss,
                     "dpo tunes a causal LM on preferences: use it with task='causal-lm'")
        check_config(self.base_bits in (None, 8, 4), "base_bits", self.base_bits, "expected 8, 4 or None (fp32)")
        check_config(self.base_bits is None or self.engine == "portable", "base_bits", self.base_bits,
                     "a low-bit frozen base needs the portable engine (ONNX Runtime's training build cannot "
                     "differentiate through dequantised weights): export with engine='portable'")
        if self.gradient_checkpointing:
            check_config(self.engine == "portable" and self.task == "causal-lm" and self.loss != "dpo"
                         and not self.proximal_mu, "gradient_checkpointing", True,
                         "gradient checkpointing is for causal-LM training (next-token loss, no FedProx term) on the "
                         "portable engine; export without it")
        check_config(self.gradient_checkpointing or not self.keep_projections, "keep_projections", True,
                     "keeping the projections' outputs is a setting of gradient checkpointing: set "
                     "gradient_checkpointing too")
        check_config(isinstance(self.dpo_beta, (int, float)) and 0 < self.dpo_beta < float("inf"), "dpo_beta",
                     self.dpo_beta, "must be a positive number (0.1 is the usual choice)")
        low, high = OPSETS[self.engine]
        check_config(self.opset is None or low <= self.opset <= high, "opset", self.opset,
               "ONNX Runtime's gradient builder needs opset 14-16 (17+ breaks LayerNormalization gradients)"
               if self.engine == "ort-training" else f"the portable engine exports opset {low}-{high}")
        check_config(self.max_length >= 2, "max_length", self.max_length, "must be at least 2")
        check_config(isinstance(self.proximal_mu, (int, float)) and 0 <= self.proximal_mu < float("inf"), "proximal_mu",
               self.proximal_mu, "must be a finite number >= 0 (0 disables FedProx's proximal term)")
        if self.task in ("classification", "multilabel"):
            check_config(len(self.labels) >= 2, "labels", self.labels, f"a {self.task} task needs at least 2 labels")
            check_config(len(set(self.labels)) == len(self.labels), "labels", self.labels, "labels must be unique")

    @property
    def onnx_opset(self) -> int:
        """The opset the bundle's graphs are written in: ``opset``, or the engine's default."""
        return self.opset if self.opset is not None else DEFAULT_OPSET[self.engine]

    @property
    def num_outputs(self) -> int:
        return len(self.labels) if self.labels else 1


@dataclass(frozen=True)
class TrainConfig:
    """One device's local training run (also what the agent runs each federated round)."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.06
    grad_accum_steps: int = 1
    early_stopping_patience: int | None = None
    early_stopping_metric: str = "loss"
    bucket_size: int = 50
    seed: int = 0
    threads: int | None = None
    # ONNX Runtime execution provider (cpu, cuda, coreml, qnn, openvino... or a full provider name);
    # None: CPU. Portable bundles train on any provider the runtime offers; ort-training bundles on CPU or CUDA.
    provider: str | None = None
    progress: bool = True
    # head-only bundles with fixed examples (arrays, images without augmentation): compute the frozen backbone's
    # features once and train the head on them (edgeft.train.cached); the same updates, far fewer forward passes
    cache_features: bool = True
    # causal LM: pack short training examples into rows of the bundle's max_length (edgeft.data.pack); each example
    # still attends only to itself, and far fewer padding tokens are computed. Bundles with ``manifest.packing``.
    pack: bool = False

    def __post_init__(self) -> None:
        check_config(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check_config(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        check_config(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check_config(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be positive")
        check_config(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        check_config(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        check_config(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               "early_stopping_patience", self.early_stopping_patience, "must be >= 1")
        check_config(self.bucket_size >= 1, "bucket_size", self.bucket_size, "must be >= 1")


def to_dict(config: object) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(config)  # type: ignore[arg-type]
