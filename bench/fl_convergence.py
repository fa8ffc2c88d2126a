"""Federated convergence from a statistics-initialised head (issue 8's evidence), with ``edgeft simulate``.

Job: all-MiniLM-L6-v2 with its own sentence pooling (mean, then L2 normalisation) + LoRA r=8 (query,
value) + a classification head, BANKING77, 10 clients with Dirichlet(alpha) label skew (seed 0), 1 local
epoch a round, batch 32, lr 3e-3; the global adapter is evaluated on the BANKING77 test set (3,080) after
round 0 and every round. Variants, each a full simulated fleet (a coordinator and 10 agent processes):

    random       FedAvg from the exported random head (no statistics round)
    class_means  round 0 builds a cosine classifier from the class means, then FedAvg
    fedcof       round 0 builds the FedCOF-style ridge head, then FedAvg
    fedadam      round 0 builds the default head (edgeft.server.config.DEFAULT_HEAD_INIT), then FedAdam
    fedprox      the default head, then FedProx (a bundle exported with the proximal term, --mu)

Results are written after every run to WORK/results.json (a crash keeps what finished), with a plot
(accuracy per round, one panel per alpha) to WORK/convergence.png. About 100 s a round on 2 cores: the
whole default bench (2 alphas x 4 variants x 10 rounds) takes over two hours.

    python bench/fl_convergence.py [--alphas 0.5,0.1] [--variants class_means,fedcof,random,fedadam] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = ("class_means", "fedcof", "random", "fedadam", "fedprox")
DEFAULT_VARIANTS = ("class_means", "fedcof", "random", "fedadam")


def run(args: argparse.Namespace, bundle: Path, alpha: float, variant: str) -> dict:
    from edgeft.config import TrainConfig
    from edgeft.server.config import DEFAULT_HEAD_INIT
    from edgeft.testing import SimulationConfig, run_simulation

    from common import TEST, TRAIN

    head = {"random": "none", "fedadam": DEFAULT_HEAD_INIT, "fedprox": DEFAULT_HEAD_INIT}.get(variant, variant)
    strategy, options = {"fedadam": ("fedadam", {"server_lr": args.server_lr}),
                         "fedprox": ("fedprox", {})}.get(variant, ("fedavg", {}))
    if variant == "fedprox":
        bundle = proximal_bundle(args)
    print(f"== alpha {alpha}, {variant}: head {head}, {strategy} {options or ''}", flush=True)
    started = time.perf_counter()
    summary = run_simulation(SimulationConfig(
        out=args.work / f"alpha{alpha}-{variant}", train=TRAIN, test=TEST, bundle=bundle, clients=args.clients,
        rounds=args.rounds, partition=f"dirichlet:{alpha}", seed=args.seed, concurrency=2, threads=1,
        baseline=False, overwrite=True, head_init=head, strategy=strategy, strategy_options=options,
        local=TrainConfig(epochs=1, batch_size=32, learning_rate=args.lr, progress=False)))
    rounds = summary["history"]["rounds"]
    mean_up = [sum(c["bytes_up"] for c in r["clients"]) / max(len(r["clients"]), 1) for r in rounds]
    return {"alpha": alpha, "variant": variant, "head_init": head, "strategy": strategy, "options": options,
            "accuracy": [round(r["evaluation"]["accuracy"], 4) for r in rounds],
            "macro_f1": [round(r["evaluation"]["macro_f1"], 4) for r in rounds],
            "statistics_bytes_per_client": round(mean_up[0]) if head != "none" else 0,
            "adapter_bytes_per_client": round(mean_up[-1]), "seconds": round(time.perf_counter() - started, 1)}


def proximal_bundle(args: argparse.Namespace) -> Path:
    """The benchmark bundle exported with FedProx's proximal term (once)."""
    from dataclasses import replace

    from edgeft.bundle import load_bundle
    from edgeft.demo import minilm_dir
    from edgeft.export import export_hf

    from common import CONFIG

    path = args.work / f"bundle-prox-{args.mu:g}"
    if not (path / "manifest.json").is_file():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        export_hf(minilm_dir(), path, replace(CONFIG, proximal_mu=args.mu))
    return load_bundle(path).path


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for r in (r for r in results if r["alpha"] == alpha):
            ax.plot(range(len(r["accuracy"])), [100 * a for a in r["accuracy"]], "o-", label=r["variant"],
                    color=f"C{VARIANTS.index(r['variant'])}")  # one colour per variant in every panel
        ax.axhline(89.1, color="grey", ls=":", label="centralised, 3 epochs (89.1%)")
        ax.set_title(f"10 clients, Dirichlet alpha={alpha}")
        ax.set_xlabel("round (0: the head before any LoRA training)")
        ax.set_ylabel("BANKING77 test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", default="0.5,0.1")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server learning rate")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal mu")
    parser.add_argument("--work", type=Path, default=Path("runs/fl_convergence"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; expected {', '.join(VARIANTS)}")

    from common import emit, minilm_bundle

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle = minilm_bundle(args.work)
    results_file = args.work / "results.json"
    results: list[dict] = []
    for alpha in (float(a) for a in args.alphas.split(",") if a):
        for variant in variants:
            results.append(run(args, bundle, alpha, variant))
            results_file.write_text(json.dumps(results, indent=2))
            plot(results, args.work / "convergence.png")
    result = {"bench": "fl_convergence", "job": f"MiniLM (sentence pooling) + LoRA r=8 (query, value) + head, "
              f"BANKING77, {args.clients} clients, Dirichlet(alpha) seed {args.seed}, 1 local epoch, batch 32, "
              f"lr {args.lr:g}, {args.rounds} rounds", "runs": results, "plot": str(args.work / "convergence.png"),
              "seconds": round(time.perf_counter() - started, 1)}
    line = "; ".join(f"alpha {r['alpha']} {r['variant']}: r0 {r['accuracy'][0]:.1%}, "
                     f"r3 {r['accuracy'][min(3, len(r['accuracy']) - 1)]:.1%}, last {r['accuracy'][-1]:.1%}"
                     for r in results)
    emit(result, f"fl_convergence: {line} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
