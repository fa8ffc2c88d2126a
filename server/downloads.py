"""Bytes of tasks sent to devices, counted in memory and written in batches.

A poll that hands out a task does no database write of its own for the count: at 100 tasks a second that was one
transaction in five of the coordinator's. The clock writes what was counted at each of its turns (``flush``), as do
a job's history and the coordinator's close, so readers see every count; a crash loses at most one turn's counts
(statistics of bytes sent, never an update or a round's state).
"""

from __future__ import annotations

import threading

from edgeft.errors import Unavailable
from edgeft.server.state import State
from edgeft.server.store import now


class Downloads:
    """Task bytes per (job, round, device), the first count of each kept, waiting for ``flush``."""

    def __init__(self, state: State):
        self.state = state
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int, str], tuple[int, float]] = {}

    def add(self, job_id: str, number: int, device_id: str, size: int) -> None:
        """Count a task's bytes sent to a device (once per device and round)."""
        with self._lock:
            self._pending.setdefault((job_id, number, device_id), (size, now()))

    def flush(self) -> None:
        """Write the counts so far in one transaction; kept for the next flush when the database does not answer."""
        with self._lock:
            rows, self._pending = self._pending, {}
        if not rows:
            return
        try:
            self.state.record_downloads(rows)
        except Unavailable:
            with self._lock:
                for key, value in rows.items():
                    self._pending.setdefault(key, value)
            raise
