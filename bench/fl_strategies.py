"""Aggregation strategies under attack and under label skew (issue 7's evidence), with ``edgeft simulate``.

Job: all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier head, BANKING77, 10 clients, 1 local epoch a
round, batch 32, lr 3e-3, the global adapter evaluated on the BANKING77 test set after every round.

(a) Byzantine: IID partitions; a clean run per strategy (FedAvg, median, Krum with f = the attackers),
    then 20% of the clients attacking (edgeft.testing.byzantine test tooling: sign_flip = reversed
    delta, scaled:10 = delta x 10, random:1 = N(0, 1) noise instead of training) under each strategy. The
    claim checked: median and Krum end within 2 accuracy points of the clean FedAvg run; FedAvg does not.
(b) Label skew: Dirichlet alpha=0.1 partitions; FedAvg, FedProx (a bundle exported with proximal_mu) and
    FedAdam (server optimiser), accuracy per round.
(c) Mixed LoRA ranks (--parts ranks): IID, every other client trains a smaller rank (--small-rank, default
    4; the coordinator serves it a rank-4 export and aggregates the LoRA products), against the clean FedAvg
    run where every client trains rank 8.

Every run is a full simulated fleet (a coordinator and 10 agent processes, 2 training at once on 1 thread
each): about a minute a round with MiniLM on 2 cores, so the whole bench (12 runs for (a), 3 for (b), 5
rounds each) takes hours. Select parts with --parts/--attacks/--robust; --smoke runs a tiny random BERT on
a 1/20 data subset in a few minutes to check the plumbing (its accuracies mean nothing).

    python bench/fl_strategies.py [--parts byzantine,noniid] [--rounds 5] [--clients 10] [--work runs/fl_strategies]
    python bench/fl_strategies.py --smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def subset(data, every: int, out: Path):  # noqa: ANN001, ANN201
    """Every ``every``-th row of a CSV data file (all of it for 1)."""
    if every <= 1:
        return data
    with open(data.path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[::every])
    return replace(data, path=out)


def export_bundles(args: argparse.Namespace, config, proximal: bool) -> dict[str, Path]:  # noqa: ANN001
    """The plain bundle and, for FedProx, one with the proximal term (same model, same initial adapter)."""
    import shutil

    import torch

    from edgeft.export import export_hf

    from edgeft.demo import minilm_dir

    model = minilm_dir()
    if args.smoke:  # a 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer
        from edgeft.export.toy import tiny_bert

        shutil.rmtree(args.work / "tiny-bert", ignore_errors=True)
        model = tiny_bert(args.work / "tiny-bert", minilm_dir() / "tokenizer.json", num_labels=len(config.labels))
    args.model = model
    bundles = {"plain": args.work / "bundle"}
    if proximal:
        bundles["proximal"] = args.work / "bundle-prox"
    for key, path in bundles.items():
        shutil.rmtree(path, ignore_errors=True)
        torch.manual_seed(args.seed)  # the new classifier head is drawn when the model loads: the same in both
        export_hf(model, path, replace(config, proximal_mu=args.mu if key == "proximal" else 0.0))
    return bundles


def simulate(args: argparse.Namespace, name: str, bundle: Path, train, test, partition: str,  # noqa: ANN001
             strategy: str, options: dict, attack: str | None = None, client_ranks: tuple[int, ...] = ()) -> dict:
    from edgeft.config import TrainConfig
    from edgeft.testing import SimulationConfig, run_simulation

    attackers = round(args.byzantine_fraction * args.clients) if attack else 0
    history, seconds = _finished_earlier(args, name), None
    if history is None:
        started = time.perf_counter()
        print(f"== {name}: {strategy} {options or ''} {partition}"
              f"{f', {attackers} attackers {attack}' if attack else ''}", flush=True)
        source = {"bundle": bundle}
        if client_ranks:  # the smaller ranks are exported from the model, with the bundle's settings
            source = {"model": args.model, "export": args.config}
        history = run_simulation(SimulationConfig(
            out=args.work / name, train=train, test=test, **source, client_ranks=client_ranks, clients=args.clients,
            rounds=args.rounds, partition=partition, seed=args.seed, concurrency=args.concurrency, threads=1,
            baseline=False, overwrite=True, local=TrainConfig(epochs=1, batch_size=32, learning_rate=args.lr,
                                                              progress=False),
            strategy=strategy, strategy_options=options, attack=attack, attackers=attackers,
            max_update_norm=1e9 if attack else None))["history"]  # attacks meet the aggregation rule, not validation
        seconds = round(time.perf_counter() - started, 1)
    accuracy = [round(r["evaluation"]["accuracy"], 4) for r in history["rounds"]]
    return {"strategy": strategy, "options": options, "attack": attack, "attackers": attackers,
            "partition": partition, "accuracy": accuracy, "final": accuracy[-1], "seconds": seconds}


def _finished_earlier(args: argparse.Namespace, name: str) -> dict | None:
    """With --resume, the history of run ``name`` when an earlier invocation finished it with --rounds rounds."""
    done = args.work / name / "history.json"
    if not (args.resume and done.exists()):
        return None
    history = json.loads(done.read_text())
    if history["status"] != "finished" or history["rounds"][-1]["round"] != args.rounds:
        return None
    print(f"== {name}: finished earlier, reusing {done}", flush=True)
    return history


def byzantine(args: argparse.Namespace, bundle: Path, train, test) -> dict:  # noqa: ANN001
    attackers = round(args.byzantine_fraction * args.clients)
    strategies = {"fedavg": {}, "median": {}, "krum": {"byzantine": max(attackers, 1)},
                  "multikrum": {"byzantine": max(attackers, 1)}, "trimmed_mean": {"trim": args.byzantine_fraction}}
    chosen = ["fedavg", *args.robust]
    runs: dict[str, dict] = {"clean": {}}
    for strategy in [s for s in chosen if s in args.clean]:
        runs["clean"][strategy] = simulate(args, f"clean-{strategy}", bundle, train, test, "iid", strategy,
                                           strategies[strategy])
    for attack in args.attacks:
        runs[attack] = {s: simulate(args, f"{attack.replace(':', '')}-{s}", bundle, train, test, "iid", s,
                                    strategies[s], attack) for s in chosen}
    clean = runs["clean"]["fedavg"]["final"]
    checks = {}
    for attack in args.attacks:
        checks[attack] = {s: {"final": runs[attack][s]["final"],
                              "points_below_clean_fedavg": round(100 * (clean - runs[attack][s]["final"]), 1),
                              "points_below_clean_same_strategy": round(
                                  100 * (runs["clean"][s]["final"] - runs[attack][s]["final"]), 1)
                              if s in runs["clean"] else None}
                          for s in chosen}
        for s in args.robust:
            checks[attack][s]["within_2_points"] = checks[attack][s]["points_below_clean_fedavg"] <= 2.0
        checks[attack]["fedavg"]["visibly_hurt"] = checks[attack]["fedavg"]["points_below_clean_fedavg"] > 2.0
    return {"attackers": attackers, "runs": runs, "checks": checks}


def ranks(args: argparse.Namespace, bundle: Path, train, test) -> dict:  # noqa: ANN001
    """Every other client at rank ``--small-rank`` against the clean run at the bundle's rank."""
    mixed = (args.config.adapter.rank, args.small_rank)
    return {"client_ranks": list(mixed), "runs": {
        "clean-fedavg": simulate(args, "clean-fedavg", bundle, train, test, "iid", "fedavg", {}),
        "mixed-fedavg": simulate(args, f"ranks{mixed[0]}-{mixed[1]}-fedavg", bundle, train, test, "iid", "fedavg", {},
                                 client_ranks=mixed)}}


def noniid(args: argparse.Namespace, bundles: dict[str, Path], train, test) -> dict:  # noqa: ANN001
    partition = f"dirichlet:{args.alpha}"
    return {"partition": partition, "mu": args.mu, "server_lr": args.server_lr, "runs": {
        "fedavg": simulate(args, "noniid-fedavg", bundles["plain"], train, test, partition, "fedavg", {}),
        "fedprox": simulate(args, "noniid-fedprox", bundles["proximal"], train, test, partition, "fedprox", {}),
        "fedadam": simulate(args, "noniid-fedadam", bundles["plain"], train, test, partition, "fedadam",
                            {"server_lr": args.server_lr})}}


def plot_byzantine(part: dict, path: Path) -> None:
    """Accuracy per round under each attack, one line per strategy, the clean FedAvg run dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in part["runs"] if a != "clean"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(5 * len(attacks), 4), squeeze=False, sharey=True)
    clean = part["runs"]["clean"]["fedavg"]["accuracy"]
    for ax, attack in zip(axes[0], attacks):
        ax.plot(range(len(clean)), [100 * a for a in clean], "k--", label="FedAvg, no attackers")
        for i, (strategy, run) in enumerate(part["runs"][attack].items()):
            ax.plot(range(len(run["accuracy"])), [100 * a for a in run["accuracy"]], "o-", color=f"C{i}",
                    label=strategy)
        ax.set_title(f"{part['attackers']} of 10 clients {attack}")
        ax.set_xlabel("round (0: the head before any LoRA training)")
        ax.set_xticks(range(len(clean)))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    axes[0][0].set_ylabel("BANKING77 test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="byzantine,noniid", help="byzantine, noniid, ranks (comma-separated)")
    parser.add_argument("--small-rank", type=int, default=4, help="the smaller LoRA rank of part (c)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2, help="agents training at once (1 thread each)")
    parser.add_argument("--byzantine-fraction", type=float, default=0.2)
    parser.add_argument("--attacks", default="sign_flip,scaled:10,random:1", help="edgeft.testing.byzantine specs")
    parser.add_argument("--robust", default="median,krum", help="robust strategies to compare with FedAvg")
    parser.add_argument("--clean", default="fedavg,median,krum",
                        help="strategies that also get a run without attackers (fedavg always does)")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet alpha of part (b)")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal mu")
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server learning rate")
    parser.add_argument("--lr", type=float, help="local learning rate (default 3e-3; 3e-2 with --smoke)")
    parser.add_argument("--subset", type=int, default=1, help="use every K-th training and test row")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, 1/20 of the data: plumbing only")
    parser.add_argument("--work", type=Path, default=Path("runs/fl_strategies"))
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs of an interrupted bench that finished (their history.json in --work)")
    args = parser.parse_args()
    args.parts = [p for p in args.parts.split(",") if p]
    args.attacks = [a for a in args.attacks.split(",") if a]
    args.robust = [r for r in args.robust.split(",") if r]
    args.clean = {"fedavg", *(c for c in args.clean.split(",") if c)}
    if args.smoke:
        args.subset = max(args.subset, 20)
    args.lr = args.lr or (3e-2 if args.smoke else 3e-3)

    from common import CONFIG, TEST, TRAIN, emit

    config = args.config = replace(CONFIG, max_length=32) if args.smoke else CONFIG
    train = subset(TRAIN, args.subset, args.work / "data" / "train.csv")
    test = subset(TEST, args.subset, args.work / "data" / "test.csv")
    started = time.perf_counter()
    bundles = export_bundles(args, config, proximal="noniid" in args.parts)
    result: dict = {"bench": "fl_strategies", "job": f"{'tiny random BERT (smoke)' if args.smoke else 'MiniLM'} + LoRA "
                    f"r=8 (query, value) + head, BANKING77{f' (every {args.subset}th row)' if args.subset > 1 else ''}, "
                    f"{args.clients} clients, 1 local epoch, batch 32, lr {args.lr:g}, {args.rounds} rounds",
                    "clients": args.clients, "rounds": args.rounds, "concurrency": args.concurrency}
    line = []
    if "byzantine" in args.parts:
        result["byzantine"] = part = byzantine(args, bundles["plain"], train, test)
        plot_byzantine(part, args.work / "byzantine.png")
        line.append(f"clean FedAvg {part['runs']['clean']['fedavg']['final']:.1%}")
        for attack in args.attacks:
            finals = ", ".join(f"{s} {part['runs'][attack][s]['final']:.1%}" for s in ["fedavg", *args.robust])
            line.append(f"{part['attackers']}/{args.clients} {attack}: {finals}")
    if "ranks" in args.parts:
        result["ranks"] = part = ranks(args, bundles["plain"], train, test)
        line.append("rank " + ", ".join(f"{k} {r['final']:.1%}" for k, r in part["runs"].items()))
    if "noniid" in args.parts:
        result["noniid"] = part = noniid(args, bundles, train, test)
        finals = ", ".join(f"{s} {r['final']:.1%}" for s, r in part["runs"].items())
        line.append(f"{part['partition']}: {finals}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    emit(result, "fl_strategies: " + "; ".join(line) + f" ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
