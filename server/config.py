"""Coordinator configuration: server settings and federated jobs, read from a TOML file.

    [server]
    address = "127.0.0.1:50051"   # where to listen
    state_dir = "coordinator"     # SQLite database and artifact store

    [[job]]
    id = "banking77"
    bundle = "bundle"             # an exported bundle folder (edgeft export)
    rounds = 3
    strategy = "fedavg"
    round_deadline_s = 600
    upload_dtype = "float32"      # or "float16" to halve upload bytes
    [job.clients]
    fraction = 1.0
    min = 2
    max = 100
    [job.train]                   # what each client runs per round
    epochs = 1
    batch_size = 32
    learning_rate = 3e-3
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.config import TrainConfig
from edgeft.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = ("fedavg",)


def _check(cond: bool, name: str, value: object, why: str) -> None:
    if not cond:
        raise ConfigError(f"invalid {name}={value!r}: {why}")


@dataclass(frozen=True)
class ClientSelection:
    """How many registered devices train in each round: ceil(fraction * available) within [min, max]."""

    fraction: float = 1.0
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        _check(0 < self.fraction <= 1, "clients.fraction", self.fraction, "must be in (0, 1]")
        _check(self.min >= 1, "clients.min", self.min, "must be >= 1")
        _check(self.max is None or self.max >= self.min, "clients.max", self.max, "must be >= clients.min")


@dataclass(frozen=True)
class JobConfig:
    """One federated job: which bundle, how many rounds, who trains and how."""

    id: str
    bundle: Path
    rounds: int = 3
    strategy: str = "fedavg"
    round_deadline_s: float = 600.0
    upload_dtype: str = "float32"
    clients: ClientSelection = field(default_factory=ClientSelection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))

    def __post_init__(self) -> None:
        _check(bool(self.id) and self.id.replace("-", "").replace("_", "").isalnum(), "job.id", self.id,
               "use letters, digits, - and _")
        object.__setattr__(self, "bundle", Path(self.bundle))
        _check(self.rounds >= 1, "job.rounds", self.rounds, "must be >= 1")
        _check(self.strategy in STRATEGIES, "job.strategy", self.strategy, f"expected one of {', '.join(STRATEGIES)}")
        _check(self.round_deadline_s > 0, "job.round_deadline_s", self.round_deadline_s, "must be positive")
        _check(self.upload_dtype in ("float32", "float16"), "job.upload_dtype", self.upload_dtype,
               "expected float32 or float16")


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
            bundle = base / raw.pop("bundle")
            jobs.append(JobConfig(bundle=bundle, clients=clients, train=train, **raw))
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"{path}: job {raw.get('id', '?')!r}: {exc}") from exc
    try:
        return ServerConfig(address=server.get("address", "127.0.0.1:50051"),
                            state_dir=base / server.get("state_dir", "coordinator"), jobs=tuple(jobs),
                            poll_wait_s=float(server.get("poll_wait_s", 5.0)))
    except TypeError as exc:
        raise ConfigError(f"{path}: [server]: {exc}") from exc
