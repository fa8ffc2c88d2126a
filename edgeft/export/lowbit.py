"""A frozen base in fewer bits: the portable engine's graphs with their frozen weight matrices stored as int8 or int4
and dequantised inside the graph, so that a device holds a quarter (int8) or an eighth (int4) of their fp32 bytes
while it trains. Only the trainable parameters (LoRA, heads) stay float.

Every frozen 2-D float initializer of at least ``MIN_ELEMENTS`` values (linear weights, their folded transposes,
embedding tables) becomes ``DequantizeLinear(q, scale)``, standard ONNX:

- int8: symmetric, one scale per row (``axis=0``; a linear weight's output channel), opset 13 and later;
- int4: symmetric, one scale per block of ``BLOCK`` values along each row (``axis=1, block_size``), opset 21
  (the graphs' opset is raised to 21); rows whose length is not a multiple of ``BLOCK`` stay int8.

Each consumer gets its own DequantizeLinear node, so a dequantised fp32 copy lives only from that node to its
consumer, not from the forward pass to the backward pass. ONNX Runtime's transpose optimizer mishandles a blocked
(int4) scale when it pushes a Transpose through DequantizeLinear (it inserts a QuantizeLinear whose scale does not
fit): the portable engine runs int4 bundles with that optimizer off and basic graph optimisations only. The backward pass needs gradients with respect to
activations only, which flow through the dequantised weights as through fp32 ones.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BASE_BITS = (8, 4)
BLOCK = 32
MIN_ELEMENTS = 1 << 14
QUADS = "int4.quads"  # dequantised_inputs' table: a uint16 word's four signed nibbles
INT4_OPSET = 21


def quantise_frozen(models: dict[str, onnx.ModelProto], bits: int, min_elements: int = MIN_ELEMENTS) -> dict:
    """Rewrite ``models`` in place (every graph the same way: one weight's quantised values are the same tensors in
    each); returns {"tensors", "fp32_bytes", "stored_bytes"} over the distinct weights quantised."""
    if bits not in BASE_BITS:
        raise ValueError(f"bits must be one of {BASE_BITS}")
    done: dict[str, tuple[list[onnx.TensorProto], int, int, dict]] = {}
    for model in models.values():
        graph = model.graph
        targets = {t.name: t for t in graph.initializer
                   if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= min_elements}
        if not targets:
            continue
        for name, tensor in targets.items():
            if name not in done:
                done[name] = _quantise(name, numpy_helper.to_array(tensor), bits)
        nodes, count, used = [], 0, set()
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in targets:
                    tensors, _, _, attributes = done[name]
                    out = f"{name}.dequantised.{count}"
                    count += 1
                    nodes.append(helper.make_node("DequantizeLinear", [t.name for t in tensors], [out],
                                                  name=f"{out}.node", **attributes))
                    node.input[i] = out
                    used.add(name)
            nodes.append(node)
        kept = [t for t in graph.initializer if t.name not in targets]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for name in sorted(used):
            graph.initializer.extend(done[name][0])
        del graph.node[:]
        graph.node.extend(nodes)
        if bits == 4:
            for opset in model.opset_import:
                if opset.domain in ("", "ai.onnx") and opset.version < INT4_OPSET:
                    opset.version = INT4_OPSET
    return {"tensors": len(done), "fp32_bytes": sum(v[1] for v in done.values()),
            "stored_bytes": sum(v[2] for v in done.values())}


def quantise_array(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D weight as (values, scale), symmetric: int4 (when the rows split into blocks of ``BLOCK``) as uint8
    bytes holding two values each (row-major; the first in the low nibble) with one scale per block
    [rows, cols / BLOCK]; otherwise int8 [rows, cols] with one scale per row [rows]."""
    rows, cols = weight.shape
    w = weight.astype(np.float32)
    if bits == 4 and cols % BLOCK == 0:
        blocks = w.reshape(rows, cols // BLOCK, BLOCK)
        scale = np.abs(blocks).max(axis=-1) / 7.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(blocks / scale[..., None]), -8, 7).astype(np.int8).reshape(rows, cols)
        nibbles = (q.reshape(-1) & 0x0F).astype(np.uint8)
        return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).reshape(rows, cols // 2), scale
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


def int4_words(q: np.ndarray) -> np.ndarray:
    """``quantise_array``'s int4 bytes [rows, cols / 2] as the uint16 words [rows, cols / 4] the layer graphs of
    ``dequantised_inputs`` read (the same bytes, little-endian)."""
    return np.ascontiguousarray(q, dtype=np.uint8).view("<u2")


def _quantise(name: str, weight: np.ndarray, bits: int) -> tuple[list[onnx.TensorProto], int, int, dict]:
    """(the quantised value and scale initializers, fp32 bytes, stored bytes, DequantizeLinear attributes)."""
    rows, cols = weight.shape
    w = weight.astype(np.float32)
    q, scale = quantise_array(w, bits)
    if q.dtype == np.uint8:
        values = helper.make_tensor(f"{name}.int4", TensorProto.INT4, [rows, cols], q.tobytes(), raw=True)
        zero = helper.make_tensor(f"{name}.zero", TensorProto.INT4, list(scale.shape),
                                  bytes((scale.size + 1) // 2), raw=True)
        attributes = {"axis": 1, "block_size": BLOCK}
    else:
        values = numpy_helper.from_array(q, f"{name}.int8")
        zero = numpy_helper.from_array(np.zeros(rows, dtype=np.int8), f"{name}.zero")
        attributes = {"axis": 0}
    scales = numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale")
    stored = len(values.raw_data) + scale.size * 4
    # an explicit zero point (0) fixes the signed type: ONNX Runtime's QDQ rewrites (a DequantizeLinear moved across
    # a Transpose gets a QuantizeLinear) would otherwise assume uint8
    return [values, scales, zero], w.nbytes, stored, attributes


def dequantised_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, int]], bits: int) -> dict[str, str]:
    """Rewrite ``model`` in place so that each float graph input named in ``shapes`` (2-D weights fed at run time, as
    the segmented step's layer graphs take them) is fed quantised (``quantise_array``) as two inputs,
    ``<name>.q`` (int4: as ``int4_words``) and ``<name>.scale``, and dequantised at the top of the graph with
    standard operators only (int4 unpacked by a table lookup: ONNX Runtime's Python API cannot feed an int4
    tensor); returns each name's storage kind ("int4" or "int8")."""
    graph = model.graph
    kinds, nodes, inputs = {}, [], []
    for value in graph.input:
        if value.name not in shapes:
            inputs.append(value)
            continue
        name, (rows, cols) = value.name, shapes[value.name]
        int4 = bits == 4 and cols % BLOCK == 0
        kinds[name] = "int4" if int4 else "int8"
        scale_shape = [rows, cols // BLOCK] if int4 else [rows]
        inputs += [helper.make_tensor_value_info(f"{name}.q", TensorProto.UINT16 if int4 else TensorProto.INT8,
                                                 [rows, cols // 4] if int4 else [rows, cols]),
                   helper.make_tensor_value_info(f"{name}.scale", TensorProto.FLOAT, scale_shape)]
        nodes += _dequantise_nodes(graph, name, rows, cols, int4)
    del graph.input[:]
    graph.input.extend(inputs)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    return kinds


def _dequantise_nodes(graph: onnx.GraphProto, name: str, rows: int, cols: int, int4: bool) -> list[onnx.NodeProto]:
    """Nodes computing float ``name`` [rows, cols] from ``name.q`` and ``name.scale`` (``quantise_array``'s)."""
    def const(suffix: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, f"{name}.{suffix}"))
        return f"{name}.{suffix}"

    def node(op: str, inputs: list[str], suffix: str, **attributes: object) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{name}.{suffix}"], name=f"{name}.{suffix}.node", **attributes)

    if not int4:  # int8 [rows, cols] * scale [rows, 1]
        axes = const("axes", np.array([1], dtype=np.int64))
        return [node("Cast", [f"{name}.q"], "float", to=TensorProto.FLOAT),
                node("Unsqueeze", [f"{name}.scale", axes], "scale2"),
                helper.make_node("Mul", [f"{name}.float", f"{name}.scale2"], [name], name=f"{name}.node")]
    # each byte holds two signed nibbles, the first low; fed as uint16 words (``int4_words``: four nibbles, the first
    # byte's low one first), one Gather from a table of the 65,536 words' values (one table a graph, 1 MB) unpacks
    # four at a time: half the lookups of a byte-pair table, which was a fifth of a layer's time at Qwen2.5's widths
    if not any(t.name == QUADS for t in graph.initializer):
        words = np.arange(1 << 16)[:, None] >> np.array([0, 4, 8, 12]) & 15
        graph.initializer.append(numpy_helper.from_array(np.where(words > 7, words - 16, words).astype(np.float32),
                                                         QUADS))
    return [node("Cast", [f"{name}.q"], "index", to=TensorProto.INT32),
            node("Gather", [QUADS, f"{name}.index"], "values"),
            node("Reshape", [f"{name}.values", const("blocks", np.array([rows, cols // BLOCK, BLOCK], np.int64))],
                 "blocked"),
            node("Unsqueeze", [f"{name}.scale", const("last", np.array([-1], dtype=np.int64))], "scale3"),
            node("Mul", [f"{name}.blocked", f"{name}.scale3"], "scaled"),
            helper.make_node("Reshape", [f"{name}.scaled", const("shape", np.array([rows, cols], np.int64))], [name],
                             name=f"{name}.node")]
