"""A federated job's settings: ``[[job]]`` of the coordinator's ``jobs.toml`` as typed, checked dataclasses
(``JobConfig`` and its parts). The TOML file, the server's own settings and the loader are in
``edgeft.server.config``; docs/jobs.md is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from edgeft.aggregate.options import StrategyOptions
from edgeft.aggregate.statistics import HEAD_INIT_METHODS, HEADS
from edgeft.aggregate.registry import (MEAN_STRATEGIES, MIXED_RANK_STRATEGIES, STRATEGIES,
                                     parse_strategy_options)
from edgeft.config import ENGINES, ExportConfig, TrainConfig
from edgeft.data import DataConfig, DataSchema
from edgeft.errors import ConfigError, check_config
from edgeft.server.async_config import MODES, AsyncJob


DEFAULT_PROXIMAL_MU = 0.01  # fedprox's mu when the coordinator exports the model and no mu is given


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
        check_config(0 < self.fraction <= 1, "clients.fraction", self.fraction, "must be in (0, 1]")
        check_config(self.min >= 1, "clients.min", self.min, "must be >= 1")
        check_config(self.max is None or self.max >= self.min, "clients.max", self.max, "must be >= clients.min")
        if self.min_available is None:
            object.__setattr__(self, "min_available", self.min)
        check_config(self.min_available >= self.min, "clients.min_available", self.min_available, "must be >= clients.min")


# What ``auto`` picks for a classification bundle with a sentence-pooled head (README: "Federated convergence")
DEFAULT_HEAD_INIT = HEADS[0]


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
        check_config(self.method in HEAD_INIT_METHODS, "head_init.method", self.method,
               f"expected one of {', '.join(HEAD_INIT_METHODS)}")
        check_config(self.scale > 0, "head_init.scale", self.scale, "must be positive")
        check_config(self.ridge > 0, "head_init.ridge", self.ridge, "must be positive")

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
        check_config(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f < 0.5,
               "secure_aggregation.max_dropout_fraction", f, "must be in [0, 0.5): the survivors must be more than "
               "half of the round")
        FixedPoint(bits=self.bits, clip=self.clip, ring_bits=64)  # ConfigError naming bits or clip
        check_config(isinstance(self.phase_timeout_s, (int, float)) and self.phase_timeout_s > 0,
               "secure_aggregation.phase_timeout_s", self.phase_timeout_s, "must be positive")


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
    # "sync": rounds of selected devices; "async": FedBuff (devices train whenever idle on the latest global
    # version; every [job.async] buffer_size accepted updates make a new version; ``rounds`` does not apply)
    mode: str = "sync"
    asynchronous: AsyncJob | None = None  # [job.async] (a table, or an AsyncJob), with mode = "async"

    def __post_init__(self) -> None:
        if isinstance(self.head_init, str):
            object.__setattr__(self, "head_init", HeadInit(method=self.head_init))
        elif isinstance(self.head_init, dict):
            object.__setattr__(self, "head_init", HeadInit(**self.head_init))
        check_config(self.secure_aggregation is None or self.head_init.method in ("auto", "none"), "job.head_init.method",
               self.head_init.method, "the statistics round does not run under secure aggregation yet; use 'auto' "
               "(it is skipped then) or 'none'")
        check_config(bool(self.id) and self.id.replace("-", "").replace("_", "").isalnum(), "job.id", self.id,
               "use letters, digits, - and _")
        check_config((self.bundle is None) != (self.model is None), "job.bundle", self.bundle,
               "give exactly one of bundle (an exported bundle) or model (a Hugging Face folder to export)")
        for name in ("bundle", "model"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.model is not None and self.export is None:
            object.__setattr__(self, "export", ExportConfig())
        check_config(self.rounds >= 1, "job.rounds", self.rounds, "must be >= 1")
        check_config(self.strategy in STRATEGIES, "job.strategy", self.strategy, f"expected one of {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategy_options", parse_strategy_options(self.strategy, self.strategy_options))
        self._check_mode()  # before the strategy's round-size checks, which do not apply to an asynchronous job
        self._check_strategy()
        check_config(self.round_deadline_s > 0, "job.round_deadline_s", self.round_deadline_s, "must be positive")
        check_config(self.upload_dtype in ("float32", "float16"), "job.upload_dtype", self.upload_dtype,
               "expected float32 or float16")
        check_config(self.max_update_norm is None or self.max_update_norm > 0, "job.max_update_norm", self.max_update_norm,
               "must be positive")
        check_config(self.max_update_norm_ratio > 0, "job.max_update_norm_ratio", self.max_update_norm_ratio,
               "must be positive")
        check_config(isinstance(self.max_update_examples, int) and self.max_update_examples >= 1, "job.max_update_examples",
               self.max_update_examples, "must be a whole number >= 1")
        if isinstance(self.secure_aggregation, dict):
            object.__setattr__(self, "secure_aggregation", SecureAggregation(**self.secure_aggregation))
        if self.secure_aggregation is not None:
            check_config(self.strategy in MEAN_STRATEGIES, "job.strategy", self.strategy,
                   "secure aggregation hides every single update, so only mean strategies can run with it "
                   f"({', '.join(MEAN_STRATEGIES)}); robust rules need the updates one by one")
            check_config(self.clients.min >= 2, "clients.min", self.clients.min,
                   "secure aggregation needs rounds of at least 2 clients (the sum of one is that client's update)")
        self._check_ranks()
        self._check_engines()

    def _check_mode(self) -> None:
        """``mode = "async"``: its [job.async] table, and what cannot run asynchronously (refused by name)."""
        check_config(self.mode in MODES, "job.mode", self.mode, f"expected one of {', '.join(MODES)}")
        if self.mode == "sync":
            check_config(self.asynchronous is None, "job.async", "set", 'applies to mode = "async" only')
            return
        object.__setattr__(self, "asynchronous", AsyncJob.parse(self.asynchronous))
        why = 'is not supported with mode = "async"'
        check_config(self.secure_aggregation is None, "job.secure_aggregation", "set", f"{why}: secure "
                     "aggregation unmasks only the sum of a round's fixed set of devices, and an asynchronous "
                     "buffer has no such set; drop [job.secure_aggregation] or use mode = \"sync\"")
        check_config(self.strategy in MEAN_STRATEGIES, "job.strategy", self.strategy, f"{why}: FedBuff aggregates "
                     f"a staleness-weighted mean of deltas; use a mean strategy ({', '.join(MEAN_STRATEGIES)})")
        check_config(not (self.device_ranks or self.device_bundles), "job.device_ranks",
                     list(self.device_ranks) or "device_bundles", f"{why} (mixed LoRA ranks)")
        check_config(self.head_init.method in ("auto", "none"), "job.head_init.method", self.head_init.method,
                     f"{why}: the statistics round is a synchronous round; use 'none'")

    def _check_engines(self) -> None:
        """Several training engines: known names, bundles only with ``bundle``, not with mixed ranks."""
        engines = self.engines
        if isinstance(engines, str):
            engines = (engines,)
        object.__setattr__(self, "engines", tuple(engines))
        object.__setattr__(self, "engine_bundles", tuple(Path(p) for p in self.engine_bundles))
        engines = self.engines
        check_config(all(isinstance(e, str) for e in engines) and set(engines) <= set(ENGINES), "job.engines",
               list(engines), f"expected engines among {', '.join(ENGINES)}")
        check_config(len(set(engines)) == len(engines), "job.engines", list(engines), "each engine once")
        check_config(not self.engine_bundles or self.bundle is not None, "job.engine_bundles",
               [str(p) for p in self.engine_bundles], "goes with job.bundle; with job.model list the engines in "
               "job.engines and the coordinator exports a bundle for each")
        if self.bundle is not None:
            check_config(not engines or len(engines) == 1 + len(self.engine_bundles), "job.engines", list(engines),
                   f"with job.bundle, list the engines of bundle and its {len(self.engine_bundles)} engine_bundles "
                   "(one each), or leave engines out")
        elif self.export is not None:
            if not engines:
                object.__setattr__(self, "engines", (self.export.engine,))
            elif self.export.engine != engines[0]:  # the job's own bundle is for the first engine listed
                opset = None  # the first engine's default: [job.export] opset is for another engine
                object.__setattr__(self, "export", replace(self.export, engine=engines[0], opset=opset))
        if len(self.engines) > 1 or self.engine_bundles:
            check_config(not (self.device_ranks or self.device_bundles), "job.engines",
                   list(self.engines) or "engine_bundles",
                   "several training engines serve the job's own LoRA rank only; mixed ranks (device_ranks, "
                   "device_bundles) and several engines in one job are not supported: run them as two jobs")

    def _check_ranks(self) -> None:
        """Mixed LoRA ranks: which settings they need and which they cannot run with."""
        object.__setattr__(self, "device_ranks", tuple(self.device_ranks))
        object.__setattr__(self, "device_bundles", tuple(Path(p) for p in self.device_bundles))
        ranks = self.device_ranks
        check_config(all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
               and len(set(ranks)) == len(ranks), "job.device_ranks", list(ranks), "distinct whole numbers >= 1")
        check_config(not ranks or self.model is not None, "job.device_ranks", list(ranks),
               "the coordinator exports the smaller ranks from job.model; with job.bundle list bundles of the "
               "smaller ranks in device_bundles instead")
        check_config(not self.device_bundles or self.bundle is not None, "job.device_bundles",
               [str(p) for p in self.device_bundles], "goes with job.bundle; with job.model use device_ranks")
        if ranks and self.export is not None:
            rank = self.export.adapter.rank
            check_config(max(ranks) < rank, "job.device_ranks", list(ranks), f"each must be below the job's rank {rank} "
                   "([job.adapter] rank)")
        if ranks or self.device_bundles:
            check_config(self.strategy in MIXED_RANK_STRATEGIES and self.strategy_options.clip_norm is None, "job.strategy",
                   self.strategy, "mixed LoRA ranks aggregate as the mean of LoRA products (fedavg or fedprox, "
                   "without clip_norm/noise_multiplier)")
            check_config(self.secure_aggregation is None, "job.secure_aggregation", "set",
                   "mixed LoRA ranks need the updates' products, which secure aggregation hides")

    def _check_strategy(self) -> None:
        """What a strategy asks of the rest of the job: Krum's minimum round size, FedProx's exported term."""
        options = self.strategy_options
        need = STRATEGIES[self.strategy].min_round(options)
        if need > 1:
            check_config(self.clients.min >= need, "clients.min", self.clients.min,
                   f"strategy {self.strategy!r} with byzantine={options.byzantine} needs rounds of at least {need} "
                   "updates (2f + 3)")
        if self.strategy == "multikrum" and options.selected is not None:
            check_config(options.selected <= self.clients.min - options.byzantine, "job.strategy_options.selected",
                   options.selected, f"must be <= clients.min - byzantine = {self.clients.min - options.byzantine}")
        if self.strategy == "fedprox" and self.model is not None and self.export is not None:
            exported = self.export.proximal_mu
            if exported == 0:
                mu = options.mu if options.mu is not None else DEFAULT_PROXIMAL_MU
                object.__setattr__(self, "export", replace(self.export, proximal_mu=mu))
            else:
                check_config(options.mu is None or options.mu == exported, "job.strategy_options.mu", options.mu,
                       f"differs from [job.export] proximal_mu={exported!r}; give one of them")
