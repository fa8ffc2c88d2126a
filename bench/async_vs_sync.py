"""FedBuff against synchronous FedAvg on a slow, flaky fleet (issue 19's benchmark), with ``edgeft simulate``.

Job: all-MiniLM-L6-v2 + LoRA r=8 (query, value) + the class-means head, BANKING77 (test set: 3,080), --devices
agents (default 20) with Dirichlet(0.5) label skew (--seed), 1 local epoch a task, batch 32, lr 3e-3, 2 agents
training at once on 1 thread each (2 cores). Both arms run on the SAME seeded fleet (edgeft.testing.FleetProfile:
log-normal slowdowns with --speed-sigma 1, --dropout 0.1 of tasks dropped; seed --seed), the same partition and
the same starting model:

- The head. An asynchronous job has no statistics round (it is a synchronous round), so the bench builds the
  class-means head once itself, from the class statistics of ALL the training data (the sum the statistics round
  gets from every device's partition: the same head, edgeft.aggregate.statistics with [job.head_init]'s default
  scale), writes it into a copy of the bundle (WORK/bundle-class-means) and both arms start from it
  (head_init none). The statistics round's own time (one forward pass per device) is counted in neither arm.
- sync: FedAvg rounds as a Flower user would run them on such a fleet: every device selected each round
  (fraction 1, as fraction_fit=1.0), a round deadline (--round-deadline, default 240 s: about twice the ~120 s
  in which all 20 devices train once on 2 cores, so that an honest slow device still makes it while a dropped
  device cannot stall the round for ever: Flower's round_timeout) and at least --min-updates updates by then
  (default half the devices: Flower's accept_failures, without failing the job on an unlucky round). A round
  closes when every selected device reported, else at its deadline; with 10% dropouts most rounds of 20 lose a
  device and so last the deadline: that is the cost FedBuff removes.
- async: FedBuff, a new version from every --buffer-size (default 10) accepted updates, polynomial staleness
  weighting with exponent 0.5, max_concurrency = all devices, a task held at most --round-deadline seconds.

Each arm stops once a global adapter's test accuracy reaches --target (default 0.88) or after --budget-s. The
time of a point is when its global adapter was made (a round's close, a version's creation: the coordinator's
history) since the arm started (coordinator and agents' start-up included, alike for both arms); its accuracy is
the coordinator's background evaluation of that adapter, whose own delay is not counted. Results go to
WORK/results.json after each arm, the plot to WORK/async_vs_sync.png.

Full run: about 30 minutes on a quiet 2-core machine (~1.5 min for the bundle and the head; sync: 88% after ~3-4
rounds, each lasting its 240 s deadline whenever a device dropped its task; async: ~10 min), at most 2 x --budget-s
+ 2 min. A smoke run of the plumbing (4 devices, 1/20 of the data; its accuracies mean little):

    python bench/async_vs_sync.py --devices 4 --train-every 20 --budget-s 180 --round-deadline 45 --buffer-size 2 \
        --local-epochs 3 --lr 1e-2 --target 0.80 --work runs/async_vs_sync_smoke

The full run:

    python bench/async_vs_sync.py --devices 20 --speed-sigma 1 --dropout 0.1 --target 0.88 --budget-s 1800 \\
        --buffer-size 10 --local-epochs 1 --seed 0 --work runs/async_vs_sync --json-out bench/results/async_vs_sync.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ARMS = ("sync", "async")


def class_means_bundle(source: Path, target: Path, train) -> tuple[Path, dict]:  # noqa: ANN001
    """A copy of bundle ``source`` at ``target`` whose exported head is the class-means head of ``train``'s
    statistics (what a statistics round over devices holding ``train`` builds); returns its path and the report."""
    import shutil

    import numpy as np

    from edgeft.aggregate.statistics import head_from_statistics, sum_statistics
    from edgeft.bundle import load_bundle
    from edgeft.data import load_dataset
    from edgeft.server.job_config import HeadInit
    from edgeft.train.engines import initial_parameters, open_session
    from edgeft.train.trainer import class_statistics, pad_id_of

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    bundle = load_bundle(target)
    session = open_session(bundle, threads=2)
    tensors, n = class_statistics(session, load_dataset(train, bundle), len(bundle.manifest.labels),
                                  pad_id_of(bundle))
    weight, bias = bundle.manifest.head()
    params, options = session.get_parameters(), HeadInit(method="class_means")
    del session
    head_w, head_b, report = head_from_statistics(sum_statistics([tensors]), "class_means", options.scale,
                                                  options.ridge, params[weight], params[bias])
    write_initial(bundle, {weight: head_w, bias: head_b})
    np.testing.assert_allclose(initial_parameters(load_bundle(target))[weight], head_w, rtol=1e-6, atol=1e-6)
    return target, {**report, "examples": n}


def write_initial(bundle, values: dict) -> None:  # noqa: ANN001
    """Overwrite some of ``bundle``'s exported trainable parameters (its safetensors file, or ORT's checkpoint)
    and pin the file's new sha256 in its manifest."""
    from dataclasses import replace

    import numpy as np

    from edgeft.bundle import CHECKPOINT, PORTABLE_PARAMETERS, sha256_of, write_manifest

    values = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in values.items()}
    if bundle.manifest.engine == "portable":
        from safetensors.numpy import load_file, save_file

        name = PORTABLE_PARAMETERS
        save_file({**load_file(str(bundle.file(name))), **values}, str(bundle.file(name)))
    else:
        from edgeft.train.session import training_api

        name, api = CHECKPOINT, training_api()
        state = api.CheckpointState.load_checkpoint(str(bundle.file(name)))
        for key, value in values.items():
            state.parameters[key].data = value
        api.CheckpointState.save_checkpoint(state, str(bundle.file(name)))
    files = {**bundle.manifest.files, name: sha256_of(bundle.file(name))}
    write_manifest(bundle.path, replace(bundle.manifest, files=files))


def points(history: dict, started: float) -> list[dict]:
    """Each global adapter made (the initial one at t=0): seconds since ``started`` and its test accuracy (None while
    not evaluated)."""
    initial = next((r for r in history["rounds"] if r["round"] == 0), {})
    out = [{"version": 0, "t": 0.0, "accuracy": (initial.get("evaluation") or {}).get("accuracy")}]
    if "versions" in history:
        made = [(v["version"], v["created_at"], v["evaluation"]) for v in history["versions"]]
    else:
        made = [(r["round"], r["closed_at"], r["evaluation"]) for r in history["rounds"]
                if r["round"] > 0 and r["status"] == "closed"]
    out += [{"version": v, "t": round(at - started, 1), "accuracy": (e or {}).get("accuracy")} for v, at, e in made]
    return out


def time_to(target: float, curve: list[dict]) -> float | None:
    """Seconds until the first global adapter of at least ``target`` test accuracy (None: never)."""
    return next((p["t"] for p in curve if p["accuracy"] is not None and p["accuracy"] >= target), None)


def run_arm(args: argparse.Namespace, arm: str, bundle: Path, train) -> dict:  # noqa: ANN001
    from edgeft.config import TrainConfig
    from edgeft.errors import EdgeftError
    from edgeft.testing import SimulationConfig, run_simulation
    from edgeft.testing.fleet_profile import FleetProfile

    from common import TEST

    started = time.time()

    def stop(history: dict) -> bool:
        return time.time() - started >= args.budget_s or time_to(args.target, points(history, started)) is not None

    settings = ({"mode": "sync", "fraction": 1.0, "min_updates": args.min_updates} if arm == "sync" else
                {"mode": "async", "async_options": {"buffer_size": args.buffer_size, "staleness": "polynomial",
                                                    "exponent": 0.5, "max_concurrency": args.devices,
                                                    **({"max_staleness": args.max_staleness}
                                                       if args.max_staleness is not None else {})}})
    print(f"== {arm}: {settings}", flush=True)
    config = SimulationConfig(
        out=args.work / arm, train=train, test=TEST, bundle=bundle, clients=args.devices, rounds=100_000,
        partition=args.partition, seed=args.seed, concurrency=args.slots, threads=1, baseline=False, overwrite=True,
        head_init="none", round_deadline_s=args.round_deadline, stop_when=stop,
        fleet=FleetProfile(speed_sigma=args.speed_sigma, dropout=args.dropout, seed=args.seed),
        local=TrainConfig(epochs=args.local_epochs, max_steps=args.max_steps, batch_size=32, learning_rate=args.lr,
                          progress=False), **settings)
    try:
        history = run_simulation(config)["history"]
    except EdgeftError as exc:
        return {"arm": arm, **settings, "error": str(exc), "seconds": round(time.time() - started, 1)}
    curve = points(history, started)
    reached = time_to(args.target, curve)
    updates = (sum(v["accepted"] for v in history["versions"]) if arm == "async" else
               sum(len(r["clients"]) for r in history["rounds"] if r["round"] > 0))
    return {"arm": arm, **settings, "points": curve, "time_to_target_s": reached,
            "stopped": "target" if reached is not None else "budget", "global_adapters": len(curve) - 1,
            "updates_aggregated": updates, "rejections": history.get("rejections"),
            "best_accuracy": max((p["accuracy"] for p in curve if p["accuracy"] is not None), default=None),
            "seconds": round(time.time() - started, 1)}


def plot(runs: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(r for r in runs if r.get("points")):
        done = [p for p in run["points"] if p["accuracy"] is not None]
        label = "synchronous FedAvg" if run["arm"] == "sync" else f"FedBuff (K={run['async_options']['buffer_size']})"
        ax.plot([p["t"] / 60 for p in done], [100 * p["accuracy"] for p in done], "o-", ms=3, color=f"C{i}",
                label=label)
        if run["time_to_target_s"] is not None:
            ax.axvline(run["time_to_target_s"] / 60, color=f"C{i}", ls=":", alpha=0.7)
    ax.axhline(100 * target, color="grey", ls="--", label=f"target {target:.0%}")
    ax.set(xlabel="wall time since the arm started (min)", ylabel="BANKING77 test accuracy (%)",
           title="the same simulated fleet, synchronous rounds against FedBuff")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--speed-sigma", type=float, default=1.0, help="log-normal slowdowns' sigma")
    parser.add_argument("--dropout", type=float, default=0.1, help="probability a device drops a task")
    parser.add_argument("--target", type=float, default=0.88, help="test accuracy that ends an arm")
    parser.add_argument("--budget-s", type=float, default=1800, help="wall time that ends an arm without the target")
    parser.add_argument("--buffer-size", type=int, default=10, help="FedBuff: accepted updates per version")
    parser.add_argument("--max-staleness", type=int, help="FedBuff: versions an update may lag (default [job.async]'s)")
    parser.add_argument("--round-deadline", type=float, default=240, help="seconds a round (an async task) may take")
    parser.add_argument("--min-updates", type=int, help="updates a sync round needs by its deadline (default half)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, help="cap on each task's optimizer steps (smoke runs)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--train-every", type=int, default=1, help="every N-th training row only (smoke runs)")
    parser.add_argument("--slots", type=int, default=2, help="agents training at once (1 thread each)")
    parser.add_argument("--arms", default="sync,async")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/async_vs_sync"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.min_updates = args.min_updates or max(1, math.ceil(args.devices / 2))
    arms = [a for a in args.arms.split(",") if a]
    if not set(arms) <= set(ARMS) or not arms:
        parser.error(f"--arms: any of {', '.join(ARMS)}")

    from edgeft.testing.fleet_profile import FleetProfile

    from common import TRAIN, emit, minilm_bundle
    from fl_strategies import subset

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = subset(TRAIN, args.train_every, args.work / "train.csv")
    source = args.work / "bundle" if (args.work / "bundle" / "manifest.json").is_file() else minilm_bundle(args.work)
    print("building the class-means head from the training data's statistics ...", flush=True)
    bundle, head = class_means_bundle(source, args.work / "bundle-class-means", train)
    fleet = FleetProfile(speed_sigma=args.speed_sigma, dropout=args.dropout, seed=args.seed)
    result = {"bench": "async_vs_sync", "job": f"MiniLM (sentence pooling) + LoRA r=8 (query, value) + class-means "
              f"head, BANKING77, {args.devices} devices, {args.partition} seed {args.seed}, {args.local_epochs} local "
              f"epoch(s), batch 32, lr {args.lr:g}, {args.slots} training at once",
              "fleet": {"speed_sigma": args.speed_sigma, "dropout": args.dropout, "seed": args.seed,
                        "slowdowns": [round(fleet.device(i).slowdown, 2) for i in range(args.devices)]},
              "head": head, "target": args.target, "budget_s": args.budget_s, "round_deadline_s": args.round_deadline,
              "train_every": args.train_every, "max_steps": args.max_steps, "runs": []}
    for arm in arms:
        result["runs"].append(run_arm(args, arm, bundle, train))
        plot(result["runs"], args.target, args.work / "async_vs_sync.png")
        (args.work / "results.json").write_text(json.dumps(result, indent=2))
    times = {r["arm"]: r.get("time_to_target_s") for r in result["runs"]}
    ratio = times["sync"] / times["async"] if times.get("sync") and times.get("async") else None  # 0: at the start
    result.update(speedup=round(ratio, 2) if ratio else None, target_met=bool(ratio and ratio >= 2),
                  plot=str(args.work / "async_vs_sync.png"), seconds=round(time.perf_counter() - started, 1))
    (args.work / "results.json").write_text(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    line = "; ".join(f"{r['arm']}: " + (f"error {r['error'][:80]}" if "error" in r else
                                        f"{r['global_adapters']} adapters, best {r['best_accuracy'] or 0:.1%}, "
                                        + (f"{args.target:.0%} at {r['time_to_target_s']:.0f} s"
                                           if r["time_to_target_s"] is not None else
                                           f"{args.target:.0%} not reached in {args.budget_s:.0f} s"))
                     for r in result["runs"])
    speedup = f"; FedBuff {ratio:.2f}x sooner (target 2x: {'met' if ratio >= 2 else 'missed'})" if ratio else ""
    emit(result, f"async_vs_sync: {line}{speedup} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
