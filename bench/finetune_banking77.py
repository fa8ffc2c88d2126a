"""The real run: all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier on BANKING77, edgeft (ONNX Runtime)
vs PyTorch + PEFT with the same recipe, initial weights, batches and schedule, in one run.

Recipe: batch 32, peak lr 3e-3, AdamW (weight decay 0.01), 6% warm-up then linear decay, 3 epochs;
test accuracy and macro-F1 after every epoch. PyTorch trains in train mode (dropout 0.1, the usual
recipe); edgeft's graph runs without dropout, so a second PyTorch run without dropout (the same graph as
edgeft's) is reported too.

    python bench/finetune_banking77.py [--epochs 3] [--threads 2] [--work runs/bench]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--no-twin", dest="twin", action="store_false",
                        help="skip the PyTorch run without dropout (edgeft's exact graph)")
    args = parser.parse_args()

    import torch
    from common import CONFIG, TEST, TRAIN, emit, minilm_bundle

    from edgeft.bundle import load_bundle
    from edgeft.config import TrainConfig
    from edgeft.data import batches, load_dataset
    from edgeft.demo import minilm_dir
    from edgeft.export import from_hf_folder
    from edgeft.export.reference import reference_for
    from edgeft.train.metrics import Accumulator
    from edgeft.train.schedule import warmup_linear
    from edgeft.train.trainer import plan_steps, train

    bundle = load_bundle(minilm_bundle(args.work))
    train_data, test_data = load_dataset(TRAIN, bundle), load_dataset(TEST, bundle)
    config = TrainConfig(epochs=args.epochs, batch_size=32, learning_rate=3e-3, threads=args.threads, progress=False)

    started = time.perf_counter()
    ort_history = []
    train(bundle, train_data, config, test_data, on_epoch=ort_history.append)
    ort_seconds = time.perf_counter() - started

    torch.set_num_threads(args.threads)
    _, total = plan_steps(len(train_data), config)
    warmup = int(round(total * config.warmup_ratio))

    def pytorch_run(dropout: bool) -> tuple[list[dict], float]:
        reference = reference_for(from_hf_folder(minilm_dir(), CONFIG), CONFIG, bundle, dropout=dropout)
        history, step = [], 0
        started = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            for batch in batches(train_data, 32, 0, shuffle=True, seed=config.seed + epoch,
                                 bucket_size=config.bucket_size):
                reference.step(batch, warmup_linear(step, total, warmup, config.learning_rate))
                step += 1
            reference.graph.eval()
            acc = Accumulator("classification")
            for batch in batches(test_data, 64, 0):
                acc.add(reference.logits(batch), batch["labels"])
            reference.graph.train(dropout)
            history.append({"epoch": epoch, **{f"val_{k}": v for k, v in acc.result().items()},
                            "seconds": round(time.perf_counter() - started, 2)})
        return history, time.perf_counter() - started

    torch_history, torch_seconds = pytorch_run(dropout=True)
    twin_history, _ = pytorch_run(dropout=False) if args.twin else ([], 0.0)

    def table(history):
        return [{"epoch": h["epoch"], "test_accuracy": round(h["val_accuracy"], 4),
                 "test_macro_f1": round(h["val_macro_f1"], 4), "seconds": h["seconds"]} for h in history]

    ort, pt = table(ort_history), table(torch_history)
    gaps = [round(100 * (o["test_accuracy"] - p["test_accuracy"]), 2) for o, p in zip(ort, pt)]
    emit({"bench": "finetune_banking77", "recipe": "LoRA r=8 alpha=16 (query, value) + classifier, batch 32, "
          f"lr 3e-3, AdamW wd 0.01, warm-up 6% + linear decay, {args.epochs} epochs", "threads": args.threads,
          "edgeft_ort": ort, "pytorch_peft": pt, "accuracy_gap_points": gaps,
          "pytorch_peft_without_dropout": table(twin_history),
          "train_seconds": {"edgeft_ort": round(ort_seconds, 1), "pytorch_peft": round(torch_seconds, 1)}},
         "finetune_banking77: test accuracy per epoch edgeft " + ", ".join(f"{o['test_accuracy']:.1%}" for o in ort)
         + " vs PyTorch+PEFT " + ", ".join(f"{p['test_accuracy']:.1%}" for p in pt)
         + f" (gap {', '.join(map(str, gaps))} points); time {ort_seconds:.0f} s vs {torch_seconds:.0f} s")



if __name__ == "__main__":
    main()
