"""``edgeft simulate``: a fleet on one machine.

A real coordinator (in this process, on a loopback port) and N real device agents (separate processes,
``edgeft.testing.agents``, each with its own partition of the data, torch unimportable in them, talking gRPC
over mutual TLS with a development CA made in ``out/tls`` and one enrolment token for the job, as a real fleet
would). At most ``concurrency`` agents train at once (file-lock training slots), so N can exceed the cores.
Everything the coordinator records (per-round evaluation of the global adapter, per-client training loss, bytes
up and down, round wall time) lands in its state database and is exported to JSON, CSV and a report with plots.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgeft.config import ENGINES, ExportConfig, TrainConfig
from edgeft.data import DataConfig, read_records
from edgeft.errors import ConfigError, DataError, EdgeftError, check_config
from edgeft.partition import label_histogram, parse_scheme, partition
from edgeft.testing.agents import simulation_tls, start_agents, write_token
from edgeft.testing.fleet_profile import FleetProfile

JOB_ID = "simulation"


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated federated job. ``model`` (a Hugging Face folder, exported with ``export``) or ``bundle``;
    ``train`` is split among ``clients`` by ``partition``; ``test`` is the coordinator's held-out set."""

    out: Path
    train: DataConfig
    test: DataConfig | None = None
    model: Path | None = None
    bundle: Path | None = None
    export: ExportConfig | None = None
    clients: int = 4
    rounds: int = 3
    partition: str = "iid"
    seed: int = 0
    fraction: float = 1.0
    local: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=32, learning_rate=3e-3,
                                                                   progress=False))
    concurrency: int | None = None  # agents training at once; default: one per core
    threads: int = 1  # ONNX Runtime threads per agent
    baseline: bool = True  # also train centrally for the same number of passes over the data
    overwrite: bool = False
    round_deadline_s: float = 3600.0
    strategy: str = "fedavg"  # the job's aggregation strategy and its [job.strategy_options]
    strategy_options: Mapping[str, object] = field(default_factory=dict)
    # the statistics round before training (JobConfig.head_init: auto, class_means, fedcof, none)
    head_init: str = "auto"
    # TEST TOOLING (edgeft.testing.byzantine): the first ``attackers`` clients corrupt their updates
    attack: str | None = None
    attackers: int = 0
    # the coordinator's bound on an update's change (JobConfig.max_update_norm; None: its ratio default).
    # Byzantine experiments loosen it so that the aggregation rule, not validation, meets the attack.
    max_update_norm: float | None = None
    # [job.secure_aggregation] (edgeft.server.config.SecureAggregation fields); None: plain uploads
    secure_aggregation: Mapping[str, object] | None = None
    # Mixed LoRA ranks: the largest rank each client trains (edgeft client --max-lora-rank), cycled over the
    # fleet: (8, 4) with rank-8 exports makes every other client train rank 4. Needs ``model``: the smaller
    # ranks are exported beside the bundle and served as the job's device_bundles. (): one rank.
    client_ranks: tuple[int, ...] = ()
    # Training engines (JobConfig.engines): with ``model``, the model is exported once per engine (the first is
    # the job's own bundle) and the job serves them all; each agent trains the first its runtime runs. (): the
    # engine of ``export``, or of ``bundle``.
    engines: tuple[str, ...] = ()
    # The Python each client's agent runs with, cycled over the fleet: a device virtualenv with edgeft installed
    # (scripts/device_venv.py), e.g. one with the plain onnxruntime, which runs the portable engine only.
    # (): this interpreter.
    client_pythons: tuple[Path, ...] = ()
    # Device heterogeneity (edgeft.testing.fleet_profile): each agent's speed, availability and dropouts, drawn
    # from the fleet's seed (the same fleet for a synchronous and an asynchronous job)
    fleet: FleetProfile = field(default_factory=FleetProfile)
    # "sync" rounds, or "async" (FedBuff) with [job.async] ``async_options`` (versions: ``rounds`` unless given)
    mode: str = "sync"
    async_options: Mapping[str, object] = field(default_factory=dict)
    # a synchronous round's updates needed by its deadline (ClientSelection.min; None: every selected client)
    min_updates: int | None = None
    # where the agents run (docs/simulation.md#ray-backend): "process" (one OS process each, on this machine) or "ray"
    # (one Ray actor each, edgeft.testing.ray_fleet) on the Ray cluster at ``ray_address`` (None: a local instance)
    backend: str = "process"
    ray_address: str | None = None
    # the address of this machine agents dial (None: 127.0.0.1); given, the coordinator listens on every interface
    advertise_host: str | None = None
    # called with the job's history every second: True ends the simulation there (agents stopped, job left running;
    # a benchmark's target accuracy or wall-time budget)
    stop_when: Callable[[dict], bool] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if (self.model is None) == (self.bundle is None):
            raise ConfigError("give exactly one of model (a Hugging Face folder) or bundle (an exported bundle)")
        if self.clients < 1 or self.rounds < 1:
            raise ConfigError(f"invalid clients={self.clients} or rounds={self.rounds}: both must be >= 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"invalid concurrency={self.concurrency}: must be >= 1")
        parse_scheme(self.partition)
        check_config(self.mode in ("sync", "async"), "mode", self.mode, "expected sync or async")
        check_config(self.backend in ("process", "ray"), "backend", self.backend, "expected process or ray")
        check_config(self.ray_address is None or self.backend == "ray", "ray_address", self.ray_address,
                     "applies to backend ray only")
        check_config(self.min_updates is None or 1 <= self.min_updates <= self.clients, "min_updates",
                     self.min_updates, "between 1 and clients")
        if self.attack is not None:
            from edgeft.testing.byzantine import Attack

            Attack.parse(self.attack)
        if not 0 <= self.attackers <= self.clients or (self.attackers and self.attack is None):
            raise ConfigError(f"invalid attackers={self.attackers}: between 0 and clients, and only with an attack")
        object.__setattr__(self, "client_ranks", tuple(self.client_ranks))
        if self.client_ranks and (self.model is None or min(self.client_ranks) < 1):
            raise ConfigError(f"invalid client_ranks={list(self.client_ranks)}: ranks >= 1, with model (the smaller "
                              "ranks are exported from it)")
        object.__setattr__(self, "engines", tuple(self.engines))
        object.__setattr__(self, "client_pythons", tuple(Path(p) for p in self.client_pythons))
        if self.engines and (self.model is None or not set(self.engines) <= set(ENGINES)
                             or len(set(self.engines)) != len(self.engines) or self.client_ranks):
            raise ConfigError(f"invalid engines={list(self.engines)}: distinct engines among {', '.join(ENGINES)}, "
                              "with model (a bundle is exported per engine) and without client_ranks")

    @property
    def slots(self) -> int:
        return self.concurrency or max(1, (os.cpu_count() or 1) // self.threads)


def _bundle(config: SimulationConfig, labels: list[str]):  # noqa: ANN202
    """The job's bundle, its bundles at the smaller ``client_ranks`` and its bundles for its other ``engines``
    (paths)."""
    from edgeft.bundle import load_bundle

    if config.bundle is not None:
        return load_bundle(config.bundle), (), ()
    from edgeft.export import export_hf

    target = config.out / "bundle"
    export = config.export or ExportConfig(labels=tuple(labels))
    if config.engines and config.engines[0] != export.engine:
        export = replace(export, engine=config.engines[0], opset=None)
    print(f"exporting {config.model} into a training bundle ...", flush=True)
    export_hf(config.model, target, export)
    others = []
    for engine in config.engines[1:]:
        print(f"exporting it for the {engine} engine too ...", flush=True)
        others.append(config.out / f"bundle-{engine}")
        export_hf(config.model, others[-1], replace(export, engine=engine, opset=None))
    smaller = []
    for rank in sorted({r for r in config.client_ranks if r < export.adapter.rank}, reverse=True):
        print(f"exporting it at LoRA rank {rank} for the clients that train that rank ...", flush=True)
        smaller.append(config.out / f"bundle-rank{rank}")
        export_hf(config.model, smaller[-1], replace(export, adapter=replace(export.adapter, rank=rank)))
    return load_bundle(target), tuple(smaller), tuple(others)


def _write_partitions(config: SimulationConfig, rows: list[dict], label_names: list[str]) -> dict:
    if not label_names:  # a causal LM: no classes; rows keep their nested fields (chat messages) in JSONL
        if config.partition != "iid":
            raise ConfigError(f"partition {config.partition!r} splits by class label; a causal-LM job's examples "
                              "have none: use --partition iid")
        parts = partition(np.zeros(len(rows), dtype=np.int64), config.clients, "iid", config.seed)
        folder = config.out / "clients"
        folder.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(parts):
            (folder / f"client-{i:03d}.jsonl").write_text("".join(json.dumps(rows[j]) + "\n" for j in part))
        info = {"scheme": "iid", "seed": config.seed, "clients": config.clients, "labels": [],
                "sizes": [len(p) for p in parts], "classes_per_client": [0] * len(parts),
                "histogram": [[len(p)] for p in parts]}
        (config.out / "partition.json").write_text(json.dumps(info))
        return info
    column = config.train.label_column
    if rows and column not in rows[0]:
        raise DataError(f"{config.train.path} has no column {column!r}; pass --label-column")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({str(r[column]) for r in rows} - set(index))
    if unknown:
        raise DataError(f"{config.train.path} has labels the model does not know: {', '.join(unknown[:5])}")
    labels = np.array([index[str(r[column])] for r in rows])
    parts = partition(labels, config.clients, config.partition, config.seed)
    folder = config.out / "clients"
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        with open(folder / f"client-{i:03d}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows[j] for j in part)
    histogram = label_histogram(labels, parts, len(label_names))
    info = {"scheme": config.partition, "seed": config.seed, "clients": config.clients, "labels": label_names,
            "sizes": [len(p) for p in parts], "classes_per_client": [int(c) for c in (histogram > 0).sum(1)],
            "histogram": histogram.tolist()}
    (config.out / "partition.json").write_text(json.dumps(info))
    return info


def _follow(coordinator, config: SimulationConfig, agents: list[tuple[subprocess.Popen, Path]]) -> bool:  # noqa: ANN001
    """Wait for the job, showing a bar per round (global version) with the latest accuracy; stop on a crashed
    agent. True when ``config.stop_when`` ended it early."""
    from tqdm.auto import tqdm

    from edgeft.testing.report import records

    shown, refused = -1, 0
    total = config.async_options.get("versions", config.rounds) if config.mode == "async" else config.rounds
    with tqdm(total=total, desc="rounds" if config.mode == "sync" else "versions", unit="round", dynamic_ncols=True,
              mininterval=30) as bar:
        while True:
            history = coordinator.history(JOB_ID)
            rejections = history.get("rejections") or {}
            if sum(rejections.values()) > refused:  # a refused device will not send again: say so
                refused = sum(rejections.values())
                bar.write(f"the coordinator refused {refused} update(s) so far ({', '.join(f'{k}: {v}' for k, v in rejections.items())}); "
                          f"a round missing an update waits for its deadline ({config.round_deadline_s:.0f} s)")
            done = [r for r in records(history) if r["round"] > 0 and r["status"] != "open"]
            if len(done) > bar.n:
                bar.update(len(done) - bar.n)
            for record in records(history):
                metrics = record.get("evaluation") or {}
                if record["round"] > shown and metrics:
                    shown = record["round"]
                    seconds = f", {record['seconds']:.0f} s" if record.get("seconds") else ""
                    if "accuracy" in metrics:
                        bar.write(f"round {shown}: test accuracy {metrics['accuracy']:.1%}, "
                                  f"macro-F1 {metrics['macro_f1']:.1%}{seconds}")
                        bar.set_postfix(accuracy=f"{metrics['accuracy']:.1%}")
                    elif "perplexity" in metrics:
                        bar.write(f"round {shown}: test loss {metrics['loss']:.3f}, perplexity "
                                  f"{metrics['perplexity']:.2f}{seconds}")
                        bar.set_postfix(perplexity=f"{metrics['perplexity']:.2f}")
                    elif "preference_accuracy" in metrics:  # DPO
                        bar.write(f"round {shown}: test DPO loss {metrics['loss']:.3f}, preference accuracy "
                                  f"{metrics['preference_accuracy']:.1%}, reward margin "
                                  f"{metrics['reward_margin']:.3f}{seconds}")
            if history["status"] != "running":
                coordinator.wait_until_finished(timeout=600)  # the last evaluations
                if history["status"] == "failed":
                    raise EdgeftError(f"the simulated job failed: {history['message']}")
                return False
            if config.stop_when is not None and config.stop_when(history):
                return True
            for proc, log in agents:
                if proc.poll() not in (None, 0):
                    tail = log.read_text()[-1500:]
                    raise EdgeftError(f"agent {log.parent.name} stopped with exit code {proc.returncode}; "
                                      f"the end of {log}:\n{tail}")
            time.sleep(1.0)


def _centralised(config: SimulationConfig, bundle, passes: int) -> list[dict]:  # noqa: ANN001
    """The same model trained on all the training data for ``passes`` epochs, evaluated after each."""
    from dataclasses import replace

    from edgeft.data import load_dataset
    from edgeft.train.trainer import train

    print(f"centralised baseline: {passes} epoch(s) on all {config.clients} clients' data ...", flush=True)
    history: list[dict] = []
    train(bundle, load_dataset(config.train, bundle),
          replace(config.local, epochs=passes, max_steps=None, threads=os.cpu_count(), progress=True),
          load_dataset(config.test, bundle), on_epoch=history.append)
    return [{"epoch": h["epoch"], **{k[4:]: v for k, v in h.items() if k.startswith("val_")}} for h in history]


def run_simulation(config: SimulationConfig) -> dict:
    """Run the simulated job; writes everything under ``config.out`` and returns the summary."""
    if config.backend == "process":
        return _simulate(config, start_agents)
    from edgeft.testing.ray_fleet import RayFleet

    with RayFleet(config) as fleet:  # connects first: a missing Ray or a bad address fails before any work
        return _simulate(config, fleet.start_agents)


def _simulate(config: SimulationConfig, start) -> dict:  # noqa: ANN001 - start_agents or RayFleet.start_agents
    from edgeft.server.config import ClientSelection, JobConfig, ServerConfig
    from edgeft.server.servicer import create_server
    from edgeft.testing.report import write_outputs

    started = time.perf_counter()
    out = config.out
    if (out / "state").exists():
        if not config.overwrite:
            raise ConfigError(f"{out} already holds a simulation; pass --overwrite or choose another --out")
        for name in ("state", "clients", "devices", "slots", "bundle", "tls", *(p.name for p in out.glob("bundle-*"))):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if config.train.path.is_dir():  # an image folder: one row per image, its absolute path and its class
        from edgeft.images import read_image_folder

        rows = [{"image": str(path.resolve()), "label": label} for path, label in read_image_folder(config.train.path)]
        config = replace(config, train=replace(config.train, image_column="image", label_column="label"))
    else:
        rows = read_records(config.train)
    if not rows:
        raise DataError(f"{config.train.path} holds no examples")
    labels = ([str(x) for x in config.export.labels] if config.export and config.export.labels
              else sorted({str(r[config.train.label_column]) for r in rows if config.train.label_column in r}))
    bundle, device_bundles, engine_bundles = _bundle(config, labels)
    causal = bundle.manifest.task == "causal-lm"
    if bundle.manifest.task not in ("classification", "causal-lm"):
        raise ConfigError(f"edgeft simulate runs classification and causal-LM jobs; the bundle's task is "
                          f"{bundle.manifest.task}")
    if causal and config.train.resolved_format == "text":
        raise ConfigError(f"{config.train.path} is one plain-text document; a federated causal-LM job spreads rows "
                          "over its clients: give JSONL rows (messages, prompt/completion or text)")
    parts = _write_partitions(config, rows, [] if causal else list(bundle.manifest.labels))
    classes = "" if causal else (f" and {min(parts['classes_per_client'])}-{max(parts['classes_per_client'])} of "
                                 f"{len(bundle.manifest.labels)} classes each")
    print(f"partition {config.partition} (seed {config.seed}): {config.clients} clients with "
          f"{min(parts['sizes'])}-{max(parts['sizes'])} examples{classes}", flush=True)

    job = JobConfig(id=JOB_ID, bundle=bundle.path, rounds=config.rounds, round_deadline_s=config.round_deadline_s,
                    strategy=config.strategy, strategy_options=dict(config.strategy_options),
                    clients=ClientSelection(fraction=config.fraction, min=config.min_updates or max(
                        1, round(config.fraction * config.clients)), min_available=config.clients),
                    mode=config.mode, asynchronous=({"versions": config.rounds, **config.async_options}
                                                    if config.mode == "async" else None),
                    data=config.train.schema,
                    train=config.local, eval_data=config.test, max_update_norm=config.max_update_norm,
                    secure_aggregation=(dict(config.secure_aggregation) if config.secure_aggregation is not None
                                        else None),
                    head_init=config.head_init, device_bundles=device_bundles, engine_bundles=engine_bundles,
                    engines=config.engines)
    tls, transport_flags = simulation_tls(out, tuple(filter(None, [config.advertise_host])))
    listen = "0.0.0.0" if config.advertise_host else "127.0.0.1"  # other machines' agents dial advertise_host
    server_config = ServerConfig(address=f"{listen}:0", state_dir=out / "state", jobs=(job,), poll_wait_s=1.0, tls=tls)
    server, port, coordinator = create_server(server_config)
    token = write_token(coordinator, JOB_ID, out / "tls" / "token")
    server.start()
    print(f"coordinator on {listen}:{port} (mutual TLS); starting {config.clients} device agents "
          f"({config.slots} training at once, {config.threads} thread(s) each)", flush=True)
    agents = start(config, port, [*transport_flags, "--token-file", str(token)])
    federated_started, stopped = time.perf_counter(), False
    try:
        stopped = _follow(coordinator, config, agents)
        federated_seconds = time.perf_counter() - federated_started
        for proc, _ in agents:
            try:
                proc.wait(timeout=0 if stopped else 30)
            except subprocess.TimeoutExpired:
                proc.kill()
        history = coordinator.history(JOB_ID)
    finally:
        for proc, _ in agents:
            if proc.poll() is None:
                proc.kill()
        server.stop(grace=None)
        if stopped:  # no evaluation left running beside what the caller does next
            coordinator.close()
    baseline = (_centralised(config, bundle, config.rounds * config.local.epochs)
                if config.baseline and config.test is not None else None)
    summary = {"config": {"clients": config.clients, "rounds": config.rounds, "partition": config.partition,
                          "seed": config.seed, "fraction": config.fraction, "local_epochs": config.local.epochs,
                          "batch_size": config.local.batch_size, "learning_rate": config.local.learning_rate,
                          "concurrency": config.slots, "threads_per_agent": config.threads,
                          "strategy": config.strategy, "strategy_options": dict(config.strategy_options),
                          "head_init": history.get("head_init"),
                          "attack": config.attack, "attackers": config.attackers,
                          "client_ranks": list(config.client_ranks), "engines": list(config.engines),
                          "client_pythons": [str(p) for p in config.client_pythons],
                          "mode": config.mode, "async": dict(config.async_options),
                          "fleet": dataclasses.asdict(config.fleet), "min_updates": config.min_updates,
                          "secure_aggregation": (dict(config.secure_aggregation)
                                                 if config.secure_aggregation is not None else None),
                          "bundle_digest": bundle.digest},
               "federated_seconds": round(federated_seconds, 1), "bundle_bytes": _bundle_bytes(bundle),
               "partition": parts, "history": history, "centralised": baseline,
               "state_dir": str(out / "state"), "job": JOB_ID}
    write_outputs(out, summary)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _bundle_bytes(bundle) -> int:  # noqa: ANN001
    return sum(bundle.file(name).stat().st_size for name in bundle.manifest.files)
