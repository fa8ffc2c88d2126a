"""``edgeft demo`` and ``edgeft simulate``: a federated fleet on this machine (a real coordinator, real agent
processes; the test tooling of ``edgeft.testing``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeft.aggregate.statistics import HEAD_INIT_METHODS
from edgeft.commands.common import csv_list
from edgeft.errors import ConfigError


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulate 4 devices fine-tuning all-MiniLM-L6-v2 on BANKING77 (shipped), deploy "
                                    "int8, predict")
    p.add_argument("--out", default="runs/demo", help="working folder (default runs/demo)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--partition", default="iid", help="iid, dirichlet:ALPHA or shards:K (default iid)")
    p.add_argument("--baseline", action="store_true", help="also train centrally for comparison (slower)")
    p.add_argument("--local", action="store_true", help="one device instead: plain local fine-tuning")
    p.add_argument("--epochs", type=int, default=1, help="with --local: epochs (default 1)")
    p.add_argument("--threads", type=int, help="with --local: ONNX Runtime threads")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from edgeft.demo import run_demo, run_local_demo

    if args.local:
        run_local_demo(Path(args.out), epochs=args.epochs, threads=args.threads)
    else:
        run_demo(Path(args.out), clients=args.clients, rounds=args.rounds, partition=args.partition,
                 baseline=args.baseline)
    return 0


def add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="a federated fleet on this machine: a real coordinator and N agent processes "
                                        "(or Ray actors on a cluster: --backend ray)")
    p.add_argument("--clients", type=int, default=4, help="simulated devices (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--partition", default="iid",
                   help="iid, dirichlet:ALPHA (label skew, e.g. dirichlet:0.5) or shards:K (default iid)")
    p.add_argument("--seed", type=int, default=0, help="partition seed (default 0)")
    p.add_argument("--data", help="training data split among the clients (default: BANKING77, shipped)")
    p.add_argument("--test-data", help="held-out data the coordinator evaluates on (default: BANKING77 test)")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--model", help="Hugging Face model folder (default: all-MiniLM-L6-v2, shipped)")
    p.add_argument("--bundle", help="an exported bundle instead of --model")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of clients per round (default 1)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--pack", action="store_true", help="causal LM: each device packs short examples into full rows")
    p.add_argument("--concurrency", type=int, help="agents training at once (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per agent (default 1)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the centralised baseline (same passes over all the data)")
    p.add_argument("--head-init", default="auto", choices=HEAD_INIT_METHODS,
                   help="round 0, the statistics round: build the head from the clients' class statistics before "
                        "training (default auto: class_means for a sentence-transformers model; none: random head)")
    p.add_argument("--out", default="runs/simulate", help="output folder (default runs/simulate)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous simulation in --out")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="the coordinator learns only each round's sum (default [job.secure_aggregation] settings)")
    p.add_argument("--client-ranks", metavar="R1,R2,...",
                   help="mixed LoRA ranks: each client's largest rank, cycled over the fleet (e.g. 8,4: every other "
                        "client trains rank 4); the smaller ranks are exported from --model")
    p.add_argument("--engines", metavar="E1,E2",
                   help="training engines the job serves, preferred first (e.g. ort-training,portable): --model is "
                        "exported for each; each client trains the first its runtime runs")
    p.add_argument("--client-pythons", metavar="PY1,PY2,...",
                   help="the Python each client's agent runs with, cycled over the fleet: device virtualenvs with "
                        "edgeft installed (scripts/device_venv.py), e.g. one with the plain onnxruntime")
    p.add_argument("--backend", choices=("process", "ray"), default="process",
                   help="where the agents run: process (one OS process each, here; default) or ray (one Ray actor "
                        "each, on a local Ray instance or the cluster at --address; pip install 'edgeft[ray]')")
    p.add_argument("--address", help="with --backend ray: a running Ray cluster (ray://HEAD:10001, HEAD:6379 or auto; "
                                     "default: start a local Ray instance)")
    p.add_argument("--advertise-host", help="with --backend ray on other machines: this machine's address the nodes "
                                            "reach (the coordinator then listens on every interface)")
    add_fleet_arguments(p)
    p.set_defaults(func=_run_simulate)


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    """The simulated fleet's heterogeneity and the job's mode (docs/simulation.md)."""
    g = p.add_argument_group("device heterogeneity (seeded by --seed) and asynchronous jobs")
    g.add_argument("--speed-sigma", type=float, default=0.0,
                   help="log-normal slowdowns exp(sigma z): a device trains that many times slower (default 0)")
    g.add_argument("--availability", type=float, default=1.0,
                   help="fraction of every --availability-period each device is online, at its own phase (default 1)")
    g.add_argument("--availability-period", type=float, default=600.0, help="seconds (default 600)")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="probability that a device drops a task without uploading it (default 0)")
    g.add_argument("--round-deadline", type=float, default=3600.0,
                   help="seconds a round (an async task) may take (default 3600)")
    g.add_argument("--min-updates", type=int,
                   help="updates a synchronous round needs by its deadline (default: every selected client)")
    g.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="sync rounds, or async (FedBuff: --rounds global versions; default sync)")
    g.add_argument("--buffer-size", type=int, help="async: updates per global version (default [job.async]'s)")
    g.add_argument("--staleness", choices=("constant", "polynomial", "hinge"), help="async: staleness weighting")
    g.add_argument("--max-staleness", type=int, help="async: versions an update may lag before it is refused")


def fleet_settings(args: argparse.Namespace) -> dict:
    """SimulationConfig's fleet, mode, async_options, round_deadline_s and min_updates from the flags."""
    from edgeft.testing.fleet_profile import FleetProfile

    options = {k: getattr(args, k) for k in ("buffer_size", "staleness", "max_staleness")
               if getattr(args, k) is not None}
    if options and args.mode != "async":
        raise ConfigError(f"--{next(iter(options)).replace('_', '-')} applies to --mode async only")
    return {"fleet": FleetProfile(speed_sigma=args.speed_sigma, availability=args.availability,
                                  period_s=args.availability_period, dropout=args.dropout, seed=args.seed),
            "mode": args.mode, "async_options": options, "round_deadline_s": args.round_deadline,
            "min_updates": args.min_updates}


def _ranks(text: str | None) -> tuple[int, ...]:
    """``--client-ranks 8,4`` as (8, 4)."""
    try:
        return tuple(int(r) for r in text.split(",")) if text else ()
    except ValueError as exc:
        raise ConfigError(f"invalid --client-ranks {text!r}: comma-separated whole numbers, e.g. 8,4") from exc


def _run_simulate(args: argparse.Namespace) -> int:
    ranks = _ranks(args.client_ranks)  # bad flags fail before any work
    from edgeft.config import TrainConfig
    from edgeft.data import DataConfig
    from edgeft.datasets import BANKING77_DIR
    from edgeft.testing import SimulationConfig, run_simulation

    shipped = args.data is None
    text = args.text_column or "text"
    label = args.label_column or ("category" if shipped else "label")
    train = DataConfig(args.data or BANKING77_DIR / "train.csv", text_column=text, label_column=label)
    test_path = args.test_data or (BANKING77_DIR / "test.csv" if shipped else None)
    test = DataConfig(test_path, text_column=text, label_column=label) if test_path else None
    model = None
    if args.bundle is None:
        from edgeft.demo import minilm_dir

        model = Path(args.model) if args.model else minilm_dir()
    export = None
    if shipped and args.bundle is None:
        from edgeft.config import ExportConfig
        from edgeft.datasets import banking77_labels

        export = ExportConfig(labels=tuple(banking77_labels()))
    fleet = fleet_settings(args)
    summary = run_simulation(SimulationConfig(
        out=Path(args.out), train=train, test=test, model=model, bundle=Path(args.bundle) if args.bundle else None,
        export=export, clients=args.clients, rounds=args.rounds, partition=args.partition, seed=args.seed,
        fraction=args.fraction, concurrency=args.concurrency, threads=args.threads, baseline=args.baseline,
        overwrite=args.overwrite, secure_aggregation={} if args.secure_aggregation else None,
        head_init=args.head_init, client_ranks=ranks, backend=args.backend, ray_address=args.address,
        advertise_host=args.advertise_host, engines=csv_list(args.engines) or (),
        client_pythons=tuple(Path(p) for p in csv_list(args.client_pythons) or ()),
        local=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, pack=args.pack,
                          progress=False), **fleet))
    from edgeft.testing.report import records

    last = records(summary["history"])[-1].get("evaluation") or {}
    shown = next((m for m in ("accuracy", "preference_accuracy", "perplexity", "loss") if m in last), None)
    final = ("no test evaluation" if shown is None else  # causal LMs have a perplexity, DPO a preference accuracy
             f"final test {shown.replace('_', ' ')} {last[shown]:.1%}" if "accuracy" in shown else
             f"final test {shown} {last[shown]:.2f}")
    print(f"simulation done in {summary['seconds']:.0f} s; {final}; report: {Path(args.out) / 'report.md'}")
    return 0
