"""``edgeft deploy``: merged adapter -> inference ONNX -> quantised model -> measured deployment package."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.bundle import TOKENIZER, Bundle, load_bundle
from edgeft.data import DataConfig
from edgeft.errors import ConfigError, EdgeftError
from edgeft.deploy.merge import merged_model
from edgeft.deploy.report import measure, write_report
from edgeft.deploy.inference import export_inference
from edgeft.update import load_update

MODES = ("none", "fp16", "int8", "int8-static", "int4")
CALIBRATION_EXAMPLES = 128
PACKAGE_FORMAT = "edgeft-package/1"


@dataclass(frozen=True)
class DeployConfig:
    """What to deploy and how.

    The trained adapter comes either from ``adapter`` (an ``edgeft train`` folder or its update.safetensors,
    with the ``bundle`` it was trained from) or from a coordinator's ``state_dir``: the global adapter of
    ``job`` after ``round`` (default: the latest), whose bundle the coordinator keeps. ``model_dir`` is the
    base Hugging Face model either way. ``eval_data`` is the held-out set the report measures on;
    ``calibration_data`` the sample ``int8-static`` calibrates on (default: ``eval_data``, which the report then
    flags). ``fixed_shape`` (batch, sequence) freezes the input shapes, as NPU execution providers want."""

    model_dir: Path
    out: Path
    bundle: Path | None = None
    adapter: Path | None = None  # an update.safetensors file or a folder holding one
    state_dir: Path | None = None
    job: str | None = None
    round: int | None = None
    mode: str = "int8"
    eval_data: DataConfig | None = None
    calibration_data: DataConfig | None = None
    fixed_shape: tuple[int, int] | None = None
    accuracy_budget: float = 1.0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"invalid mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.accuracy_budget < 0:
            raise ConfigError(f"invalid accuracy_budget={self.accuracy_budget!r}: must be >= 0")
        if (self.adapter is None) == (self.state_dir is None):
            raise ConfigError("give either an adapter (with its bundle) or a coordinator state folder with a job")
        if self.adapter is not None and self.bundle is None:
            raise ConfigError("an adapter folder needs the bundle it was trained from (--bundle)")
        if self.state_dir is not None and not self.job:
            raise ConfigError("deploying from a coordinator state folder needs the job id (--job)")
        if self.fixed_shape is not None and (len(self.fixed_shape) != 2 or min(self.fixed_shape) < 1):
            raise ConfigError(f"invalid fixed_shape={self.fixed_shape!r}: expected (batch, sequence), both >= 1")


class _Calibration:
    """Batches of real task inputs for static quantisation (onnxruntime's CalibrationDataReader protocol)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantise(fp32: Path, out: Path, mode: str, calibration: list[dict[str, np.ndarray]] | None = None) -> None:
    """Write ``fp32`` quantised per ``mode`` to ``out``; ``int8-static`` calibrates on ``calibration``."""
    logging.disable(logging.WARNING)  # onnxruntime.quantization advises pre-processing on every call
    try:
        _quantise(fp32, out, mode, calibration)
    finally:
        logging.disable(logging.NOTSET)


def _quantise(fp32: Path, out: Path, mode: str, calibration: list[dict[str, np.ndarray]] | None) -> None:
    import onnx

    if mode == "int8-static":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if not calibration:
            raise ConfigError("mode int8-static needs calibration data: pass --eval-data (a sample of the task's data)")
        quantize_static(str(fp32), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        # reduce_range: 7-bit weights, so the u8 x s8 products cannot saturate the 16-bit
                        # accumulators of CPUs without VNNI (the fused QLinearMatMul lost ~0.4 logits without it)
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"])
        return
    if mode == "int4":
        from edgeft.deploy.int4 import quantise_gathers, quantise_matmuls

        model = onnx.load(str(fp32))
        quantise_matmuls(model)
        quantise_gathers(model)  # the embedding tables: half of a small BERT's weights
        onnx.save(model, str(out))
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
    """CALIBRATION_EXAMPLES texts drawn from the calibration data, tokenised as the package will, in batches of 8
    (of the fixed batch size when shapes are fixed)."""
    data = config.calibration_data or config.eval_data
    if config.mode != "int8-static" or data is None:
        return None
    from edgeft.data import read_records
    from edgeft.predict import Predictor

    records = read_records(data)  # a seeded random sample: files are often sorted by label
    pick = np.random.default_rng(0).permutation(len(records))[:CALIBRATION_EXAMPLES]
    texts = [str(records[i][data.text_column]) for i in sorted(pick)]
    size = config.fixed_shape[0] if config.fixed_shape else 8
    predictor = Predictor(package_dir, model_file=fp32)
    return [predictor.encode(texts[i: i + size], fill_batch=True) for i in range(0, len(texts), size)]


def fix_shapes(path: Path, batch: int, sequence: int) -> None:
    """Freeze the model's input (and so every) shape to [batch, sequence], with ONNX Runtime's own tool."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(path))
    for name in ("input_ids", "attention_mask"):
        make_input_shape_fixed(model.graph, name, [batch, sequence])
    fix_output_shapes(model)
    onnx.save(model, str(path))


def _trained_adapter(config: DeployConfig) -> tuple[Bundle, dict[str, np.ndarray], dict]:
    """The bundle, the trained adapter tensors and where they came from (for the package's metadata)."""
    if config.state_dir is not None:
        from edgeft.server.coordinator import stored_adapter

        bundle, tensors, number = stored_adapter(config.state_dir, config.job, config.round)
        return bundle, tensors, {"state_dir": str(config.state_dir), "job": config.job, "round": number}
    bundle = load_bundle(config.bundle)
    adapter_file = config.adapter / "update.safetensors" if config.adapter.is_dir() else config.adapter
    update = load_update(adapter_file)
    if update.bundle_digest and update.bundle_digest != bundle.digest:
        raise ConfigError(f"{adapter_file} was trained from another bundle ({update.bundle_digest[:12]}...), "
                          f"not {bundle.digest[:12]}...")
    return bundle, update.tensors, {"adapter": str(adapter_file)}


def within_budget(loss_points: float | None, budget_points: float) -> bool:
    """A package is good when it lost at most ``budget_points`` of accuracy (or was not measured)."""
    return loss_points is None or loss_points <= budget_points


def deploy(config: DeployConfig) -> dict:
    """Build the deployment package in ``config.out``; returns the report. Raises EdgeftError when the
    quantised model loses more accuracy than the budget (the package is then marked not good)."""
    bundle, tensors, source = _trained_adapter(config)
    model = merged_model(config.model_dir, bundle, tensors)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeft-deploy-") as tmp:
        fp32 = Path(tmp) / "model-fp32.onnx"
        exporter = export_inference(model, fp32, causal=bundle.manifest.task == "causal-lm")
        if config.fixed_shape:
            fix_shapes(fp32, *config.fixed_shape)
        shutil.copyfile(bundle.file(TOKENIZER), out / TOKENIZER)
        package = {"format": PACKAGE_FORMAT, "task": bundle.manifest.task, "labels": bundle.manifest.labels,
                   "mode": config.mode, "max_length": bundle.manifest.tokenizer["max_length"],
                   "pad_id": bundle.manifest.tokenizer["pad_id"], "base_model": bundle.manifest.base_model,
                   "bundle_digest": bundle.digest, "adapter_source": source, "exporter": exporter,
                   "fixed_shape": list(config.fixed_shape) if config.fixed_shape else None, "good": False}
        (out / "package.json").write_text(json.dumps(package, indent=2))
        quantise(fp32, out / "model.onnx", config.mode, _calibration_batches(out, fp32, config))
        report = measure(fp32, out / "model.onnx", out, config.eval_data, config.threads)
    report["mode"] = config.mode
    report["fixed_shape"] = list(config.fixed_shape) if config.fixed_shape else None
    if config.mode == "int8-static":
        report["calibration"] = ("a sample of the evaluation data (pass separate calibration data for an "
                                 "unbiased report)" if config.calibration_data is None else
                                 str(config.calibration_data.path))
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
