"""Evaluation of each global adapter on a job's held-out data, one at a time on a thread of its own, beside the
rounds and never under their lock. A failed evaluation is recorded, never fatal to the job."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from edgeft.bundle import Bundle
from edgeft.server.config import JobConfig
from edgeft.server.state import State
from edgeft.train.engines import open_session

log = logging.getLogger("edgeft.server")


class Evaluator:
    """Evaluates global adapters (``adapter(job_id, version)``) with each job's own bundle (``bundles()``)."""

    def __init__(self, state: State, bundles: Callable[[], dict[str, Bundle]],
                 adapter: Callable[[str, int], dict[str, np.ndarray]]):
        self.state, self.bundles, self.adapter = state, bundles, adapter
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeft-eval")
        self._pending: list[Future] = []
        self._eval_sets: dict[str, object] = {}

    def schedule(self, job: JobConfig, version: int) -> None:
        """Evaluate global adapter ``version`` of ``job`` when the job has eval_data."""
        if job.eval_data is not None:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._pool.submit(self.evaluate, job, version))

    def idle(self) -> bool:
        """Every scheduled evaluation is stored."""
        return all(f.done() for f in self._pending)

    def evaluate(self, job: JobConfig, version: int) -> None:
        """Evaluate the global adapter after round ``version`` on the job's held-out data; store the metrics."""
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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
