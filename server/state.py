"""The coordinator's stored state: named queries over the tables of ``edgeft.server.store``.

The one module of the coordinator that speaks SQL (enrolment tokens keep theirs in ``edgeft.server.auth``, the
replicas' leases in ``edgeft.server.lease``, asynchronous jobs in ``edgeft.server.async_state``). Every
method is one transaction; the round, job and device rules live in ``rounds``, ``jobs`` and ``coordinator``.
Several coordinator processes may write one database: what must happen once (one update per device and round, one
global adapter per round, a round closed or failed once, one row per device, enrolment, job) is decided by the
database's unique keys and by claiming the round's row (an UPDATE ... WHERE status = 'open', which PostgreSQL
locks and SQLite serialises), never by a lock here. An unreachable database raises Unavailable (``store.transaction``).
"""

from __future__ import annotations

import logging
from collections import namedtuple
from typing import Callable, Iterable

from sqlalchemy import bindparam, exists, func, inspect, insert, select, update
from sqlalchemy.engine import Connection

from edgeft.errors import NotFound, PermissionDenied, StateError
from edgeft.server.artifacts import Artifacts
from edgeft.server.schema import upgrade
from edgeft.server.store import (adapters, aggregations, connect, devices, downloads, enrolments, evaluations,
                                 job_bundles, job_engines, jobs, label, now, rejections, rounds, transaction, updates,
                                 upsert_device)
from edgeft.server.writes import dialect_insert_of, insert_ignore, upsert

log = logging.getLogger("edgeft.server")
# the liveness write (State._seen), built once: building a statement costs more than running it (~0.1 ms)
_SEEN = (update(devices).where(devices.c.id == bindparam("device_id"), exists().where(
    enrolments.c.device_id == bindparam("device_id"), enrolments.c.job_id == bindparam("job_id")))
    .values(last_seen=bindparam("now", type_=devices.c.last_seen.type)).returning(devices.c.capabilities))
_SEEN_WITH_METRICS = _SEEN.values(metrics=bindparam("metrics", type_=devices.c.metrics.type))
# a job's and a round's rows read together by one statement (State._round_state), by column name like a Row
JobRow = namedtuple("JobRow", [c.name for c in jobs.c])
RoundRow = namedtuple("RoundRow", [c.name for c in rounds.c])


class _Changed(Exception):
    """A round's updates or closing lease changed before its closing transaction: it is rolled back."""


def open_state(database: str, artifacts: Artifacts) -> "State":
    """The coordinator's database (a SQLAlchemy URL), its schema brought to this edgeft's (``schema.upgrade``).
    A database without the coordinator's tables beside an artifact store that holds blobs is a lost state
    (StateError), never a fresh start."""
    engine = connect(database)
    try:
        with engine.connect() as conn:
            had_state = inspect(conn).has_table("jobs")
        if not had_state and artifacts.has_blobs():
            where = engine.url.database if engine.url.get_backend_name() == "sqlite" else label(engine.url)
            raise StateError(f"{where} is missing or empty, but {artifacts.describe()} holds the artifacts of a "
                             "coordinator state: the database was lost. Restore the state folder (or the database) "
                             "from a backup, or start over with a new state_dir")
        before, after = upgrade(engine)
    except BaseException:
        engine.dispose()
        raise
    log.info("state database %s (schema revision %s%s)", label(engine.url), after,
             "" if before in (None, after) else f", upgraded from {before}")
    return State(engine)


def adapter_row(conn, job_id: str, version: int | None):  # noqa: ANN001, ANN202
    """The stored global adapter row of ``job_id`` after round ``version`` (default: the latest)."""
    query = select(adapters).where(adapters.c.job_id == job_id)
    if version is not None:
        query = query.where(adapters.c.version == version)
    row = conn.execute(query.order_by(adapters.c.version.desc())).first()
    if row is None:
        known = conn.execute(select(func.max(adapters.c.version)).where(adapters.c.job_id == job_id)).scalar()
        if known is None:
            names = conn.execute(select(jobs.c.id)).scalars().all()
            raise NotFound(f"no job {job_id!r} on this coordinator (jobs: {', '.join(names) or 'none'})")
        raise NotFound(f"job {job_id!r} has no round {version}: its global adapters go from round 0 (initial) "
                       f"to round {known}")
    return row


class State:
    """Named reads and writes of a coordinator's database (``engine``: its SQLAlchemy engine)."""

    def __init__(self, engine):  # noqa: ANN001
        self.engine = engine

    def _tx(self):  # noqa: ANN202
        return transaction(self.engine)

    def ping(self) -> None:
        """Raise Unavailable when the database does not answer now (the health check's probe)."""
        with self._tx() as conn:
            conn.execute(select(1))

    # -- jobs ---------------------------------------------------------------------------------------
    def job(self, job_id: str):  # noqa: ANN201
        with self._tx() as conn:
            return conn.execute(select(jobs).where(jobs.c.id == job_id)).first()

    def any_running_job(self) -> bool:
        with self._tx() as conn:
            return conn.execute(select(jobs.c.id).where(jobs.c.status == "running")).first() is not None

    def create_job(self, job_id: str, digest: str, rounds_total: int, first: int, blob: str,
                   rank_digests: dict[int, str], engine_digests: dict[str, str]) -> bool:
        """A new job: its bundle, the initial global adapter (version ``first - 1``), its other bundles. False
        (nothing written) when the job is stored already (another coordinator process created it meanwhile)."""
        with self._tx() as conn:
            if not insert_ignore(conn, jobs, ("id",), id=job_id, bundle_digest=digest, rounds=rounds_total,
                                 current_round=first, status="running", message=""):
                return False
            conn.execute(insert(adapters).values(job_id=job_id, version=first - 1, blob=blob, created_at=now()))
            for rank, other in rank_digests.items():
                conn.execute(insert(job_bundles).values(job_id=job_id, rank=rank, digest=other))
            self._set_engines(conn, job_id, engine_digests)
        return True

    def rank_bundles(self, job_id: str) -> dict[int, str]:
        """The digests of a job's bundles at smaller LoRA ranks, by rank."""
        with self._tx() as conn:
            return {r.rank: r.digest for r in conn.execute(select(job_bundles).where(job_bundles.c.job_id == job_id))}

    def engines(self, job_id: str) -> dict[str, str]:
        """The digests of the bundles a job serves by engine, in its order of preference (empty: one engine)."""
        with self._tx() as conn:
            return {r.engine: r.digest for r in conn.execute(
                select(job_engines).where(job_engines.c.job_id == job_id).order_by(job_engines.c.position))}

    def set_engines(self, job_id: str, engine_digests: dict[str, str]) -> None:
        with self._tx() as conn:
            self._set_engines(conn, job_id, engine_digests)

    @staticmethod
    def _set_engines(conn: Connection, job_id: str, engine_digests: dict[str, str]) -> None:
        """Record the engines a job serves (no rows for one engine: its own bundle's)."""
        served = engine_digests if len(engine_digests) > 1 else {}
        conn.execute(job_engines.delete().where(job_engines.c.job_id == job_id,
                                                job_engines.c.engine.not_in(list(served))))
        for position, (engine, digest) in enumerate(served.items()):
            upsert(conn, job_engines, ("job_id", "engine"),
                   dict(job_id=job_id, engine=engine, position=position, digest=digest),
                   dict(position=position, digest=digest))

    def resume_blobs(self, job_id: str) -> list[str]:
        """The blobs a resumed job goes on from: its open rounds' updates and its latest global adapter."""
        with self._tx() as conn:
            blobs = [r.blob for r in conn.execute(select(updates.c.blob).join(
                rounds, (rounds.c.job_id == updates.c.job_id) & (rounds.c.number == updates.c.round))
                .where(updates.c.job_id == job_id, rounds.c.status == "open"))]
            blobs.append(adapter_row(conn, job_id, None).blob)
        return blobs

    # -- global adapters, evaluations, strategy state ---------------------------------------------------
    def adapter(self, job_id: str, version: int | None):  # noqa: ANN201
        """The global adapter row after round ``version`` (default: the latest); NotFound naming what exists."""
        with self._tx() as conn:
            return adapter_row(conn, job_id, version)

    def adapter_versions(self, job_id: str) -> list[int]:
        with self._tx() as conn:
            return conn.execute(select(adapters.c.version).where(adapters.c.job_id == job_id)).scalars().all()

    def evaluated(self, job_id: str) -> set[int]:
        with self._tx() as conn:
            return set(conn.execute(select(evaluations.c.round).where(evaluations.c.job_id == job_id)).scalars())

    def unevaluated(self, job_id: str) -> list[int]:
        """The versions of a job's global adapters that have no evaluation stored (-1, an exported head a
        statistics round replaced, is never evaluated)."""
        with self._tx() as conn:
            done = select(evaluations.c.round).where(evaluations.c.job_id == job_id)
            return conn.execute(select(adapters.c.version).where(
                adapters.c.job_id == job_id, adapters.c.version != -1, adapters.c.version.not_in(done))
                .order_by(adapters.c.version)).scalars().all()

    def add_evaluation(self, job_id: str, version: int, metrics: dict) -> None:
        """Store the evaluation of global adapter ``version`` (the first one stored counts)."""
        with self._tx() as conn:
            insert_ignore(conn, evaluations, ("job_id", "round"), job_id=job_id, round=version, metrics=metrics,
                          created_at=now())

    def strategy_blob(self, job_id: str, round_number: int) -> str | None:
        with self._tx() as conn:
            return conn.execute(select(aggregations.c.state_blob).where(
                aggregations.c.job_id == job_id, aggregations.c.round == round_number)).scalar()

    # -- devices ------------------------------------------------------------------------------------
    def enrol(self, device_id: str, capabilities: dict, job_id: str, token_id: str) -> None:
        """Record a device and (re-)enrol it in a job with an enrolment token."""
        with self._tx() as conn:
            upsert_device(conn, device_id, capabilities)
            upsert(conn, enrolments, ("device_id", "job_id"),
                   dict(device_id=device_id, job_id=job_id, token_id=token_id, enrolled_at=now()),
                   dict(token_id=token_id, enrolled_at=now()))

    def seen(self, device_id: str, job_id: str, metrics: dict | None = None) -> dict:
        """The liveness write of a poll, heartbeat or upload: the device is registered and enrolled in the job
        (NotFound / PermissionDenied otherwise); seen now (with its ``metrics`` when given). Its capabilities."""
        with self._tx() as conn:
            return self._seen(conn, device_id, job_id, metrics)

    @staticmethod
    def _seen(conn: Connection, device_id: str, job_id: str, metrics: dict | None = None) -> dict:
        keys = {"device_id": device_id, "job_id": job_id, "now": now()}  # one statement for the common case
        row = conn.execute(_SEEN if metrics is None else _SEEN_WITH_METRICS, keys | {"metrics": metrics}).first()
        if row is not None:
            return row.capabilities
        if conn.execute(select(devices.c.id).where(devices.c.id == device_id)).first() is None:
            raise NotFound(f"unknown device {device_id!r}: register first", reason="unknown_device")
        raise PermissionDenied(f"device {device_id!r} is not enrolled in job {job_id!r}: register with a "
                               "token of that job first")

    def device(self, device_id: str) -> dict:
        with self._tx() as conn:
            row = conn.execute(select(devices).where(devices.c.id == device_id)).first()
        if row is None:
            raise NotFound(f"unknown device {device_id!r}")
        return dict(row._mapping)

    def available_devices(self, job_id: str, since: float) -> list[str]:
        """The devices enrolled in a job and seen since ``since``, by id."""
        with self._tx() as conn:
            return [r.id for r in conn.execute(
                select(devices.c.id).join(enrolments, enrolments.c.device_id == devices.c.id)
                .where(enrolments.c.job_id == job_id, devices.c.last_seen >= since).order_by(devices.c.id)).all()]

    # -- rounds and updates -------------------------------------------------------------------------
    def round(self, job_id: str, number: int):  # noqa: ANN201
        with self._tx() as conn:
            return conn.execute(select(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)).first()

    def open_rounds(self, job_id: str) -> list:
        """A job's open rounds."""
        with self._tx() as conn:
            return conn.execute(select(rounds).where(rounds.c.status == "open", rounds.c.job_id == job_id)
                                .order_by(rounds.c.number)).all()

    def open_round_keys(self) -> list[tuple[str, int, float]]:
        """(job id, round number, deadline) of every open round (the clock's turn: without the selected devices)."""
        with self._tx() as conn:
            return [tuple(r) for r in conn.execute(select(rounds.c.job_id, rounds.c.number, rounds.c.deadline)
                                                   .where(rounds.c.status == "open")
                                                   .order_by(rounds.c.job_id, rounds.c.number))]

    def open_round(self, job_id: str, number: int, selected: list[str], deadline_s: float):  # noqa: ANN201
        """Open round ``number`` of a job for ``selected`` devices; returns its row (the row stored first when
        another process opened the round meanwhile)."""
        with self._tx() as conn:
            insert_ignore(conn, rounds, ("job_id", "number"), job_id=job_id, number=number, status="open",
                          selected=selected, opened_at=now(), deadline=now() + deadline_s, message="")
            return conn.execute(select(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)).first()

    def round_state(self, job_id: str, number: int | None, device_id: str) -> tuple:
        """In one transaction: the job's row, the row of its round ``number`` (default: the current one; None when
        not opened) and the id of the upload ``device_id`` delivered for it (None: none)."""
        with self._tx() as conn:
            return self._round_state(conn, job_id, number, device_id)

    def seen_round_state(self, job_id: str, number: int, device_id: str) -> tuple:
        """A poll's or an upload's reads in one transaction: the liveness write (``seen``: NotFound /
        PermissionDenied for a device that is not registered or not enrolled), then ``round_state``. Returns
        (capabilities, job row, round row, upload id)."""
        with self._tx() as conn:
            return (self._seen(conn, device_id, job_id), *self._round_state(conn, job_id, number, device_id))

    @staticmethod
    def _round_state(conn: Connection, job_id: str, number: int | None, device_id: str) -> tuple:
        """(job row, round ``number``'s row or None, the device's upload id for it or None), in one statement;
        ``number`` None: the job's current round. (None, None, None) for an unknown job."""
        at = jobs.c.current_round if number is None else number
        found = conn.execute(
            select(*jobs.c, *(c.label(f"round_{c.name}") for c in rounds.c), updates.c.upload_id)
            .select_from(jobs.outerjoin(rounds, (rounds.c.job_id == jobs.c.id) & (rounds.c.number == at))
                         .outerjoin(updates, (updates.c.job_id == jobs.c.id) & (updates.c.round == at)
                                    & (updates.c.device_id == device_id)))
            .where(jobs.c.id == job_id)).first()
        if found is None:
            return None, None, None
        n = len(JobRow._fields)
        round_row = RoundRow(*found[n:n + len(RoundRow._fields)]) if found[n] is not None else None
        return JobRow(*found[:n]), round_row, found[-1]

    def round_and_count(self, job_id: str, number: int) -> tuple:
        """A round's row (None: not opened) and how many updates it stored, in one transaction."""
        with self._tx() as conn:
            row = conn.execute(select(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)).first()
            count = conn.execute(select(func.count()).select_from(updates).where(
                updates.c.job_id == job_id, updates.c.round == number)).scalar_one()
        return row, count

    def add_update(self, job_id: str, number: int, device_id: str, upload_id: str, n_examples: int, metrics: dict,
                   blob: str, size: int) -> int:
        """Store an accepted update while its round is open; returns how many updates the round stores with it
        (read in the same transaction), or 0 (nothing stored) when the round is no longer open or the device's
        update for it is stored already. The round's row is claimed first, so no update slips in beside a
        closing (``close_round``)."""
        with self._tx() as conn:
            if not (self._claim(conn, job_id, number) and insert_ignore(
                    conn, updates, ("job_id", "round", "device_id"), job_id=job_id, round=number,
                    device_id=device_id, upload_id=upload_id, n_examples=n_examples, metrics=metrics, blob=blob,
                    received_at=now(), bytes=size)):
                return 0
            return conn.execute(select(func.count()).select_from(updates).where(
                updates.c.job_id == job_id, updates.c.round == number)).scalar_one()

    @staticmethod
    def _claim(conn: Connection, job_id: str, number: int, **changes: object) -> bool:
        """Lock open round ``number``'s row for this transaction (with ``changes``: apply them); False when it is
        not open. Writers that claim the same round wait for each other, in any number of processes."""
        return conn.execute(update(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number,
                                                 rounds.c.status == "open")
                            .values(**(changes or {"status": "open"}))).rowcount == 1

    def update_rows(self, job_id: str, number: int) -> list:
        """The stored updates of a round, by device id."""
        with self._tx() as conn:
            return conn.execute(select(updates).where(updates.c.job_id == job_id, updates.c.round == number)
                                .order_by(updates.c.device_id)).all()

    def fail_round(self, job_id: str, number: int, message: str) -> bool:
        """Open round ``number`` failed: the round and the job record why (nothing else is written). False
        (nothing written) when the round is no longer open."""
        with self._tx() as conn:
            if not self._claim(conn, job_id, number, status="failed", closed_at=now(), message=message[:2000]):
                return False
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(status="failed", message=message[:2000]))
        return True

    def close_round(self, job_id: str, number: int, blob: str, state_blob: str | None, report: dict,
                    finished: bool, updates_aggregated: int | None = None,
                    guard: Callable[[Connection], bool] | None = None) -> bool:
        """Close open round ``number``, in one transaction: the new global adapter, the strategy's state and
        report, the job's progress. False (nothing written) when the round is no longer open (it closed or failed
        once already), with ``updates_aggregated`` when it stores another number of updates than that now
        (one came in after the aggregation read them: aggregate again), or when ``guard(conn)`` (the closing
        replica's lease, renewed in this transaction) is False."""
        try:
            with self._tx() as conn:
                if not self._claim(conn, job_id, number, status="closed", closed_at=now()):
                    return False
                if guard is not None and not guard(conn):
                    raise _Changed
                if updates_aggregated is not None and updates_aggregated != conn.execute(
                        select(func.count()).select_from(updates).where(
                            updates.c.job_id == job_id, updates.c.round == number)).scalar_one():
                    raise _Changed
                conn.execute(insert(adapters).values(job_id=job_id, version=number, blob=blob, created_at=now()))
                conn.execute(insert(aggregations).values(job_id=job_id, round=number, state_blob=state_blob,
                                                         report=report, created_at=now()))
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    current_round=number + 1, status="finished" if finished else "running"))
        except _Changed:
            return False
        return True

    def record_downloads(self, counts: dict[tuple[str, int, str], tuple[int, float]]) -> None:
        """Count tasks' bytes sent to devices, (job, round, device) -> (bytes, when), in one transaction; a count
        stored already for the same device and round stays."""
        keys = ("job_id", "round", "device_id")
        rows = [dict(job_id=j, round=r, device_id=d, bytes=size, sent_at=at)
                for (j, r, d), (size, at) in counts.items()]
        with self._tx() as conn:
            dialect_insert = dialect_insert_of(conn)
            if dialect_insert is None:
                for row in rows:
                    insert_ignore(conn, downloads, keys, **row)
            else:
                conn.execute(dialect_insert(downloads).on_conflict_do_nothing(index_elements=list(keys)), rows)

    # -- refused uploads ----------------------------------------------------------------------------
    def count_rejection(self, job_id: str, reason: str, message: str) -> None:
        """Count a refused upload of ``job_id`` under ``reason`` (atomic with any number of writers)."""
        with self._tx() as conn:
            upsert(conn, rejections, ("job_id", "reason"),
                   dict(job_id=job_id, reason=reason, count=1, last_message=message[:500], last_at=now()),
                   dict(count=rejections.c.count + 1, last_message=message[:500], last_at=now()))

    def rejections(self, job_id: str) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(select(rejections.c.reason, rejections.c.count)
                                .where(rejections.c.job_id == job_id)).all()
        return {r.reason: r.count for r in sorted(rows)}

    # -- history ------------------------------------------------------------------------------------
    def job_record(self, job_id: str) -> dict[str, Iterable]:
        """Everything stored about a job's rounds: round rows, evaluations, updates (without blobs), downloads
        and strategy reports."""
        with self._tx() as conn:
            return {
                "rounds": conn.execute(select(rounds).where(rounds.c.job_id == job_id).order_by(rounds.c.number)).all(),
                "evaluations": {r.round: r.metrics for r in conn.execute(
                    select(evaluations).where(evaluations.c.job_id == job_id))},
                "updates": conn.execute(select(updates.c.round, updates.c.device_id, updates.c.n_examples,
                                               updates.c.metrics, updates.c.bytes)
                                        .where(updates.c.job_id == job_id)).all(),
                "downloads": {(r.round, r.device_id): r.bytes for r in conn.execute(
                    select(downloads).where(downloads.c.job_id == job_id))},
                "reports": {r.round: r.report for r in conn.execute(
                    select(aggregations.c.round, aggregations.c.report).where(aggregations.c.job_id == job_id))}}
