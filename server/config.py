"""Coordinator configuration: server settings and federated jobs, read from a TOML file.

    [server]
    address = "127.0.0.1:50051"   # where to listen
    state_dir = "coordinator"     # SQLite database and artifact store

    [[job]]
    id = "banking77"
    bundle = "bundle"             # an exported bundle folder (edgeft export) ...
    # model = "path/to/hf-model"  # ... or a Hugging Face folder the coordinator exports itself, with:
    # [job.export]  task = "classification", labels = "categories.json", max_length = 128
    # [job.adapter] kind = "lora", rank = 8, alpha = 16, target_modules = ["query", "value"]
    rounds = 3
    strategy = "fedavg"           # fedprox, fedadam, fedyogi, fedadagrad, median, trimmed_mean, krum, multikrum
    # [job.strategy_options]      # e.g. server_lr = 0.01 (fedadam), trim = 0.1, byzantine = 1, clip_norm = 1.0,
    #                             # noise_multiplier = 1.0 (client-level DP); see edgeft.aggregate.StrategyOptions
    round_deadline_s = 600
    upload_dtype = "float32"      # or "float16" to halve upload bytes
    [job.clients]
    fraction = 1.0
    min = 2                       # updates a round needs by its deadline
    max = 100
    min_available = 2             # connected devices before a round opens (default: min)
    [job.train]                   # what each client runs per round
    epochs = 1
    batch_size = 32
    learning_rate = 3e-3
    [job.data]                    # the data schema devices read their files with
    text_column = "text"
    label_column = "label"
    [job.eval]                    # optional: held-out data on the coordinator, evaluated after every round
    path = "test.csv"             # read with [job.data]'s columns
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgeft.aggregate.options import STRATEGY_NAMES, StrategyOptions, parse_strategy_options
from edgeft.config import AdapterConfig, ExportConfig, OptimizerConfig, TrainConfig
from edgeft.data import DataConfig
from edgeft.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = STRATEGY_NAMES
DEFAULT_PROXIMAL_MU = 0.01  # fedprox's mu when the coordinator exports the model and no mu is given


def _check(cond: bool, name: str, value: object, why: str) -> None:
    if not cond:
        raise ConfigError(f"invalid {name}={value!r}: {why}")


@dataclass(frozen=True)
class ClientSelection:
    """Who trains in each round.

    A round opens once ``min_available`` devices (default: ``min``) are connected; ceil(fraction x
    available) of them, within [min, max], are selected; the round needs ``min`` updates by its deadline.
    """

    fraction: float = 1.0
    min: int = 1
    max: int | None = None
    min_available: int | None = None

    def __post_init__(self) -> None:
        _check(0 < self.fraction <= 1, "clients.fraction", self.fraction, "must be in (0, 1]")
        _check(self.min >= 1, "clients.min", self.min, "must be >= 1")
        _check(self.max is None or self.max >= self.min, "clients.max", self.max, "must be >= clients.min")
        if self.min_available is None:
            object.__setattr__(self, "min_available", self.min)
        _check(self.min_available >= self.min, "clients.min_available", self.min_available, "must be >= clients.min")


@dataclass(frozen=True)
class DataSchema:
    """Which columns of a device's file hold the text and the label; ``format`` None: from the suffix."""

    text_column: str = "text"
    label_column: str = "label"
    format: str | None = None


@dataclass(frozen=True)
class JobConfig:
    """One federated job: which bundle (or model to export), how many rounds, who trains and how."""

    id: str
    bundle: Path | None = None
    model: Path | None = None
    export: ExportConfig | None = None
    data: DataSchema = field(default_factory=DataSchema)
    rounds: int = 3
    strategy: str = "fedavg"
    strategy_options: StrategyOptions = field(default_factory=StrategyOptions)  # or the TOML table as a dict
    round_deadline_s: float = 600.0
    upload_dtype: str = "float32"
    clients: ClientSelection = field(default_factory=ClientSelection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    # Held-out data on the coordinator: the global adapter is evaluated on it after every round (and before
    # the first), in the background; results go to the state database.
    eval_data: DataConfig | None = None

    def __post_init__(self) -> None:
        _check(bool(self.id) and self.id.replace("-", "").replace("_", "").isalnum(), "job.id", self.id,
               "use letters, digits, - and _")
        _check((self.bundle is None) != (self.model is None), "job.bundle", self.bundle,
               "give exactly one of bundle (an exported bundle) or model (a Hugging Face folder to export)")
        for name in ("bundle", "model"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.model is not None and self.export is None:
            object.__setattr__(self, "export", ExportConfig())
        _check(self.rounds >= 1, "job.rounds", self.rounds, "must be >= 1")
        _check(self.strategy in STRATEGIES, "job.strategy", self.strategy, f"expected one of {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategy_options", parse_strategy_options(self.strategy, self.strategy_options))
        self._check_strategy()
        _check(self.round_deadline_s > 0, "job.round_deadline_s", self.round_deadline_s, "must be positive")
        _check(self.upload_dtype in ("float32", "float16"), "job.upload_dtype", self.upload_dtype,
               "expected float32 or float16")

    def _check_strategy(self) -> None:
        """What a strategy asks of the rest of the job: Krum's minimum round size, FedProx's exported term."""
        options = self.strategy_options
        if self.strategy in ("krum", "multikrum"):
            need = 2 * options.byzantine + 3
            _check(self.clients.min >= need, "clients.min", self.clients.min,
                   f"strategy {self.strategy!r} with byzantine={options.byzantine} needs rounds of at least {need} "
                   "updates (2f + 3)")
        if self.strategy == "multikrum" and options.selected is not None:
            _check(options.selected <= self.clients.min - options.byzantine, "job.strategy_options.selected",
                   options.selected, f"must be <= clients.min - byzantine = {self.clients.min - options.byzantine}")
        if self.strategy == "fedprox" and self.model is not None and self.export is not None:
            exported = self.export.proximal_mu
            if exported == 0:
                mu = options.mu if options.mu is not None else DEFAULT_PROXIMAL_MU
                object.__setattr__(self, "export", replace(self.export, proximal_mu=mu))
            else:
                _check(options.mu is None or options.mu == exported, "job.strategy_options.mu", options.mu,
                       f"differs from [job.export] proximal_mu={exported!r}; give one of them")


@dataclass(frozen=True)
class ServerConfig:
    """Where the coordinator listens and keeps its state, and its jobs."""

    address: str = "127.0.0.1:50051"
    state_dir: Path = Path("coordinator")
    jobs: tuple[JobConfig, ...] = ()
    poll_wait_s: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        ids = [j.id for j in self.jobs]
        _check(len(ids) == len(set(ids)), "job.id", ids, "job ids must be unique")


def load_server_config(path: str | Path) -> ServerConfig:
    """Parse a coordinator TOML file; relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    base = path.parent
    server = data.get("server", {})
    jobs = []
    for raw in data.get("job", []):
        raw = dict(raw)
        try:
            clients = ClientSelection(**raw.pop("clients", {}))
            train = TrainConfig(**{"progress": False, **raw.pop("train", {})})
            data_schema = DataSchema(**raw.pop("data", {}))
            paths = {k: base / raw.pop(k) for k in ("bundle", "model") if k in raw}
            export = _export_config(raw.pop("export", {}), raw.pop("adapter", {}), raw.pop("optimizer", {}), base)
            evaluation = raw.pop("eval", None)
            eval_data = None
            if evaluation is not None:
                evaluation = dict(evaluation)
                eval_data = DataConfig(base / evaluation.pop("path"), text_column=data_schema.text_column,
                                       label_column=data_schema.label_column, format=data_schema.format,
                                       **evaluation)
            jobs.append(JobConfig(clients=clients, train=train, data=data_schema, export=export,
                                  eval_data=eval_data, **paths, **raw))
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"{path}: job {raw.get('id', '?')!r}: {exc}") from exc
    try:
        return ServerConfig(address=server.get("address", "127.0.0.1:50051"),
                            state_dir=base / server.get("state_dir", "coordinator"), jobs=tuple(jobs),
                            poll_wait_s=float(server.get("poll_wait_s", 5.0)))
    except TypeError as exc:
        raise ConfigError(f"{path}: [server]: {exc}") from exc


def _export_config(export: dict, adapter: dict, optimizer: dict, base: Path) -> ExportConfig | None:
    """[job.export], [job.adapter] and [job.optimizer] as an ExportConfig (labels may name a JSON file)."""
    if not (export or adapter or optimizer):
        return None
    export = dict(export)
    labels = export.pop("labels", ())
    if isinstance(labels, str):
        import json

        labels = json.loads((base / labels).read_text())
    for key in ("target_modules", "trainable_modules"):
        if key in adapter:
            adapter[key] = tuple(adapter[key])
    return ExportConfig(labels=tuple(labels), adapter=AdapterConfig(**adapter),
                        optimizer=OptimizerConfig(**optimizer), **export)
