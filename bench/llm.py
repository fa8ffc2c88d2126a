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

train     (--parts train) LoRA r=8 training with an fp32, int8 and int4 frozen base (portable engine,
          edgeft.export.lowbit) against PyTorch + PEFT (fp32), on --shape's widths (smollm2-135m: the Llama above;
          qwen2.5-0.5b: Qwen2, 24 layers, hidden 896, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936,
          tied embeddings) with --layers layers (default: 6; 0: the shape's full depth; a full-depth portable export
          takes minutes per bundle), batches of 4 x 256 Tiny Shakespeare tokens, --steps steps (median after the
          first), each column in its own process: peak RSS (VmHWM), tokens/s and the frozen weights' size. A base
          named BASE+checkpointing (e.g. int4+checkpointing) is exported with gradient checkpointing
          (edgeft.export.segmented: the step layer by layer, each layer recomputed in the backward pass);
          BASE+selective also keeps each layer's projection outputs for the backward pass (keep_projections);
          --pytorch-checkpointing adds PyTorch + PEFT with transformers' gradient checkpointing as a second peer.

    python bench/llm.py [--new-tokens 64] [--threads 2] [--repeats 3] [--json-out bench/results/llm.json]
    python bench/llm.py --parts train [--shape smollm2-135m|qwen2.5-0.5b] [--layers 6] [--bases fp32,int8,int4]
                        [--steps 5] [--json-out bench/results/llm_train.json]
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
QWEN25_05B_SHAPE = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                    "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
                    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True, "initializer_range": 0.02, "use_sliding_window": False,
                    "bos_token_id": 0, "eos_token_id": 0}
BASES = {"fp32": None, "int8": 8, "int4": 4}
CHECKPOINTING = "+checkpointing"  # a base's column with gradient checkpointing (edgeft.export.segmented)
SELECTIVE = "+selective"  # ... keeping the projections' outputs for the backward pass (keep_projections)


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


def train_folder(work: Path, shape: str, layers: int) -> Path:
    """A model folder of ``shape``'s widths with ``layers`` layers (0: all; random weights, the decoder's tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from train_step import DECODER_SHAPE, decoder_folder

    config_class, model_class, widths = ((LlamaConfig, LlamaForCausalLM, DECODER_SHAPE) if shape == "smollm2-135m"
                                         else (Qwen2Config, Qwen2ForCausalLM, QWEN25_05B_SHAPE))
    layers = layers or widths["num_hidden_layers"]
    folder = work / "llm" / (f"train-{layers}-layers" if shape == "smollm2-135m" else f"train-{shape}-{layers}-layers")
    if not (folder / "model.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(decoder_folder(work, fresh=False) / "tokenizer.json", folder / "tokenizer.json")
        torch.manual_seed(0)
        model_class(config_class(**{**widths, "num_hidden_layers": layers}, attn_implementation="eager")
                    ).save_pretrained(folder)
    return folder


def train_column(column: str, folder: Path, bundle_dir: Path, steps: int, threads: int) -> dict:
    """One training column in this process: ``steps`` LoRA steps on batches of 4 x 256 Tiny Shakespeare tokens;
    (median step seconds after the first, tokens/s, peak RSS)."""
    import numpy as np

    from memory import peak_rss_mb

    if column.startswith("pytorch"):
        import torch

        from edgeft.config import AdapterConfig, ExportConfig
        from edgeft.export.adapters import apply_adapter
        from edgeft.export.graph import TrainingGraph
        from edgeft.export.source import from_hf_folder

        torch.set_num_threads(threads)
        config = ExportConfig(task="causal-lm", max_length=256, adapter=AdapterConfig(rank=8))
        source = from_hf_folder(folder, config)
        adapted = apply_adapter(source, config.adapter, config.task)
        graph = TrainingGraph(adapted.model, source.input_names, config.loss, 0.0, source.prepare_inputs)
        if column.endswith(CHECKPOINTING):  # transformers' own, non-reentrant (the LoRA weights get gradients)
            adapted.model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
            adapted.model.train()  # transformers checkpoints in training mode only (no dropout in these models)
        params = [p for p in adapted.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step(batch: dict) -> None:
            loss, _ = graph(*[torch.from_numpy(batch[n]) for n in ("input_ids", "attention_mask", "labels")])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from edgeft.train.session import keep_torch_out

        keep_torch_out()
        from edgeft.bundle import load_bundle
        from edgeft.train.engines import open_session

        session = open_session(load_bundle(bundle_dir, verify=False), threads=threads)

        def step(batch: dict) -> None:
            session.train_step(batch)
            session.optimizer_step(1e-4)
    from edgeft.bundle import load_bundle
    from edgeft.data import DataConfig, batches, load_dataset
    from edgeft.datasets import TINYSHAKESPEARE

    data = load_dataset(DataConfig(TINYSHAKESPEARE), load_bundle(bundle_dir, verify=False))
    pool = list(batches(data.subset(np.arange(4 * steps)), 4, 0))
    seconds = []
    for batch in pool[:steps]:
        started = time.perf_counter()
        step(batch)
        seconds.append(time.perf_counter() - started)
    median = float(np.median(seconds[1:]))
    return {"step_s": round(median, 3), "tokens_per_s": round(4 * 256 / median, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def train_part(args: argparse.Namespace) -> dict:
    """Peak RSS and speed of LoRA training with an fp32, int8 and int4 frozen base (portable engine) against
    PyTorch + PEFT (fp32), each column in its own process."""
    import subprocess

    from edgeft.config import AdapterConfig, ExportConfig
    from edgeft.export import export_hf

    folder = train_folder(args.work, args.shape, args.layers)
    bases = [b for b in args.bases.split(",") if b]
    out = {}
    peers = ["pytorch", *(["pytorch" + CHECKPOINTING] if args.pytorch_checkpointing else [])]
    for column in (*bases, *peers):
        bits = BASES.get(column.removesuffix(CHECKPOINTING).removesuffix(SELECTIVE))
        selective = column.endswith(SELECTIVE)
        checkpointing = column.endswith(CHECKPOINTING) or selective
        bundle_dir = folder.parent / (f"{folder.name.replace('-layers', '')}-bundle-{bits or 'fp32'}"
                                      + ("-selective" if selective else "-checkpointing" if checkpointing else ""))
        if not (bundle_dir / "manifest.json").is_file():
            shutil.rmtree(bundle_dir, ignore_errors=True)
            print(f"exporting the {column} training bundle ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            export_hf(folder, bundle_dir, ExportConfig(task="causal-lm", max_length=256, adapter=AdapterConfig(rank=8),
                                                       engine="portable", base_bits=bits,
                                                       gradient_checkpointing=checkpointing,
                                                       keep_projections=selective))
            print(f"  exported in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--column", column, str(folder), str(bundle_dir),
                               str(args.steps), str(args.threads)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {column} column failed: {done.stderr[-3000:]}")
        out[column] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {column}: {out[column]}", file=sys.stderr, flush=True)
        if not column.startswith("pytorch"):
            frozen = [bundle_dir / n for n in ("portable_frozen.bin", "segmented_layers.safetensors")]
            out[column]["frozen_mb"] = round(sum(f.stat().st_size for f in frozen if f.is_file()) / 2**20, 1)
    for column in [*bases, *peers[1:]]:
        out[column]["rss_vs_pytorch"] = round(out[column]["peak_rss_mb"] / out["pytorch"]["peak_rss_mb"], 3)
        out[column]["tokens_per_s_vs_pytorch"] = round(out[column]["tokens_per_s"] / out["pytorch"]["tokens_per_s"],
                                                       2)
    return {"shape": args.shape, "layers": args.layers or "all", "steps": args.steps, "batch": "4 x 256 tokens",
            **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--parts", default="generate", help="comma-separated: generate, train")
    parser.add_argument("--shape", default="smollm2-135m", choices=("smollm2-135m", "qwen2.5-0.5b"),
                        help="train: the model's widths")
    parser.add_argument("--layers", type=int, default=6, help="train: layers (0: the shape's full depth)")
    parser.add_argument("--bases", default="fp32,int8,int4",
                        help="train: the frozen bases to measure; BASE+checkpointing: with gradient checkpointing; "
                             "BASE+selective: also keeping the projections' outputs")
    parser.add_argument("--steps", type=int, default=5, help="train: steps per column")
    parser.add_argument("--pytorch-checkpointing", action="store_true",
                        help="train: also PyTorch + PEFT with transformers' gradient checkpointing")
    parser.add_argument("--column", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.column:
        column, folder, bundle_dir, steps, threads = args.column
        print(json.dumps(train_column(column, Path(folder), Path(bundle_dir), int(steps), int(threads))))
        return
    if args.parts == "train":
        result = train_part(args)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        bases = [b for b in args.bases.split(",") if b]
        emit(result, f"llm train ({result['layers']} layers of {args.shape}'s shape, LoRA r=8, 4x256 tokens): peak RSS "
                     + ", ".join(f"{c} {result[c]['peak_rss_mb']:.0f} MB (x{result[c]['rss_vs_pytorch']})" for c in bases)
                     + f" vs PyTorch {result['pytorch']['peak_rss_mb']:.0f} MB; tokens/s "
                     + ", ".join(f"{c} {result[c]['tokens_per_s']}" for c in bases)
                     + f" vs PyTorch {result['pytorch']['tokens_per_s']}")
        return
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
