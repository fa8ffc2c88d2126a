"""Chat SFT on Tiny Shakespeare, centralised and federated: quality evidence that needs no pretrained LM.

A small chat Llama is built from a config (edgeft.export.toy.tiny_llama with chat=True: a byte-level BPE tokenizer
trained on Tiny Shakespeare with ChatML's special tokens, SmolLM2-Instruct's chat template). Its weights are random
and frozen, so LoRA (rank --rank on every attention and MLP projection, the default targets) must do all the
learning: the point is that chat SFT and its federated form train, not a good Shakespeare chatbot.

Data: Tiny Shakespeare cut into speeches (blocks between blank lines, the speaker's line included), each pair of
consecutive speeches one chat turn: {"messages": [{"role": "user", "content": speech i's speaker line and its last
3 lines}, {"role": "assistant", "content": speech i + 1, whole}]}; no system turn, so the template adds its default
system prompt. Training pairs come from the first 90% of the text, validation pairs from the last 10% (disjoint;
the tokenizer is trained on the first 90% only). The loss is the masked loss: on the assistant's tokens only (its
speech and the end-of-turn marker), as edgeft's causal-LM chat data gives; the system prompt and the user's turn
carry no loss. Examples longer than --max-length tokens are cut (dropped if no assistant token is left; both
counted in the JSON).

  centralised  export_hf (portable engine), then edgeft.train.trainer.train for --epochs epochs; validation masked
               loss and perplexity before training and after each epoch.
  federated    the same bundle, the same training pairs spread iid over --clients simulated devices
               (edgeft.testing.runner.run_simulation: a real coordinator and real agent processes over mutual
               TLS), --rounds rounds of FedAvg with --local-epochs local epochs each; the coordinator's masked
               loss and perplexity on the validation pairs every round (round 0: before training).
For scale, the JSON also gives the validation masked loss of a unigram model of the training assistant tokens
(token frequencies alone, add-one smoothing).

    python bench/chat_sft.py [--epochs 3] [--rounds 3] [--clients 4] [--work runs/chat_sft]
                             [--json-out bench/results/chat_sft.json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TRAIN_FRACTION = 0.9
CUE_LINES = 3  # the user turn: the speaker line and the last lines of the speech before


def speeches(text: str) -> list[str]:
    """The text's speeches: blocks between blank lines (a speaker's line, then what they say)."""
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def cue(speech: str, lines: int = CUE_LINES) -> str:
    """A speech's speaker line and its last ``lines`` lines: what the next speaker answers."""
    speaker, *said = speech.split("\n")
    return "\n".join([speaker, *said[-lines:]])


def chat_rows(text: str, limit: int | None = None) -> list[dict]:
    """One user/assistant turn per pair of consecutive speeches (at most ``limit``, taken evenly): the cue of one
    speech, then the whole next speech."""
    blocks = speeches(text)
    rows = [{"messages": [{"role": "user", "content": cue(a)}, {"role": "assistant", "content": b}]}
            for a, b in zip(blocks, blocks[1:])]
    if limit is not None and len(rows) > limit:
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit)]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def unigram_loss(train_labels: list, val_labels: list, vocab_size: int) -> float:
    """The validation masked loss of a unigram model of the training assistant tokens (add-one smoothing): what
    token frequencies alone give, for scale."""
    import numpy as np

    def tokens(labels: list) -> np.ndarray:
        return np.concatenate([row[row >= 0] for row in labels])

    counts = np.bincount(tokens(train_labels), minlength=vocab_size) + 1.0
    return float(-np.log(counts / counts.sum())[tokens(val_labels)].mean())


def metrics(record: dict, prefix: str = "") -> dict:
    return {"loss": round(record[f"{prefix}loss"], 4), "perplexity": round(record[f"{prefix}perplexity"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="centralised epochs")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=1, help="each client's epochs per round")
    parser.add_argument("--train-pairs", type=int, default=1600, help="training turns (taken evenly from the 90%%)")
    parser.add_argument("--val-pairs", type=int, default=300, help="validation turns (taken evenly from the 10%%)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--init-range", type=float, default=0.05, help="std of the random base weights")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--work", type=Path, default=Path("runs/chat_sft"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from common import emit

    from edgeft.config import AdapterConfig, ExportConfig, TrainConfig
    from edgeft.data import DataConfig, load_dataset
    from edgeft.datasets import TINYSHAKESPEARE
    from edgeft.export import export_hf
    from edgeft.export.toy import tiny_llama
    from edgeft.testing.runner import SimulationConfig, run_simulation
    from edgeft.train.engines import open_session
    from edgeft.train.trainer import evaluate, pad_id_of, train

    start = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    text = TINYSHAKESPEARE.read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * TRAIN_FRACTION))
    train_text, val_text = text[:cut], text[cut:]
    train_file = write_jsonl(args.work / "train.jsonl", chat_rows(train_text, args.train_pairs))
    val_file = write_jsonl(args.work / "validation.jsonl", chat_rows(val_text, args.val_pairs))

    # the tokenizer is trained on the training part only, so the validation text is unseen
    model_dir = tiny_llama(args.work / "model", train_text, vocab_size=args.vocab, hidden_size=args.hidden,
                           num_hidden_layers=args.layers, initializer_range=args.init_range, chat=True)
    config = ExportConfig(task="causal-lm", max_length=args.max_length,
                          adapter=AdapterConfig(rank=args.rank, alpha=2 * args.rank))
    t = time.perf_counter()
    bundle = export_hf(model_dir, args.work / "bundle", config)
    export_s = time.perf_counter() - t
    train_data = load_dataset(DataConfig(train_file), bundle)
    val_data = load_dataset(DataConfig(val_file), bundle)
    unigram = unigram_loss(train_data.labels, val_data.labels,
                           json.loads((model_dir / "config.json").read_text())["vocab_size"])
    local = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, progress=False)

    before = evaluate(open_session(bundle), val_data, "causal-lm", pad_id_of(bundle))
    t = time.perf_counter()
    result = train(bundle, train_data, local, val_data)
    central_s = time.perf_counter() - t
    central = [metrics(h, "val_") | {"train_loss": round(h["train_loss"], 4)} for h in result.history]

    t = time.perf_counter()
    summary = run_simulation(SimulationConfig(
        out=args.work / "federated", train=DataConfig(train_file), test=DataConfig(val_file), bundle=bundle.path,
        clients=args.clients, rounds=args.rounds, partition="iid", head_init="none", baseline=False,
        local=TrainConfig(epochs=args.local_epochs, batch_size=args.batch_size, learning_rate=args.lr,
                          progress=False)))
    federated_s = time.perf_counter() - t
    rounds = summary["history"]["rounds"]
    federated = [{"round": r["round"], "status": r.get("status")} | metrics(r["evaluation"]) for r in rounds]

    result_json = {
        "bench": "chat_sft",
        "model": f"Llama from config ({args.layers} layers, {args.hidden} wide, byte-level BPE vocab {args.vocab}, "
                 f"ChatML template), random frozen weights (std {args.init_range})",
        "adapter": f"LoRA r={args.rank} alpha={2 * args.rank} on the default targets (every attention and MLP "
                   "projection)",
        "trainable_parameters": sum(math.prod(t.shape) for t in bundle.manifest.trainable),
        "data": f"Tiny Shakespeare speeches as user/assistant turns; train from the first {TRAIN_FRACTION:.0%} "
                "of the text, validation from the rest; loss on the assistant's tokens only",
        "train_rows": train_data.notes, "val_rows": val_data.notes,
        "val_assistant_tokens": before["tokens"], "max_length": args.max_length,
        "batch_size": args.batch_size, "lr": args.lr,
        "val_loss_unigram": round(unigram, 4),
        "export_seconds": round(export_s, 1),
        "centralised": {"epochs": args.epochs, "before": metrics(before), "per_epoch": central,
                        "seconds": round(central_s, 1)},
        "federated": {"clients": args.clients, "partition": "iid", "rounds": args.rounds,
                      "local_epochs": args.local_epochs, "strategy": "fedavg",
                      "partition_sizes": summary["partition"]["sizes"], "per_round": federated,
                      "seconds": round(federated_s, 1)},
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result_json, indent=2) + "\n")
    emit(result_json,
         f"chat_sft: validation masked loss {before['loss']:.3f} before, "
         + ", ".join(f"{e['loss']:.3f}" for e in central) + f" after each of {args.epochs} epochs; federated "
         f"({args.clients} clients) " + ", ".join(f"{r['loss']:.3f}" for r in federated)
         + f" at rounds 0..{rounds[-1]['round']} (token frequencies alone: {unigram:.3f})")


if __name__ == "__main__":
    main()
