"""Running sums: a synchronous round's mean-based aggregate folded as its updates arrive, so closing the round reads a
few sums instead of streaming every stored update back from the artifact store.

For a plain round whose strategy aggregates a weighted sum (``Summable``: ``DeltaMean`` for FedAvg with clipping or
privacy, FedProx and the FedOpt family; ``WeightedMean`` for plain FedAvg), the replica that stored an update folds
it, once its row is committed, into an aggregation of the round held in memory: the strategy's own ``add``, so the
arithmetic (delta from the round's global adapter, clipping, weight, norm) is the closing's. On the clock's turn,
and before it closes a round itself, a replica flushes what it folded: the sum as a blob (``Partial``: totals,
weight, norms, count), then, in one transaction, a ``running_sums`` row and the mark of every update row it
covers (``SumState.record``). The closing reads the rows with their marks in one SELECT, folds each sum in
(``add_partial``) and streams only the rows no sum covers. A replica that dies before flushing loses nothing (its
updates are not marked, so they are streamed); a flush that fails leaves its updates unmarked and is retried; an
update is covered by one sum or streamed, never both. Robust strategies (median, Krum...), mixed LoRA ranks,
secure aggregation and statistics rounds are not summed here: their closing streams every update.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from edgeft.aggregate.base import Aggregation, Partial, Summable
from edgeft.errors import EdgeftError, Unavailable
from edgeft.server.artifacts import Artifacts
from edgeft.server.sum_state import SumState
from edgeft.update import AdapterUpdate

log = logging.getLogger("edgeft.server")
TOTAL = "total/"  # blob names: total/<tensor>, weight, norms, count


def partial_tensors(partial: Partial) -> dict[str, np.ndarray]:
    """A running sum as named float64 tensors (what its blob stores)."""
    return {**{TOTAL + k: np.asarray(v, dtype=np.float64) for k, v in partial.total.items()},
            "weight": np.array([partial.weight], dtype=np.float64),
            "norms": np.array(partial.norms, dtype=np.float64).reshape(-1),
            "count": np.array([partial.count], dtype=np.int64)}


def tensors_partial(tensors: dict[str, np.ndarray]) -> Partial:
    """The inverse of ``partial_tensors``."""
    return Partial({k[len(TOTAL):]: v for k, v in tensors.items() if k.startswith(TOTAL)},
                   float(tensors["weight"][0]), [float(n) for n in tensors["norms"]], int(tensors["count"][0]))


@dataclass
class _Sum:
    """What this replica folded of one round and has not flushed: the aggregation and the devices it holds."""

    aggregation: Summable
    devices: list[str] = field(default_factory=list)


class RunningSums:
    """This replica's running sums, per (job, round). ``start(job, number)``: a fresh aggregation of the round (the
    job's strategy over the round's global adapter); ``holder``: this replica's id, recorded with each flush."""

    def __init__(self, state: SumState, artifacts: Artifacts, start: Callable[[object, int], Aggregation],
                 holder: str):
        self.state, self.artifacts, self.start, self.holder = state, artifacts, start, holder
        self._sums: dict[tuple[str, int], _Sum] = {}
        self._streamed: set[str] = set()  # jobs whose aggregation is not a weighted sum
        self._lock = threading.Lock()

    def fold(self, job, number: int, device_id: str, update: AdapterUpdate) -> None:  # noqa: ANN001
        """Fold a committed update of plain round ``number`` of ``job`` into this replica's running sum (nothing
        when the job's aggregation is not a weighted sum). A failure only leaves the round's unflushed updates to
        the closing's stream."""
        key = (job.id, number)
        with self._lock:
            if job.id in self._streamed:
                return
            entry = self._sums.get(key)
            try:
                if entry is None:
                    aggregation = self.start(job, number)
                    if not isinstance(aggregation, Summable):
                        self._streamed.add(job.id)
                        return
                    entry = self._sums[key] = _Sum(aggregation)
                entry.aggregation.add(update)
                entry.devices.append(device_id)
            except Exception as exc:  # noqa: BLE001 - e.g. the global adapter unreadable: stream them instead
                self._sums.pop(key, None)
                log.warning("job %s: round %d's running sum dropped (its updates are streamed at closing): %s",
                            job.id, number, exc)

    def unflushed(self) -> int:
        """How many folded updates wait for a flush."""
        with self._lock:
            return sum(len(entry.devices) for entry in self._sums.values())

    def drop(self) -> None:
        """Forget every unflushed sum (as a replica that dies does): their updates are streamed at closing."""
        with self._lock:
            self._sums.clear()

    def flush(self, job_id: str | None = None, number: int | None = None) -> None:
        """Write this replica's running sums (those of round ``number`` of ``job_id`` when given) to the artifact
        store and the database. A sum whose round closed meanwhile is dropped; one the store or the database did
        not take stays in memory for the next turn (its updates stay unmarked meanwhile: never lost)."""
        with self._lock:
            keys = [k for k in self._sums if job_id is None or k == (job_id, number)]
            taken = {k: self._sums.pop(k) for k in keys}
        for (job, round_number), entry in taken.items():
            try:
                blob = self.artifacts.put_tensors(partial_tensors(entry.aggregation.partial()))
                if not self.state.record(job, round_number, uuid.uuid4().hex, blob, entry.devices, self.holder):
                    log.info("job %s: round %d closed before its running sum was flushed; dropped", job, round_number)
            except Unavailable as exc:
                log.info("job %s: round %d's running sum waits for its flush: %s", job, round_number, exc)
                self._restore((job, round_number), entry)
            except EdgeftError as exc:
                log.warning("job %s: round %d's running sum not flushed (its updates are streamed): %s",
                            job, round_number, exc)

    def _restore(self, key: tuple[str, int], entry: _Sum) -> None:
        """Put back a sum that could not be flushed, merged with what was folded meanwhile."""
        with self._lock:
            newer = self._sums.get(key)
            if newer is not None:
                entry.aggregation.add_partial(newer.aggregation.partial())
                entry.devices.extend(newer.devices)
            self._sums[key] = entry

    def feed(self, aggregation: Summable, job_id: str, number: int,
             stream: Callable[[list], Iterable[AdapterUpdate]]) -> int:
        """Add every stored update of a round to ``aggregation`` once: the flushed running sums in one consistent
        read of the rows and their marks, ``stream(rows)`` for the rows no sum covers. Returns the updates
        added."""
        rows = self.state.rows(job_id, number)
        covered: dict[str, list] = {}
        uncovered = [r for r in rows if r.running_sum is None]
        for r in rows:
            if r.running_sum is not None:
                covered.setdefault(r.running_sum, []).append(r)
        for sum_rows in covered.values():
            partial = self._read(sum_rows)
            if partial is None:
                uncovered.extend(sum_rows)
            else:
                aggregation.add_partial(partial)
        uncovered.sort(key=lambda r: r.device_id)
        for stored in stream(uncovered):
            aggregation.add(stored)
        return len(rows)

    def _read(self, rows: list) -> Partial | None:
        """The running sum covering ``rows``; None (stream them instead) when its blob is unreadable or does not
        cover exactly them."""
        try:
            partial = tensors_partial(self.artifacts.get_tensors(rows[0].sum_blob))
        except Unavailable:
            raise
        except (EdgeftError, KeyError, ValueError) as exc:
            log.warning("running sum %s unreadable (its updates are streamed): %s", rows[0].running_sum, exc)
            return None
        if partial.count != len(rows) or rows[0].sum_updates != len(rows):
            log.warning("running sum %s covers %d updates, %d rows are marked with it: they are streamed",
                        rows[0].running_sum, partial.count, len(rows))
            return None
        return partial


def stream_rows(artifacts: Artifacts, rows: list, with_device: bool = False) -> Iterator:
    """The stored updates of ``rows`` one at a time (the store reads a bounded few ahead); with ``with_device``,
    (device id, update) pairs."""
    for r, tensors in zip(rows, artifacts.iter_tensors(r.blob for r in rows)):
        stored = AdapterUpdate(tensors, r.n_examples, r.metrics)
        yield (r.device_id, stored) if with_device else stored
