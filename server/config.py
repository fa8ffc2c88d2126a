"""Coordinator configuration: server settings and federated jobs, read from a TOML file.

    [server]
    address = "127.0.0.1:50051"   # where to listen
    state_dir = "coordinator"     # SQLite database and artifact store
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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgeft.aggregate.options import MEAN_STRATEGIES, STRATEGY_NAMES, StrategyOptions, parse_strategy_options
from edgeft.config import ENGINES, AdapterConfig, ExportConfig, OptimizerConfig, TrainConfig
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


HEAD_INIT_METHODS = ("auto", "class_means", "fedcof", "none")
# What ``auto`` picks for a classification bundle with a sentence-pooled head (README: "Federated convergence")
DEFAULT_HEAD_INIT = "class_means"


@dataclass(frozen=True)
class HeadInit:
    """The statistics round (round 0): the task head is built from the devices' class statistics before the
    LoRA rounds (``edgeft.aggregate.statistics``). ``method``: ``class_means`` (cosine classifier on the class
    means), ``fedcof`` (ridge classifier with FedCOF's covariance estimate; ``ridge`` its regularisation),
    ``none`` (train from the exported random head), or ``auto``: the default recipe for classification
    bundles with a sentence-pooled head, ``none`` for any other bundle. ``scale``: the logit scale (inverse
    temperature) of the built head."""

    method: str = "auto"
    scale: float = 20.0
    ridge: float = 1.0

    def __post_init__(self) -> None:
        _check(self.method in HEAD_INIT_METHODS, "head_init.method", self.method,
               f"expected one of {', '.join(HEAD_INIT_METHODS)}")
        _check(self.scale > 0, "head_init.scale", self.scale, "must be positive")
        _check(self.ridge > 0, "head_init.ridge", self.ridge, "must be positive")

    def resolve(self, manifest: object) -> str:
        """The method for a bundle (its manifest): ``none`` where it has no sentence-pooled classifier head;
        ConfigError where ``class_means``/``fedcof`` were asked of such a bundle."""
        fits = getattr(manifest, "task", None) == "classification" and getattr(manifest, "pooling", None)
        if self.method == "auto":
            return DEFAULT_HEAD_INIT if fits else "none"
        if self.method != "none" and not fits:
            raise ConfigError(f"head_init.method={self.method!r} needs a classification bundle with a sentence-pooled "
                              "head (a sentence-transformers model exported with pooling 'auto' or 'sentence'); "
                              "use method 'none' or 'auto'")
        return self.method


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation of a job's rounds (``edgeft.secagg``): devices send pairwise-masked, fixed-point
    encoded deltas; the coordinator unmasks only their sum.

    max_dropout_fraction: the share of a round's selected clients that may drop out during the protocol and
      still give the exact sum (threshold t = selected - floor(fraction x selected), at least 2 and more than
      half); fewer survivors abort the round without unmasking anything. In [0, 0.5).
    bits, clip: each value of a device's delta (its adapter minus the global one) is clipped to [-clip, clip]
      and quantised to ``bits`` bits: the mean is exact to clip / (2^(bits-1) - 1) / 2.
    phase_timeout_s: how long each phase after the first (which waits for training, until the round's
      deadline) waits for devices before it closes with those that answered.
    """

    max_dropout_fraction: float = 0.3
    bits: int = 16
    clip: float = 0.5  # 16 bits: the mean within 7.6e-6, finer than a float16 upload of adapter values above 0.03
    phase_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        from edgeft.secagg.fixedpoint import FixedPoint

        f = self.max_dropout_fraction
        _check(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f < 0.5,
               "secure_aggregation.max_dropout_fraction", f, "must be in [0, 0.5): the survivors must be more than "
               "half of the round")
        FixedPoint(bits=self.bits, clip=self.clip, ring_bits=64)  # ConfigError naming bits or clip
        _check(isinstance(self.phase_timeout_s, (int, float)) and self.phase_timeout_s > 0,
               "secure_aggregation.phase_timeout_s", self.phase_timeout_s, "must be positive")


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
    # Update validation (besides the manifest's names, shapes and dtypes and finite values). The L2 norm of an
    # update's change from the global adapter it was trained from, all tensors together, is bounded by
    # ``max_update_norm`` when given, else by ``max_update_norm_ratio`` x the norm of that global adapter.
    max_update_norm: float | None = None
    max_update_norm_ratio: float = 10.0
    max_update_examples: int = 1_000_000
    # The base model's digest (a bundle manifest's base_model.digest): a bundle for another base is refused.
    base_model_digest: str | None = None
    clients: ClientSelection = field(default_factory=ClientSelection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    # Held-out data on the coordinator: the global adapter is evaluated on it after every round (and before
    # the first), in the background; results go to the state database.
    eval_data: DataConfig | None = None
    # Secure aggregation: the coordinator sees only the sum of each round's updates (None: plain uploads).
    secure_aggregation: SecureAggregation | None = None
    # The statistics round before the LoRA rounds (a HeadInit, a TOML table, or just the method's name)
    head_init: HeadInit = field(default_factory=HeadInit)
    # Mixed LoRA ranks: smaller ranks served to devices that ask for at most that rank (edgeft client
    # --max-lora-rank); ``device_ranks`` are exported by the coordinator (with ``model``), ``device_bundles`` are
    # bundles of the job's model at smaller ranks (with ``bundle``). Updates of all ranks are aggregated exactly
    # as the mean of their LoRA products, re-factorised to the job's rank (edgeft.aggregate.lora_ranks).
    device_ranks: tuple[int, ...] = ()
    device_bundles: tuple[Path, ...] = ()
    # Training engines (``edgeft.config.ENGINES``): the engines the job serves, the preferred first. A device gets
    # a bundle of the first of them it runs (its agent reports what its runtime runs; an agent too old to say
    # runs "ort-training"); a device that runs none of them is refused at registration. With ``model`` the
    # coordinator exports the model once per engine, the first being the job's own bundle (its initial adapter
    # and evaluations); default: the engine of [job.export] alone. With ``bundle``, ``engine_bundles`` are the
    # job's bundle exported for other engines (the same model and settings, only the engine differs: checked),
    # and ``engines``, when given, lists exactly the engines of ``bundle`` and ``engine_bundles`` in the order
    # of preference (default: ``bundle``'s engine first). Updates of every engine are the same tensors and are
    # aggregated together. Several engines serve the job's own LoRA rank only: not with device_ranks or
    # device_bundles.
    engines: tuple[str, ...] = ()
    engine_bundles: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.head_init, str):
            object.__setattr__(self, "head_init", HeadInit(method=self.head_init))
        elif isinstance(self.head_init, dict):
            object.__setattr__(self, "head_init", HeadInit(**self.head_init))
        _check(self.secure_aggregation is None or self.head_init.method in ("auto", "none"), "job.head_init.method",
               self.head_init.method, "the statistics round does not run under secure aggregation yet; use 'auto' "
               "(it is skipped then) or 'none'")
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
        _check(self.max_update_norm is None or self.max_update_norm > 0, "job.max_update_norm", self.max_update_norm,
               "must be positive")
        _check(self.max_update_norm_ratio > 0, "job.max_update_norm_ratio", self.max_update_norm_ratio,
               "must be positive")
        _check(isinstance(self.max_update_examples, int) and self.max_update_examples >= 1, "job.max_update_examples",
               self.max_update_examples, "must be a whole number >= 1")
        if isinstance(self.secure_aggregation, dict):
            object.__setattr__(self, "secure_aggregation", SecureAggregation(**self.secure_aggregation))
        if self.secure_aggregation is not None:
            _check(self.strategy in MEAN_STRATEGIES, "job.strategy", self.strategy,
                   "secure aggregation hides every single update, so only mean strategies can run with it "
                   f"({', '.join(MEAN_STRATEGIES)}); robust rules need the updates one by one")
            _check(self.clients.min >= 2, "clients.min", self.clients.min,
                   "secure aggregation needs rounds of at least 2 clients (the sum of one is that client's update)")
        self._check_ranks()
        self._check_engines()

    def _check_engines(self) -> None:
        """Several training engines: known names, bundles only with ``bundle``, not with mixed ranks."""
        engines = self.engines
        if isinstance(engines, str):
            engines = (engines,)
        object.__setattr__(self, "engines", tuple(engines))
        object.__setattr__(self, "engine_bundles", tuple(Path(p) for p in self.engine_bundles))
        engines = self.engines
        _check(all(isinstance(e, str) for e in engines) and set(engines) <= set(ENGINES), "job.engines",
               list(engines), f"expected engines among {', '.join(ENGINES)}")
        _check(len(set(engines)) == len(engines), "job.engines", list(engines), "each engine once")
        _check(not self.engine_bundles or self.bundle is not None, "job.engine_bundles",
               [str(p) for p in self.engine_bundles], "goes with job.bundle; with job.model list the engines in "
               "job.engines and the coordinator exports a bundle for each")
        if self.bundle is not None:
            _check(not engines or len(engines) == 1 + len(self.engine_bundles), "job.engines", list(engines),
                   f"with job.bundle, list the engines of bundle and its {len(self.engine_bundles)} engine_bundles "
                   "(one each), or leave engines out")
        elif self.export is not None:
            if not engines:
                object.__setattr__(self, "engines", (self.export.engine,))
            elif self.export.engine != engines[0]:  # the job's own bundle is for the first engine listed
                opset = None  # the first engine's default: [job.export] opset is for another engine
                object.__setattr__(self, "export", replace(self.export, engine=engines[0], opset=opset))
        if len(self.engines) > 1 or self.engine_bundles:
            _check(not (self.device_ranks or self.device_bundles), "job.engines",
                   list(self.engines) or "engine_bundles",
                   "several training engines serve the job's own LoRA rank only; mixed ranks (device_ranks, "
                   "device_bundles) and several engines in one job are not supported: run them as two jobs")

    def _check_ranks(self) -> None:
        """Mixed LoRA ranks: which settings they need and which they cannot run with."""
        object.__setattr__(self, "device_ranks", tuple(self.device_ranks))
        object.__setattr__(self, "device_bundles", tuple(Path(p) for p in self.device_bundles))
        ranks = self.device_ranks
        _check(all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
               and len(set(ranks)) == len(ranks), "job.device_ranks", list(ranks), "distinct whole numbers >= 1")
        _check(not ranks or self.model is not None, "job.device_ranks", list(ranks),
               "the coordinator exports the smaller ranks from job.model; with job.bundle list bundles of the "
               "smaller ranks in device_bundles instead")
        _check(not self.device_bundles or self.bundle is not None, "job.device_bundles",
               [str(p) for p in self.device_bundles], "goes with job.bundle; with job.model use device_ranks")
        if ranks and self.export is not None:
            rank = self.export.adapter.rank
            _check(max(ranks) < rank, "job.device_ranks", list(ranks), f"each must be below the job's rank {rank} "
                   "([job.adapter] rank)")
        if ranks or self.device_bundles:
            _check(self.strategy in ("fedavg", "fedprox") and self.strategy_options.clip_norm is None, "job.strategy",
                   self.strategy, "mixed LoRA ranks aggregate as the mean of LoRA products (fedavg or fedprox, "
                   "without clip_norm/noise_multiplier)")
            _check(self.secure_aggregation is None, "job.secure_aggregation", "set",
                   "mixed LoRA ranks need the updates' products, which secure aggregation hides")

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

    A long poll holds a worker thread for up to ``poll_wait_s``; beyond ``max_concurrent_rpcs`` calls in
    progress a call is answered RESOURCE_EXHAUSTED at once (agents back off and retry), never left hanging.
    """

    max_message_bytes: int = 8 << 20  # largest message either way (a task carries the whole global adapter)
    chunk_bytes: int = 1 << 20  # bundle bytes per download message
    max_upload_bytes: int = 512 << 20  # all messages of one upload together
    max_workers: int = 64  # threads serving calls
    max_concurrent_rpcs: int = 128  # calls in progress (running or waiting for a thread)
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
        _check(self.max_message_bytes >= 64 << 10, "limits.max_message_bytes", self.max_message_bytes,
               "must be >= 65536")
        _check(0 < self.chunk_bytes <= self.max_message_bytes - (16 << 10), "limits.chunk_bytes", self.chunk_bytes,
               "must be positive and at least 16 KiB below limits.max_message_bytes (room for the message's fields)")
        _check(self.max_upload_bytes >= self.max_message_bytes, "limits.max_upload_bytes", self.max_upload_bytes,
               "must be >= limits.max_message_bytes")
        _check(self.max_workers >= 1, "limits.max_workers", self.max_workers, "must be >= 1")
        _check(self.max_concurrent_rpcs >= 1, "limits.max_concurrent_rpcs", self.max_concurrent_rpcs, "must be >= 1")
        for name in ("min_client_ping_interval_s", "keepalive_time_s", "keepalive_timeout_s"):
            _check(getattr(self, name) > 0, f"limits.{name}", getattr(self, name), "must be positive")


@dataclass(frozen=True)
class ServerConfig:
    """Where the coordinator listens and keeps its state, how it secures the wire, and its jobs.

    Exactly one of ``tls`` (TLS, optionally mutual) or ``insecure=True`` (plaintext, development only)."""

    address: str = "127.0.0.1:50051"
    state_dir: Path = Path("coordinator")
    jobs: tuple[JobConfig, ...] = ()
    poll_wait_s: float = 5.0
    tls: TlsConfig | None = None
    insecure: bool = False
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        ids = [j.id for j in self.jobs]
        _check(len(ids) == len(set(ids)), "job.id", ids, "job ids must be unique")
        _check(isinstance(self.insecure, bool), "server.insecure", self.insecure, "must be true or false")
        if self.tls is None and not self.insecure:
            raise ConfigError("the coordinator serves TLS only: give [server.tls] cert and key (`edgeft certs` makes "
                              "development ones), or set [server] insecure = true (or --insecure) for plaintext "
                              "on a trusted network")
        _check(self.tls is None or not self.insecure, "server.insecure", self.insecure,
               "give either [server.tls] or insecure = true, not both")


SERVER_KEYS = ("address", "state_dir", "poll_wait_s", "insecure", "tls", "limits")


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
            data_schema = DataSchema(**raw.pop("data", {}))
            paths = {k: base / raw.pop(k) for k in ("bundle", "model") if k in raw}
            for key in ("device_bundles", "engine_bundles"):
                if key in raw:
                    paths[key] = tuple(base / p for p in raw.pop(key))
            export = _export_config(raw.pop("export", {}), raw.pop("adapter", {}), raw.pop("optimizer", {}), base)
            evaluation = raw.pop("eval", None)
            eval_data = None
            if evaluation is not None:
                evaluation = dict(evaluation)
                eval_data = DataConfig(base / evaluation.pop("path"), text_column=data_schema.text_column,
                                       label_column=data_schema.label_column, format=data_schema.format,
                                       **evaluation)
            secure = raw.pop("secure_aggregation", None)
            secure = SecureAggregation(**secure) if secure is not None else None
            jobs.append(JobConfig(clients=clients, train=train, data=data_schema, export=export,
                                  eval_data=eval_data, secure_aggregation=secure, **paths, **raw))
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"{path}: job {raw.get('id', '?')!r}: {exc}") from exc
    try:
        tls = server.get("tls")
        if tls is not None:
            tls = TlsConfig(**{k: base / v for k, v in tls.items()})
        return ServerConfig(address=server.get("address", "127.0.0.1:50051"),
                            state_dir=base / server.get("state_dir", "coordinator"), jobs=tuple(jobs),
                            poll_wait_s=float(server.get("poll_wait_s", 5.0)), tls=tls,
                            insecure=server.get("insecure", False),
                            limits=ServerLimits(**server.get("limits", {})))
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
