"""The training bundle: ONNX Runtime artifacts, tokenizer and a manifest with a sha256 per file.

A bundle is a directory. ``manifest.json`` says what is inside and how to feed it; ``load_bundle``
verifies every file against the manifest before anything trains on it. No torch here: devices use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from edgeft import __version__
from edgeft.config import ENGINES, INPUT_KINDS
from edgeft.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The ONNX Runtime training artifacts inside a bundle (names fixed by ORT's generate_artifacts).
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
TOKENIZER = "tokenizer.json"
# The portable engine's files (edgeft.export.portable writes them, edgeft.train.portable runs them) and the names
# its graphs give the gradient accumulators (``grad.<name>``), the optimizer state (``exp_avg.<name>``...) and the
# updated values (``<input>.out``).
PORTABLE_GRADIENT = "portable_gradient.onnx"
PORTABLE_EVAL = "portable_eval.onnx"
PORTABLE_OPTIMIZER = "portable_optimizer.onnx"
PORTABLE_FROZEN = "portable_frozen.bin"
PORTABLE_PARAMETERS = "portable_parameters.safetensors"
# A portable bundle exported with gradient checkpointing (edgeft.export.segmented) trains with these graphs instead of
# the gradient and eval graphs: its manifest's ``segmented`` entry says how.
SEGMENTED_PROLOGUE = "segmented_prologue.onnx"
SEGMENTED_LAYER = "segmented_layer.onnx"
SEGMENTED_LAYER_GRAD = "segmented_layer_grad.onnx"
SEGMENTED_HEAD = "segmented_head.onnx"
SEGMENTED_HEAD_GRAD = "segmented_head_grad.onnx"
SEGMENTED_LAYERS = "segmented_layers.safetensors"
GRAD_PREFIX, OUT_SUFFIX = "grad.", ".out"
KEPT_PREFIX = "kept."  # activations a segmented layer graph hands its gradient graph (keep_projections)
OPTIMIZER_STATE = {"adamw": ("exp_avg.", "exp_avg_sq."), "sgd": ()}
# Operators ONNX Runtime registers itself in the standard ONNX domain from version 1 (kept from its contrib
# era): its training graphs carry LayerNormalization at opset 14, which onnx's checker knows only from opset 17.
ORT_STANDARD_DOMAIN_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization"})


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
    # Sentence-pooled heads: {"mode", "normalize", "dimension"}; the graphs then also output ``features`` (the
    # pooled sentence embedding the head reads, [batch, dimension]). A classifier of images, features or arrays whose
    # head is one Linear module: {"mode": "head_input", "module", "normalize": false, "dimension"}, ``features``
    # being that module's input. Absent otherwise.
    pooling: dict | None = None
    # The training engine (``edgeft.config.Engine``): which files train the bundle and which runtime can run
    # them. Bundles from before the portable engine have no such field: ``ort-training``.
    engine: str = "ort-training"
    # What the model reads (``INPUT_KINDS``): token ids from the bundle's tokenizer (bundles from before other
    # kinds have no field), images (``preprocessing``: an ``edgeft.images.ImagePreprocessing`` as a dict),
    # numeric feature columns of a table, or arrays by model input name (.npz files).
    input_kind: str = "tokens"
    preprocessing: dict | None = None
    # loss="dpo": {"beta"}. Absent otherwise.
    loss_options: dict | None = None
    # Causal-LM bundles whose graphs read the attention mask as segment ids (1, 2, ...; 0 padding), so that several
    # examples packed into one row (``TrainConfig.pack``) never attend to each other. False (and absent) otherwise.
    packing: bool = False
    # Portable causal-LM bundles exported with gradient checkpointing (``edgeft.export.segmented``): {"layers": the
    # number of decoder layers, "prefix": their trainable names' prefix (``<prefix>.<layer>.<local name>``),
    # "weights": a layer's local weight names in its graphs' input order, "trainable": those that train,
    # "quantised": the frozen ones stored in base_bits}. Absent otherwise.
    segmented: dict | None = None

    def head(self) -> tuple[str, str]:
        """The trainable names of a sentence-pooled head's weight [labels, dimension] and bias [labels]."""
        specs = {t.name: t for t in self.trainable}
        if self.pooling is not None:
            shape = [len(self.labels), int(self.pooling["dimension"])]
            module = self.pooling.get("module", "classifier")  # head_input features: the head module's name
            for name, spec in specs.items():
                bias = name[: -len("weight")] + "bias"
                if module in name and name.endswith(".weight") and spec.shape == shape and bias in specs:
                    return name, bias
        raise BundleError("this bundle has no sentence-pooled classifier head to initialise: export a "
                          "sentence-transformers model for a classification task with pooling='sentence' or 'auto'")

    def to_json(self) -> str:
        data = asdict(self)
        # bundles without them keep their manifest (and digest) as before
        for optional in ("proximal", "pooling", "preprocessing", "loss_options", "segmented"):
            if data[optional] is None:
                del data[optional]
        if data["input_kind"] == "tokens":
            del data["input_kind"]
        if not data["packing"]:
            del data["packing"]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        try:
            version = data["format_version"]
            if version != FORMAT_VERSION:
                raise BundleError(f"bundle format version {version} is not supported by edgeft {__version__} "
                                  f"(it reads version {FORMAT_VERSION}); re-export the bundle")
            specs = {k: [TensorSpec(**t) for t in data[k]] for k in ("inputs", "outputs", "trainable")}
            manifest = cls(**{**data, **specs})
            if manifest.input_kind not in INPUT_KINDS:
                raise BundleError(f"bundle input kind {manifest.input_kind!r} is unknown to edgeft {__version__} (it "
                                  f"knows {', '.join(INPUT_KINDS)}); upgrade edgeft or re-export the bundle")
            if manifest.engine not in ENGINES:
                raise BundleError(f"bundle engine {manifest.engine!r} is unknown to edgeft {__version__} (it knows "
                                  f"{', '.join(ENGINES)}); upgrade edgeft or re-export the bundle")
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest.json is malformed: {exc}; re-export the bundle") from exc
        for name in manifest.files:
            member_name(name)
        return manifest

    @property
    def trainable_names(self) -> list[str]:
        return [t.name for t in self.trainable]


def member_name(name: str) -> str:
    """``name`` when it is a plain relative path inside a bundle folder; a name that could reach outside it
    (absolute, ``..``, backslashes, a drive letter, NUL) raises ``BundleError``."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (not parts or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts
            or re.match(r"^[A-Za-z]:", name)):
        raise BundleError(f"bundle file name {name!r} reaches outside the bundle folder; refused (a bundle names "
                          "its files relative to its folder, without '..')")
    return name


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

    @cached_property  # read once: a coordinator names the bundle in every task it gives
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
        root = path.resolve()
        for name, expected in {MANIFEST: "", **manifest.files}.items():
            file = path / name
            if file.is_symlink() or not file.resolve().is_relative_to(root):
                raise BundleError(f"bundle file {name} in {path} is a symbolic link (or lies behind one); a bundle "
                                  "holds plain files only")
            if name == MANIFEST:
                continue
            if not file.is_file():
                raise BundleError(f"bundle file {name} is missing from {path}; re-download or re-export the bundle")
            actual = sha256_of(file)
            if actual != expected:
                raise BundleError(f"bundle file {name} is corrupt: sha256 {actual[:12]}... does not match the "
                                  f"manifest's {expected[:12]}...; re-download or re-export the bundle")
    return Bundle(path, manifest)


def check_bundle(bundle: Bundle) -> None:
    """Check a bundle's ONNX files before anything runs them (the coordinator when it adds a bundle, a device
    after it downloads one): each passes ``onnx.checker`` (structure and operator schemas; ``full_check=False``,
    no shape inference, external data never loaded) and its external-data references name files of the
    bundle that the manifest pins by sha256, never a path outside it. Raises ``BundleError``."""
    for name in bundle.manifest.files:
        if name.endswith(".onnx"):
            _check_onnx(bundle, name)


def _check_onnx(bundle: Bundle, name: str) -> None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(bundle.file(name)), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise BundleError(f"bundle file {name} is not a readable ONNX model ({exc}); re-export the bundle") from exc
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            try:
                member_name(location)
            except BundleError:
                raise BundleError(f"{name}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                                  "bundle; refused") from None
            if str(PurePosixPath(name).parent / location) not in bundle.manifest.files:  # beside the model
                raise BundleError(f"{name}: tensor {tensor.name!r} keeps its data in {location!r}, which the "
                                  "manifest does not list (its sha256 is not pinned); refused")
    try:  # from the path: external data is checked where it lies (never loaded)
        onnx.checker.check_model(str(bundle.file(name)), full_check=False)
        return
    except onnx.checker.ValidationError as exc:
        error = exc
    # The checker stops at its first error. When that is an operator ONNX Runtime registers itself, check the
    # rest of the graph in memory with those nodes moved aside (external tensors, checked above, become inputs).
    relabelled: set[str] = set()
    while True:
        found = re.search(r"No Op registered for (\w+) with domain_version", str(error))
        op = found.group(1) if found else None
        if op not in ORT_STANDARD_DOMAIN_OPS or op in relabelled:
            raise BundleError(f"bundle file {name} fails onnx.checker: {str(error).strip().splitlines()[0]}; "
                              "re-export the bundle")
        if not relabelled:
            _detach_external(model)
        _relabel(model, op)
        relabelled.add(op)
        try:
            onnx.checker.check_model(model, full_check=False)
            return
        except onnx.checker.ValidationError as exc:
            error = exc


def _detach_external(model) -> None:  # noqa: ANN001
    """Turn ``model``'s external initializers (in memory) into graph inputs of the same type and shape."""
    from onnx import TensorProto, helper

    for graph in _graphs(model.graph):
        external = [t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
        inputs = {i.name for i in graph.input}
        for tensor in external:
            graph.initializer.remove(tensor)
            if tensor.name not in inputs:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))


def _relabel(model, op: str) -> None:  # noqa: ANN001
    """Move the standard-domain nodes ``op`` of ``model`` (in memory) to a private domain the checker skips."""
    domain = "edgeft.ort-registered"
    if all(o.domain != domain for o in model.opset_import):
        model.opset_import.add(domain=domain, version=1)
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.op_type == op and node.domain in ("", "ai.onnx"):
                node.domain = domain


def _graphs(graph):  # noqa: ANN001, ANN202
    """``graph`` and every subgraph in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _tensors(model):  # noqa: ANN001, ANN202
    """Every TensorProto of ``model``: initializers, sparse initializers and tensor attributes, in subgraphs
    and functions too."""
    nodes = [n for f in model.functions for n in f.node]
    for graph in _graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        nodes.extend(graph.node)
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
