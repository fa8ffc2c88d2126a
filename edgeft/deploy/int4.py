"""Weight-only int4: MatMul weights packed blockwise for ONNX Runtime's com.microsoft MatMulNBits kernel.

The training build of ORT lacks the 4-bit quantiser's binding, so the packing is done here: for a MatMul
weight W [K, N], each column's K values are cut into blocks of ``block`` values with one fp32 scale each
(max |w| / 7); values become q = round(w / scale) + 8 in [0, 15] (the kernel's default zero point 8),
stored two per byte, low nibble first, as uint8 [N, K / block, block / 2].
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


def quantise_matmuls(model: onnx.ModelProto, block: int = BLOCK) -> int:
    """Replace every MatMul whose weight is a [K, N] initializer (K divisible by ``block``) with
    MatMulNBits; returns how many were replaced."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
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
    unused = [i for i in graph.initializer if uses.get(i.name, 1) == 0]
    for init in unused:
        graph.initializer.remove(init)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced
