"""The causal-LM path end to end: a small GPT-2 built from a config, LoRA on attention and MLP, trained
with ONNX Runtime on Tiny Shakespeare; validation perplexity per epoch.

The model's weights are random (no pretrained GPT-2 can be downloaded here), so LoRA has to do all the
learning: the point is that the LM path trains, not a good Shakespeare model.

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
    parser.add_argument("--work", type=Path, default=Path("runs/lm"))
    args = parser.parse_args()

    from common import emit

    from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
    from edgeft.data import DataConfig, Encoder, load_dataset, split
    from edgeft.datasets import TINYSHAKESPEARE
    from edgeft.export import export_hf
    from edgeft.export.toy import tiny_gpt2
    from edgeft.run import LocalRun, run_local
    from edgeft.train.session import TrainingSession
    from edgeft.train.trainer import evaluate

    shutil.rmtree(args.work, ignore_errors=True)
    text = TINYSHAKESPEARE.read_text()
    model_dir = tiny_gpt2(args.work / "model", text, vocab_size=1024, n_embd=128, n_layer=4)
    config = ExportConfig(task="causal-lm", max_length=128,
                          adapter=AdapterConfig(rank=16, alpha=32, target_modules=("c_attn", "c_proj", "c_fc")))
    bundle = export_hf(model_dir, args.work / "bundle", config)
    data = load_dataset(DataConfig(TINYSHAKESPEARE), bundle, Encoder(bundle))
    _, val = split(data, 0.05, seed=0)
    before = evaluate(TrainingSession(bundle), val, "causal-lm", 0)
    _, summary = run_local(LocalRun(bundle=args.work / "bundle", train=DataConfig(TINYSHAKESPEARE), val_fraction=0.05,
                                    config=TrainConfig(epochs=args.epochs, batch_size=32, learning_rate=3e-3,
                                                       progress=False), out=args.work / "adapter"))
    ppl = [round(h["val_perplexity"], 2) for h in summary["history"]]
    n_params = sum(math.prod(t.shape) for t in bundle.manifest.trainable)
    emit({"bench": "lm_tinyshakespeare", "model": "GPT-2 from config (4 layers, 128 wide, BPE vocab 1024), random "
          "weights", "adapter": "LoRA r=16 on c_attn, c_proj, c_fc", "trainable_parameters": n_params,
          "train_examples": summary["n_examples"], "val_perplexity_before": round(before["perplexity"], 2),
          "val_perplexity_per_epoch": ppl, "history": summary["history"]},
         f"lm_tinyshakespeare: validation perplexity {before['perplexity']:.1f} before, then "
         + ", ".join(map(str, ppl)) + " after each epoch")


if __name__ == "__main__":
    main()
