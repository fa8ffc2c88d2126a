"""Admission by load for asynchronous jobs: while uploads queue (the coordinator takes them in more slowly than its
devices send them), work is given out no faster than updates were taken in, a little slower,
so the queue drains; once it has, that rate grows again, each window in which the work given came back. Without it,
a concurrency cap above what the coordinator can take fills its call slots (``max_concurrent_rpcs``) with queued
uploads, devices retry on RESOURCE_EXHAUSTED, and fewer updates a second are taken in than with a smaller cap.

The measure is the uploads in progress beyond ``[server.limits] upload_workers`` (``InProgress`` counts them; the
polls of a crowd waiting for work do not count): 20,000 simulated devices with a cap of 5,000 had 900 calls waiting
on 64 shared threads, a healthy coordinator under 10. A rate, not a lower cap: an upload comes a training time after its task; a cap lowered while uploads queue keeps
being lowered for all that time (the uploads already under way keep the queue full), then starves the coordinator.
The rate taken in while busy is what it can take, whatever the training time.

A slow start (as TCP's): a job's limit begins at INITIAL_PER_S and doubles each window in which the work given
came back (updates were taken in at CAUGHT_UP of the limit or more) without a queue, until uploads first queue; then
it grows by GROWTH. Without it every device of a crowd that asks at once got work, their uploads came together a
training time later, and the RESOURCE_EXHAUSTED retries they set off (42,512 in one 20,000-device run, 105,523 in
another of the same code) decided how many updates a second the run took in. Growth waits for the work given to
come back, so a training time longer than the window does not let the limit run ahead of what the coordinator has
shown it can take. A limit that does not bind (under half of it asked for) follows the demand down, to twice what
was asked (never below INITIAL_PER_S), and grows again from there: it is never lifted, as a lifted limit let a crowd
returning after a lull take every task at once.

    issue_limit(busy, taken, given, limit, growth) = max(BACKOFF * taken, MIN_PER_S)   busy, taken > 0
                                                   = limit           busy, nothing taken in (no evidence)
                                                   = min(limit, max(2 * given, INITIAL_PER_S))
                                                                     not busy, under half of it given
                                                   = limit * growth  not busy, the work given came back
                                                   = limit           not busy, it has not yet
"""

from __future__ import annotations

import logging
import threading
import time

from edgeft.server.pace import WINDOW_S, Tally

log = logging.getLogger("edgeft.server")
BUSY_SHARE = 0.5  # busy: on average uploads beyond limits.upload_workers are at least this share of it
BACKOFF = 0.9  # while busy, work is given at this share of the rate updates were taken in
GROWTH = 1.25  # a window not busy in which the work given came back: the limit grows by this factor ...
SLOW_START_GROWTH = 2.0  # ... by this one until uploads first queue
INITIAL_PER_S = 50.0  # a job's limit to begin with, tasks a second
CAUGHT_UP = 0.7  # the work given came back: updates taken in at this share of the limit or more
MIN_PER_S = 0.5  # the limit never falls below this many tasks a second


def issue_limit(busy: bool, taken_per_s: float, given_per_s: float, limit: float,
                growth: float = GROWTH) -> float:
    """The most tasks a second to give out in the next window, from the last window: whether uploads queued, the
    updates taken in a second and the tasks given a second, and the limit it had. A queue while no update was taken
    in says nothing of the rate uploads can be taken in: the limit stays. Not busy, the limit grows by ``growth``
    once updates come back at about its rate, and follows the demand down when under half of it was asked for."""
    if busy:
        return max(BACKOFF * taken_per_s, MIN_PER_S) if taken_per_s > 0 else limit
    if given_per_s < limit / 2:
        return min(limit, max(2 * given_per_s, INITIAL_PER_S))
    return limit * growth if taken_per_s >= CAUGHT_UP * limit else limit


class CallLoad:
    """The calls waiting (``InProgress``), integrated over time: two ``reading``s give their mean between them. The
    coordinator's upload load is shared by its jobs. Thread safe."""

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


class InProgress:
    """Calls in progress (the coordinator's uploads, ``with`` one each): those beyond ``free`` count as waiting in
    ``load``. Uploads run one at a time on the server's event loop; many in progress at once mean they come faster
    than it takes them in."""

    def __init__(self, load: CallLoad, free: int):
        self.load, self.free, self.count = load, free, 0
        self._lock = threading.Lock()

    def _change(self, by: int) -> None:
        with self._lock:
            waiting = max(self.count - self.free, 0)
            self.count += by
            self.load.change(max(self.count - self.free, 0) - waiting)

    def __enter__(self) -> InProgress:
        self._change(1)
        return self

    def __exit__(self, *_) -> None:  # noqa: ANN002
        self._change(-1)


class Admission:
    """One job's admission: counts the tasks it gave, reads ``taken`` (the uploads taken in, accepted or refused),
    and every ``window_s`` turns them and the uploads' queue (``load``) into the rate limit of the next window, a
    token bucket holding at most a second of tasks (full to begin with). ``busy_at``: the mean uploads waiting from
    which the process is busy. Thread safe."""

    def __init__(self, job_id: str, load: CallLoad, busy_at: float, taken: Tally | None = None,
                 window_s: float = WINDOW_S):
        self.job_id, self.load, self.busy_at, self.window_s = job_id, load, busy_at, window_s
        self.taken = taken or Tally()
        self._lock = threading.Lock()
        self._since, self._area = load.reading()
        self._given, self._taken_at = 0, self.taken.count
        self.limit = INITIAL_PER_S
        self._tokens, self._filled = INITIAL_PER_S, self._since
        self._queued = False  # uploads have queued since the job began: the slow start is over

    def admit(self) -> bool:
        """Whether a device asking for work may be given some now (counted as given when it may)."""
        with self._lock:
            at, area = self.load.reading()
            span = at - self._since
            if span >= self.window_s:
                self._roll(span, (area - self._area) / span)
                self._since, self._area = at, area
            self._tokens = min(self._tokens + (at - self._filled) * self.limit, max(self.limit, 1.0))
            self._filled = at
            if self._tokens < 1:
                return False
            self._tokens -= 1
            self._given += 1
            return True

    def _roll(self, span: float, waiting: float) -> None:
        busy, first_queue = waiting >= self.busy_at, waiting >= self.busy_at and not self._queued
        taken_at = self.taken.count
        self.limit = issue_limit(busy, (taken_at - self._taken_at) / span, self._given / span, self.limit,
                                 GROWTH if self._queued else SLOW_START_GROWTH)
        self._queued = self._queued or busy
        self._given, self._taken_at = 0, taken_at
        if first_queue:
            log.warning("job %s: uploads queue at the coordinator (%.0f beyond upload_workers on average, busy "
                        "from %.0f): work is given at most %.1f times a second while they do, then grows as it "
                        "comes back", self.job_id, waiting, self.busy_at, self.limit)
