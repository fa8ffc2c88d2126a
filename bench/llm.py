"""Small language models: generation speed of edgeft's causal-LM packages against PyTorch, in the same run.

Model: a Llama decoder of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, intermediate 1536,
vocabulary 49152, tied embeddings) built from its configuration with random weights (no pretrained LM can be
downloaded here; speed and memory do not depend on the weights), its tokenizer a byte-level BPE trained on Tiny
Shakespeare: the model folder bench/train_step.py builds (cached in --work).

generate  The folder is exported into an ort-training bundle (LoRA r=8 on every attention and MLP projection), its
          adapter at its initial value (B = 0: the base model) deployed by `edgeft deploy` as fp32 (`none`) and
          `int4` packages (KV-cache decoder; int4: every MatMul weight as MatMulNBits). Each package generates
          --new-tokens tokens greedily at batch 1 after a Shakespeare prompt with edgeft.generate (plain
          onnxruntime API, --threads threads), best of --repeats; PyTorch: transformers' generate on the same model
          (fp32, KV cache, eager attention, the same threads). Reported: decode tokens/s (after the first token),
          time to the first token, package size, and how many of the int4 package's tokens equal fp32's.

The training side of the issue's table (tokens/s and peak RSS of LoRA training against PyTorch + PEFT, fp32 base) is
bench/train_step.py's decoder part; an int8 / int4 frozen base during training is not built yet.

    python bench/llm.py [--new-tokens 64] [--threads 2] [--repeats 3] [--json-out bench/results/llm.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import emit  # noqa: E402

PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."


def packages(work: Path, model_dir: Path) -> dict[str, Path]:
    """The fp32 and int4 packages of the decoder (made once in ``work``)."""
    from edgeft.config import AdapterConfig, ExportConfig
    from edgeft.deploy import DeployConfig, deploy
    from edgeft.export import export_hf
    from edgeft.train.engines import initial_parameters
    from edgeft.update import AdapterUpdate, save_update

    bundle_dir = work / "llm" / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        shutil.rmtree(bundle_dir, ignore_errors=True)
        print("exporting the decoder bundle ...", file=sys.stderr, flush=True)
        export_hf(model_dir, bundle_dir, ExportConfig(task="causal-lm", max_length=256, adapter=AdapterConfig(rank=8),
                                                      engine="ort-training"))
    from edgeft.bundle import load_bundle

    bundle = load_bundle(bundle_dir, verify=False)
    adapter = work / "llm" / "update.safetensors"
    save_update(adapter, AdapterUpdate(initial_parameters(bundle), 1, {}, bundle.digest))
    out = {}
    for mode in ("none", "int4"):
        out[mode] = work / "llm" / f"package-{mode}"
        meta = out[mode] / "package.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("bundle_digest") != bundle.digest:
            shutil.rmtree(out[mode], ignore_errors=True)
            print(f"deploying the {mode} package ...", file=sys.stderr, flush=True)
            deploy(DeployConfig(out=out[mode], model_dir=model_dir, bundle=bundle_dir, adapter=adapter, mode=mode,
                                accuracy_budget=100))
    return out


def edgeft_generation(package: Path, new_tokens: int, threads: int, repeats: int) -> dict:
    from edgeft.generate import Generator

    generator = Generator(package, threads=threads)
    runs = [generator.generate(PROMPT, max_new_tokens=new_tokens, chat=False) for _ in range(repeats)]
    best = max(runs, key=lambda r: r.tokens_per_s)
    size = sum(f.stat().st_size for f in package.glob("*.onnx*"))
    return {"tokens_per_s": round(best.tokens_per_s, 1), "first_token_ms": round(best.prefill_seconds * 1000, 1),
            "tokens": best.tokens, "prompt_tokens": best.prompt_tokens, "model_mb": round(size / 2**20, 1),
            "kv_cache": generator.kv_cache, "all_tokens_per_s": [round(r.tokens_per_s, 1) for r in runs]}


def pytorch_generation(model_dir: Path, prompt_ids: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.tensor([prompt_ids])
    rates, first, tokens = [], [], None
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model(input_ids=ids)  # the prompt alone: time to the first token
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
            seconds = time.perf_counter() - started - first[-1]
            tokens = out[0, ids.shape[1]:].tolist()
            rates.append((len(tokens) - 1) / seconds)
    return {"tokens_per_s": round(max(rates), 1), "first_token_ms": round(min(first) * 1000, 1), "tokens": tokens,
            "all_tokens_per_s": [round(r, 1) for r in rates]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from train_step import DECODER_SHAPE, decoder_folder

    model_dir = decoder_folder(args.work, fresh=False)
    built = packages(args.work, model_dir)
    fp32 = edgeft_generation(built["none"], args.new_tokens, args.threads, args.repeats)
    int4 = edgeft_generation(built["int4"], args.new_tokens, args.threads, args.repeats)
    from edgeft.generate import Generator

    prompt_ids = Generator(built["none"]).prompt_ids(PROMPT, chat=False)
    torch_run = pytorch_generation(model_dir, prompt_ids, args.new_tokens, args.threads, args.repeats)
    same = sum(a == b for a, b in zip(int4["tokens"], fp32["tokens"]))
    result = {"model": {"shape": DECODER_SHAPE, "weights": "random (config-built)"}, "batch": 1,
              "new_tokens": args.new_tokens, "threads": args.threads, "prompt_tokens": fp32["prompt_tokens"],
              "edgeft_fp32": fp32, "edgeft_int4": int4, "pytorch_fp32": torch_run,
              "fp32_tokens_equal_pytorch": fp32["tokens"] == torch_run["tokens"],
              "int4_tokens_equal_fp32": f"{same}/{len(fp32['tokens'])}",
              "int4_vs_pytorch_tokens_per_s": round(int4["tokens_per_s"] / torch_run["tokens_per_s"], 2),
              "fp32_vs_pytorch_tokens_per_s": round(fp32["tokens_per_s"] / torch_run["tokens_per_s"], 2)}
    for part in ("edgeft_fp32", "edgeft_int4", "pytorch_fp32"):
        result[part] = {k: v for k, v in result[part].items() if k != "tokens"}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    emit(result, f"llm generate (SmolLM2-135M shape, batch 1, {args.threads} threads): int4 "
                 f"{int4['tokens_per_s']} tokens/s, fp32 {fp32['tokens_per_s']}, PyTorch {torch_run['tokens_per_s']} "
                 f"(int4 x{result['int4_vs_pytorch_tokens_per_s']}); first token {int4['first_token_ms']} ms; "
                 f"int4 {int4['model_mb']} MB vs fp32 {fp32['model_mb']} MB")


if __name__ == "__main__":
    main()
