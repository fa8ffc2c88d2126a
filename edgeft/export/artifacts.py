"""The offline half of ONNX Runtime training: turn a (loss, logits) graph into training artifacts.

One of the two modules that touch ``onnxruntime.training`` (the other is ``edgeft.train.session``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from edgeft.bundle import OPTIMIZER_MODEL
from edgeft.config import OptimizerConfig
from edgeft.errors import ExportError


# An ort-training bundle holds every weight twice over in formats that stop at 2 GiB: the exported graph is one
# protobuf message (ONNX) and ORT's checkpoint one flatbuffer. Weights within GRAPH_ROOM of the limit already fail.
ARTIFACT_LIMIT = 2**31
GRAPH_ROOM = 2**26


def refuse_oversized(model: object) -> None:
    """``ExportError`` before any work when ``model``'s (a torch module's) parameters and buffers, stored as fp32,
    are too large for ONNX Runtime training artifacts; the portable engine keeps frozen weights in ONNX external data
    and exports such models."""
    tensors = [*model.parameters(), *model.buffers()]  # type: ignore[attr-defined]  # each shared tensor once
    size = sum(4 * t.numel() for t in tensors)
    if size > ARTIFACT_LIMIT - GRAPH_ROOM:
        raise ExportError(f"this model's weights are {size / 2**30:.2f} GiB in fp32; the ort-training engine cannot "
                          f"export over {(ARTIFACT_LIMIT - GRAPH_ROOM) / 2**30:.2f} GiB (its graph is one ONNX "
                          "protobuf and its checkpoint one flatbuffer, both limited to 2 GiB): export with "
                          "engine='portable' (--engine portable), which keeps the frozen weights in ONNX external data")


def generate(graph_path: Path, trainable: list[str], optimizer: OptimizerConfig, out_dir: Path) -> None:
    """Write training, eval and optimizer models plus the checkpoint for ``trainable`` into ``out_dir``."""
    from onnxruntime.training import artifacts
    from onnxruntime.training.onnxblock import optim

    model = onnx.load(str(graph_path))
    trainable_set = set(trainable)
    refuse_untrainable_operators(model, trainable_set)
    frozen = [i.name for i in model.graph.initializer if i.name not in trainable_set]
    if optimizer.name == "adamw":
        opt = optim.AdamW(betas=tuple(optimizer.betas), eps=optimizer.eps, weight_decay=optimizer.weight_decay)
    else:
        opt = optim.SGD()
    try:
        with _native_stderr_silenced():
            artifacts.generate_artifacts(model, requires_grad=list(trainable), frozen_params=frozen, loss=None,
                                         optimizer=opt, artifact_directory=str(out_dir))
        if optimizer.name == "adamw":
            _use_pytorch_adamw(out_dir / OPTIMIZER_MODEL)
    except Exception as exc:  # ORT raises RuntimeError / Fail with the C++ message
        message = str(exc)
        raise ExportError(
            "ONNX Runtime's gradient builder cannot differentiate this graph"
            f"{_culprit(message, model)}: {message.strip().splitlines()[0][:500]}. Use opset 14-16, avoid "
            "operators without gradients in the trainable path, or train fewer modules") from exc


# Operators on the gradient path that onnxruntime-training 1.19.2 cannot differentiate without failing badly: it
# kills the process (SIGFPE in AveragePoolGrad) or never returns (ConvGrad of a convolution padded with auto_pad).
UNTRAINABLE = {"AveragePool": "its gradient (AveragePoolGrad) crashes onnxruntime-training 1.19.2; use a global "
                              "average pool (AdaptiveAvgPool2d(1) or a mean over the spatial axes)",
               "Conv": "ConvGrad of a convolution padded with auto_pad (padding='same') never returns in "
                       "onnxruntime-training 1.19.2; give numeric padding"}


def refuse_untrainable_operators(model: onnx.ModelProto, trainable: set[str]) -> None:
    """``ExportError`` naming the operator and node when a gradient would flow through an operator of
    ``UNTRAINABLE`` (its input depends on a trainable parameter); the portable engine trains such models."""
    needs_grad = set(trainable)
    for node in model.graph.node:  # topological order: what a trainable parameter reaches needs gradients
        if any(i in needs_grad for i in node.input):
            bad = node.op_type == "AveragePool" or (node.op_type == "Conv" and any(
                a.name == "auto_pad" and a.s not in (b"", b"NOTSET", b"VALID") for a in node.attribute))
            if bad:
                raise ExportError(f"the ort-training engine cannot train through operator {node.op_type} (node "
                                  f"{node.name or node.output[0]}): {UNTRAINABLE[node.op_type]}; or export with "
                                  "engine='portable', or freeze the layers before it")
            needs_grad.update(node.output)


def _use_pytorch_adamw(path: Path) -> None:
    """Switch ORT's AdamW node to PyTorch's semantics (adam_mode 0).

    onnxblock hard-codes adam_mode 1 (the old transformers AdamW: eps added before bias correction,
    decay after the step). That changes the step of coordinates with small gradients, such as LoRA
    matrices early in training, so results drifted from the PyTorch + PEFT recipe users compare with.
    """
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attribute in node.attribute:
                if attribute.name == "adam_mode":
                    attribute.i = 0
    onnx.save(model, str(path))


def _culprit(message: str, model: onnx.ModelProto) -> str:
    """The operator type named in a gradient-builder error message, if any."""
    for node in model.graph.node:
        if node.name and node.name in message:
            return f" (operator {node.op_type}, node {node.name})"
    ops = {n.op_type for n in model.graph.node}
    named = [op for op in sorted(ops) if f"'{op}'" in message or f" {op} " in message or f"{op}Grad" in message]
    return f" (operator {named[0]})" if named else ""


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Drop what native code writes to stderr: ORT's gradient builder logs every graph pass at INFO level
    whatever the configured severity. Errors still surface as Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
