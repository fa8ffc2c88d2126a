"""Coordinator configuration: server settings and federated jobs, read from a TOML file.

    [server]
    address = "127.0.0.1:50051"   # where to listen
    state_dir = "coordinator"     # artifact store, and the SQLite database state.db unless database is given
    # database = "postgresql+psycopg://edgeft@db.example/edgeft"  # any SQLAlchemy URL (password: PGPASSWORD)
    # artifacts = "s3://bucket/prefix"  # an S3-compatible bucket instead of the folder state_dir/artifacts, with
    # [server.s3] endpoint_url = "http://minio:9000", region = "eu-west-1" (each optional: AWS_* variables)
    # lease_s = 30                 # replicas on one database: a dead replica's round closing or evaluation is
    #                             # taken over after this long (docs/replicas.md)
    # final_answers_s = 10         # once every job is over: how long to keep answering before exiting (devices
    #                             # that poll meanwhile learn the job's end)
    # token_cache_s = 5            # a valid enrolment token is read from the database again after this long:
    #                             # a revocation made elsewhere (CLI, another replica) takes effect within it
    # insecure = true             # plaintext instead of [server.tls] (development on a trusted network only)
    [server.tls]
    cert = "certs/server.pem"     # the coordinator's certificate chain and key (PEM; `edgeft certs` makes dev ones)
    key = "certs/server.key"
    client_ca = "certs/ca.pem"    # optional: mutual TLS, devices must present a certificate signed by this CA
    [server.limits]               # optional: resource bounds (ServerLimits fields)
    max_concurrent_rpcs = 128

    [[job]]
    id = "banking77"
    bundle = "bundle"             # an exported bundle folder (edgeft export) ...
    # model = "path/to/hf-model"  # ... or a Hugging Face folder the coordinator exports itself, with:
    # [job.export]  task = "classification", labels = "categories.json", max_length = 128
    # [job.adapter] kind = "lora", rank = 8, alpha = 16, target_modules = ["query", "value"]
    # device_ranks = [4, 2]       # optional, with model: also export and serve these smaller LoRA ranks to devices
    #                             # that ask for them (edgeft client --max-lora-rank); fedavg/fedprox only
    # device_bundles = ["bundle-r4"]  # ... the same with bundle: the job's bundle at smaller ranks, exported by you
    # engines = ["ort-training", "portable"]  # optional: the training engines the job serves, preferred first; a
    #                             # device gets a bundle of the first one it runs, one that runs none is refused.
    #                             # With model: exported once per engine (default: [job.export] engine alone)
    # engine_bundles = ["bundle-portable"]  # ... with bundle: the job's bundle exported for the other engines
    rounds = 3
    strategy = "fedavg"           # fedprox, fedadam, fedyogi, fedadagrad, median, trimmed_mean, krum, multikrum
    # [job.strategy_options]      # e.g. server_lr = 0.01 (fedadam), trim = 0.1, byzantine = 1, clip_norm = 1.0,
    #                             # noise_multiplier = 1.0 (client-level DP); see edgeft.aggregate.StrategyOptions
    round_deadline_s = 600
    upload_dtype = "float32"      # or "float16" to halve upload bytes
    max_update_norm_ratio = 10.0  # refuse an update whose change from the round's global adapter has an L2 norm
                                  # above this multiple of the global adapter's norm ...
    # max_update_norm = 50.0      # ... or above this absolute bound instead
    max_update_examples = 1000000 # refuse an update that claims more examples than this
    # base_model_digest = "..."   # refuse a bundle exported from another base model (manifest base_model.digest)
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
    [job.secure_aggregation]      # optional: the coordinator learns only the sum of each round's updates
    max_dropout_fraction = 0.3    # clients that may vanish mid-protocol (below: the round aborts)
    bits = 16                     # fixed-point bits per value of an update's delta (16: fp16-like, 8: int8-like)
    clip = 0.5                    # ... within [-clip, clip]
    phase_timeout_s = 60          # how long each phase after the first waits for slow devices
    # mode = "async"              # FedBuff instead of rounds (docs/strategies.md), with:
    # [job.async]  buffer_size = 10, staleness = "polynomial", exponent = 0.5, max_staleness = 10, server_lr = 1.0,
    #              max_concurrency = 100, versions = 50 and/or time_budget_s = 3600
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.config import AdapterConfig, ExportConfig, OptimizerConfig, TrainConfig
from edgeft.data import DataConfig, DataSchema  # noqa: F401 (DataSchema: [job.data])
from edgeft.errors import ConfigError, check_config
from edgeft.wire.types import MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES
from edgeft.server.job_config import (DEFAULT_HEAD_INIT, DEFAULT_PROXIMAL_MU, HEAD_INIT_METHODS, STRATEGIES,  # noqa: F401
                                     ClientSelection, HeadInit, JobConfig, SecureAggregation)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

@dataclass(frozen=True)
class TlsConfig:
    """The coordinator's TLS files (PEM). With ``client_ca``, mutual TLS: every device must present a
    certificate signed by that CA, or the handshake fails."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


@dataclass(frozen=True)
class ServerLimits:
    """Resource bounds of the coordinator, and its HTTP/2 keepalive policy.

    The Coordinator service's calls run on one event loop (``server.loop``): a long poll waits up to ``poll_wait_s``
    without holding a thread. Beyond ``max_concurrent_rpcs`` calls in progress a call is answered
    RESOURCE_EXHAUSTED at once (agents back off and retry), never left hanging.
    """

    max_message_bytes: int = MAX_MESSAGE_BYTES  # largest message either way (a task carries the whole global adapter)
    chunk_bytes: int = 1 << 20  # bundle bytes per download message
    max_upload_bytes: int = 512 << 20  # all messages of one upload together
    max_workers: int = 4  # threads serving the health service (the Coordinator service runs on the event loop)
    upload_workers: int = 32  # uploads in progress beyond this many wait: asynchronous jobs' admission counts them
    max_concurrent_rpcs: int = 128  # calls in progress
    # Keepalive (see the agent's edgeft.client.transport for its side). Agents ping every 60 s while they
    # train without a call in flight; the server must accept that, or it answers GOAWAY "too_many_pings":
    # it accepts pings without data down to every ``min_client_ping_interval_s`` (half the agents' interval,
    # room for timer jitter), also on connections with no call (keepalive_permit_without_calls; without it
    # the minimum for idle connections is 2 hours) and without limit on the count between data frames
    # (max_pings_without_data = 0). Its own pings, every ``keepalive_time_s``, find dead devices' connections.
    min_client_ping_interval_s: float = 30.0
    keepalive_time_s: float = 300.0
    keepalive_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        check_config(self.max_message_bytes >= MIN_MESSAGE_BYTES, "limits.max_message_bytes", self.max_message_bytes,
               "must be >= 65536")
        check_config(0 < self.chunk_bytes <= self.max_message_bytes - (16 << 10), "limits.chunk_bytes", self.chunk_bytes,
               "must be positive and at least 16 KiB below limits.max_message_bytes (room for the message's fields)")
        check_config(self.max_upload_bytes >= self.max_message_bytes, "limits.max_upload_bytes", self.max_upload_bytes,
               "must be >= limits.max_message_bytes")
        check_config(self.max_workers >= 1, "limits.max_workers", self.max_workers, "must be >= 1")
        check_config(self.upload_workers >= 1, "limits.upload_workers", self.upload_workers, "must be >= 1")
        check_config(self.max_concurrent_rpcs >= 1, "limits.max_concurrent_rpcs", self.max_concurrent_rpcs, "must be >= 1")
        for name in ("min_client_ping_interval_s", "keepalive_time_s", "keepalive_timeout_s"):
            check_config(getattr(self, name) > 0, f"limits.{name}", getattr(self, name), "must be positive")


@dataclass(frozen=True)
class S3Settings:
    """How the coordinator reaches an S3-compatible store (``[server.s3]``). Every field is optional: unset, boto3
    takes it from the standard variables (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY) or its other usual sources (~/.aws, an instance role)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("endpoint_url", "region", "access_key_id", "secret_access_key"):
            value = getattr(self, name)
            check_config(value is None or (isinstance(value, str) and value != ""), f"server.s3.{name}",
                         "***" if "secret" in name else value, "must be a non-empty string")
        check_config(self.endpoint_url is None or "://" in self.endpoint_url, "server.s3.endpoint_url",
                     self.endpoint_url, "must be a URL such as http://127.0.0.1:8333")
        check_config((self.access_key_id is None) == (self.secret_access_key is None), "server.s3.access_key_id",
                     self.access_key_id, "give access_key_id and secret_access_key together (or neither)")
        for name in ("connect_timeout_s", "read_timeout_s"):
            check_config(getattr(self, name) > 0, f"server.s3.{name}", getattr(self, name), "must be positive")


@dataclass(frozen=True)
class ServerConfig:
    """Where the coordinator listens and keeps its state, how it secures the wire, and its jobs.

    Exactly one of ``tls`` (TLS, optionally mutual) or ``insecure=True`` (plaintext, development only)."""

    address: str = "127.0.0.1:50051"
    state_dir: Path = Path("coordinator")
    database: str | None = None  # a SQLAlchemy URL; None: the SQLite file state_dir/state.db
    artifacts: str | None = None  # "s3://bucket/prefix"; None: the folder state_dir/artifacts
    s3: S3Settings = field(default_factory=S3Settings)
    jobs: tuple[JobConfig, ...] = ()
    poll_wait_s: float = 5.0
    tls: TlsConfig | None = None
    insecure: bool = False
    limits: ServerLimits = field(default_factory=ServerLimits)
    lease_s: float = 30.0  # replicas: how long a replica's claim on closing a round or evaluating lasts unrenewed
    final_answers_s: float = 10.0  # `edgeft server`: how long it still answers polls once every job is over
    token_cache_s: float = 5.0  # how long a valid token's row is trusted before it is read again (auth.TokenStore)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        check_config(isinstance(self.lease_s, (int, float)) and not isinstance(self.lease_s, bool)
                     and self.lease_s >= 1, "server.lease_s", self.lease_s, "must be a number of seconds, at least 1")
        check_config(isinstance(self.final_answers_s, (int, float)) and not isinstance(self.final_answers_s, bool)
                     and self.final_answers_s >= 0, "server.final_answers_s", self.final_answers_s,
                     "must be a number of seconds, at least 0")
        check_config(isinstance(self.token_cache_s, (int, float)) and not isinstance(self.token_cache_s, bool)
                     and 0 <= self.token_cache_s <= 3600, "server.token_cache_s", self.token_cache_s,
                     "must be a number of seconds from 0 to 3600")
        if self.database is not None:
            from edgeft.server.store import database_url

            if not isinstance(self.database, str) or "://" not in self.database:
                raise ConfigError("invalid server.database: must be a SQLAlchemy URL such as "
                                  "postgresql+psycopg://user@host/db or sqlite:////path/to/state.db")
            database_url(self.database)  # ConfigError when it does not parse (neither echoes a password)
        check_config(self.artifacts is None or (isinstance(self.artifacts, str) and self.artifacts.startswith("s3://")
                     and len(self.artifacts) > 5 and not self.artifacts[5:].startswith("/")), "server.artifacts",
                     self.artifacts, 'must be "s3://bucket/prefix" (leave it out for the folder state_dir/artifacts)')
        ids = [j.id for j in self.jobs]
        check_config(len(ids) == len(set(ids)), "job.id", ids, "job ids must be unique")
        check_config(isinstance(self.insecure, bool), "server.insecure", self.insecure, "must be true or false")
        if self.tls is None and not self.insecure:
            raise ConfigError("the coordinator serves TLS only: give [server.tls] cert and key (`edgeft certs` makes "
                              "development ones), or set [server] insecure = true (or --insecure) for plaintext "
                              "on a trusted network")
        check_config(self.tls is None or not self.insecure, "server.insecure", self.insecure,
               "give either [server.tls] or insecure = true, not both")


    @property
    def database_url(self) -> str:
        """The coordinator's database: ``database``, or the SQLite file ``state.db`` in ``state_dir``."""
        return self.database if self.database is not None else f"sqlite:///{self.state_dir / 'state.db'}"


SERVER_KEYS = ("address", "state_dir", "database", "artifacts", "s3", "poll_wait_s", "insecure", "tls", "limits",
               "lease_s", "final_answers_s", "token_cache_s")


def load_server_config(path: str | Path, **overrides: object) -> ServerConfig:
    """Parse a coordinator TOML file; relative paths are taken from the file's folder. ``overrides`` replace
    [server] values (``address``, ``insecure``; None leaves the file's value)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    base = path.parent
    server = {**data.get("server", {}), **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(server) - set(SERVER_KEYS))
    if unknown:
        raise ConfigError(f"{path}: [server] has unknown key(s) {', '.join(unknown)}; expected {', '.join(SERVER_KEYS)}")
    jobs = []
    for raw in data.get("job", []):
        raw = dict(raw)
        try:
            clients = ClientSelection(**raw.pop("clients", {}))
            train = TrainConfig(**{"progress": False, **raw.pop("train", {})})
            try:
                data_schema = DataSchema(**raw.pop("data", {}))
            except ConfigError as exc:  # refused at start, not when the first device reads its file
                raise ConfigError(f"{path}: job {raw.get('id', '?')!r}: [job.data] {exc}") from exc
            paths = {k: base / raw.pop(k) for k in ("bundle", "model") if k in raw}
            for key in ("device_bundles", "engine_bundles"):
                if key in raw:
                    paths[key] = tuple(base / p for p in raw.pop(key))
            export = _export_config(raw.pop("export", {}), raw.pop("adapter", {}), raw.pop("optimizer", {}), base)
            evaluation = raw.pop("eval", None)
            eval_data = None
            if evaluation is not None:
                evaluation = dict(evaluation)
                eval_data = DataConfig.of(base / evaluation.pop("path"), data_schema, **evaluation)
            secure = raw.pop("secure_aggregation", None)
            secure = SecureAggregation(**secure) if secure is not None else None
            asynchronous = raw.pop("async", None)  # [job.async]: "async" is a Python keyword
            jobs.append(JobConfig(clients=clients, train=train, data=data_schema, export=export,
                                  eval_data=eval_data, secure_aggregation=secure, asynchronous=asynchronous,
                                  **paths, **raw))
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"{path}: job {raw.get('id', '?')!r}: {exc}") from exc
    try:
        tls = server.get("tls")
        if tls is not None:
            tls = TlsConfig(**{k: base / v for k, v in tls.items()})
        return ServerConfig(address=server.get("address", "127.0.0.1:50051"),
                            state_dir=base / server.get("state_dir", "coordinator"),
                            database=_database(server.get("database"), base), artifacts=server.get("artifacts"),
                            s3=S3Settings(**server.get("s3", {})), jobs=tuple(jobs),
                            poll_wait_s=float(server.get("poll_wait_s", 5.0)), tls=tls,
                            insecure=server.get("insecure", False),
                            limits=ServerLimits(**server.get("limits", {})),
                            lease_s=server.get("lease_s", 30.0), final_answers_s=server.get("final_answers_s", 10.0),
                            token_cache_s=server.get("token_cache_s", 5.0))
    except TypeError as exc:
        raise ConfigError(f"{path}: [server]: {exc}") from exc


def _database(url: object, base: Path) -> object:
    """[server] database with a relative SQLite file path taken from the config file's folder."""
    if not isinstance(url, str) or not url.startswith("sqlite"):
        return url
    from edgeft.server.store import database_url

    parsed = database_url(url)
    if parsed.database and parsed.database != ":memory:" and not Path(parsed.database).is_absolute():
        return parsed.set(database=str(base / parsed.database)).render_as_string(hide_password=False)
    return url


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
