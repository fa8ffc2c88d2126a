"""The inference ONNX model of a deployment package: input_ids, attention_mask -> logits for text models; the
bundle's own inputs (pixels, features, arrays by name) -> logits for the others.

Hugging Face architectures that optimum's ONNX exporter (``optimum-onnx``) supports for the task go
through it (its model patches follow transformers' changes); anything else through torch.onnx. Both
write one .onnx file at opset 17 with dynamic batch and sequence axes, which ONNX Runtime 1.17+ runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from edgeft.bundle import TensorSpec
from edgeft.export.graph import logits_of
from edgeft.export.source import causal_lm_inputs

INFERENCE_OPSET = 17
INPUTS = ("input_ids", "attention_mask")  # what edgeft.predict.Predictor feeds
OPTIMUM, TORCH_ONNX = "optimum", "torch.onnx"
OPTIMUM_KV_CACHE = "optimum (KV cache)"  # a causal LM's decoder with past_key_values.* inputs, present.* outputs
_AXIS_NAMES = {"batch_size": "batch", "sequence_length": "sequence"}  # optimum's names -> torch.onnx path's


class _Inference(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return logits_of(self.model(**(causal_lm_inputs(inputs) if self.causal else inputs)))


def _optimum_config(model: torch.nn.Module, causal: bool, past: bool = False):  # -> optimum OnnxConfig | None
    """optimum's ONNX config for ``model`` and the task, cut down to INPUTS -> logits (no past key values); with
    ``past`` (causal LMs) its text-generation-with-past config as it is (the KV cache in and out, and position ids
    where the architecture reads them). None where optimum is not installed or does not support the architecture
    for the task."""
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the architectures)
        from optimum.exporters.tasks import TasksManager
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    task = "text-generation" if causal else "text-classification"
    model_type = str(getattr(model.config, "model_type", ""))
    supported = None
    for name in dict.fromkeys((model_type, model_type.replace("_", "-"))):  # optimum spells some with '-'
        try:
            supported = TasksManager.get_supported_tasks_for_model_type(name, "onnx", library_name="transformers")
            break
        except KeyError:
            continue
    if past:
        if not supported or "text-generation-with-past" not in supported:
            return None
        return supported["text-generation-with-past"](model.config, task=task, use_past=True, use_past_in_inputs=True)
    if not supported or task not in supported:
        return None
    base = type(supported[task](model.config))

    class InferenceOnnxConfig(base):  # type: ignore[misc, valid-type]
        # BERT's token_type_ids and GPT-2's position_ids stay inside the graph at their defaults (zeros and
        # 0..n-1), as in training and in the torch.onnx path.
        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return {name: {i: _AXIS_NAMES.get(a, a) for i, a in axes.items()}
                    for name, axes in super().inputs.items() if name in INPUTS}

        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            return {name: {i: _AXIS_NAMES.get(a, a) for i, a in axes.items()} for name, axes in super().outputs.items()}

    config = InferenceOnnxConfig(model.config, task=task)
    if tuple(config.inputs) != INPUTS or list(config.outputs) != ["logits"]:
        return None
    return config


def _export_with_optimum(model: torch.nn.Module, config, path: Path) -> None:
    from optimum.exporters.onnx import export

    # optimum's export sets return_dict and its overrides (use_cache=False) on the model's config: put them back
    keys = ["return_dict", *(config.values_override or {})]
    saved = {k: getattr(model.config, k) for k in keys if hasattr(model.config, k)}
    try:
        export(model.eval(), config, path, opset=INFERENCE_OPSET, do_constant_folding=True)
    finally:
        for k in keys:
            if k in saved:
                setattr(model.config, k, saved[k])
            elif hasattr(model.config, k):
                delattr(model.config, k)


def _export_with_torch_onnx(model: torch.nn.Module, path: Path, causal: bool) -> None:
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"} if causal else {0: "batch"}}
    torch.onnx.export(_Inference(model, causal).eval(), example, str(path), dynamo=False,
                      opset_version=INFERENCE_OPSET, do_constant_folding=True,
                      input_names=list(INPUTS), output_names=["logits"], dynamic_axes=axes)


def export_inference(model: torch.nn.Module, path: Path, causal: bool) -> str:
    """Export ``model`` (in eval mode) to ``path``: input_ids, attention_mask -> logits with dynamic batch and
    sequence, one file at opset INFERENCE_OPSET. Returns the exporter used: OPTIMUM or TORCH_ONNX."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if causal:  # a decoder with its KV cache (past_key_values.* in, present.* out), for edgeft.generate
            config = _optimum_config(model, causal, past=True)
            if config is not None:
                try:
                    _export_with_optimum(model, config, path)
                    return OPTIMUM_KV_CACHE
                except Exception:  # noqa: BLE001  (then without the cache, below)
                    pass
        config = _optimum_config(model, causal)
        if config is not None:
            try:
                _export_with_optimum(model, config, path)
                return OPTIMUM
            except Exception as exc:  # an optimum bug for this model must not block deployment
                failure = exc
        _export_with_torch_onnx(model, path, causal)
    if config is not None:
        warnings.warn(f"optimum's ONNX exporter failed ({type(failure).__name__}: {failure}); "
                      "exported with torch.onnx instead", RuntimeWarning, stacklevel=2)
    return TORCH_ONNX


class _NamedInputs(torch.nn.Module):
    """``model(**inputs)`` with the inputs given by position, in the manifest's order (what torch.onnx traces)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.names, inputs))))


def export_inputs_inference(model: torch.nn.Module, path: Path, specs: list[TensorSpec],
                            example: dict[str, torch.Tensor]) -> str:
    """Export ``model`` (in eval mode) to ``path`` for the inputs ``specs`` names (a bundle's: pixels, features or
    arrays) -> logits, with torch.onnx at opset INFERENCE_OPSET: the axes the specs name (the batch) stay
    dynamic, the others are the recorded sizes; BatchNorm layers fold into the convolutions before them.
    Returns TORCH_ONNX."""
    names = [spec.name for spec in specs]
    axes = {spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in specs}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_NamedInputs(model, names).eval(), tuple(example[n] for n in names), str(path),
                          dynamo=False, opset_version=INFERENCE_OPSET, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.EVAL, input_names=names, output_names=["logits"],
                          dynamic_axes=axes)
    return TORCH_ONNX
