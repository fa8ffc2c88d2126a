"""Pace steering for asynchronous jobs (after Bonawitz et al., "Towards Federated Learning at Scale", SysML 2019):
while a job's concurrency cap is reached, a device that asks for work is told when to ask again, so that the
devices waiting come back at about the rate work frees up, not every second each.

Little's law gives the number of devices waiting: refused polls a second times the wait they were told. Spreading
them over the time the freed slots take to admit them gives the wait to tell the next one:

    retry_after = clamp(refused_per_s * told_s / freed_per_s, floor_s, ceiling_s)

With 100,000 devices waiting on a job that accepts 100 updates a second, each is told to come back in about 1,000
s (clamped to ``ceiling_s``), instead of 100,000 polls a second. ``freed_per_s`` is measured (uploads received,
accepted or refused), and at least the cap over the job's task deadline (before any upload came: every slot frees by
then).
"""

from __future__ import annotations

import threading
import time

FLOOR_S = 1.0  # the shortest wait told (the cap's recheck: a slot may free any moment)
CEILING_S = 600.0  # the longest: a device waiting longer would miss work freed meanwhile
WINDOW_S = 10.0  # rates are measured over this long
GROWTH = 2.0  # the wait told at most doubles from one window to the next: a window in which nothing freed (every
# holder still training) says little, and a test's handful of devices must not be told minutes


def retry_after(refused_per_s: float, told_s: float, freed_per_s: float, floor_s: float = FLOOR_S,
                ceiling_s: float = CEILING_S) -> float:
    """The wait to tell a refused device: the devices waiting (``refused_per_s`` x ``told_s``, Little's law) over
    the rate work frees up (``freed_per_s`` > 0), clamped to [``floor_s``, ``ceiling_s``]."""
    return min(max(refused_per_s * told_s / freed_per_s, floor_s), ceiling_s)


class Tally:
    """A running count of events, thread safe: a window reads it when it starts and when it ends. One a job counts
    the work that ended (an upload taken in, accepted or refused), read by its ``Pace`` and its admission."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


class Pace:
    """One job's pace: counts refused polls, reads ``freed`` (the work that ended), and every WINDOW_S turns them
    into the wait to tell (at most GROWTH times the last). ``min_freed_per_s``: the freed rate assumed at least (the
    cap over the task deadline). Thread safe."""

    def __init__(self, min_freed_per_s: float, freed: Tally | None = None, window_s: float = WINDOW_S,
                 clock=time.monotonic):  # noqa: ANN001
        self.min_freed_per_s, self.window_s, self.clock = min_freed_per_s, window_s, clock
        self.freed = freed or Tally()
        self._lock = threading.Lock()
        self._since, self._freed_at = clock(), self.freed.count
        self._refused = 0
        self._told = FLOOR_S

    def refused(self) -> int:
        """A device was refused work (the cap is reached): the whole seconds to tell it to wait."""
        with self._lock:
            self._refused += 1
            at = self.clock()
            span = at - self._since
            if span >= self.window_s:
                freed_at = self.freed.count
                freed = max((freed_at - self._freed_at) / span, self.min_freed_per_s)
                self._told = min(retry_after(self._refused / span, self._told, freed), GROWTH * self._told)
                self._since, self._refused, self._freed_at = at, 0, freed_at
            return max(int(round(self._told)), 1)
