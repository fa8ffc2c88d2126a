"""The coordinator's stored state: named queries over the tables of ``edgeft.server.store``.

The one module of the coordinator that speaks SQL (enrolment tokens keep theirs in ``edgeft.server.auth``). Every
method is one transaction; the round, job and device rules live in ``rounds``, ``jobs`` and ``coordinator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from edgeft.errors import NotFound, PermissionDenied, StateError
from edgeft.server.artifacts import ArtifactStore
from edgeft.server.store import (adapters, aggregations, devices, downloads, enrolments, evaluations, job_bundles,
                                 job_engines, jobs, now, open_database, rejections, rounds, updates, upsert_device)


def open_state(state_dir: Path, artifacts: ArtifactStore) -> "State":
    """The coordinator's database; a missing or empty database beside an artifact store that holds blobs is a
    lost state (StateError), never a fresh start."""
    path = state_dir / "state.db"
    had_state = any(p.is_file() and p.stat().st_size > 0 for p in (path, path.with_name("state.db-wal")))
    if not had_state and artifacts.has_blobs():
        raise StateError(f"{path} is missing or empty, but {artifacts.root} holds the artifacts of a coordinator "
                         "state: the database was lost. Restore the state folder from a backup, or start over with "
                         "a new state_dir")
    return State(open_database(path))


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

    # -- jobs ---------------------------------------------------------------------------------------
    def job(self, job_id: str):  # noqa: ANN201
        with self.engine.begin() as conn:
            return conn.execute(select(jobs).where(jobs.c.id == job_id)).first()

    def any_running_job(self) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(select(jobs.c.id).where(jobs.c.status == "running")).first() is not None

    def create_job(self, job_id: str, digest: str, rounds_total: int, first: int, blob: str,
                   rank_digests: dict[int, str], engine_digests: dict[str, str]) -> None:
        """A new job: its bundle, the initial global adapter (version ``first - 1``), its other bundles."""
        with self.engine.begin() as conn:
            conn.execute(insert(jobs).values(id=job_id, bundle_digest=digest, rounds=rounds_total,
                                             current_round=first, status="running", message=""))
            conn.execute(insert(adapters).values(job_id=job_id, version=first - 1, blob=blob, created_at=now()))
            for rank, other in rank_digests.items():
                conn.execute(insert(job_bundles).values(job_id=job_id, rank=rank, digest=other))
            self._set_engines(conn, job_id, engine_digests)

    def rank_bundles(self, job_id: str) -> dict[int, str]:
        """The digests of a job's bundles at smaller LoRA ranks, by rank."""
        with self.engine.begin() as conn:
            return {r.rank: r.digest for r in conn.execute(select(job_bundles).where(job_bundles.c.job_id == job_id))}

    def engines(self, job_id: str) -> dict[str, str]:
        """The digests of the bundles a job serves by engine, in its order of preference (empty: one engine)."""
        with self.engine.begin() as conn:
            return {r.engine: r.digest for r in conn.execute(
                select(job_engines).where(job_engines.c.job_id == job_id).order_by(job_engines.c.position))}

    def set_engines(self, job_id: str, engine_digests: dict[str, str]) -> None:
        with self.engine.begin() as conn:
            self._set_engines(conn, job_id, engine_digests)

    @staticmethod
    def _set_engines(conn, job_id: str, engine_digests: dict[str, str]) -> None:  # noqa: ANN001
        """Record the engines a job serves (no rows for one engine: its own bundle's)."""
        conn.execute(job_engines.delete().where(job_engines.c.job_id == job_id))
        if len(engine_digests) > 1:
            for position, (engine, digest) in enumerate(engine_digests.items()):
                conn.execute(insert(job_engines).values(job_id=job_id, engine=engine, position=position,
                                                        digest=digest))

    def resume_blobs(self, job_id: str) -> list[str]:
        """The blobs a resumed job goes on from: its open rounds' updates and its latest global adapter."""
        with self.engine.begin() as conn:
            blobs = [r.blob for r in conn.execute(select(updates.c.blob).join(
                rounds, (rounds.c.job_id == updates.c.job_id) & (rounds.c.number == updates.c.round))
                .where(updates.c.job_id == job_id, rounds.c.status == "open"))]
            blobs.append(adapter_row(conn, job_id, None).blob)
        return blobs

    # -- global adapters, evaluations, strategy state ---------------------------------------------------
    def adapter(self, job_id: str, version: int | None):  # noqa: ANN201
        """The global adapter row after round ``version`` (default: the latest); NotFound naming what exists."""
        with self.engine.begin() as conn:
            return adapter_row(conn, job_id, version)

    def adapter_versions(self, job_id: str) -> list[int]:
        with self.engine.begin() as conn:
            return conn.execute(select(adapters.c.version).where(adapters.c.job_id == job_id)).scalars().all()

    def evaluated(self, job_id: str) -> set[int]:
        with self.engine.begin() as conn:
            return set(conn.execute(select(evaluations.c.round).where(evaluations.c.job_id == job_id)).scalars())

    def add_evaluation(self, job_id: str, version: int, metrics: dict) -> None:
        """Store the evaluation of global adapter ``version`` (the first one stored counts)."""
        with self.engine.begin() as conn:
            if conn.execute(select(evaluations.c.round).where(evaluations.c.job_id == job_id,
                                                              evaluations.c.round == version)).first() is None:
                conn.execute(insert(evaluations).values(job_id=job_id, round=version, metrics=metrics,
                                                        created_at=now()))

    def strategy_blob(self, job_id: str, round_number: int) -> str | None:
        with self.engine.begin() as conn:
            return conn.execute(select(aggregations.c.state_blob).where(
                aggregations.c.job_id == job_id, aggregations.c.round == round_number)).scalar()

    # -- devices ------------------------------------------------------------------------------------
    def enrol(self, device_id: str, capabilities: dict, job_id: str, token_id: str) -> None:
        """Record a device and (re-)enrol it in a job with an enrolment token."""
        with self.engine.begin() as conn:
            upsert_device(conn, device_id, capabilities)
            conn.execute(enrolments.delete().where(enrolments.c.device_id == device_id,
                                                   enrolments.c.job_id == job_id))
            conn.execute(insert(enrolments).values(device_id=device_id, job_id=job_id, token_id=token_id,
                                                   enrolled_at=now()))

    def seen(self, device_id: str, job_id: str, metrics: dict | None = None) -> dict:
        """The liveness write of a poll, heartbeat or upload: the device is registered and enrolled in the job
        (NotFound / PermissionDenied otherwise); it was seen now (with its latest ``metrics`` when given).
        Returns its capabilities."""
        with self.engine.begin() as conn:
            row = conn.execute(select(devices.c.capabilities).where(devices.c.id == device_id)).first()
            if row is None:
                raise NotFound(f"unknown device {device_id!r}: register first", reason="unknown_device")
            if conn.execute(select(enrolments.c.device_id).where(enrolments.c.device_id == device_id,
                                                                 enrolments.c.job_id == job_id)).first() is None:
                raise PermissionDenied(f"device {device_id!r} is not enrolled in job {job_id!r}: register with a "
                                       "token of that job first")
            values = {"last_seen": now(), **({"metrics": metrics} if metrics is not None else {})}
            conn.execute(update(devices).where(devices.c.id == device_id).values(**values))
        return row.capabilities

    def device(self, device_id: str) -> dict:
        with self.engine.begin() as conn:
            row = conn.execute(select(devices).where(devices.c.id == device_id)).first()
        if row is None:
            raise NotFound(f"unknown device {device_id!r}")
        return dict(row._mapping)

    def available_devices(self, job_id: str, since: float) -> list[str]:
        """The devices enrolled in a job and seen since ``since``, by id."""
        with self.engine.begin() as conn:
            return [r.id for r in conn.execute(
                select(devices.c.id).join(enrolments, enrolments.c.device_id == devices.c.id)
                .where(enrolments.c.job_id == job_id, devices.c.last_seen >= since).order_by(devices.c.id)).all()]

    # -- rounds and updates -------------------------------------------------------------------------
    def round(self, job_id: str, number: int):  # noqa: ANN201
        with self.engine.begin() as conn:
            return conn.execute(select(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)).first()

    def open_rounds(self, job_id: str | None = None, due_by: float | None = None) -> list:
        """Open rounds (of ``job_id``; whose deadline passed before ``due_by``)."""
        query = select(rounds).where(rounds.c.status == "open")
        if job_id is not None:
            query = query.where(rounds.c.job_id == job_id)
        if due_by is not None:
            query = query.where(rounds.c.deadline < due_by)
        with self.engine.begin() as conn:
            return conn.execute(query.order_by(rounds.c.job_id, rounds.c.number)).all()

    def open_round(self, job_id: str, number: int, selected: list[str], deadline_s: float):  # noqa: ANN201
        """Open round ``number`` of a job for ``selected`` devices; returns its row."""
        with self.engine.begin() as conn:
            conn.execute(insert(rounds).values(job_id=job_id, number=number, status="open", selected=selected,
                                               opened_at=now(), deadline=now() + deadline_s, message=""))
            return conn.execute(select(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)).first()

    def round_state(self, job_id: str, number: int | None, device_id: str) -> tuple:
        """In one transaction: the job's row, the row of its round ``number`` (default: the current one; None when
        not opened) and the id of the upload ``device_id`` delivered for it (None: none)."""
        with self.engine.begin() as conn:
            job = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
            if job is None:
                return None, None, None
            number = job.current_round if number is None else number
            row = conn.execute(select(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)).first()
            upload = conn.execute(select(updates.c.upload_id).where(
                updates.c.job_id == job_id, updates.c.round == number, updates.c.device_id == device_id)).scalar()
        return job, row, upload

    def round_and_count(self, job_id: str, number: int) -> tuple:
        """A round's row (None: not opened) and how many updates it stored, in one transaction."""
        with self.engine.begin() as conn:
            row = conn.execute(select(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)).first()
            count = conn.execute(select(func.count()).select_from(updates).where(
                updates.c.job_id == job_id, updates.c.round == number)).scalar_one()
        return row, count

    def add_update(self, job_id: str, number: int, device_id: str, upload_id: str, n_examples: int, metrics: dict,
                   blob: str, size: int) -> bool:
        """Store an accepted update; False when the device's update for the round is already stored."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(updates).values(
                    job_id=job_id, round=number, device_id=device_id, upload_id=upload_id, n_examples=n_examples,
                    metrics=metrics, blob=blob, received_at=now(), bytes=size))
        except IntegrityError:
            return False
        return True

    def update_rows(self, job_id: str, number: int) -> list:
        """The stored updates of a round, by device id."""
        with self.engine.begin() as conn:
            return conn.execute(select(updates).where(updates.c.job_id == job_id, updates.c.round == number)
                                .order_by(updates.c.device_id)).all()

    def fail_round(self, job_id: str, number: int, message: str) -> None:
        """Round ``number`` failed: the round and the job record why (nothing else is written)."""
        with self.engine.begin() as conn:
            conn.execute(update(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)
                         .values(status="failed", closed_at=now(), message=message[:2000]))
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(status="failed", message=message[:2000]))

    def close_round(self, job_id: str, number: int, blob: str, state_blob: str | None, report: dict,
                    finished: bool) -> None:
        """A closed round, in one transaction: the new global adapter, the strategy's state and report, the
        job's progress."""
        with self.engine.begin() as conn:
            conn.execute(insert(adapters).values(job_id=job_id, version=number, blob=blob, created_at=now()))
            conn.execute(insert(aggregations).values(job_id=job_id, round=number, state_blob=state_blob,
                                                     report=report, created_at=now()))
            conn.execute(update(rounds).where(rounds.c.job_id == job_id, rounds.c.number == number)
                         .values(status="closed", closed_at=now()))
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                current_round=number + 1, status="finished" if finished else "running"))

    def record_download(self, job_id: str, number: int, device_id: str, size: int) -> None:
        """Count a task's bytes sent to a device (once per device and round)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(downloads).values(job_id=job_id, round=number, device_id=device_id, bytes=size,
                                                      sent_at=now()))
        except IntegrityError:
            pass

    # -- refused uploads ----------------------------------------------------------------------------
    def count_rejection(self, job_id: str, reason: str, message: str) -> None:
        with self.engine.begin() as conn:
            counted = conn.execute(update(rejections)
                                   .where(rejections.c.job_id == job_id, rejections.c.reason == reason)
                                   .values(count=rejections.c.count + 1, last_message=message[:500], last_at=now()))
            if counted.rowcount == 0:
                conn.execute(insert(rejections).values(job_id=job_id, reason=reason, count=1,
                                                       last_message=message[:500], last_at=now()))

    def rejections(self, job_id: str) -> dict[str, int]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(rejections.c.reason, rejections.c.count)
                                .where(rejections.c.job_id == job_id)).all()
        return {r.reason: r.count for r in sorted(rows)}

    # -- history ------------------------------------------------------------------------------------
    def job_record(self, job_id: str) -> dict[str, Iterable]:
        """Everything stored about a job's rounds: round rows, evaluations, updates (without blobs), downloads
        and strategy reports."""
        with self.engine.begin() as conn:
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
