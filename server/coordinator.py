"""The coordinator: a thin facade over its rooms, for the gRPC servicer (``edgeft.server.servicer``), scripts and
tests. Transport-free: its methods take and return edgeft's own types.

- ``jobs``: each job's bundles (own, smaller LoRA ranks, other engines), put in place once at start or resume;
- ``state``: the only module that speaks SQL (named queries over ``store``'s tables);
- ``rounds`` (and ``secure`` for secure aggregation rounds): open, task, submit, close;
- ``evaluation``: the thread that evaluates each new global adapter; ``history``: what a job recorded.

All state lives in the database and the artifact store, so a restarted coordinator (even after SIGKILL) carries on
where it was. Rounds close when their last update arrives or on the coordinator's clock (``start_clock``: a thread
that calls ``tick``), never inside a poll; a poll or heartbeat reads, plus one liveness write (``State.seen``), plus
opening the job's current round the first time a device asks for it. Several coordinator processes (replicas) may
serve one database and one bucket: a round is closed, and a global adapter evaluated, by the replica that holds its
lease (``lease``), and every replica's clock takes over what a dead one left (docs/replicas.md).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from edgeft.aggregate import STRATEGIES, Strategy, build_strategy
from edgeft.aggregate.lora_ranks import HeteroRankFedAvg
from edgeft.bundle import Bundle
from edgeft.errors import NotFound, Rejected, Unavailable
from edgeft.server.admission import CallLoad
from edgeft.server.artifacts import Artifacts, FolderStore
from edgeft.server.async_rounds import AsyncRounds
from edgeft.server.async_state import AsyncState
from edgeft.server.auth import TokenStore
from edgeft.server.config import JobConfig, S3Settings, ServerConfig
from edgeft.server.downloads import Downloads
from edgeft.server.evaluation import Evaluator
from edgeft.server.history import job_history, job_status
from edgeft.server.jobs import JobBundles, engine_refusal
from edgeft.server.lease import Leases
from edgeft.server.rounds import Rounds, TaskAssignment
from edgeft.server.s3 import S3Store
from edgeft.server.secure import SecureRounds
from edgeft.server.state import State, open_state
from edgeft.server.store import open_database
from edgeft.update import AdapterUpdate
from edgeft.wire import RetryLater, SecAggHeader, UploadHeader

log = logging.getLogger("edgeft.server")

__all__ = ["STRATEGIES", "Coordinator", "TaskAssignment", "engine_refusal", "stored_adapter"]
CLOCK_S = 0.25  # how often the clock closes rounds whose deadline passed
SWEEP_S = 2.0  # how often the clock looks for global adapters no replica evaluated yet
LIVENESS_S = 1.0  # a device's polls within this long of its last liveness write read only (long-polls repeat)


def stored_adapter(state_dir: str | Path, job_id: str, round_number: int | None = None, database: str | None = None,
                   artifacts: str | None = None, s3: S3Settings | None = None
                   ) -> tuple[Bundle, dict[str, np.ndarray], int]:
    """Read-only: a job's global adapter after ``round_number`` (default: the latest), its bundle and the
    round, from a coordinator's state folder, its ``database`` (default: the folder's SQLite file) and its
    ``artifacts`` bucket with ``s3`` settings (default: the folder's artifacts; with a bucket the state folder only
    keeps a copy of the bundle) (for ``edgeft deploy --state``; the coordinator may be running)."""
    state_dir = Path(state_dir)
    if database is None and not (state_dir / "state.db").is_file():
        raise NotFound(f"{state_dir} is not a coordinator state folder (no state.db); pass the server's "
                       "state_dir (and --database when its [server] database is not the folder's file)")
    if artifacts is None and not (state_dir / "artifacts").is_dir() and (state_dir / "bundle-cache").is_dir():
        raise NotFound(f"the coordinator of {state_dir} keeps its artifacts in an S3 bucket ([server] artifacts): "
                       "pass it with --artifacts s3://bucket/prefix, the store's endpoint with --s3-endpoint (or "
                       "AWS_ENDPOINT_URL_S3) and its credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    state = State(open_database(database or state_dir / "state.db", upgrade=False))
    try:
        row = state.adapter(job_id, round_number)
        digest = state.job(job_id).bundle_digest
    finally:
        state.engine.dispose()
    store = artifact_store(state_dir, artifacts, s3 or S3Settings())
    return store.bundle(digest, verify=True), store.get_tensors(row.blob), row.version


def artifact_store(state_dir: Path, artifacts: str | None, s3: S3Settings) -> Artifacts:
    """The folder ``state_dir/artifacts`` (``artifacts`` None), or the bucket ``artifacts`` ("s3://bucket/prefix")
    reached with ``s3``, its bundles also kept in the local folder ``state_dir/bundle-cache``."""
    if artifacts is None:
        return FolderStore(state_dir / "artifacts")
    return S3Store(artifacts, s3, cache=state_dir / "bundle-cache")


def open_artifacts(config: ServerConfig) -> Artifacts:
    """The coordinator's artifact store: the folder ``state_dir/artifacts`` (default), or the bucket of ``[server]
    artifacts = "s3://bucket/prefix"`` with its bundles also kept in the local folder ``state_dir/bundle-cache``."""
    return artifact_store(config.state_dir, config.artifacts, config.s3)


def job_strategy(configured: Strategy, job: JobConfig, bundles: JobBundles) -> Strategy:
    """The strategy that aggregates a job's rounds: its configured one; with mixed LoRA ranks the mean of the
    LoRA products, re-factorised (``HeteroRankFedAvg``)."""
    own = bundles.bundles[job.id].manifest
    if len(bundles.rank_bundles[job.id]) > 1:
        return HeteroRankFedAvg(int(own.adapter["rank"]), float(own.adapter["alpha"]))
    return configured


class Coordinator:
    """The coordinator's rules over its stored state."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.artifacts = open_artifacts(config)  # the folder state_dir/artifacts, or [server] artifacts (S3)
        self.state = open_state(config.database_url, self.artifacts)
        self.engine = self.state.engine
        self.artifacts.remove_partial()  # blobs and bundles whose writing a crash cut short
        log.info("artifacts in %s", self.artifacts.describe())
        self.jobs = {job.id: job for job in config.jobs}
        self.tokens = TokenStore(self.engine, self.jobs, config.token_cache_s)  # device enrolment tokens, per job
        self.bundle_sets = JobBundles(config, self.artifacts, self.state)
        self.strategies: dict[str, Strategy] = {}
        self.secure_rounds = SecureRounds()
        self.leases = Leases(self.engine, config.lease_s)  # work one replica does at a time (edgeft.server.lease)
        self.evaluator = Evaluator(self.state, lambda: self.bundles, self.global_adapter, self.leases)
        self.rounds = Rounds(config, self.jobs, self.bundle_sets, self.state, self.artifacts, self.strategies,
                             self.secure_rounds, on_closed=self.evaluator.schedule, leases=self.leases)
        self.upload_load = CallLoad()  # uploads waiting (the servicer's InProgress counts them)
        self.async_rounds = AsyncRounds(self.rounds, AsyncState(self.state), self.upload_load)  # "async" jobs
        self._swept = 0.0  # when the clock last looked for global adapters without an evaluation
        self._clock: threading.Thread | None = None
        self._seen: dict[tuple[str, str], tuple[float, dict]] = {}  # (device, job): last liveness write, capabilities
        self.downloads = Downloads(self.state)  # task bytes sent, written in batches
        self._stop = threading.Event()
        for job in config.jobs:
            self._start_job(job)

    def _start_job(self, job: JobConfig) -> None:
        configured = build_strategy(job.strategy, job.strategy_options)
        started = self.bundle_sets.start(job, check=configured.check_bundle)
        self.strategies[job.id] = job_strategy(configured, job, self.bundle_sets)
        for version in started.evaluate:
            self.evaluator.schedule(job, version)
        if job.secure_aggregation is not None and self.engine.dialect.name != "sqlite":
            log.warning("job %s aggregates securely: its rounds' protocol state lives in this process only, so with "
                        "several coordinator replicas on %s list the job in one replica's configuration alone "
                        "(docs/replicas.md)", job.id, self.engine.url.render_as_string(hide_password=True))
        with self.rounds.lock:
            for number in started.open_rounds:
                if job.secure_aggregation is not None:  # its protocol state was in the old process's memory only
                    self.rounds.fail(job, number, f"round {number} was a secure aggregation round in progress when "
                                     "the coordinator stopped; its protocol state (keys, shares, the masked sum) "
                                     "lives in memory only, so the round cannot go on and no input was unmasked")
                    continue
                self.rounds.close_if_done(job, number)  # it got all its updates before the crash

    # -- the clock ----------------------------------------------------------------------------------
    def start_clock(self, interval_s: float = CLOCK_S) -> None:
        """Close rounds at their deadlines (and move secure phases on) from a thread of their own."""
        if self._clock is None:
            self._stop.clear()
            self._clock = threading.Thread(target=self._run_clock, args=(interval_s,), name="edgeft-clock",
                                           daemon=True)
            self._clock.start()

    def stop_clock(self) -> None:
        self._stop.set()
        if self._clock is not None:
            self._clock.join(timeout=10)
            self._clock = None

    def _run_clock(self, interval_s: float) -> None:
        waiting = False  # for the database: said once per outage, not every turn
        while not self._stop.wait(interval_s):
            try:
                self.tick()
            except Unavailable as exc:
                if not waiting:
                    log.warning("the round clock waits for the database or the artifact store: %s", exc)
                waiting = True
                continue
            except Exception:  # noqa: BLE001 - the clock outlives one failed turn; the next one retries
                log.exception("the round clock's turn failed")
            if waiting:
                log.warning("the database and the artifact store answer again; the round clock goes on")
            waiting = False

    def tick(self) -> None:
        """Close rounds that are done (their deadline passed, or a closing that did not happen: see
        ``Rounds.tick``), or fail them below the minimum; move secure phases on; every SWEEP_S, schedule the
        evaluations no replica stored yet; write the task bytes counted since the last turn."""
        self.downloads.flush()
        self.rounds.tick()
        self.async_rounds.tick([job for job in self.jobs.values() if job.mode == "async"])
        if time.monotonic() - self._swept >= SWEEP_S:
            self._swept = time.monotonic()
            for key, (at, _) in list(self._seen.items()):  # memos past LIVENESS_S serve no poll: memory stays flat
                if self._swept - at >= LIVENESS_S:
                    self._seen.pop(key, None)
            self.evaluator.sweep(list(self.jobs.values()))

    # -- jobs and their bundles -----------------------------------------------------------------------
    @property
    def bundles(self) -> dict[str, Bundle]:
        """Every job's own bundle (its largest LoRA rank)."""
        return self.bundle_sets.bundles

    @property
    def rank_bundles(self) -> dict[str, dict[int, Bundle]]:
        return self.bundle_sets.rank_bundles

    @property
    def engine_bundles(self) -> dict[str, dict[str, Bundle]]:
        return self.bundle_sets.engine_bundles

    @property
    def head_init(self) -> dict[str, str]:
        return self.bundle_sets.head_init

    @property
    def last_close_seconds(self) -> float:
        """How long the last round's aggregation took."""
        return self.rounds.last_close_seconds

    def served_bundles(self, job_id: str) -> dict[str, Bundle]:
        return self.bundle_sets.served_bundles(job_id)

    def job_status(self, job_id: str) -> dict:
        return job_status(self.state, job_id)

    def history(self, job_id: str) -> dict:
        """Everything recorded about a job, per round (``edgeft.server.history.job_history``)."""
        self.downloads.flush()
        return job_history(self.state, job_id, self.jobs.get(job_id), self.head_init.get(job_id))

    def global_adapter(self, job_id: str, version: int | None = None) -> dict[str, np.ndarray]:
        """The global adapter after round ``version`` (default: the latest)."""
        return self.rounds.global_adapter(job_id, version)

    def round_updates(self, job_id: str, number: int) -> list[AdapterUpdate]:
        """The updates accepted for a round, as stored."""
        return list(self.rounds.iter_updates(job_id, number))

    def strategy_state(self, job_id: str, round_number: int) -> dict[str, np.ndarray] | None:
        return self.rounds.strategy_state(job_id, round_number)

    def _job(self, job_id: str) -> JobConfig:
        if job_id not in self.jobs:
            raise NotFound(f"unknown job {job_id!r}")
        return self.jobs[job_id]

    # -- devices ------------------------------------------------------------------------------------
    def register(self, device_id: str, capabilities: dict, job_id: str, token_id: str = "") -> str:
        """Record a device (a new id when it has none) and enrol it in ``job_id`` with token ``token_id``."""
        self._job(job_id)
        device_id = device_id or uuid.uuid4().hex
        self.bundle_sets.device_bundle(job_id, capabilities)  # a device the job has no bundle for is refused now
        self.state.enrol(device_id, capabilities, job_id, token_id)
        self._seen.pop((device_id, job_id), None)
        return device_id

    def heartbeat(self, device_id: str, metrics: dict[str, float], job_id: str) -> None:
        """A device of ``job_id`` is alive; keep its latest metrics (the liveness write)."""
        self.state.seen(device_id, job_id, metrics=metrics)

    def device(self, device_id: str) -> dict:
        return self.state.device(device_id)

    def poll(self, device_id: str, job_id: str) -> TaskAssignment | str | RetryLater | None:
        """A task of job ``job_id`` for the device, the string reason when the job is over, None (nothing yet: a
        long-poll asks again), or RetryLater (an asynchronous job's cap is reached: the device asks again then).

        The poll's liveness write (``State.seen``: registered, enrolled, seen now) goes with its reads of the round
        in one transaction, at most once per device and job every LIVENESS_S: a long-poll asks every 0.2 s, and
        1,000 devices would otherwise queue 5,000 database writes a second."""
        job = self._job(job_id)
        key, at = (device_id, job_id), time.monotonic()
        last = self._seen.get(key)
        fresh = last is not None and at - last[0] < LIVENESS_S
        if job.mode == "async":  # FedBuff: the latest global version, within the concurrency cap (its own transaction)
            outcome, seen = self.async_rounds.task(device_id, job, last[1] if fresh else None)
            if seen is not None:
                self._seen[key] = (at, seen)
            return outcome
        if fresh:
            capabilities, state = last[1], None
        else:
            capabilities, *state = self.state.seen_round_state(job_id, None, device_id)  # with the round's reads
            self._seen[key] = (at, capabilities)
        return self.rounds.task(device_id, job, capabilities, tuple(state) if state else None)

    def record_download(self, job_id: str, number: int, device_id: str, size: int) -> None:
        """Count a task's bytes sent to a device (once per device and round; written at the clock's next turn)."""
        self.downloads.add(job_id, number, device_id, size)

    # -- uploads ------------------------------------------------------------------------------------
    def submit(self, header: UploadHeader, update: AdapterUpdate, size: int = 0) -> bool:
        """Accept a device's update for the open round (an asynchronous job: into its buffer); False for a replay of
        an upload already received."""
        job = self._job(header.job_id)
        if job.mode == "async":
            return self.async_rounds.submit(job, header, update, size)
        return self.rounds.submit(job, header, update, size)

    def count_rejection(self, job_id: str, error, message: str = "") -> None:  # noqa: ANN001
        self.rounds.count_rejection(job_id, error, message)

    def rejections(self, job_id: str) -> dict[str, int]:
        """Refused uploads of a job per reason (``duplicate``: replays counted once, not refused)."""
        return self.state.rejections(job_id)

    # -- secure aggregation rounds (edgeft.server.secure) -----------------------------------------------
    def secure_ring_dtype(self, job_id: str, number: int) -> np.dtype | None:
        return self.secure_rounds.ring_dtype(job_id, number)

    def secure_step(self, header: SecAggHeader, step: object) -> object:
        """A device's message for the current phase of a secure round (``SecureRounds.step``)."""
        job = self._job(header.job_id)
        if job.secure_aggregation is None:
            raise Rejected(f"job {job.id!r} does not aggregate securely; upload the update with UploadUpdate")
        return self.secure_rounds.step(self.rounds, job, header, step)

    def secure_answer(self, header: SecAggHeader, phase: str) -> object:
        return self.secure_rounds.answer(self.rounds, header, phase)

    # -- for scripts and tests ------------------------------------------------------------------------
    def wait_until_finished(self, timeout: float) -> None:
        """Block until every job has finished or failed and its evaluations are stored."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.tick()
            if not self.state.any_running_job() and self.evaluator.idle() and not any(
                    self.state.unevaluated(job.id) for job in self.jobs.values() if job.eval_data is not None):
                return
            time.sleep(0.2)
        raise TimeoutError("jobs still running")

    def close(self) -> None:
        """Stop the clock and the evaluations; release the database."""
        self.stop_clock()
        try:
            self.downloads.flush()
        except Unavailable as exc:
            log.warning("task byte counts not written at close: %s", exc)
        self.evaluator.shutdown()
        self.engine.dispose()
