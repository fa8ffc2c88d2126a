"""The portable engine on the device: train a bundle with plain ONNX Runtime InferenceSessions.

Three graphs (``edgeft.export.portable``): gradient (forward + backward, accumulating), optimizer, eval. The
trainable parameters, their gradient accumulators and the optimizer state stay ONNX Runtime values on the
execution provider's device between steps (IOBinding); they are read back only to save or upload. The frozen
weights are mapped from their file once (memory-mapped, not read into a copy) and handed to both the gradient and
the eval session as the same initializer values.
Never imports torch or ``onnxruntime.training``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.bundle import GRAD_PREFIX, OPTIMIZER_STATE, OUT_SUFFIX, Bundle
from edgeft.bundle import PORTABLE_EVAL as EVAL_MODEL
from edgeft.bundle import PORTABLE_GRADIENT as GRADIENT_MODEL
from edgeft.bundle import PORTABLE_OPTIMIZER as OPTIMIZER_MODEL
from edgeft.bundle import PORTABLE_PARAMETERS as PARAMETERS
from edgeft.errors import BundleError, TrainingError
from edgeft.train.runtime import version_tuple
from edgeft.train.session import check_parameter_values

# Where a provider keeps the tensors it works on (IOBinding device names); others work in CPU memory.
DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                      "ROCMExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
               10: np.float16, 11: np.float64}


def frozen_initializers(path: Path, files: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """The external (frozen) initializers of the ONNX model at ``path``, as views into ``files`` (file name ->
    its bytes; a file not mapped yet is memory-mapped and added): graphs that point into the same file share its
    memory, and the process holds no copy of it beside the operating system's file cache (the pages are the
    file's; copy-on-write, so nothing written through a view reaches the file). Also whether the model holds int4
    initializers (a low-bit frozen base, ``edgeft.export.lowbit``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    int4 = any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    tensors = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info["location"]
        if location not in files:
            files[location] = np.memmap(path.parent / location, dtype=np.uint8, mode="c")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = ONNX_DTYPES.get(tensor.data_type)
        if dtype is None:  # e.g. int4 (a low-bit frozen base): ONNX Runtime reads it from the file itself
            continue
        raw = files[location][offset: offset + length]
        tensors[tensor.name] = raw.view(dtype).reshape(tuple(tensor.dims))
    return tensors, int4


class PortableSession:
    """Train a portable bundle with any onnxruntime (1.19 or later) on ``provider`` (default: CPU).

    The same interface as ``edgeft.train.session.TrainingSession``: ``train_step`` accumulates gradients,
    ``optimizer_step`` applies them and clears them."""

    engine = "portable"

    def __init__(self, bundle: Bundle, threads: int | None = None, provider: str | None = None):
        import onnxruntime as ort
        from safetensors.numpy import load_file

        from edgeft.predict import choose_provider

        manifest = bundle.manifest
        if manifest.engine != "portable":
            raise BundleError(f"the bundle at {bundle.path} is for the {manifest.engine!r} engine, not 'portable'")
        self.provider = choose_provider(provider)
        self._ort = ort
        self._device = DEVICE_OF_PROVIDER.get(self.provider, "cpu")
        ort.set_default_logger_severity(3)
        self.names = manifest.trainable_names
        self.input_names = [i.name for i in manifest.inputs]
        self._input_specs = {i.name: i for i in manifest.inputs}
        self.has_features = manifest.pooling is not None
        proximal = manifest.proximal
        self.anchor_prefix: str | None = proximal["anchor_prefix"] if proximal else None
        self.optimizer = manifest.optimizer.get("name", "adamw")
        self._keep: list = []
        try:
            files: dict[str, np.ndarray] = {}  # the shared weights file, read once
            self._open_graphs(bundle, threads, files)
            self._optimizer = self._session(bundle.file(OPTIMIZER_MODEL), threads, files)
            initial = load_file(str(bundle.file(PARAMETERS)))
        except (BundleError, TrainingError):
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
            raise BundleError(f"ONNX Runtime {ort.__version__} cannot load the portable bundle at {bundle.path}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                              ) from exc
        missing = [n for n in self.names if n not in initial]
        if missing:
            raise BundleError(f"{PARAMETERS} lacks trainable parameters {missing[:3]}; re-export the bundle")
        self._params = {n: self._value(initial[n]) for n in self.names}
        self._anchors = ({self.anchor_prefix + n: self._value(initial[n]) for n in self.names}
                         if self.anchor_prefix else {})
        self._zeros = {n: self._value(np.zeros_like(initial[n])) for n in self.names}
        self._grads = dict(self._zeros)
        self._state = {prefix + n: self._value(np.zeros_like(initial[n]))
                       for n in self.names for prefix in OPTIMIZER_STATE[self.optimizer]}
        self._step = 0

    def _open_graphs(self, bundle: Bundle, threads: int | None, files: dict[str, np.ndarray]) -> None:
        """The sessions of the training step's graphs (``edgeft.train.segmented`` opens its own)."""
        self._gradient = self._session(bundle.file(GRADIENT_MODEL), threads, files)
        self._eval = self._session(bundle.file(EVAL_MODEL), threads, files)

    def _session(self, path: Path, threads: int | None, files: dict[str, np.ndarray], arena: bool = True,
                 fed_weights: bool = False):  # noqa: ANN202
        """An InferenceSession of ``path`` whose external initializers are this process's one copy of them.
        ``fed_weights``: a graph whose frozen weights are inputs, not initializers (``edgeft.train.segmented``'s
        layer graphs), keeps all of ONNX Runtime's graph optimisations: none of them can copy a weight there."""
        ort = self._ort
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = arena
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        frozen, int4 = frozen_initializers(path, files)
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in frozen.items()}
        self._keep.append(values)  # the sessions use these buffers in place: keep them alive
        for name, value in values.items():
            options.add_initializer(name, value)
        # Both would give each session a private copy of the shared weights (prepacked GEMM operands, folded
        # transposes). Measured on all-MiniLM-L6-v2 (batch 32, 2 threads, ORT 1.19.2): peak RSS 486 MB without
        # them, 688 MB with them, step time the same within this machine's noise.
        options.add_session_config_entry("session.disable_prepacking", "1")
        # onnxruntime after 1.19 plans the training graph's memory patterns into a much larger peak: the 135M-parameter
        # decoder of bench/train_step.py peaks at 7.1 GB on 1.32.0 with them, 5.1 GB without (3% slower). On 1.19.2
        # turning them off raises the peak (4.4 -> 4.8 GB), so they stay on there. docs/performance.md has the runs.
        options.enable_mem_pattern = version_tuple(ort.__version__) < (1, 20)
        # ConstantFolding would dequantise a low-bit frozen base into fp32 copies (edgeft.export.lowbit) and fold
        # every frozen transpose; QDQ propagation would add quantise/dequantise pairs around its transposes
        disabled = [] if fed_weights else ["ConstantFolding", "QDQPropagationTransformer"]
        if int4:  # the transpose optimizer mishandles blocked scales (edgeft.export.lowbit)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            disabled.append("TransposeOptimizer")
        return ort.InferenceSession(str(path), options, providers=[self.provider], disabled_optimizers=disabled)

    def _value(self, array: np.ndarray):  # noqa: ANN202
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32), self._device, 0)

    def _check_batch(self, batch: dict[str, np.ndarray]) -> None:
        """Every model input present with the manifest's dtype and rank, and the inputs agreeing on the sizes of
        named axes (batch, sequence): a ``TrainingError`` naming the input, not ONNX Runtime's broadcast error."""
        sizes: dict[str, tuple[str, int]] = {}
        for name in self.input_names:
            if name not in batch:
                raise TrainingError(f"batch lacks the model input {name!r}; the bundle expects {self.input_names}")
            value, spec = np.asarray(batch[name]), self._input_specs[name]
            if str(value.dtype) != spec.dtype:
                raise TrainingError(f"batch input {name!r} is {value.dtype}; the bundle expects {spec.dtype}")
            if value.ndim != len(spec.shape):
                raise TrainingError(f"batch input {name!r} has shape {value.shape}; the bundle expects {spec.shape}")
            for dim, size in zip(spec.shape, value.shape):  # fixed sizes are left to ONNX Runtime
                if isinstance(dim, str):
                    first, expected = sizes.setdefault(dim, (name, int(size)))
                    if size != expected:
                        raise TrainingError(f"batch inputs disagree on the {dim} axis: {first!r} has {expected}, "
                                            f"{name!r} has {size}")

    def _bind_inputs(self, io, batch: dict[str, np.ndarray]) -> None:  # noqa: ANN001
        self._check_batch(batch)
        for name in self.input_names:
            io.bind_cpu_input(name, np.ascontiguousarray(batch[name]))
        for name, value in {**self._params, **self._anchors}.items():
            io.bind_ortvalue_input(name, value)

    def _forward(self, session, batch: dict[str, np.ndarray], outputs: list[str],  # noqa: ANN001
                 grads: bool) -> list:
        io = session.io_binding()
        self._bind_inputs(io, batch)
        for name in outputs:
            io.bind_output(name, "cpu")
        if grads:
            for name in self.names:
                io.bind_ortvalue_input(GRAD_PREFIX + name, self._grads[name])
                io.bind_output(GRAD_PREFIX + name + OUT_SUFFIX, self._device, 0)
        try:
            session.run_with_iobinding(io)
        except Exception as exc:
            raise TrainingError(f"ONNX Runtime failed on this batch: {str(exc).strip().splitlines()[0]}") from exc
        values = io.get_outputs()
        if grads:
            self._grads = dict(zip(self.names, values[len(outputs):]))
        return [v.numpy() for v in values[: len(outputs)]]

    def train_step(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """Forward + backward on one batch; gradients add up until ``optimizer_step``."""
        loss, logits = self._forward(self._gradient, batch, ["loss", "logits"], grads=True)
        return float(loss), logits

    def eval_step(self, batch: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """Forward only: (loss, logits)."""
        loss, logits = self._forward(self._eval, batch, ["loss", "logits"], grads=False)
        return float(loss), logits

    def features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Forward only: the sentence embeddings the task head reads (sentence-pooled bundles)."""
        if not self.has_features:
            raise TrainingError("this bundle's graphs have no 'features' output: export a sentence-transformers "
                                "model with pooling='sentence' (or 'auto') for class statistics")
        return self._forward(self._eval, batch, ["features"], grads=False)[0]

    def optimizer_step(self, learning_rate: float) -> None:
        """Apply the accumulated gradients with ``learning_rate`` and reset them."""
        self._step += 1
        io = self._optimizer.io_binding()
        io.bind_cpu_input("learning_rate", np.array(learning_rate, dtype=np.float32))
        io.bind_cpu_input("step", np.array(self._step, dtype=np.float32))
        prefixes = OPTIMIZER_STATE[self.optimizer]
        for name in self.names:
            io.bind_ortvalue_input(name, self._params[name])
            io.bind_ortvalue_input(GRAD_PREFIX + name, self._grads[name])
            for prefix in prefixes:
                io.bind_ortvalue_input(prefix + name, self._state[prefix + name])
        order = [(None, n) for n in self.names] + [(p, n) for n in self.names for p in prefixes]
        for prefix, name in order:
            io.bind_output((prefix or "") + name + OUT_SUFFIX, self._device, 0)
        self._optimizer.run_with_iobinding(io)
        for (prefix, name), value in zip(order, io.get_outputs()):
            if prefix is None:
                self._params[name] = value
            else:
                self._state[prefix + name] = value
        self._grads = dict(self._zeros)

    def get_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters, by name."""
        return {name: np.array(self._params[name].numpy(), copy=True) for name in self.names}

    def set_parameters(self, values: dict[str, np.ndarray], proximal_anchor: bool = True) -> None:
        """Overwrite trainable parameters (e.g. with a global adapter); names and shapes must match. In a FedProx
        bundle the proximal anchors are set to the same values unless ``proximal_anchor`` is False."""
        check_parameter_values({n: self._params[n].shape() for n in self.names}, values)
        for name, value in values.items():
            self._params[name] = self._value(value)
        if proximal_anchor and self.anchor_prefix is not None:
            self.set_proximal_anchor(values)

    def set_proximal_anchor(self, values: dict[str, np.ndarray]) -> None:
        """FedProx bundles: set w_global of the loss's mu/2 * ||w - w_global||^2 term, by trainable name."""
        if self.anchor_prefix is None:
            raise TrainingError("this bundle has no proximal term; export it with proximal_mu > 0 for FedProx")
        for name, value in values.items():
            if name not in self._params:
                raise TrainingError(f"unknown parameter {name!r}; the bundle trains {len(self.names)} parameters")
            self._anchors[self.anchor_prefix + name] = self._value(value)
