"""Federated rounds: who trains, what they get, which updates count, when a round closes.

A round is one of three kinds (``RoundKind``): a plain round (devices upload updates, the job's strategy
aggregates them), the statistics round (round 0 with a head init: class statistics, summed into a head) and a
secure aggregation round (``edgeft.server.secure``: devices take part in a protocol; only the sum is unmasked).
``Rounds`` holds the rules common to all: opening a round, the task a device gets, accepting an upload, closing on
the last update (``submit``) or at the deadline (``tick``, which the coordinator's clock calls: never a poll).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from edgeft.aggregate import RoundContext, Strategy, Summable
from edgeft.aggregate.statistics import check_statistics, head_from_statistics, sum_statistics
from edgeft.errors import DataError, EdgeftError, NotFound, Rejected, Unavailable
from edgeft.secagg.updates import SecAggSettings
from edgeft.server.artifacts import Artifacts, DecodedCache
from edgeft.server.config import JobConfig, ServerConfig
from edgeft.server.jobs import JobBundles
from edgeft.server.lease import Leases
from edgeft.server.running_sums import RunningSums, stream_rows
from edgeft.server.state import State
from edgeft.server.store import now
from edgeft.server.sum_state import SumState
from edgeft.update import AdapterUpdate, check_update, update_norm
from edgeft.wire import AsyncWork, UploadHeader

log = logging.getLogger("edgeft.server")


@dataclass(frozen=True)
class TaskAssignment:
    """What a device trains now."""

    job: JobConfig
    round: int
    bundle_digest: str
    global_adapter: dict[str, np.ndarray]
    deadline: float
    secure: SecAggSettings | None = None  # set for a secure aggregation round: take part instead of uploading
    statistics: bool = False  # the statistics round: class statistics, no training
    asynchronous: AsyncWork | None = None  # an asynchronous job's task: the version it carries, the upload's id


class RoundKind:
    """One kind of round: what a selected device is asked, which uploads it takes, how it closes."""

    statistics = False  # the task asks for class statistics, not training

    def settings(self, job: JobConfig, selected: int) -> SecAggSettings | None:
        """The secure aggregation settings of the task (None: a plain upload)."""
        return None

    def took_part(self, job: JobConfig, number: int, device_id: str) -> bool:
        """The device already took part in (or missed) the round in a way an upload does not show."""
        return False

    def check(self, rounds: "Rounds", job: JobConfig, header: UploadHeader, update: AdapterUpdate,
              capabilities: dict) -> None:
        """Refuse an upload (from a device with ``capabilities``) that does not fit the round (DataError /
        Rejected)."""
        raise NotImplementedError

    def close(self, rounds: "Rounds", job: JobConfig, row, count: int, deadline_passed: bool) -> None:  # noqa: ANN001
        """Close open round ``row`` when it is complete (``count`` updates stored) or its deadline passed."""
        raise NotImplementedError

    def tick(self, rounds: "Rounds") -> None:
        """The clock's turn beyond round deadlines (a secure round's phase timeouts)."""


class CollectedRound(RoundKind):
    """A round of uploads: closes when every selected device delivered, or at the deadline with at least the
    job's minimum; ``aggregate`` makes the new global adapter from the stored uploads."""

    def close(self, rounds: "Rounds", job: JobConfig, row, count: int, deadline_passed: bool) -> None:  # noqa: ANN001
        """Closed by the replica that holds the round's lease (``edgeft.server.lease``): the others leave it be."""
        if count < len(row.selected) and not deadline_passed:
            return
        with rounds.leases.hold(f"close/{job.id}/{row.number}") as lease:
            if lease is None:  # another replica closes it; should it die, its lease expires and a clock turn here
                return  # takes the round over
            row, count = rounds.state.round_and_count(job.id, row.number)  # as it is now that the lease is ours
            if row.status == "open":
                self._close(rounds, job, row, count, lease.guard)

    def _close(self, rounds: "Rounds", job: JobConfig, row, count: int, guard) -> None:  # noqa: ANN001
        if count < job.clients.min:
            rounds.fail(job, row.number, f"round {row.number} got {count} updates by its deadline, fewer than the "
                        f"minimum {job.clients.min}")
            return
        started = time.perf_counter()
        try:
            result, state, report = self.aggregate(rounds, job, row)
            blob = rounds.artifacts.put_tensors(result)
        except Unavailable:  # the database or the artifact store did not answer: the clock tries again
            raise
        except EdgeftError as exc:  # e.g. too few updates for Krum: the round fails, the job stops, nothing leaks
            rounds.fail(job, row.number, f"round {row.number} {self.failure(job)}: {exc}")
            return
        rounds.store(job, row.number, blob, state, report, started, updates_aggregated=count, guard=guard)

    def aggregate(self, rounds: "Rounds", job: JobConfig, row) -> tuple[dict, dict | None, dict]:  # noqa: ANN001
        raise NotImplementedError

    def failure(self, job: JobConfig) -> str:
        raise NotImplementedError


class PlainRound(CollectedRound):
    """Devices train and upload adapters; the job's strategy aggregates them."""

    def check(self, rounds: "Rounds", job: JobConfig, header: UploadHeader, update: AdapterUpdate,
              capabilities: dict) -> None:
        rounds.check_trained(job, header.round - 1, update, capabilities)

    def aggregate(self, rounds: "Rounds", job: JobConfig, row) -> tuple[dict, dict | None, dict]:  # noqa: ANN001
        context = RoundContext(round=row.number, selected=len(row.selected),
                               state=rounds.strategy_state(job.id, row.number - 1))
        aggregation = rounds.strategies[job.id].start(rounds.global_adapter(job.id, row.number - 1), context)
        if isinstance(aggregation, Summable):  # running sums (edgeft.server.running_sums): this replica's first
            rounds.sums.flush(job.id, row.number)
            rounds.sums.feed(aggregation, job.id, row.number, lambda rows: stream_rows(rounds.artifacts, rows))
            return aggregation.result(), aggregation.state(), aggregation.report()  # report: after result
        devices_in_order = []
        for device_id, stored in rounds.iter_updates(job.id, row.number, with_device=True):
            aggregation.add(stored)
            devices_in_order.append(device_id)
        result, state, report = aggregation.result(), aggregation.state(), aggregation.report()  # report: after result
        if "krum_selected" in report:  # indices in the order the updates were added: name the devices
            report["krum_selected"] = [devices_in_order[i] for i in report["krum_selected"]]
        return result, state, report

    def failure(self, job: JobConfig) -> str:
        return f"could not be aggregated with {job.strategy}"


class StatisticsRound(CollectedRound):
    """Round 0 with a head init: devices upload class statistics; their sum makes the head (version 0)."""

    statistics = True

    def check(self, rounds: "Rounds", job: JobConfig, header: UploadHeader, update: AdapterUpdate,
              capabilities: dict) -> None:
        manifest = rounds.jobs.bundles[job.id].manifest
        if update.n_examples > job.max_update_examples:
            raise DataError(f"n_examples={update.n_examples} is over max_update_examples="
                            f"{job.max_update_examples}", reason="n_examples")
        check_statistics(update.tensors, len(manifest.labels), int(manifest.pooling["dimension"]), update.n_examples)

    def aggregate(self, rounds: "Rounds", job: JobConfig, row) -> tuple[dict, dict | None, dict]:  # noqa: ANN001
        """The exported adapter (version -1) with the head the job's method builds from the sum of the stored
        class statistics (``edgeft.aggregate.statistics``)."""
        initial = dict(rounds.global_adapter(job.id, -1))
        weight, bias = rounds.jobs.bundles[job.id].manifest.head()
        total = sum_statistics([u.tensors for u in rounds.iter_updates(job.id, 0)])
        options = job.head_init
        initial[weight], initial[bias], report = head_from_statistics(
            total, rounds.jobs.head_init[job.id], options.scale, options.ridge, initial[weight], initial[bias])
        return initial, None, report

    def failure(self, job: JobConfig) -> str:
        return "its class statistics could not make a head"


class Rounds:
    """The round rules over the stored state. The database keeps them with any number of writers (a round
    closes once, a device counts once per round: ``State``); ``lock`` only spares this process duplicate work
    (two threads aggregating the same round)."""

    def __init__(self, config: ServerConfig, jobs: dict[str, JobConfig], bundles: JobBundles, state: State,
                 artifacts: Artifacts, strategies: dict[str, Strategy], secure: RoundKind,
                 on_closed: Callable[[JobConfig, int], None], leases: Leases):
        self.config, self.job_configs, self.jobs, self.state, self.leases = config, jobs, bundles, state, leases
        self.artifacts, self.strategies, self.secure, self.on_closed = artifacts, strategies, secure, on_closed
        self.plain, self.statistics = PlainRound(), StatisticsRound()
        self.lock = threading.RLock()
        self._norms: dict[tuple[str, int], float] = {}  # L2 norm of each global adapter version
        self._adapters = DecodedCache()  # (job id, version) -> the global adapter, decoded
        self.last_close_seconds = 0.0  # how long the last round's aggregation took
        self.sums = RunningSums(SumState(state), artifacts, lambda job, number: self.strategies[job.id].start(
            self.global_adapter(job.id, number - 1), RoundContext(round=number)), leases.holder)

    def kind(self, job: JobConfig, number: int) -> RoundKind:
        if job.secure_aggregation is not None:
            return self.secure
        return self.statistics if number == 0 else self.plain

    # -- reads --------------------------------------------------------------------------------------
    def global_adapter(self, job_id: str, version: int | None = None) -> dict[str, np.ndarray]:
        """The global adapter after round ``version`` (default: the latest).

        Versions never change once written, so recent ones are kept decoded: every device's poll in a round asks
        for the same one, and an asynchronous job's uploads for the few they trained from."""
        cached = None if version is None else self._adapters.get((job_id, version))
        if cached is not None:
            return cached
        row = self.state.adapter(job_id, version)
        tensors = self._adapters.get((job_id, row.version))
        if tensors is None:
            tensors = self.artifacts.get_tensors(row.blob)
            self._adapters.put((job_id, row.version), tensors)
        return tensors

    def iter_updates(self, job_id: str, number: int, with_device: bool = False) -> Iterator:
        """The stored updates of a round one at a time (by device id), so aggregation holds one update in
        memory (and the store reads a bounded few ahead: ``Artifacts.iter_tensors``); with ``with_device``,
        (device id, update) pairs."""
        yield from stream_rows(self.artifacts, self.state.update_rows(job_id, number), with_device)

    def strategy_state(self, job_id: str, round_number: int) -> dict[str, np.ndarray] | None:
        """What the job's strategy kept after ``round_number`` (server optimiser moments, privacy ledger)."""
        blob = self.state.strategy_blob(job_id, round_number)
        return self.artifacts.get_tensors(blob) if blob else None

    def norm_bound(self, job: JobConfig, version: int, reference: dict[str, np.ndarray]) -> float:
        """The bound on the L2 norm of an update's change from global adapter ``version`` (``reference``)."""
        if job.max_update_norm is not None:
            return job.max_update_norm
        key = (job.id, version)
        if key not in self._norms:
            self._norms[key] = update_norm(reference)
        return job.max_update_norm_ratio * self._norms[key]

    def check_trained(self, job: JobConfig, version: int, update: AdapterUpdate, capabilities: dict | None) -> None:
        """Refuse (DataError) an update trained from global adapter ``version`` that does not fit the bundle the
        device was given, claims too many examples, or moved further from that adapter than the job's bound.
        ``capabilities`` None: the job serves one bundle (``JobBundles.one_bundle``)."""
        reference = self.global_adapter(job.id, version)
        bound = self.norm_bound(job, version, reference)
        rank = self.jobs.update_rank(job.id, update)
        bundle = self.jobs.one_bundle(job.id) if capabilities is None else self.jobs.given_bundle(job.id, capabilities,
                                                                                                   rank)
        manifest = bundle.manifest
        check_update(update, manifest, max_examples=job.max_update_examples,
                     reference=self.jobs.for_rank(job.id, rank, reference), max_norm=bound)

    # -- a device asks for work -----------------------------------------------------------------------
    def task(self, device_id: str, job: JobConfig, capabilities: dict, state: tuple | None = None
             ) -> TaskAssignment | str | None:
        """A task of ``job`` for the device, the string reason when the job is over, or None (ask later).
        Reads (``state``: ``State.round_state``'s answer for the current round when read already), and opens the
        job's current round when none is open yet (``open_when_ready``)."""
        job_row, row, uploaded = state or self.state.round_state(job.id, None, device_id)
        if job_row is None:
            raise NotFound(f"unknown job {job.id!r}")
        if job_row.status != "running":
            return f"job {job_row.id} {job_row.status}{': ' + job_row.message if job_row.message else ''}"
        if row is None:
            row = self.open_when_ready(job, job_row.current_round)
        if row is None or row.status != "open" or device_id not in row.selected or uploaded:
            return None
        kind = self.kind(job, row.number)
        if kind.took_part(job, row.number, device_id):
            return None
        rank, bundle = self.jobs.device_bundle(job.id, capabilities)
        adapter = self.jobs.for_rank(job.id, rank, self.global_adapter(job.id, row.number - 1))
        return TaskAssignment(job, row.number, bundle.digest, adapter, row.deadline,
                              kind.settings(job, len(row.selected)), statistics=kind.statistics)

    def open_when_ready(self, job: JobConfig, number: int):  # noqa: ANN201
        """Open round ``number`` once enough enrolled devices were seen lately; its row, or None."""
        with self.lock:
            row = self.state.round(job.id, number)
            if row is not None:
                return row
            available = self.state.available_devices(job.id, since=now() - max(60.0, 4 * self.config.poll_wait_s))
            if len(available) < job.clients.min_available:
                return None
            rng = np.random.default_rng(int(hashlib.sha256(f"{job.id}:{number}".encode()).hexdigest()[:8], 16))
            chosen = self.strategies[job.id].configure_round(number, available, job.clients.fraction,
                                                             job.clients.min, job.clients.max, rng)
            return self.state.open_round(job.id, number, chosen, job.round_deadline_s)

    # -- uploads ------------------------------------------------------------------------------------
    def submit(self, job: JobConfig, header: UploadHeader, update: AdapterUpdate, size: int) -> bool:
        """Accept a device's update for the open round; returns False for a replay of the upload already
        received (the same ``upload_id``: counted once). Every refusal is counted under its reason."""
        try:
            if job.secure_aggregation is not None:
                raise Rejected(f"job {job.id!r} aggregates securely: a plain upload would show the coordinator a "
                               "single update, so it is refused; the device takes part in SecureAggregate instead",
                               reason="secure_aggregation")
            return self._submit(job, header, update, size)
        except Unavailable:  # the database did not answer: nothing to count it in, and not the device's fault
            raise
        except EdgeftError as exc:
            self.count_rejection(job.id, exc)
            raise

    def _submit(self, job: JobConfig, header: UploadHeader, update: AdapterUpdate, size: int) -> bool:
        capabilities, *state = self.state.seen_round_state(job.id, header.round, header.device_id)  # one transaction
        round_row = self._open_for(job, header, tuple(state))
        if round_row is None:
            return False
        kind = self.kind(job, header.round)
        try:
            kind.check(self, job, header, update, capabilities)
        except DataError as exc:
            raise DataError(f"update from {header.device_id} refused: {exc}", reason=exc.reason) from exc
        blob = self.artifacts.put_tensors(update.tensors)
        with self.lock:
            stored = self.state.add_update(job.id, header.round, header.device_id, header.upload_id,
                                           update.n_examples, update.metrics, blob, size)
            if not stored:
                # the round closed while the update was checked, or this device's update came in meanwhile (a
                # replay on another connection or coordinator): Rejected saying which, or False for a replay
                self._open_for(job, header)
                return False
            if kind is self.plain:  # committed: this replica's running sum of the round takes it
                self.sums.fold(job, header.round, header.device_id, update)
            try:  # the round was open when the update was stored, with ``stored`` updates (close_if_done's reads)
                kind.close(self, job, round_row, stored, deadline_passed=False)
            except Unavailable as exc:  # the update is stored; the clock closes the round when the store answers
                log.warning("job %s: round %d waits to close: %s", job.id, header.round, exc)
        return True

    def _open_for(self, job: JobConfig, header: UploadHeader, state: tuple | None = None):  # noqa: ANN201
        """The upload's round row when it is open and waits for the device's update (Rejected saying why not);
        None for a replay of the upload already received. ``state``: ``State.round_state``'s answer when read
        already."""
        job_row, round_row, received = state or self.state.round_state(job.id, header.round, header.device_id)
        if received is not None:
            if received == header.upload_id:
                self.count_rejection(job.id, "duplicate", f"upload {header.upload_id!r} of {header.device_id} "
                                     f"for round {header.round} again; counted once")
                return None
            raise Rejected(f"device {header.device_id} already delivered upload {received!r} for round "
                           f"{header.round} of job {job.id!r}; a device counts once per round, so upload "
                           f"{header.upload_id!r} is refused", reason="second_update")
        if round_row is None or job_row.current_round != header.round:
            raise Rejected(f"round {header.round} of job {job.id!r} is not open (current round: "
                           f"{job_row.current_round}, status {job_row.status})", reason="round")
        if round_row.status != "open":
            raise Rejected(f"round {header.round} of job {job.id!r} is {round_row.status}; the update came late",
                           reason="late")
        if header.device_id not in round_row.selected:
            raise Rejected(f"device {header.device_id} was not selected for round {header.round}",
                           reason="not_selected")
        if now() > round_row.deadline:
            raise Rejected(f"round {header.round} of job {job.id!r} passed its deadline; the update came late",
                           reason="late")
        return round_row

    def count_rejection(self, job_id: str, error: EdgeftError | str, message: str = "") -> None:
        """Count a refused upload of ``job_id`` under its reason (an EdgeftError's ``reason``, else its class;
        or the reason given as a string); reason ``duplicate`` counts replays answered duplicate=true."""
        if isinstance(error, EdgeftError):
            reason, message = error.reason or type(error).__name__, str(error)
        else:
            reason = error
        self.state.count_rejection(job_id, reason, message)

    # -- closing ------------------------------------------------------------------------------------
    def tick(self) -> None:
        """The clock: close every open round that is done (its deadline passed, or every update is in but its
        closing did not happen: a store that did not answer, a replica that died closing it; or fail it below
        the minimum), and move secure rounds' phases on; first flush this replica's running sums."""
        self.sums.flush()
        with self.lock:
            for job_id, number, deadline in self.state.open_round_keys():
                job = self.job_configs.get(job_id)
                if job is not None:
                    self.close_if_done(job, number, deadline_passed=deadline < now())
            self.secure.tick(self)

    def close_if_done(self, job: JobConfig, number: int, deadline_passed: bool = False) -> None:
        """Close round ``number`` when its kind says it is done (every upload in, or the deadline passed)."""
        with self.lock:
            row, count = self.state.round_and_count(job.id, number)
            if row is not None and row.status == "open":
                self.kind(job, number).close(self, job, row, count, deadline_passed)

    def fail(self, job: JobConfig, number: int, message: str) -> None:
        """Record that open round ``number`` failed and why; the job stops (nothing else is written)."""
        if self.state.fail_round(job.id, number, message):
            log.error("job %s: %s", job.id, message)

    def store(self, job: JobConfig, number: int, blob: str, state: dict | None, report: dict, started: float,
              updates_aggregated: int | None = None, guard: Callable | None = None) -> None:
        """Write a closed round: the new global adapter, the strategy's state and report, the job's progress.
        Nothing when the round is closed already, or stores more updates than the ``updates_aggregated`` the
        aggregation read (another process stored one meanwhile: the round closes on a later turn), or ``guard``
        (the closing lease's) says another replica took the closing over."""
        state_blob = self.artifacts.put_tensors(state) if state else None
        self.last_close_seconds = time.perf_counter() - started
        if self.state.close_round(job.id, number, blob, state_blob, report, finished=number >= job.rounds,
                                  updates_aggregated=updates_aggregated, guard=guard):
            log.info("job %s: round %d closed by replica %s", job.id, number, self.leases.holder)
            self.on_closed(job, number)
