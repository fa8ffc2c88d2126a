"""The stored state of asynchronous (FedBuff) jobs: named queries over ``async_updates`` and ``async_work`` (and the
job, adapter and aggregation rows every job has), each one transaction.

Crash safety, as for rounds: an accepted update is a row (unique per job and upload id, so a replay counts once)
whose blob was written before it; a new global version is written in one transaction with the buffered rows it was
made from marked with it, after claiming the job's row (``current_round`` = the latest version + 1), so a version
is made once and an update goes into exactly one version, whatever process dies when, and however many replicas
share the database.
"""

from __future__ import annotations

import uuid
from typing import Callable

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection

from edgeft.server.state import State
from edgeft.server.store import adapters, aggregations, async_updates, async_work, jobs, now, transaction
from edgeft.server.writes import insert_ignore, upsert


# the statements of every poll and upload, built once: building one costs more than running it (~0.1 ms)
_JOB = select(jobs).where(jobs.c.id == bindparam("job_id"))
_HOLDING = select(func.count()).select_from(async_work).where(
    async_work.c.job_id == bindparam("job_id"), async_work.c.device_id != bindparam("device_id"),
    async_work.c.expires_at > bindparam("now"))
_RECEIVED = select(async_updates.c.seq).where(async_updates.c.job_id == bindparam("job_id"),
                                              async_updates.c.upload_id == bindparam("upload_id"))
_BUFFERED = select(func.count()).select_from(async_updates).where(async_updates.c.job_id == bindparam("job_id"),
                                                                  async_updates.c.version.is_(None))
_JOB_PROGRESS = select(jobs.c.status, jobs.c.current_round,  # and the buffer's size: one statement
                       _BUFFERED.scalar_subquery().label("buffered")).where(jobs.c.id == bindparam("job_id"))
_RELEASE = async_work.delete().where(async_work.c.job_id == bindparam("job_id"),
                                     async_work.c.device_id == bindparam("device_id"))
_WORK = ("job_id", "device_id", "upload_id", "base_version", "issued_at", "expires_at")


class _Changed(Exception):
    """The version was made meanwhile, or its buffer changed: roll the closing transaction back."""


class AsyncState:
    """Reads and writes of asynchronous jobs over ``state``'s engine."""

    def __init__(self, state: State):
        self.state = state

    def _tx(self):  # noqa: ANN202
        return transaction(self.state.engine)

    # -- work handed out ---------------------------------------------------------------------------------
    def take_work(self, job_id: str, device_id: str, expires_at: float, cap: int | None, seen: bool) -> tuple:
        """A poll's one transaction: the device's liveness write when ``seen`` (``State.seen``: NotFound /
        PermissionDenied for a device not registered or not enrolled), the job's row, and, while the job runs,
        work on its latest version recorded for the device (until ``expires_at``) unless ``cap`` other devices
        hold some (None: not counted). Returns (capabilities or None without ``seen``, job row or None, the work's
        upload id or None: the job does not run, or the cap is reached; how many other devices held work, or None
        when not counted). A device that asks again while holding work gets new work in place of the old."""
        with self._tx() as conn:
            capabilities = State._seen(conn, device_id, job_id) if seen else None
            row = conn.execute(_JOB, {"job_id": job_id}).first()
            if row is None or row.status != "running":
                return capabilities, row, None, None
            keys = {"job_id": job_id, "device_id": device_id}
            holding = None if cap is None else conn.execute(_HOLDING, keys | {"now": now()}).scalar_one()
            if holding is not None and holding >= cap:
                return capabilities, row, None, holding
            version = row.current_round - 1
            upload_id = f"{device_id}:{job_id}:v{version}:{uuid.uuid4().hex[:12]}"
            work = keys | dict(upload_id=upload_id, base_version=version, issued_at=now(), expires_at=expires_at)
            upsert(conn, async_work, ("job_id", "device_id"), work, _WORK[2:])
            return capabilities, row, upload_id, holding

    def release_work(self, job_id: str, device_id: str) -> None:
        """The device no longer holds work (its upload came, accepted or refused)."""
        with self._tx() as conn:
            conn.execute(_RELEASE, {"job_id": job_id, "device_id": device_id})

    def holding(self, job_id: str) -> int:
        """How many devices hold work of the job now."""
        with self._tx() as conn:
            return conn.execute(select(func.count()).select_from(async_work).where(
                async_work.c.job_id == job_id, async_work.c.expires_at > now())).scalar_one()

    # -- uploads -----------------------------------------------------------------------------------------
    def received(self, job_id: str, upload_id: str) -> bool:
        """Whether the upload is stored already (a replay)."""
        with self._tx() as conn:
            return self._received(conn, job_id, upload_id)

    @staticmethod
    def _received(conn: Connection, job_id: str, upload_id: str) -> bool:
        return conn.execute(_RECEIVED, {"job_id": job_id, "upload_id": upload_id}).first() is not None

    def upload_state(self, job_id: str, upload_id: str, device_id: str) -> tuple:
        """An upload's reads in one transaction: whether it is stored already (a replay), then the device's
        liveness write (``State.seen``: NotFound / PermissionDenied for a device not registered or not enrolled)
        and the job's row. Returns (received, capabilities, job row); for a replay (True, None, None)."""
        with self._tx() as conn:
            if self._received(conn, job_id, upload_id):
                return True, None, None
            capabilities = State._seen(conn, device_id, job_id)
            return False, capabilities, conn.execute(_JOB, {"job_id": job_id}).first()

    def add_update(self, job_id: str, upload_id: str, device_id: str, base_version: int, n_examples: int,
                   metrics: dict, blob: str, size: int, buffer_size: int, max_staleness: int,
                   seen: bool = False) -> int | None:
        """Store an accepted update in the job's buffer and release the device's work, in one transaction (first,
        when ``seen``, the device's liveness write: ``State.seen``'s NotFound / PermissionDenied for a device not
        registered or not enrolled); returns how many updates the buffer holds with it, 0 (nothing stored) for an
        upload stored already or a job that is no longer running, or None (nothing stored) when it would be more
        than ``max_staleness`` versions behind the version it goes into: the job's next version, or a later one when
        the buffer already holds ``buffer_size`` or more updates ahead of it (versions made, or uploads stored, while
        it was checked)."""
        with self._tx() as conn:
            if seen:
                State._seen(conn, device_id, job_id)
            job = conn.execute(_JOB_PROGRESS, {"job_id": job_id}).first()
            if job is None or job.status != "running":
                return 0
            ahead = job.buffered
            goes_into = job.current_round + ahead // buffer_size  # a version takes the oldest buffer_size updates
            if goes_into - 1 - base_version > max_staleness:
                return None
            row = dict(job_id=job_id, upload_id=upload_id, device_id=device_id, base_version=base_version,
                       n_examples=n_examples, metrics=metrics, blob=blob, received_at=now(), bytes=size)
            if not insert_ignore(conn, async_updates, ("job_id", "upload_id"), **row):
                return 0
            conn.execute(_RELEASE, {"job_id": job_id, "device_id": device_id})
            return ahead + 1

    def buffer(self, job_id: str, limit: int) -> list:
        """The oldest ``limit`` updates in the job's buffer (not in a version yet), in arrival order."""
        with self._tx() as conn:
            return conn.execute(select(async_updates).where(async_updates.c.job_id == job_id,
                                                            async_updates.c.version.is_(None))
                                .order_by(async_updates.c.seq).limit(limit)).all()

    # -- versions ----------------------------------------------------------------------------------------
    def close_version(self, job_id: str, version: int, seqs: list[int], blob: str, state_blob: str | None,
                      report: dict, finished: bool, guard: Callable[[Connection], bool] | None = None) -> bool:
        """Write global ``version`` made from the buffered updates ``seqs``, in one transaction: the adapter, the
        strategy's state and report, the updates marked with the version, the job's progress (finished when
        ``finished``). False (nothing written) when the version exists already, one of the updates is in a
        version already, the job is not running, or ``guard`` (the closing lease) says no."""
        try:
            with self._tx() as conn:
                claimed = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running",
                                                          jobs.c.current_round == version)
                                       .values(current_round=version + 1,
                                               status="finished" if finished else "running",
                                               message=f"{version} global versions made" if finished else ""))
                if claimed.rowcount != 1 or (guard is not None and not guard(conn)):
                    raise _Changed
                marked = conn.execute(update(async_updates).where(
                    async_updates.c.job_id == job_id, async_updates.c.seq.in_(seqs),
                    async_updates.c.version.is_(None)).values(version=version))
                if marked.rowcount != len(seqs):
                    raise _Changed
                conn.execute(insert(adapters).values(job_id=job_id, version=version, blob=blob, created_at=now()))
                conn.execute(insert(aggregations).values(job_id=job_id, round=version, state_blob=state_blob,
                                                         report=report, created_at=now()))
        except _Changed:
            return False
        return True

    def drop(self, job_id: str, seqs: list[int]) -> bool:
        """Take buffered updates out of the buffer without a version (version -1: too stale when their buffer
        filled); False when one of them is not in the buffer any more."""
        try:
            with self._tx() as conn:
                if conn.execute(update(async_updates).where(
                        async_updates.c.job_id == job_id, async_updates.c.seq.in_(seqs),
                        async_updates.c.version.is_(None)).values(version=-1)).rowcount != len(seqs):
                    raise _Changed
        except _Changed:
            return False
        return True

    def finish(self, job_id: str, message: str) -> bool:
        """End a running job (its stop condition was met); False when it was not running."""
        with self._tx() as conn:
            return conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "running")
                                .values(status="finished", message=message[:2000])).rowcount == 1

    def started_at(self, job_id: str) -> float | None:
        """When the job started: when its initial global adapter was stored."""
        with self._tx() as conn:
            return conn.execute(select(func.min(adapters.c.created_at)).where(adapters.c.job_id == job_id)).scalar()

    def versions(self, job_id: str) -> list[dict]:
        """Per global version made (oldest first): when, and its updates (device, base version, examples, bytes,
        training metrics)."""
        with self._tx() as conn:
            made = {r.version: r.created_at for r in conn.execute(
                select(adapters.c.version, adapters.c.created_at).where(adapters.c.job_id == job_id))}
            rows = conn.execute(select(async_updates.c.version, async_updates.c.device_id,
                                       async_updates.c.base_version, async_updates.c.n_examples,
                                       async_updates.c.bytes, async_updates.c.metrics)
                                .where(async_updates.c.job_id == job_id).order_by(async_updates.c.seq)).all()
        out = []
        for version in sorted(v for v in made if v > 0):
            out.append({"version": version, "created_at": made[version],
                        "updates": [{"device_id": r.device_id, "base_version": r.base_version,
                                     "n_examples": r.n_examples, "bytes_up": r.bytes, "metrics": r.metrics}
                                    for r in rows if r.version == version]})
        return out

    def report(self, job_id: str, version: int) -> dict:
        """The strategy's report stored with global ``version`` ({} when there is none)."""
        with self._tx() as conn:
            return conn.execute(select(aggregations.c.report).where(aggregations.c.job_id == job_id,
                                                                    aggregations.c.round == version)).scalar() or {}

    def buffered(self, job_id: str) -> int:
        """How many accepted updates wait in the job's buffer."""
        with self._tx() as conn:
            return self._buffered(conn, job_id)

    @staticmethod
    def _buffered(conn: Connection, job_id: str) -> int:
        return conn.execute(_BUFFERED, {"job_id": job_id}).scalar_one()
