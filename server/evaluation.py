"""Evaluation of each global adapter on a job's held-out data, one at a time on a thread of its own, beside the
rounds and never under their lock. A failed evaluation is recorded, never fatal to the job.

With several coordinator replicas each global adapter is evaluated once: by the replica that holds its lease
(``evaluate/<job>/<version>``, ``edgeft.server.lease``). The clock's ``sweep`` schedules every adapter that has no
evaluation yet, so one whose evaluating replica died is evaluated here once that replica's lease expired."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from edgeft.bundle import Bundle
from edgeft.server.config import JobConfig
from edgeft.server.lease import Leases
from edgeft.server.state import State
from edgeft.train.engines import open_session

log = logging.getLogger("edgeft.server")


class Evaluator:
    """Evaluates global adapters (``adapter(job_id, version)``) with each job's own bundle (``bundles()``)."""

    def __init__(self, state: State, bundles: Callable[[], dict[str, Bundle]],
                 adapter: Callable[[str, int], dict[str, np.ndarray]], leases: Leases):
        self.state, self.bundles, self.adapter, self.leases = state, bundles, adapter, leases
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeft-eval")
        self._pending: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()
        self._eval_sets: dict[str, object] = {}

    def schedule(self, job: JobConfig, version: int) -> None:
        """Evaluate global adapter ``version`` of ``job`` when the job has eval_data (once: a version scheduled
        and not done yet is not scheduled again)."""
        if job.eval_data is None:
            return
        with self._lock:
            self._pending = {k: f for k, f in self._pending.items() if not f.done()}
            if (job.id, version) not in self._pending:
                self._pending[job.id, version] = self._pool.submit(self.evaluate, job, version)

    def sweep(self, jobs: list[JobConfig]) -> None:
        """Schedule every global adapter of ``jobs`` that has no evaluation stored (by any replica) yet."""
        for job in jobs:
            if job.eval_data is not None:
                for version in self.state.unevaluated(job.id):
                    self.schedule(job, version)

    def idle(self) -> bool:
        """Every scheduled evaluation is stored."""
        with self._lock:
            return all(f.done() for f in self._pending.values())

    def evaluate(self, job: JobConfig, version: int) -> None:
        """Evaluate the global adapter after round ``version`` on the job's held-out data and store the metrics,
        unless another replica holds its lease or stored them already."""
        with self.leases.hold(f"evaluate/{job.id}/{version}") as lease:
            if lease is not None and version in self.state.unevaluated(job.id):
                self._evaluate(job, version)

    def _evaluate(self, job: JobConfig, version: int) -> None:
        from edgeft.data import load_dataset
        from edgeft.train.trainer import evaluate, pad_id_of

        bundle = self.bundles()[job.id]
        try:
            if job.id not in self._eval_sets:
                self._eval_sets[job.id] = load_dataset(job.eval_data, bundle)
            session = open_session(bundle, threads=job.train.threads)
            session.set_parameters(self.adapter(job.id, version))
            started = time.perf_counter()
            metrics = evaluate(session, self._eval_sets[job.id], bundle.manifest.task, pad_id_of(bundle), bundle=bundle)
            metrics["eval_seconds"] = round(time.perf_counter() - started, 2)
        except Exception as exc:  # an evaluation failure is recorded, never fatal to the job
            log.error("evaluation of job %s after round %d failed: %s", job.id, version, exc)
            metrics = {"error": f"{type(exc).__name__}: {exc}"}
        self.state.add_evaluation(job.id, version, metrics)
        log.info("job %s: global adapter %d evaluated by replica %s", job.id, version, self.leases.holder)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
