"""Run a deployment package: read its inputs as training read them, run its model.onnx with ONNX Runtime.

Text packages tokenise with their tokenizer.json; image packages preprocess image files with the package's
``preprocessing`` (evaluation transform: resize, centre crop, normalise; no augmentation); feature packages read
numeric columns of a CSV/JSONL file (or an .npz); array packages read an .npz of arrays by input name. Needs only
onnxruntime (the plain inference package works), numpy, tokenizers and Pillow: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgeft.bundle import TensorSpec
from edgeft.errors import BundleError, ConfigError, DataError

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "QNNExecutionProvider", "OpenVINOExecutionProvider",
                       "CoreMLExecutionProvider", "CPUExecutionProvider")
BATCH = 32


def choose_provider(requested: str | None = None) -> str:
    """The execution provider to use: ``requested`` if the runtime offers it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        name = requested if requested.endswith("ExecutionProvider") else f"{requested.upper()}ExecutionProvider"
        name = {"OPENVINOExecutionProvider": "OpenVINOExecutionProvider",
                "COREMLExecutionProvider": "CoreMLExecutionProvider"}.get(name, name)
        if name not in available:
            raise ConfigError(f"execution provider {requested!r} is not available here; this runtime offers "
                              f"{', '.join(available)}")
        return name
    return "CPUExecutionProvider"


class Predictor:
    """A loaded deployment package."""

    def __init__(self, package_dir: str | Path, model_file: str | Path | None = None, provider: str | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        package_dir = Path(package_dir)
        meta_path = package_dir / "package.json"
        if not meta_path.is_file():
            raise BundleError(f"{package_dir} is not a deployment package (package.json is missing); "
                              "make one with `edgeft deploy`")
        self.meta = json.loads(meta_path.read_text())
        self.input_kind: str = self.meta.get("input_kind", "tokens")  # packages from before other kinds: text
        self.inputs = [TensorSpec(**spec) for spec in self.meta.get("inputs") or []]
        shape = self.meta.get("fixed_shape")
        # (batch, sequence) for text, (batch,) for the others, when the package's model takes only that (NPUs)
        self.fixed_shape: tuple[int, ...] | None = tuple(int(d) for d in shape) if shape else None
        self.labels = list(self.meta["labels"])
        self.tokenizer = None
        self.preprocessing = None
        if self.input_kind == "tokens":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(package_dir / "tokenizer.json"))
            self.tokenizer.no_padding()
            self.tokenizer.no_truncation()
        elif self.input_kind == "image":
            from edgeft.images import ImagePreprocessing

            self.preprocessing = ImagePreprocessing.from_dict(self.meta["preprocessing"])
        self.provider = choose_provider(provider)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model = Path(model_file) if model_file else package_dir / "model.onnx"
        try:
            self.session = ort.InferenceSession(str(model), options, providers=[self.provider])
        except Exception as exc:  # ORT raises its own InvalidProtobuf / Fail types
            raise BundleError(f"ONNX Runtime cannot load {model}: {exc}") from exc
        self.input_names = [value.name for value in self.session.get_inputs()]

    def encode(self, texts: list[str], fill_batch: bool = False) -> dict[str, np.ndarray]:
        """Model inputs for ``texts``, tokenised and truncated exactly as in training (and padded to the fixed
        sequence length, and with ``fill_batch`` to the fixed batch size, when the package has one)."""
        from edgeft.data import pad, truncate

        if self.tokenizer is None:
            raise ConfigError(f"this package's model reads {self.input_kind} inputs, not texts")
        fixed = self.fixed_shape
        limit = min(int(self.meta["max_length"]), fixed[1]) if fixed else int(self.meta["max_length"])
        ids = [truncate(np.asarray(e.ids, dtype=np.int64), limit)
               for e in self.tokenizer.encode_batch([str(t) for t in texts])]
        input_ids, mask = pad(ids, int(self.meta["pad_id"]))
        if fixed:
            extra_rows = fixed[0] - len(ids) if fill_batch else 0
            widths = ((0, max(extra_rows, 0)), (0, fixed[1] - input_ids.shape[1]))
            input_ids = np.pad(input_ids, widths, constant_values=int(self.meta["pad_id"]))
            mask = np.pad(mask, widths, constant_values=0)
        return {"input_ids": input_ids, "attention_mask": mask}

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Logits for model inputs (examples first); a fixed-shape model runs them in slices of its batch size,
        the last one padded with zero rows. A decoder with a KV cache gets an empty one (and its position ids)."""
        feed = {name: feed[name] for name in self.input_names if name in feed}
        if len(feed) < len(self.input_names):
            feed.update(empty_cache(self.session, feed["attention_mask"]))
        fixed = self.fixed_shape
        if not fixed:
            return self.session.run(["logits"], feed)[0]
        rows = len(next(iter(feed.values())))
        outputs = []
        for start in range(0, rows, fixed[0]):
            chunk = {k: v[start: start + fixed[0]] for k, v in feed.items()}
            short = fixed[0] - len(next(iter(chunk.values())))
            if short:
                chunk = {k: np.pad(v, [(0, short)] + [(0, 0)] * (v.ndim - 1)) for k, v in chunk.items()}
            outputs.append(self.session.run(["logits"], chunk)[0][: fixed[0] - short])
        return np.concatenate(outputs)

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.run(self.encode(texts))

    def top(self, logits: np.ndarray) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class of each row of logits (softmax)."""
        logits = logits.astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        best = probs.argmax(-1)
        return [(self.labels[b] if b < len(self.labels) else str(b), float(row[b])) for row, b in zip(probs, best)]

    def predict(self, texts: list[str], batch_size: int = BATCH) -> list[tuple[str, float]]:
        """(label, probability) for each text."""
        results = []
        for start in range(0, len(texts), batch_size):
            results += self.top(self.logits(texts[start: start + batch_size]))
        return results

    def images(self, paths: Sequence[str | Path]) -> np.ndarray:
        """The model input of image files: [N, C, size, size] float32, preprocessed as in evaluation."""
        from edgeft.images import preprocess_batch

        if self.preprocessing is None:
            raise ConfigError(f"this package's model reads {self.input_kind} inputs, not images")
        return preprocess_batch(list(paths), self.preprocessing)

    def predict_images(self, paths: Sequence[str | Path], batch_size: int = BATCH) -> Iterator[dict]:
        """{"file", "label", "score"} for each image file, or {"file", "error"} for one that does not decode (the
        others go on)."""
        from edgeft.images import load_image, preprocess

        for start in range(0, len(paths), batch_size):
            good, pixels = [], []
            for path in paths[start: start + batch_size]:
                try:
                    pixels.append(preprocess(load_image(path, self.preprocessing), self.preprocessing))
                    good.append(path)
                except DataError as exc:
                    yield {"file": str(path), "error": str(exc)}
            if good:
                name = self.inputs[0].name if self.inputs else self.input_names[0]
                for path, (label, score) in zip(good, self.top(self.run({name: np.stack(pixels)}))):
                    yield {"file": str(path), "label": label, "score": score}

    def predict_arrays(self, path: str | Path, feature_columns: Sequence[str] | None = None,
                       label_column: str = "label", batch_size: int = BATCH) -> Iterator[dict]:
        """{"file", "row", "label", "score"} for each example of an .npz file (arrays by input name) or, for a
        features package, each row of a CSV/JSONL file (``feature_columns``; rows counted from 1)."""
        feed = read_arrays(path, self.inputs, self.input_kind, feature_columns, label_column)
        rows = len(next(iter(feed.values())))
        for start in range(0, rows, batch_size):
            chunk = {k: v[start: start + batch_size] for k, v in feed.items()}
            for row, (label, score) in enumerate(self.top(self.run(chunk)), start + 1):
                yield {"file": str(path), "row": row, "label": label, "score": score}


def empty_cache(session, attention_mask: np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN001
    """A decoder's other inputs for a first pass: an empty KV cache (``past_key_values.*``: [batch, heads, 0,
    head_dim]) and, where it reads them, position ids counted over the attention mask."""
    batch = attention_mask.shape[0]
    feed = {}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            heads, head_dim = (d if isinstance(d, int) else 1 for d in (spec.shape[1], spec.shape[3]))
            feed[spec.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
        elif spec.name == "position_ids":
            feed[spec.name] = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)
    return feed


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named, folders expanded to the image files under them (sorted; hidden ones skipped)."""
    from edgeft.images import is_image_file

    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path} holds no image files")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files


def read_arrays(path: str | Path, specs: Sequence[TensorSpec], kind: str, feature_columns: Sequence[str] | None = None,
                label_column: str = "label") -> dict[str, np.ndarray]:
    """Model inputs from a file, checked against the package's input specs (``edgeft.arrays.check_arrays``): an .npz
    of arrays by input name (a ``labels`` array, if any, is ignored) or, for a features package, the named numeric
    columns of a CSV/JSONL table ('all': every column but ``label_column``). One ``DataError`` line per problem."""
    from edgeft.arrays import check_arrays

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as loaded:
                arrays = {name: loaded[name] for name in loaded.files}
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path} is not a readable .npz file of arrays by input name ({exc})") from exc
        return check_arrays(arrays, specs, str(path))
    if kind != "features":
        raise DataError(f"{path}: this package's model reads arrays by input name ({', '.join(s.name for s in specs)}): "
                        "give an .npz file")
    if not feature_columns:
        raise DataError(f"{path}: name the feature columns with --feature-columns (comma-separated, or 'all' for "
                        "every column but the label)")
    return {specs[0].name: _feature_table(path, feature_columns, label_column, specs[0])}


def _feature_table(path: Path, columns: Sequence[str], label_column: str, spec: TensorSpec) -> np.ndarray:
    """The feature columns of a table to predict on (the label column, if the table has one, is not a feature)."""
    from edgeft.arrays import check_arrays, read_feature_table

    features, _ = read_feature_table(path, "all" if list(columns) == ["all"] else columns, label_column,
                                     labelled=False)
    return check_arrays({spec.name: features}, [spec], f"{path} ({features.shape[1]} feature columns)")[spec.name]


def predict_files(predictor: Predictor, inputs: Sequence[str | Path], feature_columns: Sequence[str] | None = None,
                  label_column: str = "label") -> Iterator[dict]:
    """One record per example of the input files of a package that does not read text: image files and folders
    (a file that does not decode gives {"file", "error"} and the others go on), or data files (.npz; CSV/JSONL
    feature columns), whose problems (a wrong shape, a missing column) stop with a ``DataError``."""
    if predictor.input_kind == "tokens":
        raise ConfigError("this package reads texts: use Predictor.predict")
    if not inputs:
        raise DataError("give the inputs to predict: " + ("image files or folders" if predictor.input_kind == "image"
                                                          else "data files (.npz, or CSV/JSONL feature columns)"))
    if predictor.input_kind == "image":
        yield from predictor.predict_images(image_files(inputs))
        return
    for path in inputs:
        yield from predictor.predict_arrays(path, feature_columns, label_column)
