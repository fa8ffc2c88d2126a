"""The portable engine's optimizer update as a standard ONNX graph (built with onnx.helper, no torch).

Inputs: ``learning_rate`` and ``step`` (float scalars; ``step`` counts from 1 and feeds AdamW's bias
correction), then per trainable parameter ``<name>``, ``grad.<name>`` and for AdamW ``exp_avg.<name>`` and
``exp_avg_sq.<name>``; outputs the same state tensors with the ``.out`` suffix.

AdamW follows ``torch.optim.AdamW`` exactly (decoupled decay first, then the bias-corrected step):
    p *= 1 - lr * wd;  m = m + (1 - b1) * (g - m);  v = b2 * v + (1 - b2) * g^2
    p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
SGD is ``p -= lr * g`` (its weight decay is an L2 term in the loss, as PyTorch's SGD ``weight_decay``).
The constants are initializers of the graph, never folded away (DESIGN.md: an optimiser that drops AdamW's
eps turns zero gradients into NaN).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeft.bundle import GRAD_PREFIX, OPTIMIZER_STATE, OUT_SUFFIX
from edgeft.config import OptimizerConfig

EXP_AVG, EXP_AVG_SQ = OPTIMIZER_STATE["adamw"]
IR_VERSION = 10  # what ONNX Runtime 1.19 reads


def state_names(optimizer: str, name: str) -> list[str]:
    """The optimizer-state inputs a trainable parameter ``name`` carries besides itself and its gradient."""
    return [prefix + name for prefix in OPTIMIZER_STATE[optimizer]]


def optimizer_model(names: list[str], shapes: list[tuple[int, ...]], config: OptimizerConfig,
                    opset: int) -> onnx.ModelProto:
    """The update graph for parameters ``names`` of ``shapes``."""
    nodes: list[onnx.NodeProto] = []
    inits = []
    inputs = [helper.make_tensor_value_info("learning_rate", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("step", TensorProto.FLOAT, [])]
    outputs = []

    def const(name: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def node(op: str, ins: list[str], out: str) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out))
        return out

    if config.name == "adamw":
        b1, b2 = config.betas
        one, beta1, beta2 = const("one", 1.0), const("beta1", b1), const("beta2", b2)
        one_minus_b1, one_minus_b2 = const("one_minus_beta1", 1.0 - b1), const("one_minus_beta2", 1.0 - b2)
        eps, wd = const("eps", config.eps), const("weight_decay", config.weight_decay)
        bc1 = node("Sub", [one, node("Pow", [beta1, "step"], "beta1_t")], "bias_correction1")
        bc2 = node("Sub", [one, node("Pow", [beta2, "step"], "beta2_t")], "bias_correction2")
        step_size = node("Div", ["learning_rate", bc1], "step_size")
        sqrt_bc2 = node("Sqrt", [bc2], "sqrt_bias_correction2")
        decay = node("Sub", [one, node("Mul", ["learning_rate", wd], "lr_wd")], "decay")
    for name, shape in zip(names, shapes):
        grad = GRAD_PREFIX + name
        dims = list(shape)
        tensors = [name, grad, *state_names(config.name, name)]
        inputs += [helper.make_tensor_value_info(t, TensorProto.FLOAT, dims) for t in tensors]
        if config.name == "adamw":
            m, v = EXP_AVG + name, EXP_AVG_SQ + name
            decayed = node("Mul", [name, decay], f"{name}/decayed")
            m_new = node("Add", [m, node("Mul", [node("Sub", [grad, m], f"{name}/g_minus_m"), one_minus_b1],
                                         f"{name}/m_delta")], m + OUT_SUFFIX)
            g2 = node("Mul", [grad, grad], f"{name}/g2")
            v_new = node("Add", [node("Mul", [v, beta2], f"{name}/v_decay"),
                                 node("Mul", [g2, one_minus_b2], f"{name}/g2_scaled")], v + OUT_SUFFIX)
            denom = node("Add", [node("Div", [node("Sqrt", [v_new], f"{name}/sqrt_v"), sqrt_bc2], f"{name}/v_hat"),
                                 eps], f"{name}/denom")
            update = node("Mul", [node("Div", [m_new, denom], f"{name}/ratio"), step_size], f"{name}/update")
            node("Sub", [decayed, update], name + OUT_SUFFIX)
        else:
            node("Sub", [name, node("Mul", [grad, "learning_rate"], f"{name}/update")], name + OUT_SUFFIX)
        outputs += [helper.make_tensor_value_info(t + OUT_SUFFIX, TensorProto.FLOAT, dims)
                    for t in [name, *state_names(config.name, name)]]
    graph = helper.make_graph(nodes, f"edgeft_{config.name}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeft")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
