"""Deployment modes on the BANKING77 model: size, latency and accuracy against ORT fp32 and PyTorch eager.

Trains the MiniLM + LoRA adapter for one epoch (as `edgeft demo`), then deploys it in every mode and
times ONNX Runtime against the merged PyTorch model in eager mode, same threads, one run.

    python bench/deploy.py [--threads 2] [--work runs/deploy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

MODES = ("none", "fp16", "int8", "int8-static", "int4")


def torch_latency(model, encoded: dict, repeats: int) -> float:
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in encoded.items()}
    with torch.no_grad():
        model(**inputs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/deploy"))
    args = parser.parse_args()

    import torch
    from common import TEST, TRAIN, emit, minilm_bundle

    from edgeft.bundle import load_bundle
    from edgeft.config import TrainConfig
    from edgeft.data import read_records
    from edgeft.demo import minilm_dir
    from edgeft.deploy import DeployConfig, deploy
    from edgeft.deploy.merge import merged_model
    from edgeft.errors import EdgeftError
    from edgeft.predict import Predictor
    from edgeft.run import LocalRun, run_local
    from edgeft.update import load_update

    torch.set_num_threads(args.threads)
    bundle_dir = minilm_bundle(args.work)
    run_local(LocalRun(bundle=bundle_dir, train=TRAIN, out=args.work / "adapter", val_fraction=0.0,
                       config=TrainConfig(epochs=1, threads=args.threads, progress=False)))
    rows = []
    for mode in MODES:
        out = args.work / f"package-{mode}"
        try:
            report = deploy(DeployConfig(model_dir=minilm_dir(), bundle=bundle_dir, adapter=args.work / "adapter",
                                         out=out, mode=mode, eval_data=TEST, calibration_data=TRAIN,
                                         threads=args.threads))
        except EdgeftError as exc:  # over the accuracy budget: still measured and reported
            print(f"{mode}: {exc}", flush=True)
            report = json.loads((out / "report.json").read_text())
        fp32, deployed = report["fp32"], report["deployed"]
        rows.append({"mode": mode, "size_mb": deployed["size_mb"], "size_ratio": report["size_ratio"],
                     "accuracy": round(deployed["accuracy"], 4), "accuracy_delta_points": -report["accuracy_loss_points"],
                     "p50_ms_batch1": round(deployed["latency_batch1"]["p50_ms"], 2),
                     "p50_ms_batch32": round(deployed["latency_batch32"]["p50_ms"], 2),
                     "speedup_vs_ort_fp32_batch1": round(fp32["latency_batch1"]["p50_ms"] / deployed["latency_batch1"]["p50_ms"], 2),
                     "speedup_vs_ort_fp32_batch32": round(fp32["latency_batch32"]["p50_ms"] / deployed["latency_batch32"]["p50_ms"], 2),
                     "good": report["good"]})
    model = merged_model(minilm_dir(), load_bundle(bundle_dir), load_update(args.work / "adapter" / "update.safetensors").tensors)
    predictor = Predictor(args.work / "package-none")
    texts = [r["text"] for r in read_records(TEST)[:32]]
    pt = {1: torch_latency(model, predictor.encode(texts[:1]), 50), 32: torch_latency(model, predictor.encode(texts), 10)}
    for row in rows:
        row["speedup_vs_pytorch_batch1"] = round(pt[1] / row["p50_ms_batch1"], 2)
        row["speedup_vs_pytorch_batch32"] = round(pt[32] / row["p50_ms_batch32"], 2)
    emit({"bench": "deploy", "threads": args.threads, "pytorch_eager_fp32_p50_ms": pt, "modes": rows},
         "deploy: " + "; ".join(f"{r['mode']} {r['size_ratio']:.2f}x size, {r['speedup_vs_ort_fp32_batch32']}x ORT fp32 / "
                                f"{r['speedup_vs_pytorch_batch32']}x PyTorch at batch 32, {r['accuracy_delta_points']:+.2f} pts"
                                for r in rows))


if __name__ == "__main__":
    main()
