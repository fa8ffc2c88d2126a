"""The training bundle: ONNX Runtime artifacts, tokenizer and a manifest with a sha256 per file.

A bundle is a directory. ``manifest.json`` says what is inside and how to feed it; ``load_bundle``
verifies every file against the manifest before anything trains on it. No torch here: devices use it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft import __version__
from edgeft.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The ONNX Runtime training artifacts inside a bundle (names fixed by ORT's generate_artifacts).
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: a graph input/output or a trainable parameter."""

    name: str
    dtype: str
    shape: list[int | str]
    peft_key: str | None = None


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds (see the README's "Bundle format" section)."""

    format_version: int
    edgeft_version: str
    base_model: dict  # {"id", "digest", "model_type"}
    task: str
    labels: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    trainable: list[TensorSpec]
    adapter: dict
    loss: str
    optimizer: dict
    opset: int
    tokenizer: dict | None  # {"file", "max_length", "pad_id"}
    files: dict[str, str]  # relative path -> sha256
    peft_config: dict | None = None
    # FedProx bundles only: {"mu", "anchor_prefix"}; the training loss adds mu/2 * ||w - anchor||^2, the anchor
    # of trainable parameter ``name`` being the frozen parameter ``anchor_prefix + name``. Absent otherwise.
    proximal: dict | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if data["proximal"] is None:  # bundles without FedProx keep their manifest (and digest) as before
            del data["proximal"]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        try:
            version = data["format_version"]
            if version != FORMAT_VERSION:
                raise BundleError(f"bundle format version {version} is not supported by edgeft {__version__} "
                                  f"(it reads version {FORMAT_VERSION}); re-export the bundle")
            specs = {k: [TensorSpec(**t) for t in data[k]] for k in ("inputs", "outputs", "trainable")}
            return cls(**{**data, **specs})
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest.json is malformed: {exc}; re-export the bundle") from exc

    @property
    def trainable_names(self) -> list[str]:
        return [t.name for t in self.trainable]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    (Path(bundle_dir) / MANIFEST).write_text(manifest.to_json())


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def digest(self) -> str:
        """Digest of the manifest, which pins every file's sha256: the bundle's identity."""
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) check every file's sha256 against it."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing; export one with `edgeft export`")
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); the bundle is corrupt, re-download it") from exc
    manifest = Manifest.from_dict(data)
    if verify:
        for name, expected in manifest.files.items():
            file = path / name
            if not file.is_file():
                raise BundleError(f"bundle file {name} is missing from {path}; re-download or re-export the bundle")
            actual = sha256_of(file)
            if actual != expected:
                raise BundleError(f"bundle file {name} is corrupt: sha256 {actual[:12]}... does not match the "
                                  f"manifest's {expected[:12]}...; re-download or re-export the bundle")
    return Bundle(path, manifest)
