"""Training-step speed and memory: edgeft's two engines against PyTorch eager + PEFT, one run, same machine,
same threads, the same batches.

Columns: PyTorch eager + PEFT (the bundle's twin: same model, adapter, loss and AdamW), the ort-training engine
(onnxruntime-training 1.19.2), the portable engine on that training build, and the portable engine on the
current plain onnxruntime (1.32.0, in its own venv made by scripts/device_venv.py). Rows: useful tokens/s
(attention_mask sum per second), step time (forward + backward + optimizer step) and peak RSS (VmHWM of the
column's own process; the engine processes never import torch, the PyTorch one has to).

Parts:
  minilm   all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier head; real BANKING77 batches of 32
           (dynamic padding, length bucketing).
  decoder  a Llama decoder of SmolLM2-135M's shape built from its config (random weights, eager attention),
           LoRA r=8 on every linear, causal LM on Tiny Shakespeare, batches of 4 x 256 tokens.

The model folder and the bundles are cached in --work, keyed by what they are made of (configuration, weights,
exporter source, library versions): a re-run exports again only when one of those changed; --fresh rebuilds.
Every column runs --repeats times, round robin, and its fastest run counts (a shared machine's busy spells
slow PyTorch's eager threads far more than ONNX Runtime's); the JSON keeps every run's tokens/s.

    python bench/train_step.py [--parts minilm,decoder] [--steps 60] [--decoder-steps 8] [--threads 2]
                               [--repeats 2] [--json-out bench/results/train_step.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from memory import peak_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLAIN_RUNTIME = "onnxruntime==1.32.0"
LEARNING_RATE = 1e-3
COLUMNS = {  # column -> (engine of its bundle, which onnxruntime runs it)
    "pytorch_peft": (None, None),
    "ort_training": ("ort-training", "training build"),
    "portable": ("portable", "training build"),
    "portable_plain_ort": ("portable", "plain"),
}
TITLES = {"pytorch_peft": "PyTorch eager + PEFT", "ort_training": "ort-training engine",
          "portable": "portable, training build", "portable_plain_ort": "portable, plain onnxruntime"}
ENGINE_COLUMNS = ("ort_training", "portable", "portable_plain_ort")
# SmolLM2-135M's config.json, less its tokenizer: the shape is what this benchmark is about.
DECODER_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu",
                 "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": True, "initializer_range": 0.041666666666666664, "bos_token_id": 0,
                 "eos_token_id": 0}
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What a cached bundle depends on besides its configuration and model folder.
EXPORT_SOURCES = ("edgeft/export", "edgeft/bundle.py", "edgeft/config.py")
EXPORT_PACKAGES = ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime-training-cpu")


@dataclass(frozen=True)
class Part:
    name: str
    model: str
    batch_size: int
    dropout: bool  # the PyTorch column trains in train mode (the engines' graphs are eval mode)
    warmup: int  # unmeasured first steps


PARTS = {
    "minilm": Part("minilm", "all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier head, BANKING77", 32, True, 3),
    "decoder": Part("decoder", "Llama, SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, "
                    "intermediate 1536, vocab 49152, tied embeddings, rope), random weights, eager attention; "
                    "LoRA r=8 on q,k,v,o,gate,up,down_proj; causal LM on Tiny Shakespeare", 4, False, 1),
}


def export_config(part: str, engine: str):  # noqa: ANN201
    from edgeft.config import AdapterConfig, ExportConfig

    if part == "minilm":
        from common import CONFIG

        return replace(CONFIG, engine=engine)
    return ExportConfig(task="causal-lm", max_length=256, engine=engine,
                        adapter=AdapterConfig(rank=8, alpha=16.0, target_modules=DECODER_TARGETS))


# ---------------------------------------------------------------- the columns, each in its own process


def load_batches(path: Path) -> list[dict]:
    import numpy as np

    with np.load(path) as data:
        count = len([k for k in data.files if k.startswith("input_ids_")])
        return [{k: data[f"{k}_{i}"] for k in ("input_ids", "attention_mask", "labels")} for i in range(count)]


def measure(step, data: list[dict], warmup: int) -> dict:  # noqa: ANN001
    """Run ``step`` on every batch; time the ones after ``warmup``."""
    losses = [step(batch) for batch in data[:warmup]]
    measured, times = data[warmup:], []
    for batch in measured:
        started = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - started)
    seconds = sum(times)
    tokens = sum(int(b["attention_mask"].sum()) for b in measured)
    padded = sum(b["input_ids"].size for b in measured)
    return {"steps": len(measured), "warmup": warmup, "seconds": round(seconds, 3),
            "step_s": seconds / len(measured), "step_s_median": statistics.median(times),
            "tokens_per_s": tokens / seconds, "samples_per_s": sum(len(b["input_ids"]) for b in measured) / seconds,
            "padding_share": 1 - tokens / padded, "loss_first": losses[0], "loss_last": losses[-1]}


def engine_worker(bundle_dir: Path, batches: Path, warmup: int, threads: int) -> dict:
    """An engine column: the bundle's engine on this process's onnxruntime; torch stays out, as on a device."""
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    import onnxruntime

    from edgeft.bundle import load_bundle
    from edgeft.train.engines import open_session

    data = load_batches(batches)
    started = time.perf_counter()
    session = open_session(load_bundle(bundle_dir), threads=threads)
    load_s, loaded_rss = time.perf_counter() - started, peak_rss_mb()

    def step(batch: dict) -> float:
        loss, _ = session.train_step(batch)
        session.optimizer_step(LEARNING_RATE)
        return loss

    result = measure(step, data, warmup)
    return {**result, "peak_rss_mb": peak_rss_mb(), "peak_rss_after_load_mb": loaded_rss, "load_s": load_s,
            "runtime": f"onnxruntime {onnxruntime.__version__}", "engine": session.engine,
            "python": sys.version.split()[0], "torch_loaded": sys.modules.get("torch") is not None}


def torch_worker(part: str, model_dir: Path, batches: Path, warmup: int, threads: int) -> dict:
    """The PyTorch column: the bundles' twin (what edgeft.export.reference.reference_for builds) trained eagerly.

    Built here rather than by reference_for, which opens an ONNX Runtime session on the bundle to read the
    initial adapter and would count that session's memory in PyTorch's peak RSS. The initial adapter is the
    bundles' all the same: drawn after the same seed, as export_source draws it."""
    import torch

    from edgeft.export import from_hf_folder
    from edgeft.export.adapters import apply_adapter
    from edgeft.export.graph import TrainingGraph
    from edgeft.export.reference import Reference

    torch.set_num_threads(threads)
    data = load_batches(batches)
    config = export_config(part, "portable")
    started = time.perf_counter()
    source = from_hf_folder(model_dir, config)
    torch.manual_seed(config.seed)
    adapted = apply_adapter(source, config.adapter, config.task)
    graph = TrainingGraph(adapted.model, source.input_names, config.loss, 0.0, source.prepare_inputs)
    graph.train(PARTS[part].dropout)
    params = dict(adapted.model.named_parameters())
    trainable = {n: params[n] for n in adapted.trainable}
    opt = config.optimizer
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=0.0, betas=opt.betas, eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    reference = Reference(graph, optimizer, trainable)
    load_s, loaded_rss = time.perf_counter() - started, peak_rss_mb()
    result = measure(lambda batch: reference.step(batch, LEARNING_RATE), data, warmup)
    import peft
    import transformers

    return {**result, "peak_rss_mb": peak_rss_mb(), "peak_rss_after_load_mb": loaded_rss, "load_s": load_s,
            "runtime": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
            "python": sys.version.split()[0], "dropout": PARTS[part].dropout}


def export_worker(part: str, engine: str, model_dir: Path, out: Path) -> dict:
    """Export one bundle; its time and this process's peak RSS."""
    from edgeft.export import export_hf

    started = time.perf_counter()
    try:
        export_hf(model_dir, out, export_config(part, engine))
    except Exception as exc:  # recorded for the column instead of numbers
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return {"error": f"{type(exc).__name__}: {lines[0][:500] if lines else ''}",
                "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "bundle_mb": size / 2**20}


# ---------------------------------------------------------------- the coordinating process (no torch here)


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.name).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = ""
    return found


def _sub(args: list[str], *, python: str = sys.executable, env: dict | None = None, timeout: float = 7200) -> dict:
    """Run this script in a fresh process with ``args``; its last stdout line as JSON, or {"error": ...}."""
    try:
        proc = subprocess.run([python, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode}"}
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip() and not line.startswith(("W1", "I1"))]
    return {"error": f"exit status {proc.returncode}: {tail[-1][:500] if tail else 'no output'}"}


def decoder_folder(work: Path, fresh: bool) -> Path:
    """The Llama model folder (config.json, model.safetensors, tokenizer.json), built once per content key."""
    folder, stamp = work / "decoder" / "model", work / "decoder" / "model.key.json"
    from edgeft.datasets import TINYSHAKESPEARE

    key = _sha256(json.dumps([DECODER_SHAPE, _versions(("transformers", "tokenizers", "torch"))]).encode(),
                  TINYSHAKESPEARE.read_bytes())
    if (not fresh and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key
            and (folder / "model.safetensors").is_file()):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    result = _sub(["--build-decoder", str(folder)])
    if "error" in result:
        raise SystemExit(f"building the decoder model folder failed: {result['error']}")
    stamp.write_text(json.dumps({"key": key, **result}))
    return folder


def build_decoder(folder: Path) -> dict:
    """Tokenizer: a byte-level BPE asking for 49152 tokens, trained on Tiny Shakespeare as edgeft.export.toy's
    tiny_gpt2 does (the text runs out of merges at about 21.5k); the model keeps SmolLM2's 49152-row embedding
    and tied LM head."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeft.datasets import TINYSHAKESPEARE

    folder.mkdir(parents=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DECODER_SHAPE["vocab_size"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TINYSHAKESPEARE.read_text()], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DECODER_SHAPE, attn_implementation="eager"))
    model.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokenizer_vocab": tokenizer.get_vocab_size()}


def bundle(part: str, engine: str, model_dir: Path, work: Path, fresh: bool) -> tuple[Path, dict]:
    """The part's bundle for ``engine``, exported in its own process unless a bundle of the same content key
    is already in ``work``; (its path, how its export went)."""
    from edgeft.config import to_dict

    out, stamp = work / part / engine, work / part / f"{engine}.export.json"
    model_files = [f for f in model_dir.rglob("*") if f.is_file()]
    sources = [f for p in EXPORT_SOURCES for f in ([ROOT / p] if (ROOT / p).is_file() else (ROOT / p).rglob("*.py"))]
    key = _sha256(json.dumps([to_dict(export_config(part, engine)), _versions(EXPORT_PACKAGES)],
                             default=str).encode(), _files_digest(model_files).encode(),
                  _files_digest(sources).encode())
    if not fresh and stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("key") == key and ("error" in info or (out / "manifest.json").is_file()):
            return out, {**info, "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    print(f"exporting {part} for {engine}...", file=sys.stderr, flush=True)
    info = _sub(["--export", part, engine, str(model_dir), str(out)])
    if not info.get("error", "").startswith(("exit status", "killed", "timed out")):  # a crash is not cached
        stamp.write_text(json.dumps({"key": key, **info}))
    return out, {"key": key, **info, "reused": False}


def write_batches(part: str, bundle_dir: Path, path: Path, count: int) -> None:
    """The first ``count`` shuffled, length-bucketed batches of the part's data, tokenised by the bundle."""
    import numpy as np

    from edgeft.bundle import load_bundle
    from edgeft.data import DataConfig, batches, load_dataset
    from edgeft.datasets import TINYSHAKESPEARE

    loaded = load_bundle(bundle_dir)
    if part == "minilm":
        from common import TRAIN

        data = load_dataset(TRAIN, loaded)
    else:
        data = load_dataset(DataConfig(TINYSHAKESPEARE), loaded)
    chosen = []
    for batch in batches(data, PARTS[part].batch_size, int(loaded.manifest.tokenizer["pad_id"]), shuffle=True, seed=0):
        chosen.append(batch)
        if len(chosen) == count:
            break
    np.savez(path, **{f"{k}_{i}": v for i, b in enumerate(chosen) for k, v in b.items()})


def plain_python(work: Path, override: str | None) -> tuple[str | None, str, bool]:
    """(python of a venv holding the current plain onnxruntime and this checkout's edgeft, where it came from,
    whether it needs the checkout on PYTHONPATH). scripts/device_venv.py makes it (on this Python) and caches it."""
    if override:
        return override, f"--plain-python {override}", True
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_venv", ROOT / "scripts" / "device_venv.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    try:
        python = tools.device_venv(work / "venvs", sys.executable, PLAIN_RUNTIME)
    except tools.DeviceVenvError as exc:
        lines = str(exc).strip().splitlines()
        return None, f"no plain onnxruntime venv: {type(exc).__name__}: {lines[0][:300] if lines else ''}", False
    return str(python), f"scripts/device_venv.py: {PLAIN_RUNTIME} on Python {sys.version.split()[0]}", False


def run_part(part: str, args: argparse.Namespace, plain: tuple[str | None, str, bool]) -> dict:
    work = args.work
    (work / part).mkdir(parents=True, exist_ok=True)
    if part == "minilm":
        from edgeft.demo import minilm_dir

        model_dir = minilm_dir()
    else:
        model_dir = decoder_folder(work, args.fresh)
    exports, bundles = {}, {}
    for engine in ("ort-training", "portable"):
        bundles[engine], exports[engine] = bundle(part, engine, model_dir, work, args.fresh)
    usable = [bundles[e] for e in ("portable", "ort-training") if "error" not in exports[e]]
    if not usable:
        raise SystemExit(f"{part}: no engine could export the model: {exports}")
    steps = args.steps if part == "minilm" else args.decoder_steps
    warmup = PARTS[part].warmup if args.warmup is None else args.warmup
    batches_file = work / part / "batches.npz"
    write_batches(part, usable[0], batches_file, steps + warmup)
    runs: dict[str, list[dict]] = {column: [] for column in COLUMNS}
    for repeat in range(args.repeats):  # round robin: a busy spell on the machine hits every column alike
        for column, (engine, runtime) in COLUMNS.items():
            print(f"{part}: {column} (run {repeat + 1} of {args.repeats})...", file=sys.stderr, flush=True)
            common = [str(batches_file), "--warmup", str(warmup), "--threads", str(args.threads)]
            load = os.getloadavg()[0]
            if engine is None:
                result = _sub(["--worker-torch", part, str(model_dir), *common])
            elif "error" in exports[engine]:
                result = {"error": f"export failed: {exports[engine]['error']}"}
            elif runtime == "plain" and plain[0] is None:
                result = {"error": plain[1]}
            else:
                python = plain[0] if runtime == "plain" else sys.executable
                env = {**os.environ, "PYTHONPATH": str(ROOT)} if runtime == "plain" and plain[2] else None
                result = _sub(["--worker-engine", str(bundles[engine]), *common], python=python, env=env)
            runs[column].append({**result, "load_average_1min": [load, os.getloadavg()[0]]})
    columns = {column: best(found) for column, found in runs.items()}
    first = load_batches(batches_file)[0]
    return {"model": PARTS[part].model, "batch": list(first["input_ids"].shape) if part == "decoder"
            else PARTS[part].batch_size, "steps": steps, "warmup": warmup,
            "export": {e: {k: v for k, v in x.items() if k != "key"} for e, x in exports.items()},
            "columns": columns, "ratios": ratios(columns)}


def best(runs: list[dict]) -> dict:
    """The fastest of a column's runs, with every run's tokens/s beside it."""
    done = [r for r in runs if "tokens_per_s" in r]
    if not done:
        return runs[-1]
    chosen = max(done, key=lambda r: r["tokens_per_s"])
    return {**chosen, "runs_tokens_per_s": [r.get("tokens_per_s") for r in runs]} if len(runs) > 1 else chosen


def ratios(columns: dict) -> dict:
    """Each engine column over PyTorch, and the portable columns over the ort-training engine."""
    def over(a: str, b: str) -> dict | None:
        x, y = columns.get(a, {}), columns.get(b, {})
        if "tokens_per_s" not in x or "tokens_per_s" not in y:
            return None
        return {"tokens_per_s": x["tokens_per_s"] / y["tokens_per_s"], "peak_rss": x["peak_rss_mb"] / y["peak_rss_mb"]}

    found = {f"{c}_over_pytorch": over(c, "pytorch_peft") for c in ENGINE_COLUMNS}
    found.update({f"{c}_over_ort_training": over(c, "ort_training") for c in ("portable", "portable_plain_ort")})
    return found


def targets(parts: dict) -> dict:
    """The issue's targets, each with its verdict from this run's figures."""
    found = {}
    if "minilm" in parts:
        r = parts["minilm"]["ratios"]
        for c in ("portable", "portable_plain_ort"):
            x = r.get(f"{c}_over_ort_training")
            found[f"minilm_{c}_matches_ort_training"] = {
                "target": "tokens/s >= ort-training's and peak RSS <= ort-training's",
                "met": None if x is None else bool(x["tokens_per_s"] >= 1.0 and x["peak_rss"] <= 1.0), "ratios": x}
    if "decoder" in parts:
        r = parts["decoder"]["ratios"]
        for c in ENGINE_COLUMNS:
            x = r.get(f"{c}_over_pytorch")
            found[f"decoder_{c}_vs_pytorch"] = {
                "target": "tokens/s >= 1.5x PyTorch's at peak RSS <= 0.6x PyTorch's",
                "met": None if x is None else bool(x["tokens_per_s"] >= 1.5 and x["peak_rss"] <= 0.6), "ratios": x}
    return found


def summary(parts: dict, threads: int) -> str:
    lines = []
    for part, result in parts.items():
        cells = []
        for column in COLUMNS:
            c = result["columns"][column]
            cells.append(f"{TITLES[column]} " + ("failed" if "error" in c else
                                                  f"{c['tokens_per_s']:.0f} tok/s {c['peak_rss_mb']:.0f} MB"))
        r = result["ratios"]
        if part == "minilm":
            x = r.get("portable_over_ort_training")
            ratio = "" if x is None else (f"; portable/ort-training {x['tokens_per_s']:.2f}x tok/s, "
                                          f"{x['peak_rss']:.2f}x RSS")
        else:
            ratio = "; over PyTorch: " + ", ".join(
                f"{TITLES[c]} {x['tokens_per_s']:.2f}x tok/s {x['peak_rss']:.2f}x RSS"
                for c in ENGINE_COLUMNS if (x := r.get(f"{c}_over_pytorch")))
        lines.append(f"{part}: " + " | ".join(cells) + ratio)
    return f"train_step ({threads} threads) " + " || ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="minilm,decoder", help="comma-separated: minilm, decoder")
    parser.add_argument("--steps", type=int, default=60, help="measured steps on MiniLM")
    parser.add_argument("--decoder-steps", type=int, default=8, help="measured steps on the decoder")
    parser.add_argument("--warmup", type=int, help="unmeasured first steps (default: 3 on MiniLM, 1 on the decoder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of every column, round robin; the fastest counts")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    parser.add_argument("--fresh", action="store_true", help="rebuild the model folder and bundles")
    parser.add_argument("--plain-python", help="python of a venv with plain onnxruntime (default: device_venv)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--worker-engine", nargs=2, metavar=("BUNDLE", "BATCHES"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-torch", nargs=3, metavar=("PART", "MODEL", "BATCHES"), help=argparse.SUPPRESS)
    parser.add_argument("--export", nargs=4, metavar=("PART", "ENGINE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build-decoder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_engine:
        bundle_dir, batches_file = map(Path, args.worker_engine)
        print(json.dumps(engine_worker(bundle_dir, batches_file, args.warmup, args.threads)))
        return
    if args.worker_torch:
        part, model, batches_file = args.worker_torch
        print(json.dumps(torch_worker(part, Path(model), Path(batches_file), args.warmup, args.threads)))
        return
    if args.export:
        part, engine, model, out = args.export
        print(json.dumps(export_worker(part, engine, Path(model), Path(out))))
        return
    if args.build_decoder:
        print(json.dumps(build_decoder(args.build_decoder)))
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    from common import emit

    started = time.perf_counter()
    load_before = os.getloadavg()
    plain = plain_python(args.work, args.plain_python)
    results = {part: run_part(part, args, plain) for part in parts}
    result = {"bench": "train_step", "threads": args.threads, "learning_rate": LEARNING_RATE,
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "plain_onnxruntime": plain[1], "date": time.strftime("%Y-%m-%d"), **results,
              "targets": targets(results), "wall_s": round(time.perf_counter() - started, 1)}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json_out)
    emit(result, summary(results, args.threads))


if __name__ == "__main__":
    main()
