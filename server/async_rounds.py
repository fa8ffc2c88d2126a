"""Asynchronous jobs (FedBuff, ``mode = "async"``): no rounds; devices ask for work whenever they are idle and get
the latest global version; every ``buffer_size`` accepted updates make the next version.

The rules, over ``AsyncState`` (storage) and the synchronous ``Rounds`` (whose validation, global adapter reads,
strategies, leases and refusal counting are reused, not repeated):
- a task: the latest global version, unless ``max_concurrency`` other devices hold work (then ask later);
- an upload: a replay counts once; one trained from a version more than ``max_staleness`` behind the latest is
  refused (reason ``stale``, counted); otherwise it is validated as a synchronous update (names, shapes, finite
  values, example count, norm bound against the version it trained from) and stored in the buffer;
- a version: the oldest ``buffer_size`` buffered updates, each delta taken from the version it trained from (and
  clipped with the strategy's clip_norm), become ``aggregate_buffer``'s staleness-weighted step, which the job's
  strategy applies as a summed delta (``start_secure``'s ``DeltaMean``: the server optimiser, differential privacy's
  noise and ledger as in synchronous rounds);
- the end: after ``versions`` versions, or ``time_budget_s`` after the job started (the clock's ``tick``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

import numpy as np

from edgeft.aggregate import RoundContext
from edgeft.aggregate.fedbuff import TABLE, BufferedUpdate, aggregate_buffer, check_staleness
from edgeft.aggregate.privacy import clip_to_norm
from edgeft.aggregate.vectors import delta
from edgeft.errors import ConfigError, DataError, EdgeftError, NotFound, Rejected, Unavailable
from edgeft.server.admission import BUSY_SHARE, Admission, CallLoad
from edgeft.server.artifacts import DecodedCache
from edgeft.server.async_state import AsyncState
from edgeft.server.config import JobConfig
from edgeft.server.pace import Pace, Tally
from edgeft.server.rounds import Rounds, TaskAssignment
from edgeft.server.store import now
from edgeft.server.turn import urgent
from edgeft.update import AdapterUpdate
from edgeft.wire import AsyncWork, RetryLater, UploadHeader

log = logging.getLogger("edgeft.server")
CAP_RECHECK_S = 1.0  # once the concurrency cap is reached, how long "ask later" is answered without counting again
CAP_MARGIN = 256  # below the cap by more than this (estimated), a poll gives work without counting the holders
KEPT_BYTES = 256 << 20  # the deltas of updates taken in here, kept until a version reads them (310 of MiniLM's)


class AsyncRounds:
    """Tasks, uploads and versions of asynchronous jobs."""

    def __init__(self, rounds: Rounds, state: AsyncState, load: CallLoad | None = None):
        self.rounds, self.state = rounds, state
        self.load = load or CallLoad()  # uploads waiting in this process (the servicer's InProgress counts them)
        self._admissions: dict[str, Admission] = {}  # job id -> its admission by load (server.admission)
        # job id -> until when (time.monotonic) this process answers "ask later" without counting the devices that
        # hold work: the cap was reached then. An update that frees a slot here forgets it at once.
        self._full_until: dict[str, float] = {}
        self._holding: dict[str, tuple[float, int]] = {}  # job id -> (when counted, devices holding work: estimate)
        self._estimate_lock = threading.Lock()
        self._making = threading.Lock()  # one version at a time made here (a lease makes it once across replicas)
        self._paces: dict[str, Pace] = {}  # job id -> when devices refused work are told to ask again
        self._ended: dict[str, Tally] = {}  # job id -> the work that ended here (read by its pace and admission)
        # job id -> the latest global version this process read or made: uploads too stale for it are refused before
        # they are checked (the transaction that stores an update checks against the stored one)
        self._latest: dict[str, int] = {}
        self._latest_lock = threading.Lock()
        self._started: dict[str, float] = {}  # job id -> when it started (its initial global adapter was stored)
        # (job id, blob, base version) -> the delta an update taken in here adds to a version (float64, computed as
        # it is taken in), until a version reads it: reading back 200 blobs and computing their deltas when a version
        # is made made versions fall behind the uploads (a backlog of thousands, read back from the store once no
        # longer kept)
        self._deltas = DecodedCache(KEPT_BYTES)

    # -- a device asks for work ----------------------------------------------------------------------
    def task(self, device_id: str, job: JobConfig, capabilities: dict | None) -> tuple:
        """(outcome, capabilities): the latest global version to train, the string reason when the job is over, or
        RetryLater (the concurrency cap is reached: ask again after the job's pace, ``server.pace``);
        ``capabilities`` None: the poll's transaction makes the liveness write and reads them (returned, else
        None)."""
        if time.monotonic() < self._full_until.get(job.id, 0.0):
            return self._refused(job), None  # the cap was reached a moment ago: no database work for this poll
        if not self._admission(job.id).admit():  # uploads queue: work is given at the rate they are taken in
            return self._refused(job), None
        deadline, cap = now() + job.round_deadline_s, job.asynchronous.max_concurrency
        seen, row, upload_id, holding = self.state.take_work(job.id, device_id, deadline,
                                                             self._cap_to_check(job.id, cap), seen=capabilities is None)
        self._counted(job.id, holding, upload_id is not None)
        capabilities = capabilities if seen is None else seen
        if row is None:
            raise NotFound(f"unknown job {job.id!r}")
        if row.status != "running":
            return f"job {row.id} {row.status}{': ' + row.message if row.message else ''}", seen
        if upload_id is None:
            self._full_until[job.id] = time.monotonic() + CAP_RECHECK_S
            return self._refused(job), seen
        version = row.current_round - 1
        self._known(job.id, version)
        rank, bundle = self.rounds.jobs.device_bundle(job.id, capabilities)
        adapter = self.rounds.jobs.for_rank(job.id, rank, self.rounds.global_adapter(job.id, version))
        return TaskAssignment(job, version + 1, bundle.digest, adapter, deadline,
                              asynchronous=AsyncWork(version, upload_id)), seen

    def _pace(self, job: JobConfig) -> Pace:
        pace = self._paces.get(job.id)
        if pace is None:  # before any upload came, work frees at least this fast: every slot by the task deadline
            pace = self._paces.setdefault(job.id, Pace(job.asynchronous.max_concurrency / job.round_deadline_s,
                                                       self._ended_of(job.id)))
        return pace

    def _admission(self, job_id: str) -> Admission:
        admission = self._admissions.get(job_id)
        if admission is None:
            busy_at = BUSY_SHARE * self.rounds.config.limits.upload_workers
            admission = self._admissions.setdefault(job_id, Admission(job_id, self.load, busy_at,
                                                                      self._ended_of(job_id)))
        return admission

    def _ended_of(self, job_id: str) -> Tally:
        return self._ended.get(job_id) or self._ended.setdefault(job_id, Tally())

    def _refused(self, job: JobConfig) -> RetryLater:
        return RetryLater(self._pace(job).refused())

    def _cap_to_check(self, job_id: str, cap: int) -> int | None:
        """``cap`` when the poll must count the devices holding work: near the cap, or at least every
        CAP_RECHECK_S (work other replicas gave out, work returned); None while this process's estimate (the last
        count plus the work given here since) is more than CAP_MARGIN below it. Counting 10,000 holders took a
        millisecond of every poll, in the database's one writer's turn."""
        with self._estimate_lock:
            counted = self._holding.get(job_id)
        if counted is None or time.monotonic() - counted[0] >= CAP_RECHECK_S or counted[1] + CAP_MARGIN >= cap:
            return cap
        return None

    def _counted(self, job_id: str, holding: int | None, issued: bool) -> None:
        with self._estimate_lock:
            if holding is not None:
                self._holding[job_id] = (time.monotonic(), holding + issued)
            elif issued and job_id in self._holding:
                at, count = self._holding[job_id]
                self._holding[job_id] = (at, count + 1)

    # -- uploads -------------------------------------------------------------------------------------
    def submit(self, job: JobConfig, header: UploadHeader, update: AdapterUpdate, size: int) -> bool:
        """Accept an update into the job's buffer (and make a version when the buffer is full); False for a replay
        of an upload already received. Every refusal is counted under its reason (``stale``: too old)."""
        try:
            return self._submit(job, header, update, size)
        except Unavailable:
            raise
        except EdgeftError as exc:
            self.rounds.count_rejection(job.id, exc)
            raise

    def _submit(self, job: JobConfig, header: UploadHeader, update: AdapterUpdate, size: int) -> bool:
        if self.rounds.jobs.one_bundle(job.id) is None:  # the device's capabilities say which bundle it trained
            # a replay?, then registered and enrolled (the liveness write), and the job: one transaction
            received, capabilities, row = self.state.upload_state(job.id, header.upload_id, header.device_id)
            if received:
                self._count_replay(job, header)
                return False
            if row.status != "running":
                raise Rejected(f"job {job.id!r} is {row.status}; the update came late", reason="late")
            latest = row.current_round - 1
        else:  # one bundle: add_update's transaction makes those checks (a transaction per upload fewer; the
            # coordinator's transactions take turns on SQLite, and 3 per update bounded its updates a second)
            capabilities, latest = None, self._latest.get(job.id)
        if latest is not None:  # the latest version this process knows: add_update checks against the stored one
            try:
                check_staleness(latest, header.base_version, job.asynchronous.fedbuff)
            except Rejected:
                self._release(job.id, header.device_id)
                raise
        try:
            self.rounds.check_trained(job, header.base_version, update, capabilities)
        except DataError as exc:
            self._release(job.id, header.device_id)
            raise DataError(f"update from {header.device_id} refused: {exc}", reason=exc.reason) from exc
        blob = self.rounds.artifacts.put_tensors(update.tensors)
        kept = (job.id, blob, header.base_version)
        self._deltas.put(kept, delta(update.tensors, self.rounds.global_adapter(job.id, header.base_version)))
        # The store checks staleness again, in the transaction that stores the update, against the version it goes
        # into (versions made and uploads stored meanwhile count): within one process an accepted update is never
        # left out for staleness. (With several replicas, or PostgreSQL's concurrent transactions, one can be:
        # aggregate_buffer leaves out and lists an update too stale by the time its buffer fills.)
        options = job.asynchronous.fedbuff
        buffered = self.state.add_update(job.id, header.upload_id, header.device_id, header.base_version,
                                         update.n_examples, update.metrics, blob, size, options.buffer_size,
                                         options.max_staleness, seen=capabilities is None)
        if not buffered:  # nothing stored: a replay, too stale by now (None), or the job ended
            if self.state.received(job.id, header.upload_id):
                self._count_replay(job, header)
                return False
            self._deltas.take(kept)  # no version reads it: it would push out updates that wait for one
            if buffered is None:
                self._release(job.id, header.device_id)
                raise Rejected(f"update trained from version {header.base_version} would be more than "
                               f"{options.max_staleness} versions behind the version it goes into (versions were "
                               f"made while it was checked); {TABLE}.max_staleness is {options.max_staleness}",
                               reason="stale")
            raise Rejected(f"job {job.id!r} ended while the update was checked", reason="late")
        self._full_until.pop(job.id, None)  # the device's slot is free
        self._ended_of(job.id).add()
        try:
            self.close_if_full(job, buffered)
        except Unavailable as exc:  # the update is stored; the clock makes the version when the store answers
            log.warning("job %s: the next version waits: %s", job.id, exc)
        return True

    def _count_replay(self, job: JobConfig, header: UploadHeader) -> None:
        self.rounds.count_rejection(job.id, "duplicate", f"upload {header.upload_id!r} of {header.device_id} again; "
                                    "counted once")

    def _known(self, job_id: str, version: int) -> None:
        """The latest global version of the job is at least ``version`` (read, or made here)."""
        with self._latest_lock:
            self._latest[job_id] = max(self._latest.get(job_id, version), version)

    def _release(self, job_id: str, device_id: str) -> None:
        """The device's upload was refused: its slot is free (here at once, for other replicas at their recheck)."""
        self.state.release_work(job_id, device_id)
        self._full_until.pop(job_id, None)
        self._ended_of(job_id).add()

    # -- versions ------------------------------------------------------------------------------------
    def close_if_full(self, job: JobConfig, buffered: int | None = None) -> None:
        """Make global versions while the buffer holds ``buffer_size`` updates and the job runs (one replica makes
        each version: its lease). ``buffered``: the buffer's size an upload just learnt (below ``buffer_size``:
        nothing to read)."""
        size = job.asynchronous.fedbuff.buffer_size
        if buffered is not None and buffered < size:
            return
        if not self._making.acquire(blocking=buffered is None):  # a version is being made here: it goes on while
            return  # the buffer holds enough (an upload does not wait for it; the clock's turn catches any left)
        try:
            with urgent():  # its transactions go before the uploads' and polls' waiting (server.turn)
                while True:
                    row = self.rounds.state.job(job.id)
                    if row is None or row.status != "running":
                        return
                    if self._budget_spent(job, row.current_round - 1):  # checked before each version: a buffer that
                        return  # keeps filling (taken in faster than versions are made) must not hold the job past it
                    buffer = self.state.buffer(job.id, size)
                    if len(buffer) < size:
                        return
                    version = row.current_round
                    with self.rounds.leases.hold(f"version/{job.id}/{version}") as lease:
                        if lease is None:
                            return
                        if not self._make(job, version, buffer, lease.guard):
                            return
        finally:
            self._making.release()

    def _make(self, job: JobConfig, version: int, buffer: list, guard) -> bool:  # noqa: ANN001
        """Aggregate ``buffer`` into global ``version`` and store it; False when another process made it first."""
        started = time.perf_counter()
        rounds, options = self.rounds, job.asynchronous.fedbuff
        strategy_options = getattr(rounds.strategies[job.id], "options", None)
        clip = getattr(strategy_options, "clip_norm", None)
        private = bool(getattr(strategy_options, "private", False))
        updates = []
        for row, change in zip(buffer, self._buffered_deltas(job.id, buffer)):
            if clip is not None:
                change, _ = clip_to_norm(change, clip)
            updates.append(BufferedUpdate(row.base_version, 1 if private else row.n_examples, change))
        try:  # an update another replica stored beside a version may be too stale by now: left out and listed
            step = aggregate_buffer(version - 1, updates, options)
        except ConfigError:  # every one of them is: they make no version
            self._drop(job, version, buffer)
            return True
        count = len(updates) - len(step.refused)
        context = RoundContext(round=version, selected=count, state=rounds.strategy_state(job.id, version - 1))
        aggregation = rounds.strategies[job.id].start_secure(rounds.global_adapter(job.id, version - 1), context)
        aggregation.add_sum({k: v * count for k, v in step.step.items()}, float(count), count)
        result = aggregation.result()
        report = {**aggregation.report(), "asynchronous": self._facts(job, version, step)}
        state = aggregation.state()
        blob = rounds.artifacts.put_tensors(result)
        state_blob = rounds.artifacts.put_tensors(state) if state else None
        rounds.last_close_seconds = time.perf_counter() - started
        finished = version >= job.asynchronous.rounds
        if not self.state.close_version(job.id, version, [r.seq for r in buffer], blob, state_blob, report,
                                        finished, guard=guard):
            return False
        log.info("job %s: global version %d made from %d updates (mean staleness %.2f)%s", job.id, version, count,
                 report["asynchronous"]["mean_staleness"], "; the job is finished" if finished else "")
        self._known(job.id, version)
        rounds.on_closed(job, version)
        return True

    def _buffered_deltas(self, job_id: str, buffer: list) -> Iterator[dict]:
        """The delta of each buffered update from the global version it trained from, in order: kept since it was
        taken in here, else computed from the store (taken in before a restart, by another replica, or no longer
        kept)."""
        keys = [(job_id, row.blob, row.base_version) for row in buffer]
        kept = {}
        for key in keys:
            change = None if key in kept else self._deltas.take(key)
            if change is not None:
                kept[key] = change
        read = self.rounds.artifacts.iter_tensors(row.blob for row, key in zip(buffer, keys) if key not in kept)
        for row, key in zip(buffer, keys):
            yield kept[key] if key in kept else delta(next(read), self.rounds.global_adapter(job_id, row.base_version))

    def _drop(self, job: JobConfig, version: int, buffer: list) -> None:
        """Take a buffer of updates all too stale for ``version`` out of the buffer, each counted as stale."""
        if self.state.drop(job.id, [r.seq for r in buffer]):
            for row in buffer:
                self.rounds.count_rejection(job.id, "stale", f"update {row.upload_id} from version {row.base_version} "
                                            f"was too stale for version {version} when its buffer filled")
            log.warning("job %s: %d buffered updates were too stale for version %d; left out", job.id, len(buffer),
                        version)

    def _facts(self, job: JobConfig, version: int, step) -> dict:  # noqa: ANN001
        """A version's record: updates accepted into it, their staleness and weights, and the uploads refused as
        stale since the previous version (``refused_stale``; ``refused_stale_total`` counts the whole job)."""
        total = self.rounds.state.rejections(job.id).get("stale", 0)
        previous = self.state.report(job.id, version - 1)  # one row: the job's whole record grows with its tasks
        before = (previous.get("asynchronous") or {}).get("refused_stale_total", 0)
        refused = {index for index, _ in step.refused}
        accepted = [s for i, s in enumerate(step.staleness) if i not in refused]
        return {**step.report(), "accepted": len(accepted),
                "mean_staleness": float(np.mean(accepted)) if accepted else 0.0,
                "refused_stale": total - before, "refused_stale_total": total}

    # -- the clock -----------------------------------------------------------------------------------
    def tick(self, jobs: list[JobConfig]) -> None:
        """End jobs whose time budget is spent, and make versions a full buffer waits for (after a restart, or a
        store that did not answer)."""
        for job in jobs:
            self.close_if_full(job)  # which checks the budget first

    def _budget_spent(self, job: JobConfig, made: int) -> bool:
        """Whether the running job's time budget is spent (it is finished then, here if still running); ``made``:
        its global versions made."""
        budget = job.asynchronous.time_budget_s
        if budget is None:
            return False
        started = self._started.get(job.id)
        if started is None:
            started = self.state.started_at(job.id)
            if started is None:
                return False
            self._started[job.id] = started
        if now() - started < budget:
            return False
        if self.state.finish(job.id, f"time budget of {budget:g} s spent after {made} global versions"):
            log.info("job %s: time budget of %g s spent after %d global versions; finished", job.id, budget, made)
        return True
