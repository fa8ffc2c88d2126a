"""Weight-only int4: MatMul weights packed blockwise for ONNX Runtime's com.microsoft MatMulNBits kernel.

The training build of ORT lacks the 4-bit quantiser's binding, so the packing is done here: for a MatMul
weight W [K, N], each column's K values are cut into blocks of ``block`` values with one fp32 scale each
(max |w| / 7); values become q = round(w / scale) + 8 in [0, 15] (the kernel's default zero point 8),
stored two per byte, low nibble first, as uint8 [N, K / block, block / 2].

Embedding tables (Gather over a [V, D] initializer) are packed the same way along D, row by row, with fp16
scales: the graph gathers the packed rows and their scales first and unpacks only those (a few standard
ops: BitShift, Cast, Mul, Sub, Concat, Reshape, all opset 11+), so the full table is never expanded.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32


def pack_int4(weight: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [N, K/block, block/2], scales fp32 [N * K/block]) for a float weight [K, N]."""
    k, n = weight.shape
    blocks = weight.astype(np.float32).T.reshape(n, k // block, block)
    scales = np.abs(blocks).max(axis=-1) / 7.0
    scales[scales == 0] = 1.0
    q = np.clip(np.round(blocks / scales[..., None]) + 8, 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scales.reshape(-1).astype(np.float32)


def unpack_int4(packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int = BLOCK) -> np.ndarray:
    """The float weight [K, N] the kernel computes with (the reference for tests)."""
    q = np.empty(packed.shape[:-1] + (block,), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    values = (q - 8) * scales.reshape(n, k // block, 1)
    return values.reshape(n, k).T


def _consumers(graph: onnx.GraphProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for out in graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    return uses


def _drop_unused(model: onnx.ModelProto, uses: dict[str, int]) -> None:
    for init in [i for i in model.graph.initializer if uses.get(i.name, 1) == 0]:
        model.graph.initializer.remove(init)


def quantise_gathers(model: onnx.ModelProto, block: int = BLOCK) -> int:
    """Replace every row lookup (Gather, axis 0) in a float [V, D] initializer (D divisible by ``block``)
    with a lookup in its int4 packing followed by unpacking of the gathered rows; returns how many."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = _consumers(graph)
    replaced, nodes = 0, []
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0]) if node.op_type == "Gather" and axis == 0 else None
        if (table is None or len(table.dims) != 2 or table.dims[1] % block
                or table.data_type != onnx.TensorProto.FLOAT):
            nodes.append(node)
            continue
        d = table.dims[1]
        packed, scales = pack_int4(numpy_helper.to_array(table).T, block)  # [V, D/block, block/2], [V * D/block]
        base = f"{node.name or node.output[0]}_int4"
        graph.initializer.extend([
            numpy_helper.from_array(packed.reshape(table.dims[0], d // 2), f"{base}_table"),
            numpy_helper.from_array(scales.reshape(table.dims[0], d // block).astype(np.float16), f"{base}_scales"),
            numpy_helper.from_array(np.array([4], dtype=np.uint8), f"{base}_four"),
            numpy_helper.from_array(np.array(16.0, dtype=np.float32), f"{base}_sixteen"),
            numpy_helper.from_array(np.array(8.0, dtype=np.float32), f"{base}_eight"),
            numpy_helper.from_array(np.array([d // block, block], dtype=np.int64), f"{base}_blocks"),
            numpy_helper.from_array(np.array([d], dtype=np.int64), f"{base}_width"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), f"{base}_zero"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{base}_last"),
        ])
        t = lambda suffix: f"{base}_{suffix}"  # noqa: E731
        ids = node.input[1]
        nodes += [
            helper.make_node("Gather", [t("table"), ids], [t("rows")], axis=0),  # uint8 [..., D/2]
            helper.make_node("Gather", [t("scales"), ids], [t("rows_scales16")], axis=0),  # fp16 [..., D/block]
            helper.make_node("Cast", [t("rows_scales16")], [t("rows_scales")], to=onnx.TensorProto.FLOAT),
            helper.make_node("BitShift", [t("rows"), t("four")], [t("high8")], direction="RIGHT"),
            helper.make_node("Cast", [t("high8")], [t("high")], to=onnx.TensorProto.FLOAT),
            helper.make_node("Cast", [t("rows")], [t("byte")], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [t("high"), t("sixteen")], [t("high16")]),
            helper.make_node("Sub", [t("byte"), t("high16")], [t("low")]),
            helper.make_node("Unsqueeze", [t("low"), t("last")], [t("low1")]),
            helper.make_node("Unsqueeze", [t("high"), t("last")], [t("high1")]),
            helper.make_node("Concat", [t("low1"), t("high1")], [t("pairs")], axis=-1),  # [..., D/2, 2]
            helper.make_node("Sub", [t("pairs"), t("eight")], [t("centred")]),
            helper.make_node("Shape", [t("rows")], [t("rows_shape")]),
            helper.make_node("Slice", [t("rows_shape"), t("zero"), t("last")], [t("lead")]),
            helper.make_node("Concat", [t("lead"), t("blocks")], [t("blocked_shape")], axis=0),
            helper.make_node("Reshape", [t("centred"), t("blocked_shape")], [t("blocked")]),  # [..., D/block, block]
            helper.make_node("Unsqueeze", [t("rows_scales"), t("last")], [t("scales1")]),
            helper.make_node("Mul", [t("blocked"), t("scales1")], [t("values")]),
            helper.make_node("Concat", [t("lead"), t("width")], [t("out_shape")], axis=0),
            helper.make_node("Reshape", [t("values"), t("out_shape")], list(node.output), name=base),
        ]
        uses[table.name] -= 1
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(model, uses)
    return replaced


def quantise_matmuls(model: onnx.ModelProto, block: int = BLOCK) -> int:
    """Replace every MatMul whose weight is a [K, N] initializer (K divisible by ``block``) with
    MatMulNBits; returns how many were replaced."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = _consumers(graph)
    replaced, nodes = 0, []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.dims[0] % block or weight.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        k, n = weight.dims
        packed, scales = pack_int4(numpy_helper.to_array(weight), block)
        base = f"{node.name or node.output[0]}_int4"
        graph.initializer.extend([numpy_helper.from_array(packed, f"{base}_weight"),
                                  numpy_helper.from_array(scales, f"{base}_scales")])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{base}_weight", f"{base}_scales"],
                                      list(node.output), name=base, domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=block))
        uses[weight.name] -= 1
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(model, uses)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced
