"""The installed ONNX Runtime: its version, for the engines' choices (a module of its own so that the engine
registry and the engines can both ask without importing each other)."""

from __future__ import annotations

MIN_PORTABLE_ORT = (1, 19)


def runtime_version() -> str:
    """The installed onnxruntime's version ("" when none is installed)."""
    try:
        import onnxruntime
    except ImportError:
        return ""
    return onnxruntime.__version__


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.32.0"`` -> ``(1, 32)``: the major and minor numbers of a runtime version, for comparisons."""
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
