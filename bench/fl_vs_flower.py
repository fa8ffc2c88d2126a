"""The same federated job run by edgeft and by Flower, in one run, on this machine.

Job (issue 5): all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier head, BANKING77, 10 clients with
Dirichlet alpha=0.5 label skew (seed 0, edgeft.partition for both), 1 local epoch a round, batch 32,
lr 3e-3, 3 rounds, FedAvg, the global model evaluated on the BANKING77 test set after every round.

- edgeft: ``edgeft simulate`` (a real coordinator, 10 agent processes over loopback gRPC, ONNX Runtime),
  2 agents training at once with 1 thread each. Wall time: export, partitioning, agents, all rounds and the
  coordinator's evaluations.
- Flower: ``flwr`` simulation (Ray) + PyTorch + PEFT (bench/flower_peer.py, in its own venv because flwr
  needs protobuf<7), one client at a time on 2 threads, each client round with edgeft's schedule (6% warm-up,
  linear decay; ``--flower-schedule constant`` for the usual constant rate) and PyTorch's dropout. Wall time: Ray start to the end of the last
  evaluation.
- Centralised: edgeft training the same model on all the data for the same number of passes (3 epochs).

    python bench/fl_vs_flower.py [--rounds 3] [--clients 10] [--alpha 0.5] [--work runs/fl_vs_flower]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="cores each framework may use")
    parser.add_argument("--work", type=Path, default=Path("runs/fl_vs_flower"))
    parser.add_argument("--no-centralised", dest="centralised", action="store_false")
    parser.add_argument("--no-flower", dest="flower", action="store_false", help="edgeft only")
    parser.add_argument("--flower-schedule", default="linear", choices=["linear", "constant"],
                        help="Flower clients' learning-rate schedule per round: linear (edgeft's warm-up 6%% + "
                             "linear decay, the same job; default) or constant (the usual Flower example)")
    args = parser.parse_args()

    from common import CONFIG, TEST, TRAIN, emit
    from flower_peer import run_flower

    from edgeft.config import TrainConfig
    from edgeft.demo import minilm_dir
    from edgeft.testing import SimulationConfig, run_simulation

    local = TrainConfig(epochs=1, batch_size=32, learning_rate=3e-3, progress=False)
    started = time.perf_counter()
    summary = run_simulation(SimulationConfig(
        out=args.work / "edgeft", train=TRAIN, test=TEST, model=minilm_dir(), export=CONFIG, clients=args.clients,
        rounds=args.rounds, partition=f"dirichlet:{args.alpha}", seed=args.seed, local=local,
        concurrency=args.threads, threads=1, baseline=False, overwrite=True))
    edgeft_seconds = time.perf_counter() - started
    evaluations = [r["evaluation"] for r in summary["history"]["rounds"]]
    edgeft = {"accuracy": [round(e["accuracy"], 4) for e in evaluations[1:]],
              "macro_f1": [round(e["macro_f1"], 4) for e in evaluations[1:]],
              "initial_accuracy": round(evaluations[0]["accuracy"], 4), "seconds": round(edgeft_seconds, 1),
              "federated_seconds": summary["federated_seconds"],
              "round_seconds": [r["seconds"] for r in summary["history"]["rounds"][1:]],
              "bytes_up_per_round": [sum(c["bytes_up"] for c in r["clients"]) for r in summary["history"]["rounds"][1:]]}

    flower = None
    if args.flower:
        flower = run_flower(clients=args.clients, rounds=args.rounds, alpha=args.alpha, seed=args.seed, epochs=1,
                            batch_size=32, lr=3e-3, threads=args.threads, work=args.work / "flower",
                            schedule=args.flower_schedule)

    centralised = None
    if args.centralised:
        from edgeft.bundle import load_bundle
        from edgeft.data import load_dataset
        from edgeft.train.trainer import train

        history: list[dict] = []
        bundle = load_bundle(args.work / "edgeft" / "bundle")  # the same export, the same initial weights
        t0 = time.perf_counter()
        train(bundle, load_dataset(TRAIN, bundle),
              TrainConfig(epochs=args.rounds, batch_size=32, learning_rate=3e-3, threads=args.threads, progress=False),
              load_dataset(TEST, bundle), on_epoch=history.append)
        centralised = {"accuracy": [round(h["val_accuracy"], 4) for h in history],
                       "seconds": round(time.perf_counter() - t0, 1)}

    result = {"bench": "fl_vs_flower", "job": f"MiniLM + LoRA r=8 (query, value) + head, BANKING77, {args.clients} "
              f"clients dirichlet:{args.alpha} seed {args.seed}, 1 local epoch, batch 32, lr 3e-3, {args.rounds} rounds, "
              "FedAvg", "threads": args.threads, "edgeft": edgeft, "flower": flower, "centralised": centralised}
    line = f"fl_vs_flower: edgeft accuracy per round {', '.join(f'{a:.1%}' for a in edgeft['accuracy'])} in {edgeft_seconds:.0f} s"
    if flower:
        result["speedup"] = round(flower["seconds"] / edgeft_seconds, 2)
        result["accuracy_gap_points"] = [round(100 * (e - f), 1) for e, f in zip(edgeft["accuracy"], flower["accuracy"])]
        line += (f"; Flower {', '.join(f'{a:.1%}' for a in flower['accuracy'])} in {flower['seconds']:.0f} s "
                 f"(edgeft {result['speedup']}x faster)")
    if centralised:
        result["federated_vs_centralised_gap_points"] = round(100 * (centralised["accuracy"][-1] - edgeft["accuracy"][-1]), 1)
        line += f"; centralised {centralised['accuracy'][-1]:.1%} after {args.rounds} epochs"
    emit(result, line)


if __name__ == "__main__":
    main()
