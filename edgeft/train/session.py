"""The on-device half of ONNX Runtime training: a thin wrapper over ``onnxruntime.training.api``.

One of the two modules that touch ``onnxruntime.training`` (the other is ``edgeft.export.artifacts``).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

from edgeft.bundle import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Bundle
from edgeft.errors import BundleError, TrainingError


HOST_ONLY_PACKAGES = ("torch", "transformers", "peft", "optimum")


def keep_torch_out() -> None:
    """Make this process a device process: torch and friends stay unloaded even where they are installed.

    The ONNX Runtime training build imports torch on ``import onnxruntime`` whenever it can (to probe for
    ORTModule), which costs a device process about 250 MB and a second of start-up for nothing. Call this
    before anything imports onnxruntime; it does nothing once torch is loaded.
    """
    for name in HOST_ONLY_PACKAGES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def training_api() -> types.ModuleType:
    """``onnxruntime.training.api`` without importing torch.

    The package ``onnxruntime.training`` imports torch in its ``__init__`` (for ORTModule and AMP), which a
    device neither has nor needs. When the package is not loaded yet, a bare package entry pointing at its
    folder lets Python import just the ``api`` sub-package, which needs only ORT's own bindings.
    """
    if "onnxruntime.training" not in sys.modules:
        import onnxruntime

        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        sys.modules["onnxruntime.training"] = package
    from onnxruntime.training import api

    return api


def check_parameter_values(shapes: dict[str, tuple], values: dict[str, np.ndarray]) -> None:
    """Raise TrainingError unless every tensor of ``values`` names a trainable parameter of ``shapes`` (name ->
    shape) and has its shape: what both engines' ``set_parameters`` accept."""
    for name, value in values.items():
        if name not in shapes:
            raise TrainingError(f"unknown parameter {name!r}; the bundle trains {len(shapes)} parameters")
        if tuple(shapes[name]) != tuple(value.shape):
            raise TrainingError(f"parameter {name!r} has shape {tuple(shapes[name])}, got {tuple(value.shape)}")


class TrainingSession:
    """Train a bundle's trainable parameters on CPU (or another provider ORT offers).

    ``train_step`` accumulates gradients; ``optimizer_step`` applies them and clears them.
    """

    engine = "ort-training"

    def __init__(self, bundle: Bundle, threads: int | None = None, provider: str | None = None):
        import onnxruntime as ort

        from edgeft.predict import choose_provider

        if bundle.manifest.engine != "ort-training":
            raise BundleError(f"the bundle at {bundle.path} is for the {bundle.manifest.engine!r} engine; open it "
                              "with edgeft.train.engines.open_session")
        self.provider = choose_provider(provider)
        device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        api = training_api()
        CheckpointState, Module, Optimizer = api.CheckpointState, api.Module, api.Optimizer

        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._state = CheckpointState.load_checkpoint(str(bundle.file(CHECKPOINT)))
            self._module = Module(str(bundle.file(TRAINING_MODEL)), self._state, str(bundle.file(EVAL_MODEL)),
                                  device=device, session_options=options)
            self._optimizer = Optimizer(str(bundle.file(OPTIMIZER_MODEL)), self._module)
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
            raise BundleError(f"ONNX Runtime cannot load the bundle at {bundle.path}: {exc}") from exc
        self.names = bundle.manifest.trainable_names
        self.input_names = [i.name for i in bundle.manifest.inputs]
        self.has_features = bundle.manifest.pooling is not None
        proximal = bundle.manifest.proximal
        self.anchor_prefix: str | None = proximal["anchor_prefix"] if proximal else None

    def _outputs(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._module(*[batch[name] for name in self.input_names])
        except KeyError as exc:
            raise TrainingError(f"batch lacks the model input {exc}; the bundle expects {self.input_names}") from exc

    def _run(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        outputs = self._outputs(batch)
        return float(outputs[0]), outputs[1]

    def train_step(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """Forward + backward on one batch; gradients add up until ``optimizer_step``."""
        self._module.train()
        return self._run(batch)

    def eval_step(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """Forward only: (loss, logits)."""
        self._module.eval()
        return self._run(batch)

    def features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Forward only: the sentence embeddings the task head reads, [batch, dimension] (bundles whose
        manifest has ``pooling``: sentence-pooled heads)."""
        if not self.has_features:
            raise TrainingError("this bundle's graphs have no 'features' output: export a sentence-transformers "
                                "model with pooling='sentence' (or 'auto') for class statistics")
        self._module.eval()
        return self._outputs(batch)[2]

    def optimizer_step(self, learning_rate: float) -> None:
        """Apply the accumulated gradients with ``learning_rate`` and reset them."""
        self._optimizer.set_learning_rate(float(learning_rate))
        self._optimizer.step()
        self._module.lazy_reset_grad()

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters, by name."""
        return {name: np.array(self._state.parameters[name].data, copy=True) for name in self.names}

    def set_parameters(self, values: dict[str, np.ndarray], proximal_anchor: bool = True) -> None:
        """Overwrite trainable parameters (e.g. with a global adapter); names and shapes must match.

        In a FedProx bundle the proximal term's anchors are set to the same values (the adapter a round
        starts from is the one local training is pulled towards), unless ``proximal_anchor`` is False."""
        check_parameter_values({n: self._state.parameters[n].data.shape for n in self.names}, values)
        for name, value in values.items():
            self._state.parameters[name].data = np.ascontiguousarray(value, dtype=np.float32)
        if proximal_anchor and self.anchor_prefix is not None:
            self.set_proximal_anchor(values)

    def set_proximal_anchor(self, values: dict[str, np.ndarray]) -> None:
        """FedProx bundles: set w_global of the loss's mu/2 * ||w - w_global||^2 term, by trainable name."""
        if self.anchor_prefix is None:
            raise TrainingError("this bundle has no proximal term; export it with proximal_mu > 0 for FedProx")
        for name, value in values.items():
            self._state.parameters[self.anchor_prefix + name].data = np.ascontiguousarray(value, dtype=np.float32)
