"""From a torch program to an ONNX model: the portable engine's translation step (``to_onnx``), and one-line
errors naming what could not be exported or translated.

torch.onnx decomposes a program into the operators its translation table knows before translating it, which
re-traces the whole program (about a third of a portable export's time). The programs the portable engine
translates are already decomposed, but for a handful of operators that torch.export spells differently (``to``,
``&``, ``|``, ``squeeze`` over several dims, metadata asserts): ``_decomposed_once`` respells those in place and,
when every operator left is one torch.onnx translates directly, skips that second decomposition. Any other program
goes through torch.onnx's own decomposition as before. ``translatable`` rewrites the operators that the backward
decompositions emit and torch.onnx cannot translate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import onnx
import torch

from edgeft.errors import ExportError
from edgeft.export.graph import rename_tensors

def export_step(fn, what: str):  # noqa: ANN001, ANN202
    try:
        return fn()
    except ExportError:
        raise
    except Exception as exc:  # torch raises many types here; name the cause in one line
        raise ExportError(f"the portable engine cannot export this model ({what} failed): "
                          f"{type(exc).__name__}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    lines = [line for line in _strip_ansi(str(exc)).strip().splitlines() if line.strip()]
    return lines[0][:400] if lines else ""


def to_onnx(module: torch.nn.Module, args: tuple, user_shapes: tuple, opset: int, input_names: list[str],
            output_names: list[str]) -> onnx.ModelProto:
    """Export ``module`` (dynamic axes on the user inputs only) to an ONNX model in memory; its frozen buffers
    (``module.frozen``: parameter name -> buffer name) become initializers named by their parameter names."""
    shapes = (tuple(user_shapes) + (None,) * (len(args) - len(user_shapes)),)
    program = export_step(lambda: torch.export.export(module, args, dynamic_shapes=shapes, strict=False),
                          "re-exporting the training step")
    try:
        with _decomposed_once():
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=input_names,
                                             output_names=output_names, optimize=False, verbose=False)
    except Exception as exc:
        raise ExportError(f"the portable engine cannot translate this model to ONNX: {_operator(exc)}") from exc
    _simplify(onnx_program.model)
    model = onnx_program.model_proto
    renames = {buffer: name for name, buffer in module.frozen.items()}
    rename_tensors(model.graph, renames)
    return model


def _simplify(model) -> None:  # noqa: ANN001
    """torch.onnx's optimiser without its pattern rewriter: fold constants (a frozen weight's transpose becomes
    one initializer), drop unused nodes, lift and deduplicate constants, eliminate common subexpressions. The
    rewriter's pattern matching grows faster than the graph: on a 4-layer SmolLM2-shaped decoder it took 100 s
    of a 205 s export (47 s without it), on the 30-layer one most of 38 minutes, for graphs ONNX Runtime then
    fuses itself."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding as folding

    ir.passes.Sequential(
        common.InlinePass(),
        folding.FoldConstantsPass(shape_inference=True, input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                  output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                  should_fold=lambda node: None),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _operator(exc: Exception) -> str:
    """One line naming the operator torch.onnx could not translate (its message says so deep in the cause chain,
    after a multi-line banner) and the node that uses it; otherwise the innermost cause's first line."""
    import re

    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(_strip_ansi(str(c)) for c in chain)
    found = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text)
    node = re.search(r"Error when translating node %(\w+)", text)
    if found:
        where = f" (node {node.group(1)})" if node else ""
        return (f"operator {found.group(1)}.{found.group(2)}{where} has no ONNX translation in torch "
                f"{torch.__version__}'s ONNX exporter: replace it in the model, or export with engine='ort-training'")
    if node:
        return f"translating node {node.group(1)} failed: {type(chain[-1]).__name__}: {first_line(chain[-1])}"
    return f"{type(chain[-1]).__name__}: {first_line(chain[-1])}"


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@contextlib.contextmanager
def _decomposed_once() -> Iterator[None]:
    """Within: torch.onnx skips its decomposition of programs whose every operator it translates directly."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
    except ImportError:  # another torch layout: its own decomposition, always
        yield
        return
    decompose = _fx_passes.decompose_with_registry

    def decompose_unless_done(program, registry):  # noqa: ANN001, ANN202
        translated = set(_decomp.get_onnx_implemented_overloads(registry))
        if _respell(program.graph_module, translated):
            return program
        return decompose(program, registry)

    _fx_passes.decompose_with_registry = decompose_unless_done
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = decompose


def _respell(module: torch.fx.GraphModule, translated: set) -> bool:
    """Rewrite ``module``'s graph to the spellings torch.onnx translates and return True, when that leaves only
    operators in ``translated`` (and Python's operators on sizes); otherwise leave it alone and return False."""
    aten = torch.ops.aten
    same = {aten.__and__.Tensor: aten.bitwise_and.Tensor, aten.__or__.Tensor: aten.bitwise_or.Tensor}
    respelled = {*same, aten.to.dtype, aten.squeeze.dims, aten._assert_tensor_metadata.default}
    nodes = [n for n in module.graph.nodes if n.op == "call_function"]
    allowed = translated | respelled
    if not all(_plain(n.target, allowed) for n in nodes):
        return False
    for node in nodes:
        if node.target in same:
            node.target = same[node.target]
        elif node.target == aten.to.dtype and len(node.args) == 2 and not node.kwargs:
            node.target, node.args, node.kwargs = aten._to_copy.default, (node.args[0],), {"dtype": node.args[1]}
        elif node.target == aten.squeeze.dims:
            value, dims = node.args
            rank = len(value.meta["val"].shape)
            with module.graph.inserting_before(node):
                for dim in sorted((d % rank for d in dims), reverse=True):
                    value = module.graph.call_function(aten.squeeze.dim, (value, dim))
                    value.meta = dict(node.meta)
            node.replace_all_uses_with(value)
            module.graph.erase_node(node)
        elif node.target == aten._assert_tensor_metadata.default and not node.users:
            module.graph.erase_node(node)
    module.recompile()
    return all(_plain(n.target, translated) for n in module.graph.nodes if n.op == "call_function")


def _plain(target: object, operators: set) -> bool:
    """An operator in ``operators``, or Python's own on sizes (getitem, mul, torch.sym_max, ...)."""
    if isinstance(target, torch._ops.OpOverload):
        return target in operators
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", "")
    return module in ("_operator", "operator") or (module == "torch" and name.startswith("sym_"))


def translatable(module: torch.fx.GraphModule) -> None:
    """Rewrite what the backward decompositions emit and torch.onnx cannot translate into equivalents it can.

    ``empty_permuted`` (``empty_like`` decomposed, seen under the SiLU gradient of Llama's MLP) is an
    uninitialised tensor of a given logical shape whatever its memory layout: ``empty.memory_format``."""
    aten = torch.ops.aten
    changed = False
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target == aten.empty_permuted.default:
            node.target = aten.empty.memory_format
            node.args = node.args[:1]
            changed = True
        elif node.op == "call_function" and node.target == aten.convolution_backward.default:
            node.target = _convolution_backward  # traced into forward convolutions when the step is re-exported
            changed = True
    if changed:
        module.recompile()


def _convolution_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,  # noqa: A002
                          bias_sizes: object, stride: list[int], padding: list[int], dilation: list[int],
                          transposed: bool, output_padding: list[int], groups: int, output_mask: list[bool]) -> tuple:
    """``aten.convolution_backward`` (no ONNX translation) as forward convolutions, which have one: the input's
    gradient is the transposed convolution of the output's gradient with the weight; the weight's is the
    input correlated with the output's gradient (stride and dilation swap roles), cut to the kernel's size."""
    if transposed:
        raise ExportError("the portable engine cannot train through a transposed convolution yet; freeze it or "
                          "export with engine='ort-training'")
    aten = torch.ops.aten
    dims = weight.dim() - 2
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        extra = [input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                       + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(dims)]
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, extra, groups)
    if output_mask[1]:
        if groups != 1:
            raise ExportError(f"the portable engine cannot train the weights of a grouped convolution ({groups} "
                              "groups) yet: freeze it (LoRA on other layers, or a head adapter) or export with "
                              "engine='ort-training'")
        grad_weight = aten.convolution(input.transpose(0, 1), grad_output.transpose(0, 1), None, dilation, padding,
                                       stride, False, [0] * dims, 1).transpose(0, 1)
        for i in range(dims):
            grad_weight = grad_weight.narrow(2 + i, 0, weight.shape[2 + i])
    if output_mask[2]:
        grad_bias = grad_output.sum(dim=[0, *range(2, 2 + dims)])
    return grad_input, grad_weight, grad_bias
