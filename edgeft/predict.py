"""Run a deployment package: tokenise with its tokenizer.json, run its model.onnx with ONNX Runtime.

Needs only onnxruntime (the plain inference package works) and tokenizers: no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeft.errors import BundleError, ConfigError

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "QNNExecutionProvider", "OpenVINOExecutionProvider",
                       "CoreMLExecutionProvider", "CPUExecutionProvider")


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
        from tokenizers import Tokenizer

        package_dir = Path(package_dir)
        meta_path = package_dir / "package.json"
        if not meta_path.is_file():
            raise BundleError(f"{package_dir} is not a deployment package (package.json is missing); "
                              "make one with `edgeft deploy`")
        self.meta = json.loads(meta_path.read_text())
        shape = self.meta.get("fixed_shape")
        # (batch, sequence) when the package's model takes only that input shape (NPU packages)
        self.fixed_shape: tuple[int, int] | None = (int(shape[0]), int(shape[1])) if shape else None
        self.labels = list(self.meta["labels"])
        self.tokenizer = Tokenizer.from_file(str(package_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.provider = choose_provider(provider)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model = Path(model_file) if model_file else package_dir / "model.onnx"
        try:
            self.session = ort.InferenceSession(str(model), options, providers=[self.provider])
        except Exception as exc:  # ORT raises its own InvalidProtobuf / Fail types
            raise BundleError(f"ONNX Runtime cannot load {model}: {exc}") from exc

    def encode(self, texts: list[str], fill_batch: bool = False) -> dict[str, np.ndarray]:
        """Model inputs for ``texts``, tokenised and truncated exactly as in training (and padded to the fixed
        sequence length, and with ``fill_batch`` to the fixed batch size, when the package has one)."""
        from edgeft.data import pad, truncate

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

    def run(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        """Logits for encoded inputs; a fixed-shape model runs them in slices of its batch size."""
        fixed = self.fixed_shape
        if not fixed:
            return self.session.run(["logits"], encoded)[0]
        rows = len(encoded["input_ids"])
        outputs = []
        for start in range(0, rows, fixed[0]):
            chunk = {k: v[start: start + fixed[0]] for k, v in encoded.items()}
            short = fixed[0] - len(chunk["input_ids"])
            if short:
                chunk = {k: np.pad(v, ((0, short), (0, 0))) for k, v in chunk.items()}
            outputs.append(self.session.run(["logits"], chunk)[0][: fixed[0] - short])
        return np.concatenate(outputs)

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.run(self.encode(texts))

    def predict(self, texts: list[str], batch_size: int = 32) -> list[tuple[str, float]]:
        """(label, probability) for each text."""
        results = []
        for start in range(0, len(texts), batch_size):
            logits = self.logits(texts[start: start + batch_size]).astype(np.float64)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            for row in probs:
                best = int(row.argmax())
                results.append((self.labels[best] if best < len(self.labels) else str(best), float(row[best])))
        return results
