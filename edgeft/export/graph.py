"""Export a model plus its loss into one ONNX graph that ONNX Runtime's gradient builder accepts.

Settings that work with ORT 1.19's gradient builder (DESIGN.md section 4): TorchScript exporter,
opset 14-16, TrainingMode.EVAL, no constant folding. The TorchScript exporter merges initializers with
identical contents (all-zero LoRA B matrices, or a fresh model's all-ones LayerNorm weights, would collapse
into one tensor behind Identity nodes), so every parameter is exported holding a unique random placeholder
and its true value is written back by name afterwards.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgeft.errors import ExportError
from edgeft.export.losses import LABEL_SPEC, LOSS_FUNCTIONS
from edgeft.export.source import ModelSource

PREFIX = "model."
# FedProx: the frozen copy of trainable parameter ``name`` that the proximal term pulls towards.
ANCHOR_PREFIX = "proximal_anchor."


def logits_of(output: object) -> torch.Tensor:
    """The logits in whatever a model's forward returns."""
    if hasattr(output, "logits"):
        return output.logits  # type: ignore[no-any-return]
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, torch.Tensor):
        return output
    raise ExportError(f"cannot find logits in the model output of type {type(output).__name__}")


class TrainingGraph(nn.Module):
    """model(**inputs) followed by the loss; returns (loss, logits), and the features the head reads as a
    third output with ``features`` (a SentenceClassifier's, whose forward returns (logits, features)).

    With ``l2 > 0`` the loss adds 0.5 * l2 * ||trainable||^2 (PyTorch SGD's weight_decay, which ORT's
    SGD optimizer lacks). With ``proximal_mu > 0`` it adds FedProx's 0.5 * mu * ||w - w_anchor||^2 over the
    ``trainable`` parameters, the anchors being frozen parameters (``proximal_anchor.<name>`` in the graph)
    that the device sets to the round's global adapter.
    """

    def __init__(self, model: nn.Module, input_names: list[str], loss: str, l2: float = 0.0,
                 prepare_inputs: Callable[[dict], dict] | None = None, proximal_mu: float = 0.0,
                 trainable: list[str] | None = None, features: bool = False, features_from: str | None = None,
                 dpo_beta: float = 0.1):
        super().__init__()
        self.features = features
        # a head module whose input is the ``features`` output (models that do not return them themselves)
        self._head_input: list[torch.Tensor] = []
        if features_from is not None:
            head_module(model, features_from).register_forward_pre_hook(
                lambda _module, args: self._head_input.append(args[0]))
        self.model = model
        self.input_names = list(input_names)
        self.loss_fn = partial(LOSS_FUNCTIONS[loss], beta=dpo_beta) if loss == "dpo" else LOSS_FUNCTIONS[loss]
        self.l2 = l2
        self.prepare_inputs = prepare_inputs
        self.proximal_mu = proximal_mu
        self.proximal_names = list(trainable or []) if proximal_mu else []
        params = dict(model.named_parameters())
        self.anchors = nn.ParameterList([nn.Parameter(params[n].detach().clone(), requires_grad=False)
                                         for n in self.proximal_names])

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, args[:-1]))
        if self.prepare_inputs is not None:
            inputs = self.prepare_inputs(inputs)
        output = self.model(**inputs)
        logits = logits_of(output)
        loss = self.loss_fn(logits, args[-1])
        if self.l2:
            penalty = sum((p * p).sum() for p in self.model.parameters() if p.requires_grad)
            loss = loss + 0.5 * self.l2 * penalty
        if self.proximal_names:
            params = dict(self.model.named_parameters())
            distance = [params[n] - anchor for n, anchor in zip(self.proximal_names, self.anchors)]
            loss = loss + 0.5 * self.proximal_mu * sum((d * d).sum() for d in distance)
        if not self.features:
            return loss, logits
        if self._head_input:
            return loss, logits, self._head_input.pop()
        return loss, logits, output[1]


def head_module(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` in ``model``, or the outermost one whose name ends with ``.name`` (the same head
    inside a PEFT wrapper)."""
    found = sorted((n for n, _ in model.named_modules() if n == name or n.endswith("." + name)), key=len)
    if not found:
        raise ExportError(f"the model has no module {name!r} to read the head's input from")
    return model.get_submodule(found[0])


def example_labels(loss: str, source: ModelSource, num_outputs: int) -> torch.Tensor:
    """Labels shaped and typed as ``loss`` expects for the source's example batch."""
    first = next(iter(source.example_inputs.values()))
    batch = first.shape[0]
    dtype, axes = LABEL_SPEC[loss]
    if loss == "cross-entropy":
        return torch.zeros(batch, dtype=torch.long)
    if loss == "causal-lm-cross-entropy":
        return torch.zeros(batch, first.shape[1], dtype=torch.long)
    if loss == "dpo":  # token labels, then the reference log-probability
        return torch.zeros(batch, first.shape[1] + 1, dtype=torch.float32)
    return torch.zeros(batch, num_outputs, dtype=torch.float32)


def label_axes(loss: str) -> dict[int, str]:
    return dict(enumerate(LABEL_SPEC[loss][1][:2])) if LABEL_SPEC[loss][1] != ["batch", "outputs"] else {0: "batch"}


def export_graph(model: nn.Module, source: ModelSource, trainable: list[str], loss: str, num_outputs: int,
                 path: Path, opset: int, l2: float = 0.0, seed: int = 0, proximal_mu: float = 0.0,
                 dpo_beta: float = 0.1) -> None:
    """Write the (loss, logits[, features]) graph of ``model`` to ``path``; trainable parameters keep their names
    (with ``proximal_mu``, their FedProx anchors are frozen parameters named ``proximal_anchor.<name>``)."""
    features = source.pooling is not None
    wrapper = TrainingGraph(model, source.input_names, loss, l2, source.prepare_inputs, proximal_mu, trainable,
                            features, (source.pooling or {}).get("module"), dpo_beta).eval()
    labels = example_labels(loss, source, num_outputs)
    args = tuple(source.example_inputs[n] for n in source.input_names) + (labels,)
    # every parameter by its name in the final graph: the model's, then the proximal anchors
    params = {**dict(model.named_parameters()),
              **{ANCHOR_PREFIX + n: a for n, a in zip(wrapper.proximal_names, wrapper.anchors)}}
    originals = {name: p.detach().clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, args, str(path), dynamo=False, opset_version=opset,
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False, export_params=True,
                input_names=[*source.input_names, "labels"],
                output_names=["loss", "logits", *(["features"] if features else [])],
                dynamic_axes={**source.dynamic_axes, "labels": label_axes(loss)})
    except ExportError:
        raise
    except Exception as exc:  # torch raises many types here; name the model and the cause
        raise ExportError(f"torch.onnx could not export the model: {type(exc).__name__}: {exc}") from exc
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
    graph = onnx.load(str(path))
    _strip_prefix(graph, {f"anchors.{i}": ANCHOR_PREFIX + n for i, n in enumerate(wrapper.proximal_names)})
    inits = {init.name: init for init in graph.graph.initializer}
    missing = [n for n in [*trainable, *(ANCHOR_PREFIX + n for n in wrapper.proximal_names)] if n not in inits]
    if missing:
        raise ExportError(f"trainable parameters missing from the exported graph (unused by forward?): {missing[:5]}")
    for name, value in originals.items():
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(value.cpu().numpy().astype(np.float32, copy=False), name))
    onnx.save(graph, str(path))


def _strip_prefix(model: onnx.ModelProto, extra: dict[str, str] | None = None) -> None:
    """Rename ``model.<name>`` tensors (the wrapper's prefix) to ``<name>`` everywhere in the graph, and
    the tensors named in ``extra`` to their new names."""
    graph = model.graph
    produced = [n for node in graph.node for n in node.output]
    renames = {n: n[len(PREFIX):] for n in [*(i.name for i in graph.initializer), *produced] if n.startswith(PREFIX)}
    renames.update(extra or {})
    rename_tensors(graph, renames)


def rename_tensors(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename tensors everywhere in ``graph`` (initializers, node inputs and outputs, graph inputs, outputs and
    value infos) by ``renames``. A tensor that already holds one of the new names (an intermediate value the
    exporter named ``mean`` beside a buffer called ``mean``) moves aside to a free name first."""
    taken = {n for node in graph.node for n in [*node.input, *node.output]} | {i.name for i in graph.initializer} | {
        v.name for v in [*graph.input, *graph.output]}
    clashes = {n for n in set(renames.values()) & taken if n not in renames}
    if clashes:
        free = {}
        for name in sorted(clashes):
            k = 1
            while f"{name}_{k}" in taken or f"{name}_{k}" in renames.values():
                k += 1
            free[name] = f"{name}_{k}"
        _rename(graph, free)
    _rename(graph, renames)


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                names[i] = renames.get(name, name)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renames.get(value.name, value.name)
