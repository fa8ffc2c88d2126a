"""The causal-LM path end to end: a small GPT-2 built from a config, LoRA, trained with ONNX Runtime on
Tiny Shakespeare; validation perplexity before training and after each epoch.

No pretrained GPT-2 can be downloaded here, so the base is random and frozen and the adapters must do all
the learning: the point is that the LM path trains, not a good Shakespeare model.

    python bench/lm_tinyshakespeare.py [--epochs 3] [--work runs/lm]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--init-range", type=float, default=0.05, help="std of the random base weights")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--work", type=Path, default=Path("runs/lm"))
    args = parser.parse_args()

    from common import emit

    from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
    from edgeft.data import DataConfig, load_dataset, split
    from edgeft.datasets import TINYSHAKESPEARE
    from edgeft.export import export_hf
    from edgeft.export.toy import tiny_gpt2
    from edgeft.train.engines import open_session
    from edgeft.train.trainer import evaluate, train

    shutil.rmtree(args.work, ignore_errors=True)
    model_dir = tiny_gpt2(args.work / "model", TINYSHAKESPEARE.read_text(), vocab_size=1024, n_embd=128, n_layer=4,
                          initializer_range=args.init_range)
    targets = ("c_attn", "c_proj", "c_fc")
    config = ExportConfig(task="causal-lm", max_length=128,
                          adapter=AdapterConfig(rank=args.rank, alpha=2 * args.rank, target_modules=targets))
    bundle = export_hf(model_dir, args.work / "bundle", config)
    train_data, val_data = split(load_dataset(DataConfig(TINYSHAKESPEARE), bundle), 0.05, seed=0)
    before = evaluate(open_session(bundle), val_data, "causal-lm", 0)
    result = train(bundle, train_data, TrainConfig(epochs=args.epochs, batch_size=32, learning_rate=args.lr,
                                                   progress=False), val_data)
    ppl = [round(h["val_perplexity"], 2) for h in result.history]
    emit({"bench": "lm_tinyshakespeare",
          "model": f"GPT-2 from config (4 layers, 128 wide, BPE vocab 1024), random weights (std {args.init_range})",
          "adapter": f"LoRA r={args.rank} on {', '.join(targets)}",
          "trainable_parameters": sum(math.prod(t.shape) for t in bundle.manifest.trainable),
          "train_blocks": len(train_data), "val_tokens": before["tokens"], "lr": args.lr,
          "val_perplexity_before": round(before["perplexity"], 2), "val_perplexity_per_epoch": ppl,
          "train_loss_per_epoch": [round(h["train_loss"], 4) for h in result.history],
          "seconds": result.history[-1]["seconds"]},
         f"lm_tinyshakespeare: validation perplexity {before['perplexity']:.1f} before, then "
         + ", ".join(map(str, ppl)) + " after each epoch")


if __name__ == "__main__":
    main()
