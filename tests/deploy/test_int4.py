"""int4 packing: the MatMulNBits kernel computes exactly with the weights our packing describes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeft.deploy.int4 import pack_int4, quantise_gathers, quantise_matmuls, unpack_int4


def test_packing_round_trip_error_is_bounded():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(128, 40)).astype(np.float32)
    packed, scales = pack_int4(weight)
    assert packed.shape == (40, 4, 16) and packed.dtype == np.uint8 and scales.shape == (160,)
    restored = unpack_int4(packed, scales, 128, 40)
    blocks = np.abs(weight.T.reshape(40, 4, 32)).max(-1)  # each value is off by at most half a step
    assert np.all(np.abs(restored - weight).T.reshape(40, 4, 32) <= blocks[..., None] / 14 + 1e-6)


def test_matmulnbits_kernel_matches_the_dequantised_reference():
    rng = np.random.default_rng(1)
    k, n = 64, 48
    weight = rng.normal(size=(k, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [x], [y],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert quantise_matmuls(model) == 1
    assert [i.name for i in model.graph.initializer if i.name == "W"] == []  # the fp32 weight is gone
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.normal(size=(5, k)).astype(np.float32)
    packed, scales = pack_int4(weight)
    np.testing.assert_allclose(session.run(None, {"x": a})[0], a @ unpack_int4(packed, scales, k, n), atol=1e-4)


def test_int4_embedding_lookup_matches_the_dequantised_table():
    rng = np.random.default_rng(2)
    vocab, width = 50, 64
    table = rng.normal(size=(vocab, width)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, width])
    graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")], "g", [ids], [y],
                              [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert quantise_gathers(model) == 1
    assert not any(i.name == "E" for i in model.graph.initializer)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lookup = rng.integers(0, vocab, size=(3, 7))
    packed, scales = pack_int4(table.T)  # rows of the table are the "columns" of its transpose
    scales = scales.astype(np.float16).astype(np.float32)  # stored as fp16
    reference = unpack_int4(packed, scales, width, vocab).T  # [vocab, width]
    np.testing.assert_allclose(session.run(None, {"ids": lookup})[0], reference[lookup], atol=1e-6)
    assert np.abs(reference - table).max() <= np.abs(table).max() / 7  # int4 steps: coarse but bounded
