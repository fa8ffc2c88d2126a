"""Gradient checkpointing for decoders on the portable engine: the training step as one small graph per part of
the model instead of one graph for the whole step, so that between the forward and the backward pass a device
keeps each decoder layer's input only (a [batch, sequence, hidden] tensor per layer) and recomputes the rest of a
layer while differentiating it, as PyTorch's ``gradient_checkpointing_enable()`` does.

``ExportConfig.gradient_checkpointing`` (``edgeft export --gradient-checkpointing``) writes, beside the portable
engine's optimizer graph and initial parameters:

- ``segmented_prologue.onnx``: (input_ids, attention_mask) -> the token embeddings ``hidden``, the additive
  attention ``mask`` (segment ids, as packing needs: ``causal_lm_inputs``), the rotary ``cos`` and ``sin``;
- ``segmented_layer.onnx``: one decoder layer, (hidden, mask, cos, sin, the layer's weights) -> ``hidden.out``;
  the weights are graph inputs, so one graph serves every layer;
- ``segmented_layer_grad.onnx``: the same layer recomputed and differentiated: (hidden, mask, cos, sin,
  ``grad.hidden.out``, weights) -> ``grad.hidden`` and the gradients ``grad.<local name>`` of its trainable weights;
- ``segmented_head.onnx`` / ``segmented_head_grad.onnx``: the final norm, the output layer and the next-token loss
  of some rows, (hidden, labels) -> ``loss_sum`` and ``count`` (the labelled tokens), and ``grad.hidden`` (of the
  summed loss): the device runs them a row at a time, so vocabulary-sized logits exist for one row only;
- with ``keep_projections`` (selective checkpointing) the layer graph also outputs ``kept.<i>``, the outputs of
  the layer's input projections (q, k, v, gate, up; Phi-3's fused qkv and gate_up), and the layer-gradient graph
  takes them as inputs instead of recomputing those products (``_fed_kept`` turns marks in its traced graph into
  inputs): it recomputes the attention scores and elementwise operations only;
- ``segmented_layers.safetensors``: every layer's frozen weights, ``<layer>.<local name>``; with ``base_bits``
  the 2-D ones as ``<layer>.<local name>.q`` (int4: uint16 words, ``int4_words``) and ``.scale``
  (``edgeft.export.lowbit.quantise_array``), which the layer graphs dequantise (``dequantised_inputs``).

The prologue's and the head's frozen weights (embeddings, final norm, output layer) live in ``portable_frozen.bin``
as the portable engine's do, in fp32 whatever ``base_bits`` says: each head call reads the output layer whole, and a
copy dequantised at every call would be as large as the fp32 table and slow to make (measured at Qwen2.5-0.5B's
shape: the int4 table made the head 2.5x slower for no lower peak). The device side is ``edgeft.train.segmented``. The layer graphs are traced with
``make_fx`` through ``torch.autograd.grad`` (core ATen), then exported and translated as the portable graphs are.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeft.bundle import (GRAD_PREFIX, KEPT_PREFIX, OUT_SUFFIX, SEGMENTED_HEAD, SEGMENTED_HEAD_GRAD, SEGMENTED_LAYER,
                           SEGMENTED_LAYER_GRAD, SEGMENTED_LAYERS, SEGMENTED_PROLOGUE)
from edgeft.config import ExportConfig
from edgeft.errors import ExportError
from edgeft.export.adapters import AdaptedModel
from edgeft.export.losses import IGNORE_INDEX
from edgeft.export.source import ModelSource, causal_lm_inputs
from edgeft.export.translate import export_step, to_onnx, translatable

# The decoder families whose layers take (hidden, attention_mask=, position_embeddings=(cos, sin)).
FAMILIES = ("llama", "qwen2", "phi3", "mistral", "smollm3", "qwen3")


class _Functional(nn.Module):
    """Calls a traced graph module (its frozen weights are constants in it, which become initializers)."""

    def __init__(self, fn: torch.fx.GraphModule):
        super().__init__()
        self.fn = fn
        self.frozen: dict[str, str] = {}

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fn(*args)


def decoder_parts(adapted: AdaptedModel, model_type: str | None) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the Hugging Face causal LM, the name of its layer list in the adapted model, the layer list), or an
    ExportError naming what gradient checkpointing cannot split."""
    if model_type not in FAMILIES:
        raise ExportError(f"gradient checkpointing splits decoders of the {', '.join(FAMILIES)} families; this model "
                          f"is {model_type!r}: export it without --gradient-checkpointing")
    model = adapted.model
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = [n for n, m in model.named_modules() if m is lm.model.layers]
    prefix = names[0]
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    outside = [n for n in adapted.trainable if not pattern.match(n)]
    if outside:
        raise ExportError(f"gradient checkpointing trains weights inside the decoder layers only; {outside[0]} is "
                          "outside them: leave it frozen (LoRA on the layers' projections) or export without "
                          "--gradient-checkpointing")
    return lm, prefix, lm.model.layers


def generate(source: ModelSource, adapted: AdaptedModel, config: ExportConfig, out_dir: Path,
             shared) -> dict:  # noqa: ANN001  (edgeft.export.portable._SharedWeights)
    """Write the segmented graphs and layer weights into ``out_dir`` (the prologue's and head's frozen weights
    through ``shared``); returns the manifest's ``segmented`` entry."""
    from safetensors.numpy import save_file

    from edgeft.export.lowbit import MIN_ELEMENTS, dequantised_inputs, int4_words, quantise_array

    lm, prefix, layers = decoder_parts(adapted, source.model_type)
    layer = layers[0]
    local = [n for n, _ in layer.named_parameters()]
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    for i, other in enumerate(layers):
        if [n for n, _ in other.named_parameters()] != local:
            raise ExportError(f"gradient checkpointing needs decoder layers of one structure; layer {i} differs")
    hidden = lm.config.hidden_size
    batch, seq = 2, 8
    ids = torch.ones(batch, seq, dtype=torch.long)
    prepared = causal_lm_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    h, g = torch.randn(batch, seq, hidden), torch.randn(batch, seq, hidden)
    cos, sin = lm.model.rotary_emb(h, prepared["position_ids"])
    mask = prepared["attention_mask"]
    weights = [p.detach() for p in layer.parameters()]
    dynamic = torch.export.Dim.DYNAMIC
    tokens = {0: dynamic, 1: dynamic}
    activations = (tokens, {0: dynamic, 2: dynamic, 3: dynamic}, tokens, tokens)

    def layer_out(state: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  params: list[torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(layer, dict(zip(local, params)), (state,),
                                         {"attention_mask": mask, "position_embeddings": (cos, sin)})
        return out[0] if isinstance(out, tuple) else out

    projections = _projections(layer) if config.keep_projections else []

    def forward(state, mask, cos, sin, *params):  # noqa: ANN001, ANN202
        kept: list[torch.Tensor] = []
        with _hooked(projections, lambda out: kept.append(out) or out):
            out = layer_out(state, mask, cos, sin, list(params))
        return (out, *kept) if kept else out

    def backward(state, mask, cos, sin, grad_out, *params):  # noqa: ANN001, ANN202
        params = [p.detach().requires_grad_(n in trainable) for n, p in zip(local, params)]
        state = state.detach().requires_grad_(True)
        with _hooked(projections, _kept):  # marked, to be fed from the forward pass (_fed_kept)
            out = layer_out(state, mask, cos, sin, params)
        grads = torch.autograd.grad(out, [state, *(p for n, p in zip(local, params) if n in trainable)], grad_out)
        return tuple(grads)

    def head(state: torch.Tensor, labels: torch.Tensor, with_grad: bool):  # noqa: ANN202
        state = state.detach().requires_grad_(with_grad)
        normed = lm.model.norm(state)
        # every position's logits (the last one's unlabelled): slicing them would copy a vocabulary-sized tensor
        logits = lm.lm_head(normed.detach()).float()
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
        keep = (targets != IGNORE_INDEX).unsqueeze(-1)
        index = targets.clamp(min=0).unsqueeze(-1)
        logp = torch.log_softmax(logits, -1)
        loss_sum = -(logp.gather(-1, index) * keep).sum()
        count = keep.sum()
        if not with_grad:
            return loss_sum, count
        # d loss_sum / d logits = keep * (softmax - one_hot(target)), written out: autograd's version of the slice
        # and the gather builds and scatters several vocabulary-sized zero tensors (40% of the head's time)
        grad_logits = (logp.exp() * keep).scatter_add(-1, index, -keep.to(logits.dtype))
        (grad,) = torch.autograd.grad(normed, [state], grad_logits @ lm.lm_head.weight)
        return loss_sum.detach(), count, grad

    def prologue(input_ids, attention_mask):  # noqa: ANN001, ANN202
        inputs = causal_lm_inputs({"input_ids": input_ids, "attention_mask": attention_mask})
        embeds = lm.model.embed_tokens(input_ids)
        cos, sin = lm.model.rotary_emb(embeds, inputs["position_ids"])
        return embeds, inputs["attention_mask"], cos, sin

    opset = config.onnx_opset
    grad_names = [GRAD_PREFIX + n for n in trainable]
    kept_values = list(forward(h, mask, cos, sin, *weights)[1:]) if projections else []
    kept_names = [f"{KEPT_PREFIX}{i}" for i in range(len(kept_values))]
    layer_grad = _traced(backward, (h, mask, cos, sin, g, *weights))
    if kept_names:
        _fed_kept(layer_grad, len(kept_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shared.save(to_onnx(_Functional(_traced(prologue, (ids, torch.ones_like(ids)))), (ids, torch.ones_like(ids)),
                            (tokens, tokens), opset, ["input_ids", "attention_mask"], ["hidden", "mask", "cos", "sin"]),
                    SEGMENTED_PROLOGUE)
        labels = torch.randint(0, 4, (batch, seq))
        vocab = lm.lm_head.weight.shape[0]
        shared.save(_untransposed(to_onnx(_Functional(_traced(lambda s, y: head(s, y, False), (h, labels))), (h, labels),
                                          (tokens, tokens), opset, ["hidden", "labels"], ["loss_sum", "count"]), vocab),
                    SEGMENTED_HEAD)
        shared.save(_untransposed(to_onnx(_Functional(_traced(lambda s, y: head(s, y, True), (h, labels))), (h, labels),
                                          (tokens, tokens), opset, ["hidden", "labels"],
                                          ["loss_sum", "count", GRAD_PREFIX + "hidden"]), vocab), SEGMENTED_HEAD_GRAD)
        graphs = {
            SEGMENTED_LAYER: to_onnx(_Functional(_traced(forward, (h, mask, cos, sin, *weights))),
                                     (h, mask, cos, sin, *weights), activations, opset,
                                     ["hidden", "mask", "cos", "sin", *local], ["hidden" + OUT_SUFFIX, *kept_names]),
            # the output gradient a tensor of its own: make_fx traces one tensor passed twice as one input
            SEGMENTED_LAYER_GRAD: to_onnx(_Functional(layer_grad), (h, mask, cos, sin, g, *weights, *kept_values),
                                          (*activations, tokens, *[{} for _ in weights], *[tokens for _ in kept_names]),
                                          opset, ["hidden", "mask", "cos", "sin",
                                                  GRAD_PREFIX + "hidden" + OUT_SUFFIX, *local, *kept_names],
                                          [GRAD_PREFIX + "hidden", *grad_names])}
    frozen = [n for n in local if n not in trainable]
    params = dict(layer.named_parameters())
    quantised = {n: tuple(params[n].shape) for n in frozen
                 if config.base_bits and params[n].dim() == 2 and params[n].numel() >= MIN_ELEMENTS}
    for name, graph in graphs.items():
        if quantised:
            dequantised_inputs(graph, quantised, config.base_bits)
        onnx.save(graph, str(out_dir / name))
    arrays: dict[str, np.ndarray] = {}
    for i, block in enumerate(layers):
        for name, value in block.named_parameters():
            if name in trainable:
                continue
            if name in quantised:
                q, scale = quantise_array(value.detach().numpy(), config.base_bits)
                arrays[f"{i}.{name}.q"] = int4_words(q) if q.dtype == np.uint8 else q
                arrays[f"{i}.{name}.scale"] = scale.astype(np.float32)
            else:
                arrays[f"{i}.{name}"] = value.detach().numpy().astype(np.float32)
    save_file(arrays, str(out_dir / SEGMENTED_LAYERS))
    return {"layers": len(layers), "prefix": prefix, "weights": local, "trainable": trainable,
            "quantised": sorted(quantised), "kept": kept_names}


@torch.library.custom_op("edgeft::kept", mutates_args=())
def _kept(value: torch.Tensor) -> torch.Tensor:
    """Identity that marks, in a traced layer-gradient graph, an activation the forward pass hands over."""
    return value.clone()


_kept.register_fake(lambda value: torch.empty_like(value))
_kept.register_autograd(lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None)


def _projections(layer: nn.Module) -> list[nn.Module]:
    """The layer's input projections, whose outputs its backward pass needs (q, k and v, gate and up; Phi-3's fused
    qkv and gate_up), outermost only (a LoRA wrapper, not the base layer inside it); not the output projections
    (o, down), whose outputs only join the residual stream."""
    linear = [(n, m) for n, m in layer.named_modules() if hasattr(m, "out_features")]
    outermost = [(n, m) for n, m in linear if not any(n.startswith(outer + ".") for outer, _ in linear)]
    return [m for n, m in outermost if n.rsplit(".", 1)[-1] not in ("o_proj", "down_proj")]


@contextmanager
def _hooked(modules: list[nn.Module], fn):  # noqa: ANN001, ANN202
    """``fn`` applied to each module's output while the block runs."""
    handles = [m.register_forward_hook(lambda _m, _args, out: fn(out)) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _fed_kept(module: torch.fx.GraphModule, count: int) -> None:
    """Turn the ``_kept`` marks of a traced layer-gradient graph into inputs appended to its signature, then drop
    what only computed them (the expansion matmuls): the backward pass reads them from the forward pass."""
    graph = module.graph
    marks = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.edgeft.kept.default]
    if len(marks) != count:
        raise ExportError(f"the layer's gradient graph marks {len(marks)} kept activations, its forward {count}")
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i, mark in enumerate(marks):
        with graph.inserting_after(last):
            last = graph.placeholder(f"{KEPT_PREFIX.rstrip('.')}_{i}")
        last.meta = dict(mark.meta)
        mark.replace_all_uses_with(last)
        graph.erase_node(mark)
    graph.eliminate_dead_code()
    module.recompile()


def _untransposed(model: onnx.ModelProto, vocab: int) -> onnx.ModelProto:
    """The output layer as the model stores it, [vocabulary, hidden], where tracing folded its transpose into a
    constant: the head's MatMul reads it through a Transpose that ONNX Runtime fuses into the product (no copy is
    made), the backward product reads it as it is, and the file holds the same bytes as the prologue's embedding
    table when the two are tied (stored once)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    for init in list(graph.initializer):
        if len(init.dims) == 2 and init.dims[1] == vocab and init.dims[0] != vocab:
            stored = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(init).T), init.name + ".t")
            graph.initializer.remove(init)
            graph.initializer.append(stored)
            graph.node.insert(0, helper.make_node("Transpose", [stored.name], [init.name], perm=[1, 0]))
    return model


def _traced(fn, args: tuple) -> torch.fx.GraphModule:  # noqa: ANN001
    """``fn`` traced into core ATen operators with symbolic shapes (``torch.autograd.grad`` inside it becomes
    the backward operators), in the spellings torch.onnx translates."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    module = export_step(lambda: make_fx(fn, decomposition_table=core_aten_decompositions(), tracing_mode="symbolic",
                                         _allow_non_fake_inputs=True)(*args), "tracing a decoder layer")
    translatable(module)
    return module

