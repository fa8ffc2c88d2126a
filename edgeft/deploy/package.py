"""``edgeft deploy``: merged adapter -> inference ONNX -> quantised model -> measured deployment package."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeft.bundle import TOKENIZER, load_bundle
from edgeft.data import DataConfig
from edgeft.errors import ConfigError, EdgeftError
from edgeft.deploy.merge import merged_model
from edgeft.deploy.report import measure, write_report
from edgeft.export.graph import logits_of
from edgeft.export.source import causal_lm_inputs
from edgeft.update import load_update

MODES = ("none", "fp16", "int8", "int8-static", "int4")
CALIBRATION_EXAMPLES = 128
PACKAGE_FORMAT = "edgeft-package/1"
INFERENCE_OPSET = 17


@dataclass(frozen=True)
class DeployConfig:
    """What to deploy and how: the base model folder, the bundle, the trained adapter, the quantisation mode,
    the held-out data the report measures on, and the accuracy budget (points lost against fp32)."""

    model_dir: Path
    bundle: Path
    adapter: Path  # an update.safetensors file or a folder holding one
    out: Path
    mode: str = "int8"
    eval_data: DataConfig | None = None
    accuracy_budget: float = 1.0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"invalid mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.accuracy_budget < 0:
            raise ConfigError(f"invalid accuracy_budget={self.accuracy_budget!r}: must be >= 0")


class _Inference(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return logits_of(self.model(**(causal_lm_inputs(inputs) if self.causal else inputs)))


def export_inference(model: torch.nn.Module, path: Path, causal: bool) -> None:
    """torch.onnx export of input_ids, attention_mask -> logits with dynamic batch and sequence."""
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Inference(model, causal).eval(), example, str(path), dynamo=False,
                          opset_version=INFERENCE_OPSET, do_constant_folding=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=axes)


class _Calibration:
    """Batches of real task inputs for static quantisation (onnxruntime's CalibrationDataReader protocol)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantise(fp32: Path, out: Path, mode: str, calibration: list[dict[str, np.ndarray]] | None = None) -> None:
    """Write ``fp32`` quantised per ``mode`` to ``out``; ``int8-static`` calibrates on ``calibration``."""
    import onnx

    if mode == "int8-static":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if not calibration:
            raise ConfigError("mode int8-static needs calibration data: pass --eval-data (a sample of the task's data)")
        quantize_static(str(fp32), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"])
        return
    if mode == "int4":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from edgeft.deploy.int4 import quantise_matmuls

        model = onnx.load(str(fp32))
        quantise_matmuls(model)
        packed = out.with_name("model-int4-matmul.onnx")
        onnx.save(model, str(packed))
        # the embedding tables (half of a small BERT) as int8: gathered rows are dequantised after the lookup
        quantize_dynamic(str(packed), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
        packed.unlink()
        return
    if mode == "none":
        shutil.copyfile(fp32, out)
    elif mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    elif mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))


def _calibration_batches(package_dir: Path, fp32: Path, config: DeployConfig) -> list[dict[str, np.ndarray]] | None:
    """Up to CALIBRATION_EXAMPLES texts of the eval data, tokenised as the package will, in batches of 8."""
    if config.mode != "int8-static" or config.eval_data is None:
        return None
    from edgeft.data import read_records
    from edgeft.predict import Predictor

    texts = [str(r[config.eval_data.text_column]) for r in read_records(config.eval_data)[:CALIBRATION_EXAMPLES]]
    predictor = Predictor(package_dir, model_file=fp32)
    return [predictor.encode(texts[i: i + 8]) for i in range(0, len(texts), 8)]


def within_budget(loss_points: float | None, budget_points: float) -> bool:
    """A package is good when it lost at most ``budget_points`` of accuracy (or was not measured)."""
    return loss_points is None or loss_points <= budget_points


def deploy(config: DeployConfig) -> dict:
    """Build the deployment package in ``config.out``; returns the report. Raises EdgeftError when the
    quantised model loses more accuracy than the budget (the package is then marked not good)."""
    bundle = load_bundle(config.bundle)
    adapter_file = config.adapter / "update.safetensors" if config.adapter.is_dir() else config.adapter
    update = load_update(adapter_file)
    if update.bundle_digest and update.bundle_digest != bundle.digest:
        raise ConfigError(f"{adapter_file} was trained from another bundle ({update.bundle_digest[:12]}...), "
                          f"not {bundle.digest[:12]}...")
    model = merged_model(config.model_dir, bundle, update.tensors)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeft-deploy-") as tmp:
        fp32 = Path(tmp) / "model-fp32.onnx"
        export_inference(model, fp32, causal=bundle.manifest.task == "causal-lm")
        shutil.copyfile(bundle.file(TOKENIZER), out / TOKENIZER)
        package = {"format": PACKAGE_FORMAT, "task": bundle.manifest.task, "labels": bundle.manifest.labels,
                   "mode": config.mode, "max_length": bundle.manifest.tokenizer["max_length"],
                   "pad_id": bundle.manifest.tokenizer["pad_id"], "base_model": bundle.manifest.base_model,
                   "bundle_digest": bundle.digest, "good": False}
        (out / "package.json").write_text(json.dumps(package, indent=2))
        quantise(fp32, out / "model.onnx", config.mode, _calibration_batches(out, fp32, config))
        report = measure(fp32, out / "model.onnx", out, config.eval_data, config.threads)
    report["mode"] = config.mode
    loss = report.get("accuracy_loss_points")
    report["good"] = within_budget(loss, config.accuracy_budget)
    report["accuracy_budget_points"] = config.accuracy_budget
    write_report(out, report)
    package["good"] = report["good"]
    (out / "package.json").write_text(json.dumps(package, indent=2))
    if not report["good"]:
        raise EdgeftError(f"the {config.mode} model loses {loss:.2f} accuracy points against fp32, over the "
                          f"budget of {config.accuracy_budget}; the package in {out} is marked not good")
    return report
