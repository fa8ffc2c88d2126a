"""The two training engines on a device: which ones this runtime can run, and a session for a bundle.

``ort-training`` needs the ONNX Runtime training build (``onnxruntime-training``, 1.19.2, x86-64 and macOS,
CPython 3.10-3.12); ``portable`` needs any ``onnxruntime`` from 1.19 on (every platform and execution provider,
the training build included, whose InferenceSession runs the portable graphs too).
"""

from __future__ import annotations

from edgeft.bundle import Bundle
from edgeft.errors import BundleError
from edgeft.train.runtime import MIN_PORTABLE_ORT, runtime_version, version_tuple

def available_engines() -> list[str]:
    """The engines this process can run, the preferred first (``portable``, then ``ort-training``)."""
    version = runtime_version()
    if not version:
        return []
    engines = []
    if version_tuple(version) >= MIN_PORTABLE_ORT:
        engines.append("portable")
    try:
        from edgeft.train.session import training_api

        training_api()
        engines.append("ort-training")
    except ImportError:
        pass
    return engines


def open_session(bundle: Bundle, threads: int | None = None, provider: str | None = None):  # noqa: ANN201
    """A training session for ``bundle`` on the engine its manifest names (``PortableSession`` or
    ``TrainingSession``); a clear ``BundleError`` when this runtime cannot run that engine."""
    engine = bundle.manifest.engine
    engines = available_engines()
    if engine not in engines:
        version = runtime_version()
        have = f"onnxruntime {version}" if version else "no onnxruntime"
        need = ("the ONNX Runtime training build (pip install onnxruntime-training-cpu==1.19.2, CPython 3.10-3.12 "
                "on x86-64 or macOS)" if engine == "ort-training" else "onnxruntime 1.19 or later")
        raise BundleError(f"the bundle at {bundle.path} is for the {engine!r} engine, which needs {need}; this "
                          f"device has {have} and runs {', '.join(engines) or 'no engine'}: export the bundle "
                          f"with --engine {'portable' if engine == 'ort-training' else 'ort-training'} or install "
                          "that runtime")
    if engine == "portable" and bundle.manifest.segmented:
        from edgeft.train.segmented import SegmentedSession

        return SegmentedSession(bundle, threads=threads, provider=provider)
    if engine == "portable":
        from edgeft.train.portable import PortableSession

        return PortableSession(bundle, threads=threads, provider=provider)
    from edgeft.train.session import TrainingSession

    return TrainingSession(bundle, threads=threads, provider=provider)


def initial_parameters(bundle: Bundle) -> dict:
    """The trainable parameters as the bundle was exported (LoRA's B matrices at zero: the base model), read from
    its files without opening a training session."""
    import numpy as np

    if bundle.manifest.engine == "portable":
        from safetensors.numpy import load_file

        from edgeft.bundle import PORTABLE_PARAMETERS

        values = load_file(str(bundle.file(PORTABLE_PARAMETERS)))
    else:
        from edgeft.bundle import CHECKPOINT
        from edgeft.train.session import training_api

        state = training_api().CheckpointState.load_checkpoint(str(bundle.file(CHECKPOINT)))
        values = {name: np.array(state.parameters[name].data, copy=True) for name in bundle.manifest.trainable_names}
    return {name: values[name] for name in bundle.manifest.trainable_names}
