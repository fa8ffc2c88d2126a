"""Admission by load for asynchronous jobs: while calls queue for the coordinator's call threads (it takes uploads in
more slowly than its devices send them), work is given out no faster than updates were taken in, a little slower,
so the queue drains; once it has, that rate grows each window until it no longer binds. Without it, a concurrency
cap above what the coordinator can take fills its call slots (``max_concurrent_rpcs``) with queued uploads,
devices retry on RESOURCE_EXHAUSTED, and fewer updates a second are taken in than with a smaller cap.

The measure is the calls waiting for a thread (``CallThreads`` counts them): 20,000 simulated devices with a cap
of 5,000 had 900 calls waiting on 64 threads, a healthy coordinator under 10. A rate, not a lower cap: an upload
comes a training time after its task; a cap lowered while uploads queue keeps being lowered for all that time (the
uploads already under way keep the queue full), then starves the coordinator. The rate taken in while busy is what
it can take, whatever the training time.

    issue_limit(busy, taken_per_s, given_per_s, limit) = max(BACKOFF * taken_per_s, MIN_PER_S)   busy, taken > 0
                                                       = limit           busy, nothing taken in (another queue)
                                                       = None            not busy, the limit did not bind
                                                       = limit * GROWTH  not busy, it bound
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from edgeft.server.pace import WINDOW_S

log = logging.getLogger("edgeft.server")
BUSY_SHARE = 0.5  # busy: on average at least this many calls per call thread (limits.max_workers) wait for one
BACKOFF = 0.9  # while busy, work is given at this share of the rate updates were taken in
GROWTH = 1.25  # a window not busy in which the limit bound: it grows by this factor
MIN_PER_S = 0.5  # the limit never falls below this many tasks a second


def issue_limit(busy: bool, taken_per_s: float, given_per_s: float, limit: float | None) -> float | None:
    """The most tasks a second to give out in the next window (None: no limit), from the last window: whether calls
    queued, the updates taken in a second and the tasks given a second, and the limit it had. A queue while no
    update was taken in (a crowd registering) says nothing of the rate uploads can be taken in: the limit stays."""
    if busy:
        return max(BACKOFF * taken_per_s, MIN_PER_S) if taken_per_s > 0 else limit
    if limit is None or given_per_s < limit / 2:
        return None
    return limit * GROWTH


class CallLoad:
    """The calls waiting for one of the coordinator's call threads, integrated over time: two ``reading``s give
    their mean between them. One per coordinator process, shared by its jobs (they share its threads). Thread safe."""

    def __init__(self, clock=time.monotonic):  # noqa: ANN001
        self.clock = clock
        self._lock = threading.Lock()
        self._count, self._at, self._area = 0, clock(), 0.0

    def change(self, by: int) -> None:
        with self._lock:
            at = self.clock()
            self._area += self._count * (at - self._at)
            self._count, self._at = self._count + by, at

    @property
    def waiting(self) -> int:
        """The calls waiting now."""
        return self._count

    def reading(self) -> tuple[float, float]:
        """(now, the integral of the calls waiting up to now)."""
        with self._lock:
            at = self.clock()
            return at, self._area + self._count * (at - self._at)


class CallThreads(ThreadPoolExecutor):
    """The gRPC server's call threads; ``load`` counts each call from when the server hands it over (``submit``)
    until a thread starts it."""

    def __init__(self, load: CallLoad, max_workers: int, thread_name_prefix: str = ""):
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.load = load

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001
        def started(*a, **k):  # noqa: ANN002, ANN003, ANN202
            self.load.change(-1)
            return fn(*a, **k)

        self.load.change(1)
        try:
            return super().submit(started, *args, **kwargs)
        except BaseException:  # refused (shut down): it will never start
            self.load.change(-1)
            raise


class Admission:
    """One job's admission: counts the tasks it gave and the uploads taken in (accepted or refused), and every
    ``window_s`` turns them and the process's call queue into the rate limit of the next window, a token bucket
    holding at most a second of tasks. ``busy_at``: the mean calls waiting from which the process is busy.
    Thread safe."""

    def __init__(self, job_id: str, load: CallLoad, busy_at: float, window_s: float = WINDOW_S):
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

    def _roll(self, at: float, span: float, waiting: float) -> None:
        before = self.limit
        self.limit = issue_limit(waiting >= self.busy_at, self._taken / span, self._given / span, before)
        self._given = self._taken = 0
        if before is None and self.limit is not None:
            self._tokens, self._filled = 0.0, at
            log.warning("job %s: calls queue for the coordinator's threads (%.0f waiting on average, busy from "
                        "%.0f): work is given at most %.1f times a second while they do", self.job_id, waiting,
                        self.busy_at, self.limit)
        elif before is not None and self.limit is None:
            log.info("job %s: calls no longer queue; work is given without a rate limit", self.job_id)
