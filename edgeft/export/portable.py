"""The portable engine's export: the whole training step compiled into standard ONNX graphs.

Any ``onnxruntime`` (1.19 to the current release, any execution provider) runs them with a plain
InferenceSession; nothing needs ``onnxruntime.training``. The bundle holds:

- ``portable_gradient.onnx``: forward, loss and backward for the trainable tensors only. Inputs: the model
  inputs, ``labels``, every state tensor (trainable parameters, and FedProx anchors) by name, and one gradient
  accumulator ``grad.<name>`` per trainable parameter; outputs ``loss``, ``logits`` (``features``) and
  ``grad.<name>.out`` = accumulator + this batch's gradient (gradient accumulation is feeding it back).
- ``portable_eval.onnx``: forward and loss, the same inputs without accumulators.
- ``portable_optimizer.onnx``: the optimizer update (``edgeft.export.optimizer``).
- ``portable_frozen.bin``: the frozen weights, ONNX external data that both graphs point into (stored once).
- ``portable_parameters.safetensors``: the initial trainable parameters.

How (DESIGN.md section 4): ``torch.export`` of (model + loss) with dynamic batch and sequence axes,
``_export_forward_backward`` for the joint forward + backward program, a module that calls that program with
the trainable tensors as inputs, exported again and translated by ``torch.onnx`` (dynamo, opset 18+).
Attention must be the eager implementation: SDPA's backward has no ONNX translation.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgeft.bundle import GRAD_PREFIX, OUT_SUFFIX
from edgeft.bundle import PORTABLE_EVAL as EVAL_MODEL
from edgeft.bundle import PORTABLE_FROZEN as FROZEN_WEIGHTS
from edgeft.bundle import PORTABLE_GRADIENT as GRADIENT_MODEL
from edgeft.bundle import PORTABLE_OPTIMIZER as OPTIMIZER_MODEL
from edgeft.bundle import PORTABLE_PARAMETERS as PARAMETERS
from edgeft.config import ExportConfig
from edgeft.errors import ExportError
from edgeft.export.adapters import AdaptedModel
from edgeft.export.graph import ANCHOR_PREFIX, TrainingGraph, example_labels, label_axes
from edgeft.export.optimizer import optimizer_model
from edgeft.export.source import ModelSource
from edgeft.export.translate import export_step, to_onnx, translatable

ALIGNMENT = 4096  # external tensors start on page boundaries (ONNX Runtime can map them)
# Initializers of at least this many bytes go to the shared weights file (smaller ones stay in their graph).
SHARED_MIN_BYTES = 1024


class _DetachedOutputs(nn.Module):
    """(loss, logits[, features]) with everything but the loss detached: the joint program differentiates
    the loss only."""

    def __init__(self, graph: TrainingGraph):
        super().__init__()
        self.g = graph

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.g(*args)
        return (out[0], *(o.detach() for o in out[1:]))


class _Step(nn.Module):
    """Calls an exported program's graph module with the state tensors as inputs and the frozen tensors as
    buffers (which become the ONNX initializers); with ``accumulate`` returns accumulator + gradient."""

    def __init__(self, program: torch.export.ExportedProgram, graph_names: dict[str, str], state: list[str],
                 values: dict[str, torch.Tensor], n_user: int, accumulate: bool):
        super().__init__()
        from torch.export.graph_signature import InputKind, OutputKind

        self.gm = program.graph_module
        self.specs = program.graph_signature.input_specs
        self.outputs = program.graph_signature.output_specs
        self.state = state
        self.graph_names = graph_names
        self.n_user = n_user
        self.accumulate = accumulate
        self.frozen: dict[str, str] = {}  # graph name -> buffer name
        self.consts = dict(program.constants)
        self.input_kinds = InputKind
        self.output_kinds = OutputKind
        for spec in self.specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                name = graph_names[spec.target]
                if name not in state and name not in self.frozen:
                    buffer = f"frozen_{len(self.frozen)}"
                    self.register_buffer(buffer, values[name].detach())  # the model's memory, not a copy
                    self.frozen[name] = buffer

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kinds = self.input_kinds
        user = iter(flat[: self.n_user])
        state = dict(zip(self.state, flat[self.n_user: self.n_user + len(self.state)]))
        args = []
        for spec in self.specs:
            if spec.kind == kinds.USER_INPUT:
                args.append(next(user))
            elif spec.kind in (kinds.PARAMETER, kinds.BUFFER):
                name = self.graph_names[spec.target]
                args.append(state[name] if name in state else getattr(self, self.frozen[name]))
            else:
                args.append(self.consts[spec.target])
        outs = self.gm(*args)
        kinds_out = self.output_kinds
        user_outs = [o for s, o in zip(self.outputs, outs) if s.kind in (kinds_out.LOSS_OUTPUT, kinds_out.USER_OUTPUT)]
        if not self.accumulate:
            return tuple(user_outs)
        grads = {self.graph_names[s.target]: o for s, o in zip(self.outputs, outs)
                 if s.kind == kinds_out.GRADIENT_TO_PARAMETER}  # one each: generate() refuses tied trainables
        accumulators = flat[self.n_user + len(self.state):]
        trainable = self.state[: len(accumulators)]
        return (*user_outs, *(acc + grads[name] for acc, name in zip(accumulators, trainable)))


def generate(source: ModelSource, adapted: AdaptedModel, config: ExportConfig, out_dir: Path) -> dict | None:
    """Write the portable engine's graphs, frozen weights and initial parameters into ``out_dir``; with gradient
    checkpointing the segmented graphs instead of the gradient and eval graphs (returns the manifest's ``segmented``
    entry then, None otherwise)."""
    if config.gradient_checkpointing:
        from edgeft.export import segmented

        # base_bits applies to the layers' weights only: the embeddings and output layer stay fp32, as each head
        # call reads the output layer whole (a dequantised copy would be as large, and slow to make every call)
        with _quiet_exporter(), _SharedWeights(out_dir) as shared:
            entry = segmented.generate(source, adapted, config, out_dir, shared)
        _write_optimizer(adapted, config, out_dir)
        return entry
    l2 = config.optimizer.weight_decay if config.optimizer.name == "sgd" else 0.0
    features = source.pooling is not None
    graph = TrainingGraph(adapted.model, source.input_names, config.loss, l2, source.prepare_inputs,
                          config.proximal_mu, adapted.trainable, features, (source.pooling or {}).get("module"),
                          config.dpo_beta).eval()
    wrapper = _DetachedOutputs(graph)
    labels = example_labels(config.loss, source, config.num_outputs)
    user_args = tuple(source.example_inputs[n] for n in source.input_names) + (labels,)
    axes = {**source.dynamic_axes, "labels": label_axes(config.loss)}
    user_names = [*source.input_names, "labels"]
    user_shapes = tuple({i: torch.export.Dim.DYNAMIC for i in axes.get(n, {})} or None for n in user_names)
    anchors = [ANCHOR_PREFIX + n for n in graph.proximal_names]
    state = [*adapted.trainable, *anchors]
    values = {n: p for n, p in adapted.model.named_parameters()}
    values.update({n: b for n, b in adapted.model.named_buffers()})
    values.update(dict(zip(anchors, graph.anchors)))
    aliases = _aliases(adapted.model)
    tied = [(a, n) for a, n in aliases.items() if n in adapted.trainable]
    if tied:
        raise ExportError(f"the portable engine cannot train tied weights: trainable parameter {tied[0][1]} is "
                          f"also {tied[0][0]} (torch.export's backward pass gives a shared parameter no gradient); "
                          "freeze it (LoRA or a head adapter) or export with engine='ort-training'")
    outputs = ["loss", "logits", *(["features"] if features else [])]
    # Each graph's frozen weights go to the shared file as soon as it is made: a model over 2 GB (ONNX's protobuf
    # limit) exports, and the coordinator holds the model's weights and one graph's copy of them at a time.
    with warnings.catch_warnings(), _quiet_exporter(), _SharedWeights(out_dir, config.base_bits) as shared:
        warnings.simplefilter("ignore")
        forward = export_step(lambda: torch.export.export(wrapper, user_args, dynamic_shapes=(user_shapes,),
                                                      strict=False), "torch.export")
        graph_names = {**{f"g.model.{n}": n for n in values}, **{f"g.model.{a}": n for a, n in aliases.items()},
                       **{f"g.anchors.{i}": a for i, a in enumerate(anchors)}}
        from torch.export.experimental import _export_forward_backward

        # the backward pass rewrites the program it is given: a copy of it, sharing its weights (not copying them)
        weights = {id(t): t for t in [*forward.state_dict.values(), *forward.constants.values()]
                   if isinstance(t, torch.Tensor)}
        joint = export_step(lambda: _export_forward_backward(copy.deepcopy(forward, weights), 0), "the backward pass")
        translatable(joint.graph_module)
        trainable_values = tuple(values[n].detach().clone() for n in adapted.trainable)
        state_values = tuple(values[n].detach().clone() for n in state)
        zeros = tuple(torch.zeros_like(v) for v in trainable_values)
        shared.save(to_onnx(_Step(joint, graph_names, state, values, len(user_names), accumulate=True),
                             user_args + state_values + zeros, user_shapes, config.onnx_opset,
                             [*user_names, *state, *(GRAD_PREFIX + n for n in adapted.trainable)],
                             [*outputs, *(GRAD_PREFIX + n + OUT_SUFFIX for n in adapted.trainable)]), GRADIENT_MODEL)
        del joint
        shared.save(to_onnx(_Step(forward, graph_names, state, values, len(user_names), accumulate=False),
                             user_args + state_values, user_shapes, config.onnx_opset, [*user_names, *state], outputs),
                    EVAL_MODEL)
    _write_optimizer(adapted, config, out_dir)
    return None


def _write_optimizer(adapted: AdaptedModel, config: ExportConfig, out_dir: Path) -> None:
    """The optimizer graph and the initial trainable parameters."""
    from safetensors.numpy import save_file

    values = dict(adapted.model.named_parameters())
    trainable_values = [values[n].detach() for n in adapted.trainable]
    onnx.save(optimizer_model(adapted.trainable, [tuple(v.shape) for v in trainable_values], config.optimizer,
                              config.onnx_opset), str(out_dir / OPTIMIZER_MODEL))
    save_file({n: v.numpy().astype(np.float32) for n, v in zip(adapted.trainable, trainable_values)},
              str(out_dir / PARAMETERS))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Within: torch.onnx does not log "torchvision is not installed. Skipping torchvision::nms", four lines a graph."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registration.setLevel(level)


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied tensors (GPT-2's lm_head.weight is its token embedding): every further name of a parameter or
    buffer -> the name ``named_parameters``/``named_buffers`` keep for it. torch.export lists each name."""
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


class _SharedWeights:
    """FROZEN_WEIGHTS being written. ``save(model, name)`` moves every initializer of ``model`` of SHARED_MIN_BYTES or
    more into it, as ONNX external data (after quantising the frozen weights to ``bits``, when given), and saves the
    graph as ``name``: a tensor that several graphs hold (the same weight, or the same constant-folded transpose of
    it, under any name) is stored once and each graph points at the same bytes."""

    def __init__(self, out_dir: Path, bits: int | None = None):
        self.out_dir, self.bits = out_dir, bits
        self.placed: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> _SharedWeights:
        self.fh = open(self.out_dir / FROZEN_WEIGHTS, "wb")  # noqa: SIM115
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def save(self, model: onnx.ModelProto, name: str) -> None:
        import hashlib

        if self.bits:
            from edgeft.export.lowbit import quantise_frozen

            quantise_frozen({name: model}, self.bits)
        fh = self.fh
        for tensor in model.graph.initializer:
            # int4 tensors keep their packed bytes (two values a byte); numpy would unpack them
            data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(data) < SHARED_MIN_BYTES:
                continue
            digest = hashlib.sha256(f"{tensor.data_type}:{list(tensor.dims)}:".encode())
            digest.update(data)  # not hashed as header + data: that would be another copy of a large tensor
            key = digest.hexdigest()
            if key not in self.placed:
                offset = -fh.tell() % ALIGNMENT + fh.tell()
                fh.seek(offset)
                fh.write(data)
                self.placed[key] = (offset, len(data))
            offset, length = self.placed[key]
            del data
            for field in ("raw_data", "float_data", "int64_data", "int32_data", "double_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for k, value in (("location", FROZEN_WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, value
        onnx.save(model, str(self.out_dir / name))
