"""Trained adapters on disk: edgeft's update format and a PEFT-compatible adapter folder.

edgeft's update format is one safetensors file (raw little-endian tensor bytes, never JSON floats)
whose metadata holds the format tag, the bundle it was trained from, the example count and metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.bundle import Manifest
from edgeft.errors import BundleError, DataError

UPDATE_FORMAT = "edgeft-update/1"
UPDATE_FILE = "update.safetensors"
PEFT_DIR = "peft"


@dataclass
class AdapterUpdate:
    """Trained parameters of one device (or one aggregate): what federated rounds exchange."""

    tensors: dict[str, np.ndarray]
    n_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    bundle_digest: str = ""


def save_update(path: str | Path, update: AdapterUpdate) -> Path:
    """Write ``update`` as an edgeft update file; returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": UPDATE_FORMAT, "n_examples": str(update.n_examples),
                "metrics": json.dumps(update.metrics), "bundle_digest": update.bundle_digest}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in update.tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_update(path: str | Path) -> AdapterUpdate:
    """Read an edgeft update file, checking its format tag."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"update file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError on corrupt headers
        raise DataError(f"{path} is not a readable edgeft update file: {exc}") from exc
    if metadata.get("format") != UPDATE_FORMAT:
        raise DataError(f"{path} is not an edgeft update (format {metadata.get('format')!r}, "
                        f"expected {UPDATE_FORMAT!r})")
    return AdapterUpdate(tensors, int(metadata["n_examples"]), json.loads(metadata.get("metrics", "{}")),
                         metadata.get("bundle_digest", ""))


def save_peft_adapter(directory: str | Path, tensors: dict[str, np.ndarray], manifest: Manifest) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that ``PeftModel.from_pretrained``
    loads onto the original base model. Only LoRA bundles have a PEFT form."""
    from safetensors.numpy import save_file

    if manifest.peft_config is None:
        raise BundleError(f"a {manifest.adapter.get('kind')!r} bundle has no PEFT form; only LoRA adapters do")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = {t.name: t.peft_key for t in manifest.trainable}
    save_file({keys[name]: np.ascontiguousarray(value) for name, value in tensors.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(manifest.peft_config, indent=2, sort_keys=True))
    return directory


def update_norm(tensors: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None = None) -> float:
    """The L2 norm of ``tensors`` (minus ``reference``, tensor by tensor) over all tensors together, in float64."""
    total = 0.0
    for name, value in tensors.items():
        value = value.astype(np.float64, copy=False)
        if reference is not None:
            value = value - reference[name].astype(np.float64, copy=False)
        total += float(np.dot(value.ravel(), value.ravel()))
    return float(np.sqrt(total))


def check_update(update: AdapterUpdate, manifest: Manifest, *, max_examples: int | None = None,
                 reference: dict[str, np.ndarray] | None = None, max_norm: float | None = None) -> None:
    """Refuse an update that does not fit the bundle: unknown or missing tensors, wrong shapes or dtypes,
    non-finite values, an example count outside [1, ``max_examples``], or (given ``max_norm``) a change from
    ``reference`` (the adapter it was trained from) whose L2 norm exceeds ``max_norm``.

    Raises ``DataError`` naming the first problem, its ``reason`` one of names, n_examples, shape, dtype,
    non_finite, norm."""
    expected = {t.name: t for t in manifest.trainable}
    unknown = sorted(set(update.tensors) - set(expected))
    missing = sorted(set(expected) - set(update.tensors))
    if unknown or missing:
        raise DataError(f"update does not match the bundle: unknown tensors {unknown[:3]}, missing {missing[:3]}",
                        reason="names")
    if update.n_examples <= 0:
        raise DataError(f"update reports n_examples={update.n_examples}; it must be positive", reason="n_examples")
    if max_examples is not None and update.n_examples > max_examples:
        raise DataError(f"update reports n_examples={update.n_examples}, above the job's max_update_examples="
                        f"{max_examples}", reason="n_examples")
    for name, value in update.tensors.items():
        spec = expected[name]
        if list(value.shape) != list(spec.shape):
            raise DataError(f"tensor {name!r} has shape {list(value.shape)}, the bundle says {spec.shape}",
                            reason="shape")
        if value.dtype != np.dtype(spec.dtype):
            raise DataError(f"tensor {name!r} has dtype {value.dtype}, the bundle says {spec.dtype}", reason="dtype")
        if not np.isfinite(value).all():
            raise DataError(f"tensor {name!r} holds NaN or infinite values", reason="non_finite")
    if max_norm is not None:
        norm = update_norm(update.tensors, reference)
        if norm > max_norm:
            what = "its change from the round's global adapter" if reference is not None else "it"
            raise DataError(f"update refused: the L2 norm of {what} is {norm:.4g}, above the job's bound "
                            f"{max_norm:.4g}", reason="norm")
