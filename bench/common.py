"""Shared set-up for the benchmarks: the all-MiniLM-L6-v2 + LoRA(q, v) + head BANKING77 bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgeft.config import ExportConfig
from edgeft.datasets import banking77, banking77_labels

CONFIG = ExportConfig(labels=tuple(banking77_labels()))
TRAIN, TEST = banking77("train"), banking77("test")


def minilm_bundle(work: Path) -> Path:
    """Export the benchmark bundle afresh into ``work/bundle`` (about 10 s); returns its path."""
    import shutil

    from edgeft.demo import minilm_dir
    from edgeft.export import export_hf

    path = work / "bundle"
    shutil.rmtree(path, ignore_errors=True)
    export_hf(minilm_dir(), path, CONFIG)
    return path


def emit(result: dict, summary: str) -> None:
    """Print the JSON result, then the one-line summary."""
    print(json.dumps(result, indent=2))
    print(summary)
    sys.stdout.flush()
