"""The turn this process's transactions take on SQLite (one writer): a lock that an urgent transaction takes before
the others waiting, and the ``urgent`` context that marks a thread's transactions so.

A version of an asynchronous job is made on one thread in five transactions (its job's row, its buffer, its lease
taken, the version stored, the lease given back); under load each waited ~0.35 s for its turn behind ~100 call
threads, 1.7 s of the 3.3 s a version took, and versions fell behind the uploads (a backlog of thousands of
updates, read back from the store). Urgent turns keep the work that frees the others from waiting behind them.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

_URGENT = threading.local()


@contextmanager
def urgent() -> Iterator[None]:
    """Within it, the transactions of this thread take their turn before the others waiting."""
    before = Turn.is_urgent()
    _URGENT.on = True
    try:
        yield
    finally:
        _URGENT.on = before


class Turn:
    """A lock taken in turn (waiters in the order they came), urgent takers (``urgent``) first."""

    def __init__(self) -> None:
        lock = threading.Lock()
        self._others = threading.Condition(lock)
        self._urgent = threading.Condition(lock)
        self._held = False
        self._urgent_waiting = 0

    @staticmethod
    def is_urgent() -> bool:
        """Whether this thread's transactions are urgent now (within ``urgent``)."""
        return getattr(_URGENT, "on", False)

    def __enter__(self) -> Turn:
        with self._others:
            if self.is_urgent():
                self._urgent_waiting += 1
                while self._held:
                    self._urgent.wait()
                self._urgent_waiting -= 1
            else:
                while self._held or self._urgent_waiting:
                    self._others.wait()
            self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._others:
            self._held = False
            (self._urgent if self._urgent_waiting else self._others).notify()
