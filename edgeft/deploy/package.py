"""``edgeft deploy``: merged adapter -> inference ONNX -> quantised model -> measured deployment package.

Two ways in, one package out: ``deploy`` rebuilds a Hugging Face model from its folder; ``deploy_module`` takes the
torch module a bundle was exported from with ``edgeft.export.export_module`` (images, feature columns, arrays or
text), which no folder holds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgeft.bundle import TOKENIZER, Bundle, load_bundle
from edgeft.data import DataConfig
from edgeft.deploy.inference import export_inference, export_inputs_inference
from edgeft.deploy.merge import merged_model, merged_module, model_input_specs, sample_inputs
from edgeft.deploy.quantise import MODES, fix_shapes, quantise
from edgeft.deploy.report import DatasetExamples, TextExamples, measure, write_report
from edgeft.deploy.torch_model import adapter_tensors
from edgeft.errors import ConfigError, EdgeftError
from edgeft.update import UPDATE_FILE

__all__ = ["MODES", "DeployConfig", "deploy", "deploy_module", "within_budget"]

CALIBRATION_EXAMPLES = 128
CALIBRATION_BATCH = 8
PACKAGE_FORMAT = "edgeft-package/1"


@dataclass(frozen=True)
class DeployConfig:
    """What to deploy and how.

    The trained adapter comes either from ``adapter`` (an ``edgeft train`` folder or its update.safetensors,
    with the ``bundle`` it was trained from) or from a coordinator's ``state_dir``: the global adapter of
    ``job`` after ``round`` (default: the latest), whose bundle the coordinator keeps. ``model_dir`` is the
    base Hugging Face model (``deploy``; ``deploy_module`` takes the module instead). ``eval_data`` is the held-out
    set the report measures on; ``calibration_data`` the sample ``int8-static`` calibrates on (default:
    ``eval_data``, which the report then flags); both are read with the bundle's own readers (texts, image folders
    or tables, feature columns, .npz arrays). ``fixed_shape`` freezes the input shapes, as NPU execution providers
    want: (batch, sequence) for text models, (batch,) for the others (their other axes are fixed already)."""

    out: Path
    model_dir: Path | None = None
    bundle: Path | None = None
    adapter: Path | None = None  # an update.safetensors file or a folder holding one
    state_dir: Path | None = None
    database: str | None = None  # with state_dir: the coordinator's [server] database URL, if not the folder's file
    artifacts: str | None = None  # with state_dir: the coordinator's [server] artifacts bucket (s3://bucket/prefix)
    s3_endpoint: str | None = None  # ... its S3 endpoint (default: AWS_ENDPOINT_URL_S3; credentials: AWS_* variables)
    job: str | None = None
    round: int | None = None
    mode: str = "int8"
    eval_data: DataConfig | None = None
    calibration_data: DataConfig | None = None
    fixed_shape: tuple[int, ...] | None = None
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
        if self.state_dir is None and (self.database or self.artifacts or self.s3_endpoint):
            raise ConfigError("database, artifacts and s3_endpoint (--database, --artifacts, --s3-endpoint) say where "
                              "a coordinator keeps its state: give them with its state folder (--state) and --job")
        if self.fixed_shape is not None and (len(self.fixed_shape) not in (1, 2) or min(self.fixed_shape) < 1):
            raise ConfigError(f"invalid fixed_shape={self.fixed_shape!r}: expected (batch, sequence) for a text model "
                              "or (batch,) for the others, each >= 1")


def _trained_adapter(config: DeployConfig) -> tuple[Bundle, dict[str, np.ndarray], dict]:
    """The bundle, the trained adapter tensors and where they came from (for the package's metadata)."""
    if config.state_dir is not None:
        from edgeft.server.config import S3Settings
        from edgeft.server.coordinator import stored_adapter

        bundle, tensors, number = stored_adapter(config.state_dir, config.job, config.round, config.database,
                                                 config.artifacts, S3Settings(endpoint_url=config.s3_endpoint))
        return bundle, tensors, {"state_dir": str(config.state_dir), "job": config.job, "round": number}
    bundle = load_bundle(config.bundle)
    adapter_file = config.adapter / UPDATE_FILE if config.adapter.is_dir() else config.adapter
    return bundle, adapter_tensors(bundle, adapter_file), {"adapter": str(adapter_file)}


def within_budget(loss_points: float | None, budget_points: float) -> bool:
    """A package is good when it lost at most ``budget_points`` of accuracy (or was not measured)."""
    return loss_points is None or loss_points <= budget_points


def deploy(config: DeployConfig) -> dict:
    """Build the deployment package of a bundle exported from a Hugging Face folder (``config.model_dir``: text or
    image classification) in ``config.out``; returns the report. Raises EdgeftError when the quantised model loses more accuracy than the
    budget (the package is then marked not good)."""
    bundle, tensors, source = _trained_adapter(config)
    base = bundle.manifest.base_model
    if not base.get("model_type"):
        raise ConfigError(f"this bundle's model ({bundle.manifest.input_kind} inputs, base {base.get('id')!r}) was "
                          "exported from a torch module, not a Hugging Face folder, so edgeft deploy cannot rebuild "
                          "it: deploy it from Python with edgeft.deploy.deploy_module(module, DeployConfig(...)), "
                          "passing the module given to export_module")
    if config.model_dir is None:
        raise ConfigError(f"deploying this bundle needs its base Hugging Face model folder ({base.get('id')}): "
                          "pass --model (model_dir)")
    model = merged_model(config.model_dir, bundle, tensors)
    specs = model_input_specs(bundle)

    def export(path: Path) -> str:
        if bundle.manifest.input_kind == "tokens":
            return export_inference(model, path, causal=bundle.manifest.task == "causal-lm")
        return export_inputs_inference(model, path, specs, sample_inputs(specs))  # Hugging Face image models

    return _package(bundle, export, source, config)


def deploy_module(module: torch.nn.Module, config: DeployConfig) -> dict:
    """``deploy`` for a bundle exported from a torch module with ``edgeft.export.export_module``: ``module`` is that
    module (as export left it, or a fresh one with the same weights; it is not changed), the trained adapter is
    merged into a copy of it (LoRA on Linear and Conv2d layers, checked against the unmerged model), and the
    package is exported for the bundle's own inputs (pixels, features, arrays or token ids) with a dynamic batch."""
    if config.model_dir is not None:
        raise ConfigError("deploy_module takes the model as a module: leave model_dir out (it is for bundles "
                          "exported from a Hugging Face folder, which edgeft.deploy.deploy rebuilds)")
    bundle, tensors, source = _trained_adapter(config)
    model = merged_module(module, bundle, tensors)
    specs = model_input_specs(bundle)

    def export(path: Path) -> str:
        return export_inputs_inference(model, path, specs, sample_inputs(specs))

    return _package(bundle, export, source, config)


def _input_shapes(bundle: Bundle, fixed: tuple[int, ...]) -> dict[str, list[int]]:
    """Each model input's frozen shape for ``fixed``: (batch, sequence) for text, (batch,) for the others."""
    manifest = bundle.manifest
    text = manifest.input_kind == "tokens"
    if len(fixed) != (2 if text else 1):
        raise ConfigError(f"invalid fixed_shape={fixed!r}: a {'text' if text else manifest.input_kind} model takes "
                          f"{'(batch, sequence), e.g. 1x128' if text else '(batch,), e.g. 1: its other axes are fixed'}")
    shapes = {}
    for spec in model_input_specs(bundle):
        if text:
            shapes[spec.name] = list(fixed)
        else:
            shapes[spec.name] = [fixed[0], *(d if isinstance(d, int) else -1 for d in spec.shape[1:])]
            if -1 in shapes[spec.name]:
                raise ConfigError(f"input {spec.name} {spec.shape} has axes besides the batch that are not fixed: "
                                  "its shape cannot be frozen with a batch size alone")
    return shapes


def _package(bundle: Bundle, export, source: dict, config: DeployConfig) -> dict:  # noqa: ANN001
    manifest = bundle.manifest
    text = manifest.input_kind == "tokens"
    shapes = _input_shapes(bundle, config.fixed_shape) if config.fixed_shape else None
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeft-deploy-") as tmp:
        fp32 = Path(tmp) / "model-fp32.onnx"
        exporter = export(fp32)
        if shapes:
            fix_shapes(fp32, shapes)
        notes = _notes(fp32, config.mode)
        if text:
            shutil.copyfile(bundle.file(TOKENIZER), out / TOKENIZER)
        chat = (manifest.tokenizer or {}).get("chat_template")
        if chat:  # a chat model's template, for edgeft generate
            shutil.copyfile(bundle.file(chat), out / chat)
        package = {"format": PACKAGE_FORMAT, "task": manifest.task, "labels": manifest.labels,
                   "mode": config.mode, "input_kind": manifest.input_kind,
                   "inputs": [{k: v for k, v in asdict(s).items() if k != "peft_key"} for s in model_input_specs(bundle)],
                   "preprocessing": manifest.preprocessing,
                   "max_length": manifest.tokenizer["max_length"] if manifest.tokenizer else None,
                   "pad_id": manifest.tokenizer["pad_id"] if manifest.tokenizer else None,
                   "chat_template": chat, "eos_token": (manifest.tokenizer or {}).get("eos_token"),
                   "base_model": manifest.base_model, "bundle_digest": bundle.digest, "adapter_source": source,
                   "exporter": exporter, "fixed_shape": list(config.fixed_shape) if config.fixed_shape else None,
                   "good": False}
        (out / "package.json").write_text(json.dumps(package, indent=2))
        quantise(fp32, out / "model.onnx", config.mode, _calibration_batches(out, fp32, bundle, config), text)
        report = measure(fp32, out / "model.onnx", out, _examples(bundle, config.eval_data), config.threads)
    report["mode"] = config.mode
    report["fixed_shape"] = list(config.fixed_shape) if config.fixed_shape else None
    report["notes"] = notes
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


def _examples(bundle: Bundle, data: DataConfig | None) -> TextExamples | DatasetExamples | None:
    """The evaluation examples, read as training reads them: texts and label names, or the bundle's dataset."""
    if data is None:
        return None
    if bundle.manifest.input_kind == "tokens":
        from edgeft.data import read_records

        rows = read_records(data)
        return TextExamples([str(r[data.text_column]) for r in rows], [str(r[data.label_column]) for r in rows])
    from edgeft.data import load_dataset

    return DatasetExamples(load_dataset(data, bundle), bundle.manifest.task == "classification")


def _calibration_batches(package_dir: Path, fp32: Path, bundle: Bundle, config: DeployConfig
                         ) -> list[dict[str, np.ndarray]] | None:
    """CALIBRATION_EXAMPLES examples drawn (seeded) from the calibration data, encoded as the package will, in
    batches of CALIBRATION_BATCH (of the fixed batch size when shapes are fixed; the last one filled up with the
    first examples again)."""
    data = config.calibration_data or config.eval_data
    if config.mode != "int8-static" or data is None:
        return None
    from edgeft.predict import Predictor

    size = config.fixed_shape[0] if config.fixed_shape else CALIBRATION_BATCH
    predictor = Predictor(package_dir, model_file=fp32)
    if bundle.manifest.input_kind == "tokens":  # texts need no labels here
        from edgeft.data import read_records

        records = read_records(data)
        pick = np.sort(np.random.default_rng(0).permutation(len(records))[:CALIBRATION_EXAMPLES])  # files are often
        texts = [str(records[i][data.text_column]) for i in pick]                                  # sorted by label
        return [predictor.encode(texts[i: i + size], fill_batch=True) for i in range(0, len(texts), size)]
    examples = _examples(bundle, data)
    pick = np.sort(np.random.default_rng(0).permutation(len(examples))[:CALIBRATION_EXAMPLES])
    fill = bool(config.fixed_shape)
    return [examples.feed(predictor, np.resize(pick[i: i + size], size) if fill else pick[i: i + size])
            for i in range(0, len(pick), size)]


def _notes(fp32: Path, mode: str) -> list[str]:
    """What the mode leaves as it was, for the report."""
    import onnx

    from edgeft.deploy.quantise import convolutions

    count = convolutions(onnx.load(str(fp32)))
    if mode == "int8" and count:
        return [f"int8 (dynamic) quantises matrix products only: the model's {count} convolutions stay fp32 "
                "(--mode int8-static quantises them: QDQ, calibrated)."]
    return []
