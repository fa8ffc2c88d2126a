"""Admission by load for asynchronous jobs: while this coordinator's call threads are mostly busy receiving uploads
(they queue: it takes updates in more slowly than its devices send them), work is given out no faster than updates
were taken in, a little slower, so the queue drains; once it has, that rate grows each window until it no longer
binds. Without it, a concurrency cap above what the coordinator can take fills its call slots with uploads, devices
retry on RESOURCE_EXHAUSTED, and fewer updates a second are taken than with a smaller cap.

A rate, not a lower cap: an upload comes a training time after its task. A cap lowered while uploads queue keeps
being lowered for all that time (the uploads already under way keep the queue full), then starves the coordinator;
the rate taken in while busy is what it can take, whatever the training time.

    issue_limit(busy, taken_per_s, given_per_s, limit) = max(BACKOFF * taken_per_s, MIN_PER_S)   while busy
                                                       = None            when the limit did not bind (given < half)
                                                       = limit * GROWTH  otherwise
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from edgeft.server.pace import WINDOW_S

log = logging.getLogger("edgeft.server")
BUSY_SHARE = 0.5  # busy: on average at least this share of the call threads (limits.max_workers) receive uploads
BACKOFF = 0.9  # while busy, work is given at this share of the rate updates were taken in
GROWTH = 1.25  # a window not busy: the limit grows by this factor
MIN_PER_S = 0.5  # the limit never falls below this many tasks a second


def issue_limit(busy: bool, taken_per_s: float, given_per_s: float, limit: float | None) -> float | None:
    """The most tasks a second to give out in the next window (None: no limit), from the last window: whether the
    coordinator was busy, the updates it took in a second and the tasks it gave a second, and the limit it had."""
    if busy:
        return max(BACKOFF * taken_per_s, MIN_PER_S)
    if limit is None or given_per_s < limit / 2:
        return None
    return limit * GROWTH


class UploadLoad:
    """The upload calls this process is receiving or storing, integrated over time: their mean number over any span
    (``mean_since``). One per coordinator process, shared by its jobs: they share its CPU. Thread safe."""

    def __init__(self, clock=time.monotonic):  # noqa: ANN001
        self.clock = clock
        self._lock = threading.Lock()
        self._count, self._at, self._area = 0, clock(), 0.0

    def _change(self, by: int) -> None:
        with self._lock:
            at = self.clock()
            self._area += self._count * (at - self._at)
            self._count, self._at = self._count + by, at

    @contextmanager
    def uploading(self) -> Iterator[None]:
        """Count an upload call while it is received and stored."""
        self._change(1)
        try:
            yield
        finally:
            self._change(-1)

    def reading(self) -> tuple[float, float]:
        """(now, the integral of uploads in progress up to now): two readings give the mean between them."""
        with self._lock:
            at = self.clock()
            return at, self._area + self._count * (at - self._at)


class Admission:
    """One job's admission: counts the tasks it gave and the uploads taken in (accepted or refused), and every
    ``window_s`` turns them and the process's upload load into the rate limit of the next window, a token bucket
    holding at most a second of tasks. ``busy_at``: the mean uploads in progress from which the process is busy.
    Thread safe."""

    def __init__(self, job_id: str, load: UploadLoad, busy_at: float, window_s: float = WINDOW_S):
        self.job_id, self.load, self.busy_at, self.window_s = job_id, load, busy_at, window_s
        self._lock = threading.Lock()
        self._since, self._area = load.reading()
        self._given = self._taken = 0
        self.limit: float | None = None
        self._tokens, self._filled = 0.0, self._since

    def taken(self) -> None:
        """An upload of the job was taken in (accepted or refused): its device's work ended."""
        with self._lock:
            self._taken += 1

    def admit(self) -> bool:
        """Whether a device asking for work may be given some now (counted as given when it may)."""
        with self._lock:
            at, area = self.load.reading()
            span = at - self._since
            if span >= self.window_s:
                self._roll(at, span, (area - self._area) / span)
                self._since, self._area = at, area
            if self.limit is not None:
                self._tokens = min(self._tokens + (at - self._filled) * self.limit, max(self.limit, 1.0))
                self._filled = at
                if self._tokens < 1:
                    return False
                self._tokens -= 1
            self._given += 1
            return True

    def _roll(self, at: float, span: float, uploading: float) -> None:
        before = self.limit
        self.limit = issue_limit(uploading >= self.busy_at, self._taken / span, self._given / span, before)
        self._given = self._taken = 0
        if before is None and self.limit is not None:
            self._tokens, self._filled = 0.0, at
            log.warning("job %s: uploads queue (%.0f received at once on average, busy from %.0f): work is given "
                        "at most %.1f times a second while they do", self.job_id, uploading, self.busy_at, self.limit)
        elif before is not None and self.limit is None:
            log.info("job %s: uploads no longer queue; work is given without a rate limit", self.job_id)
