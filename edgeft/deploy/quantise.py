"""Quantise a package's fp32 inference model (``--mode``) and freeze its input shapes.

What each mode does to which operators:

- ``int8``: dynamic quantisation (int8 weights per channel, activations quantised on the fly). It covers matrix
  products: MatMul, and Gemm (a Linear on 2-D inputs, rewritten as MatMul + Add first: ONNX Runtime's dynamic
  quantiser does not take Gemm), plus the text operators ONNX Runtime handles (Gather, Attention). Convolutions
  stay fp32: dynamic ConvInteger is slow on CPUs and no NPU takes it; ``int8-static`` is the mode for CNNs.
- ``int8-static``: QDQ (QuantizeLinear/DequantizeLinear pairs around each quantised operator, the format NPU
  execution providers take), int8 weights per channel, uint8 activations with ranges calibrated on real inputs.
  Text models quantise their MatMul/Gemm (7-bit weights); other models every operator the quantiser knows (Conv,
  Gemm, MatMul, pooling, ...; 8-bit weights), so that an NPU runs the whole graph in int8.
- ``int4``: weight-only MatMulNBits on MatMul weights (K divisible by 32; Gemm rewritten as MatMul first in
  models that do not read text) and 4-bit embedding tables. Refused for models with convolutions: ONNX Runtime has no 4-bit convolution.
- ``fp16``: weights and compute in fp16, fp32 inputs and outputs. ``none``: the fp32 model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from edgeft.errors import ConfigError

MODES = ("none", "fp16", "int8", "int8-static", "int4")
TEXT_STATIC_OPS = ["MatMul", "Gemm"]


class _Calibration:
    """Batches of real task inputs for static quantisation (onnxruntime's CalibrationDataReader protocol)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantise(fp32: Path, out: Path, mode: str, calibration: list[dict[str, np.ndarray]] | None = None,
             text: bool = True) -> None:
    """Write ``fp32`` quantised per ``mode`` to ``out``; ``int8-static`` calibrates on ``calibration``; ``text``:
    the model reads tokens (what ``int8-static`` quantises depends on it, see the module's docstring)."""
    logging.disable(logging.WARNING)  # onnxruntime.quantization advises pre-processing on every call
    try:
        _quantise(fp32, out, mode, calibration, text)
    finally:
        logging.disable(logging.NOTSET)


def convolutions(model) -> int:  # noqa: ANN001  (onnx.ModelProto)
    """How many convolution nodes the model's main graph has."""
    return sum(node.op_type in ("Conv", "ConvTranspose") for node in model.graph.node)


def _quantise(fp32: Path, out: Path, mode: str, calibration: list[dict[str, np.ndarray]] | None, text: bool) -> None:
    import onnx

    if mode == "int8-static":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if not calibration:
            raise ConfigError("mode int8-static needs calibration data: pass --calibration-data or --eval-data "
                              "(a sample of the task's data)")
        quantize_static(str(fp32), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        # reduce_range (text models): 7-bit weights, so the u8 x s8 products cannot saturate the
                        # 16-bit accumulators of CPUs without VNNI (the fused QLinearMatMul lost ~0.4 logits without
                        # it). Convolutional models keep 8 bits: 7-bit weights cost EfficientNet-Lite0 6 points of
                        # digits accuracy (93.6% fp32: 87.5% with 7 bits, 93.3% with 8; bench/vision.py)
                        per_channel=True, reduce_range=text, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=TEXT_STATIC_OPS if text else None)
        return
    if mode == "int4":
        from edgeft.deploy.int4 import quantise_gathers, quantise_matmuls

        model = onnx.load(str(fp32))
        if convolutions(model):
            raise ConfigError(f"mode int4 packs MatMul weights for ONNX Runtime's MatMulNBits; this model's "
                              f"{convolutions(model)} convolutions have no 4-bit kernel and would stay fp32: use "
                              "--mode int8-static (QDQ, calibrated) for convolutional models")
        if not text:
            gemm_to_matmul(model)
        packed = quantise_matmuls(model) + quantise_gathers(model)  # gathers: the embedding tables of text models
        if not packed:
            raise ConfigError("mode int4 found no weight it can pack: MatMulNBits needs MatMul/Gemm weights whose "
                              "input size is a multiple of 32; use --mode int8 or int8-static")
        onnx.save(model, str(out))
        return
    if mode == "none":
        shutil.copyfile(fp32, out)
    elif mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        model = onnx.load(str(fp32))
        rewritten = 0 if text else gemm_to_matmul(model)
        source = fp32
        if rewritten:
            source = fp32.with_name(fp32.stem + "-matmul.onnx")
            onnx.save(model, str(source))
        try:
            quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=[op for op in IntegerOpsRegistry if op != "Conv"])
        finally:
            if source != fp32:
                source.unlink()
    elif mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))


def gemm_to_matmul(model) -> int:  # noqa: ANN001  (onnx.ModelProto)
    """Rewrite each Gemm with a constant weight (alpha = beta = 1, A not transposed) as MatMul (+ Add of its bias),
    the weight stored [K, N]; returns how many. The result computes the same."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" else None
        if (weight is None or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
                or attrs.get("transA", 0) or weight.data_type != onnx.TensorProto.FLOAT):
            nodes.append(node)
            continue
        value = numpy_helper.to_array(weight)
        base = node.name or node.output[0]
        name = f"{base}_matmul_weight"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value.T if attrs.get("transB") else value),
                                                         name))
        uses[weight.name] -= 1
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{base}_product" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{base}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}_Add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    for init in [i for i in graph.initializer if uses.get(i.name, 1) == 0]:
        graph.initializer.remove(init)
    return rewritten


def fix_shapes(path: Path, shapes: dict[str, list[int]]) -> None:
    """Freeze each named input's shape (and so every shape) to ``shapes[name]``, with ONNX Runtime's own tool."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(path))
    for name, shape in shapes.items():
        make_input_shape_fixed(model.graph, name, shape)
    fix_output_shapes(model)
    onnx.save(model, str(path))
