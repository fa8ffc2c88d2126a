"""The stored running sums of synchronous rounds (``edgeft.server.running_sums``): named queries over
``running_sums`` and the ``running_sum`` mark of ``updates`` rows, each one transaction.

A flushed running sum and the marks on the update rows it covers are written together, so any one SELECT sees a row
either covered by a running sum it also sees, or not covered at all: the closing folds each running sum in and
streams the rest, and counts every update once, whichever replica died when.
"""

from __future__ import annotations

from sqlalchemy import insert, select, update

from edgeft.server.state import State
from edgeft.server.store import now, running_sums, transaction, updates

BATCH = 500  # device ids per UPDATE ... IN (...) when marking rows


class _Refused(Exception):
    """The round is no longer open, or a row to mark is covered already or missing: roll the flush back."""


class SumState:
    """Reads and writes of running sums over ``state``'s engine."""

    def __init__(self, state: State):
        self.state = state

    def record(self, job_id: str, number: int, sum_id: str, blob: str, device_ids: list[str], holder: str) -> bool:
        """Record running sum ``sum_id`` (its blob) of open round ``number`` and mark the update rows of
        ``device_ids`` as covered by it, in one transaction. False (nothing written) when the round is no longer
        open or one of those rows is not there uncovered."""
        try:
            with transaction(self.state.engine) as conn:
                if not State._claim(conn, job_id, number):  # waits for uploads and a closing of this round
                    raise _Refused
                conn.execute(insert(running_sums).values(id=sum_id, job_id=job_id, round=number, blob=blob,
                                                         updates=len(device_ids), holder=holder, created_at=now()))
                for start in range(0, len(device_ids), BATCH):
                    batch = device_ids[start:start + BATCH]
                    marked = conn.execute(update(updates).where(
                        updates.c.job_id == job_id, updates.c.round == number, updates.c.device_id.in_(batch),
                        updates.c.running_sum.is_(None)).values(running_sum=sum_id)).rowcount
                    if marked != len(batch):
                        raise _Refused
        except _Refused:
            return False
        return True

    def rows(self, job_id: str, number: int) -> list:
        """The stored updates of a round by device id, each with the running sum covering it (``sum_blob`` and
        ``sum_updates``; None: not covered), in ONE SELECT: a consistent snapshot of sums and marks."""
        with transaction(self.state.engine) as conn:
            return conn.execute(
                select(updates, running_sums.c.blob.label("sum_blob"), running_sums.c.updates.label("sum_updates"))
                .select_from(updates.outerjoin(running_sums, running_sums.c.id == updates.c.running_sum))
                .where(updates.c.job_id == job_id, updates.c.round == number)
                .order_by(updates.c.device_id)).all()
