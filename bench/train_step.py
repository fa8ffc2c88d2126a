"""Training-step throughput: ONNX Runtime training vs PyTorch eager + PEFT, one run, same machine.

all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier head; real BANKING77 batches of 32 with dynamic
padding and length bucketing; same thread count. Each framework runs in its own process so its peak
RSS is its own (the ORT process never imports torch).

    python bench/train_step.py [--steps 60] [--threads 2] [--work runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _batches(bundle_path: Path, n: int):
    from common import TRAIN

    from edgeft.bundle import load_bundle
    from edgeft.data import batches, load_dataset

    bundle = load_bundle(bundle_path)
    data = load_dataset(TRAIN, bundle)
    out = []
    for batch in batches(data, 32, 0, shuffle=True, seed=0):
        out.append(batch)
        if len(out) == n:
            return bundle, out
    return bundle, out


def worker(kind: str, bundle_path: Path, steps: int, warmup: int, threads: int) -> dict:
    if kind == "ort":
        from edgeft.train.session import keep_torch_out

        keep_torch_out()  # as on a device, where torch is not installed
    bundle, data = _batches(bundle_path, steps + warmup)
    if kind == "ort":
        from edgeft.train.session import TrainingSession

        session = TrainingSession(bundle, threads=threads)

        def step(batch):
            session.train_step(batch)
            session.optimizer_step(1e-3)
    else:
        import torch
        from common import CONFIG

        from edgeft.demo import minilm_dir
        from edgeft.export import from_hf_folder
        from edgeft.export.reference import reference_for

        torch.set_num_threads(threads)
        ref = reference_for(from_hf_folder(minilm_dir(), CONFIG), CONFIG, bundle, dropout=True)

        def step(batch):
            ref.step(batch, 1e-3)
    for batch in data[:warmup]:
        step(batch)
    measured = data[warmup:]
    started = time.perf_counter()
    for batch in measured:
        step(batch)
    seconds = time.perf_counter() - started
    samples = sum(len(b["labels"]) for b in measured)
    tokens = sum(int(b["attention_mask"].sum()) for b in measured)
    padded = sum(b["input_ids"].size for b in measured)
    return {"steps": len(measured), "seconds": seconds, "step_s": seconds / len(measured),
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "padding_share": 1 - tokens / padded, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent across fork + exec, so a worker started by a parent that loaded torch would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--worker", choices=["ort", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.work / "bundle", args.steps, args.warmup, args.threads)))
        return
    from common import emit, minilm_bundle

    minilm_bundle(args.work)
    results = {}
    for kind in ("ort", "torch"):
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--threads", str(args.threads), "--work", str(args.work)],
                              capture_output=True, text=True, check=True)
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    ort, pt = results["ort"], results["torch"]
    ratios = {"tokens_per_s": ort["tokens_per_s"] / pt["tokens_per_s"],
              "samples_per_s": ort["samples_per_s"] / pt["samples_per_s"],
              "peak_rss": ort["peak_rss_mb"] / pt["peak_rss_mb"]}
    emit({"bench": "train_step", "model": "all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier",
          "batch": 32, "threads": args.threads, "ort": ort, "pytorch_peft": pt, "ratio_ort_over_pytorch": ratios},
         f"train_step: ORT {ort['tokens_per_s']:.0f} tok/s vs PyTorch+PEFT {pt['tokens_per_s']:.0f} tok/s "
         f"= {ratios['tokens_per_s']:.2f}x; peak RSS {ort['peak_rss_mb']:.0f} MB vs {pt['peak_rss_mb']:.0f} MB "
         f"= {ratios['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
