"""A causal LM whose fp32 weights exceed 2 GB: export it (both engines) and train it on the portable engine.

Model: a Qwen2-architecture decoder with one layer (hidden 1024, 8 query heads sharing 2 key/value heads,
intermediate 2816) and an untied vocabulary of --vocab rows (default 300,000: the embedding and the output layer hold
1.14 GiB each, 2.33 GiB or 2.50 GB with the layer), random weights, its tokenizer a byte-level BPE trained on Tiny
Shakespeare (ids below 1024; the other rows of the vocabulary are there for their size). Built once in --work.

export    Each engine in its own process: `export_hf` with LoRA r=8 on every attention and MLP projection
          (the default). Reported: wall time, peak RSS (VmHWM) of the process, the bundle's file sizes; for the
          ort-training engine the error it gives (ONNX protobuf files and ORT training checkpoints stop at 2 GB).
train     The portable bundle opened with `open_session` (no torch in the process) and trained --steps steps on
          batches of 2 x 64 Tiny Shakespeare tokens, then in another process on batches of 1 x 8 tokens (almost no
          activations): peak RSS of the process against the size of the frozen weights (portable_frozen.bin) it
          maps, the RSS right after opening the session, and after the steps the resident pages of mapped files
          (the frozen weights read so far) apart from private memory (activations, runtime, and any copy of the
          weights: with 1 x 8 tokens it stays near the runtime's own).

    python bench/large_export.py [--vocab 300000] [--steps 3] [--threads 2] [--json-out bench/results/large_export.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import emit  # noqa: E402

SHAPE = {"hidden_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2,
         "intermediate_size": 2816, "max_position_embeddings": 512, "tie_word_embeddings": False,
         "use_sliding_window": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
MAX_LENGTH = 64


def model_folder(work: Path, vocab: int) -> Path:
    """The Qwen2 folder with ``vocab`` rows (made once in ``work``)."""
    folder = work / f"qwen2-1-layer-{vocab}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from edgeft.datasets import TINYSHAKESPEARE
    from edgeft.export.toy import byte_level_bpe

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    byte_level_bpe(folder, TINYSHAKESPEARE.read_text()[:200_000], 1024)
    torch.manual_seed(0)
    with torch.device("meta"):  # no random initialisation of 300,000 rows twice over
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **SHAPE))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02) if parameter.dim() > 1 else parameter.fill_(1.0)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    model.save_pretrained(folder)
    return folder


def export_column(engine: str, folder: Path, out: Path) -> dict:
    """Export ``folder`` for ``engine`` in this process: wall time and peak RSS, or the error."""
    from memory import peak_rss_mb

    from edgeft.config import AdapterConfig, ExportConfig
    from edgeft.errors import EdgeftError
    from edgeft.export import export_hf

    shutil.rmtree(out, ignore_errors=True)
    config = ExportConfig(task="causal-lm", max_length=MAX_LENGTH, adapter=AdapterConfig(rank=8), engine=engine)
    started = time.perf_counter()
    try:
        export_hf(folder, out, config)
    except EdgeftError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    files = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(out.iterdir()) if p.is_file()}
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "files_mb": files}


def rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory now: all of it (VmRSS), private (RssAnon) or pages of mapped files (RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def train_column(bundle_dir: Path, steps: int, threads: int, rows: int, tokens: int) -> dict:
    """``steps`` LoRA steps of the portable bundle on batches of ``rows`` x ``tokens`` in this process (no torch):
    peak RSS and step time."""
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    import numpy as np

    from memory import peak_rss_mb

    from edgeft.bundle import load_bundle
    from edgeft.data import DataConfig, batches, load_dataset
    from edgeft.datasets import TINYSHAKESPEARE
    from edgeft.train.engines import open_session

    bundle = load_bundle(bundle_dir, verify=False)
    baseline = rss_mb()
    started = time.perf_counter()
    session = open_session(bundle, threads=threads)
    opened = {"open_s": round(time.perf_counter() - started, 1), "rss_after_open_mb": round(rss_mb(), 1),
              "rss_before_open_mb": round(baseline, 1)}
    data = load_dataset(DataConfig(TINYSHAKESPEARE), bundle)
    seconds, losses = [], []
    for batch in list(batches(data.subset(np.arange(rows * steps)), rows, 0))[:steps]:
        batch = {name: value[:, :tokens] for name, value in batch.items()}
        started = time.perf_counter()
        losses.append(round(float(session.train_step(batch)[0]), 4))
        session.optimizer_step(1e-4)
        seconds.append(time.perf_counter() - started)
    return {**opened, "steps": steps, "step_s": round(float(np.median(seconds)), 2), "losses": losses,
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_anon_after_mb": round(rss_mb("RssAnon"), 1),
            "rss_file_after_mb": round(rss_mb("RssFile"), 1)}


def run_column(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--column", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {args[0]} column failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=300_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench/large"))
    parser.add_argument("--engines", default="portable,ort-training")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--column", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.column:
        kind, *rest = args.column
        if kind == "train":
            result = train_column(Path(rest[0]), *(int(value) for value in rest[1:]))
        else:
            result = export_column(kind, Path(rest[0]), Path(rest[1]))
        print(json.dumps(result))
        return
    folder = model_folder(args.work, args.vocab)
    weights = (folder / "model.safetensors").stat().st_size
    result: dict = {"model": {"architecture": "qwen2", **SHAPE, "vocab_size": args.vocab,
                              "fp32_weights_mb": round(weights / 2**20, 1)}, "threads": args.threads}
    for engine in args.engines.split(","):
        print(f"exporting for {engine} ...", file=sys.stderr, flush=True)
        result[engine] = run_column(engine, str(folder), str(args.work / f"bundle-{engine}-{args.vocab}"))
    portable = result.get("portable", {})
    if "error" not in portable and "portable" in result:
        print("training ...", file=sys.stderr, flush=True)
        bundle_dir = args.work / f"bundle-portable-{args.vocab}"
        frozen = (bundle_dir / "portable_frozen.bin").stat().st_size / 2**20
        for key, rows, tokens in (("train", 2, MAX_LENGTH), ("train_1x8", 1, 8)):
            train = run_column("train", str(bundle_dir), str(args.steps), str(args.threads), str(rows), str(tokens))
            train.update(batch=f"{rows} x {tokens} tokens", frozen_mb=round(frozen, 1),
                         peak_rss_vs_frozen=round(train["peak_rss_mb"] / frozen, 2))
            result[key] = train
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    parts = [f"large export ({result['model']['fp32_weights_mb'] / 1024:.2f} GiB fp32, vocab {args.vocab})"]
    if "portable" in result:
        parts.append(f"portable export {portable.get('seconds')} s, peak RSS {portable.get('peak_rss_mb', 0):.0f} MB"
                     + (f" ({portable['error'][:80]})" if "error" in portable else ""))
    if "train" in result:
        train = result["train"]
        parts.append(f"training peak RSS {train['peak_rss_mb']:.0f} MB for {train['frozen_mb']:.0f} MB of frozen "
                     f"weights (x{train['peak_rss_vs_frozen']}; after the steps {train['rss_file_after_mb']:.0f} MB "
                     f"of mapped file pages, {train['rss_anon_after_mb']:.0f} MB private), {train['step_s']} s a step; "
                     f"1 x 8 tokens: {result['train_1x8']['rss_anon_after_mb']:.0f} MB private")
    if "ort-training" in result:
        ort = result["ort-training"]
        parts.append("ort-training: " + (ort["error"][:120] if "error" in ort else f"exported in {ort['seconds']} s"))
    emit(result, "; ".join(parts))


if __name__ == "__main__":
    main()
