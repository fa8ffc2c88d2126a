"""Federated rounds: who trains, what they get, which updates count, when a round closes.

Transport-free: the gRPC servicer calls these methods with edgeft's own types. All state lives in the
database and the artifact store, so a restarted coordinator (even after SIGKILL) carries on where it was.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from edgeft.aggregate import STRATEGIES, RoundContext, Strategy, build_strategy
from edgeft.aggregate.lora_ranks import (HeteroRankFedAvg, adapter_rank, check_engine_bundle, check_rank_bundle,
                                         lora_pairs, truncate)
from edgeft.aggregate.statistics import check_statistics, head_from_statistics, sum_statistics
from edgeft.bundle import Bundle, load_bundle
from edgeft.config import ENGINES
from edgeft.errors import (BundleError, ConfigError, DataError, EdgeftError, NotFound, PermissionDenied, Rejected,
                           SecAggError, StateError)
from edgeft.secagg.updates import SecAggSettings, decode_sum
from edgeft.train.engines import open_session
from edgeft.update import AdapterUpdate, check_update, update_norm
from edgeft.wire import SecAggHeader, UploadHeader
from edgeft.server.artifacts import ArtifactStore
from edgeft.server.auth import TokenStore
from edgeft.server.config import DEFAULT_HEAD_INIT, JobConfig, ServerConfig
from edgeft.server.secure import SecureRound, round_settings
from edgeft.server.store import (adapters, aggregations, devices, downloads, enrolments, evaluations, job_bundles,
                                 job_engines, jobs, now, open_database, rejections, rounds, updates, upsert_device)

log = logging.getLogger("edgeft.server")

__all__ = ["STRATEGIES", "Coordinator", "TaskAssignment", "stored_adapter"]  # STRATEGIES: edgeft.aggregate's registry


@dataclass(frozen=True)
class TaskAssignment:
    """What a device trains now."""

    job: JobConfig
    round: int
    bundle_digest: str
    global_adapter: dict[str, np.ndarray]
    deadline: float
    secure: SecAggSettings | None = None  # set for a secure aggregation round: take part instead of uploading
    statistics: bool = False  # the statistics round: class statistics, no training


def _update_rank(update: AdapterUpdate, served: dict[int, Bundle]) -> int:
    """The LoRA rank an update was trained at (the rows of its first LoRA A), one of the ``served`` ranks;
    DataError (reason shape) otherwise."""
    if len(served) == 1:
        return next(iter(served))
    try:
        pairs = lora_pairs(sorted(update.tensors))
    except ConfigError as exc:
        raise DataError(f"update does not match the bundle: {exc}", reason="names") from exc
    first = update.tensors[next(iter(pairs.values()))[0]] if pairs else None
    rank = int(first.shape[0]) if first is not None and first.ndim == 2 else -1
    if rank not in served:
        raise DataError(f"update's LoRA rank {rank} is not one the job serves ({sorted(served)})", reason="shape")
    return rank


RUNTIME_FOR_ENGINE = {
    "ort-training": "the ONNX Runtime training build (pip install onnxruntime-training-cpu==1.19.2; CPython 3.10-3.12 "
                    "on x86-64 or macOS)",
    "portable": "onnxruntime 1.19 or later with an edgeft agent that reports its engines",
}


def engine_refusal(job_id: str, served: list[str], reported: list[str], ort_version: str = "") -> str:
    """Why a device that runs none of a job's training engines is refused, and what to do about it."""
    runs = ", ".join(reported) if reported else "ort-training only (its agent does not report its engines)"
    runtime = f" (onnxruntime {ort_version})" if ort_version else ""
    install = " or ".join(RUNTIME_FOR_ENGINE[e] for e in served if e in RUNTIME_FOR_ENGINE)
    wanted = [e for e in reported or ["ort-training"] if e in ENGINES and e not in served][:1]
    ask = (", or ask the coordinator's operator to serve the device's engine too: [job] engines = ["
           + ", ".join(f'"{e}"' for e in [*served, *wanted]) + "]") if wanted else ""
    return (f"job {job_id!r} trains with the {', '.join(served)} engine{'s' if len(served) > 1 else ''}; this device "
            f"runs {runs}{runtime}. Install {install} on the device{ask}")


def encode(tensors: dict[str, np.ndarray]) -> bytes:
    return save_tensors({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def _adapter_row(conn, job_id: str, version: int | None):  # noqa: ANN001, ANN202
    """The stored global adapter row of ``job_id`` after round ``version`` (default: the latest)."""
    query = select(adapters).where(adapters.c.job_id == job_id)
    if version is not None:
        query = query.where(adapters.c.version == version)
    row = conn.execute(query.order_by(adapters.c.version.desc())).first()
    if row is None:
        known = conn.execute(select(func.max(adapters.c.version)).where(adapters.c.job_id == job_id)).scalar()
        if known is None:
            names = conn.execute(select(jobs.c.id)).scalars().all()
            raise NotFound(f"no job {job_id!r} on this coordinator (jobs: {', '.join(names) or 'none'})")
        raise NotFound(f"job {job_id!r} has no round {version}: its global adapters go from round 0 (initial) "
                       f"to round {known}")
    return row


def _open_state(state_dir: Path, artifacts: ArtifactStore):  # noqa: ANN202
    """The coordinator's database; a missing or empty database beside an artifact store that holds blobs is a
    lost state (StateError), never a fresh start."""
    path = state_dir / "state.db"
    had_state = any(p.is_file() and p.stat().st_size > 0 for p in (path, path.with_name("state.db-wal")))
    if not had_state and artifacts.has_blobs():
        raise StateError(f"{path} is missing or empty, but {artifacts.root} holds the artifacts of a coordinator "
                         "state: the database was lost. Restore the state folder from a backup, or start over with "
                         "a new state_dir")
    return open_database(path)


def stored_adapter(state_dir: str | Path, job_id: str, round_number: int | None = None
                   ) -> tuple[Bundle, dict[str, np.ndarray], int]:
    """Read-only: a job's global adapter after ``round_number`` (default: the latest), its bundle and the
    round, from a coordinator's state folder (for ``edgeft deploy --state``; the coordinator may be running)."""
    state_dir = Path(state_dir)
    if not (state_dir / "state.db").is_file():
        raise NotFound(f"{state_dir} is not a coordinator state folder (no state.db); pass the server's "
                       "state_dir")
    engine = open_database(state_dir / "state.db")
    try:
        with engine.begin() as conn:
            row = _adapter_row(conn, job_id, round_number)
            digest = conn.execute(select(jobs.c.bundle_digest).where(jobs.c.id == job_id)).scalar_one()
    finally:
        engine.dispose()
    store = ArtifactStore(state_dir / "artifacts")
    return store.bundle(digest), load_tensors(store.get(row.blob)), row.version


class Coordinator:
    """The coordinator's rules over its stored state."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.artifacts = ArtifactStore(config.state_dir / "artifacts")
        self.engine = _open_state(config.state_dir, self.artifacts)
        self.artifacts.remove_partial()  # blobs and bundles whose writing a crash cut short
        self.jobs = {job.id: job for job in config.jobs}
        self.strategies: dict[str, Strategy] = {job.id: build_strategy(job.strategy, job.strategy_options)
                                                for job in config.jobs}
        self.tokens = TokenStore(self.engine, self.jobs)  # device enrolment tokens, per job
        self.last_close_seconds = 0.0  # how long the last round's aggregation took
        self._adapter_cache: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        self._lock = threading.RLock()  # one writer at a time: rounds close exactly once
        self._count_lock = threading.Lock()  # rejection counters
        self._norms: dict[tuple[str, int], float] = {}  # L2 norm of each global adapter version
        # every job's bundles by LoRA rank, its own (the largest) included; more than one: mixed ranks (the key
        # of a bundle whose adapter is not LoRA is 0)
        self.rank_bundles: dict[str, dict[int, Bundle]] = {}
        # every job's bundles at its own rank by training engine, in its order of preference, its own bundle among
        # them; more than one: devices get the first engine they run (several engines never go with mixed ranks)
        self.engine_bundles: dict[str, dict[str, Bundle]] = {}
        self.head_init: dict[str, str] = {}  # per job: its statistics round's head method, or "none"
        # evaluations of global adapters run one at a time beside the rounds, never under the lock
        self._evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeft-eval")
        self._pending: list[Future] = []
        self._eval_sets: dict[str, object] = {}
        self._secure: dict[tuple[str, int], SecureRound] = {}  # open secure rounds: protocol state in memory only
        for job in config.jobs:
            self._start_job(job)

    @property
    def bundles(self) -> dict[str, Bundle]:
        """Every job's own bundle (its largest LoRA rank)."""
        return {job_id: served[max(served)] for job_id, served in self.rank_bundles.items()}

    def served_bundles(self, job_id: str) -> dict[str, Bundle]:
        """Every bundle job ``job_id`` serves to devices (its LoRA ranks and its engines), by digest."""
        served = [*self.rank_bundles.get(job_id, {}).values(), *self.engine_bundles.get(job_id, {}).values()]
        return {bundle.digest: bundle for bundle in served}

    # -- jobs ---------------------------------------------------------------------------------------
    def _start_job(self, job: JobConfig) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job.id)).first()
        if row is not None:
            self._resume_job(job, row)
            self.strategies[job.id].check_bundle(self.bundles[job.id].manifest)
            return
        bundle = self.artifacts.add_bundle(job.bundle if job.bundle is not None else self._export(job))
        self._check_base_model(job, bundle)
        self.strategies[job.id].check_bundle(bundle.manifest)
        # the statistics round does not run under secure aggregation yet: the head starts as exported
        self.head_init[job.id] = method = ("none" if job.secure_aggregation is not None
                                           else job.head_init.resolve(bundle.manifest))
        initial = open_session(bundle, threads=1).get_parameters()
        if job.max_update_norm is None and update_norm(initial) == 0:
            raise ConfigError(f"job {job.id!r}: its initial adapter is all zeros, so max_update_norm_ratio has no "
                              "scale; set [job] max_update_norm (an absolute bound on an update's L2 norm)")
        blob = self.artifacts.put(encode(initial))
        smaller = self._add_rank_bundles(job, bundle)
        engines = self._add_engine_bundles(job, bundle)
        # with a head init, round 0 is the statistics round: the exported adapter is version -1 and the
        # statistics-built head makes version 0, which round 1 trains from
        first = 0 if method != "none" else 1
        with self.engine.begin() as conn:
            conn.execute(insert(jobs).values(id=job.id, bundle_digest=bundle.digest, rounds=job.rounds,
                                             current_round=first, status="running", message=""))
            conn.execute(insert(adapters).values(job_id=job.id, version=first - 1, blob=blob, created_at=now()))
            for rank, other in smaller.items():
                conn.execute(insert(job_bundles).values(job_id=job.id, rank=rank, digest=other.digest))
            self._store_engines(conn, job, engines)
        self.rank_bundles[job.id] = {adapter_rank(bundle.manifest): bundle, **smaller}
        self.engine_bundles[job.id] = engines
        if first == 1:
            self._schedule_evaluation(job, 0)

    def _resume_job(self, job: JobConfig, row) -> None:  # noqa: ANN001
        """After a restart: check the stored state the job goes on from (bundle files, the latest global
        adapter, the open round's updates; StateError when corrupt), refuse a configured bundle or model for
        another base model, close a round that got all its updates before the crash, evaluate what was not."""
        try:
            bundle = self.artifacts.bundle(row.bundle_digest, verify=True)
            with self.engine.begin() as conn:
                stored = conn.execute(select(job_bundles).where(job_bundles.c.job_id == job.id)).all()
                engine_rows = conn.execute(select(job_engines).where(job_engines.c.job_id == job.id)
                                           .order_by(job_engines.c.position)).all()
            self.rank_bundles[job.id] = {adapter_rank(bundle.manifest): bundle, **{
                r.rank: self.artifacts.bundle(r.digest, verify=True) for r in stored}}
            self.engine_bundles[job.id] = {r.engine: bundle if r.digest == bundle.digest else
                                           self.artifacts.bundle(r.digest, verify=True) for r in engine_rows} or {
                bundle.manifest.engine: bundle}
            with self.engine.begin() as conn:
                blobs = [r.blob for r in conn.execute(select(updates.c.blob).join(
                    rounds, (rounds.c.job_id == updates.c.job_id) & (rounds.c.number == updates.c.round))
                    .where(updates.c.job_id == job.id, rounds.c.status == "open"))]
                blobs.append(_adapter_row(conn, job.id, None).blob)
            for blob in blobs:
                self.artifacts.get(blob)
        except BundleError as exc:
            raise StateError(f"job {job.id!r}: the coordinator state in {self.config.state_dir} is corrupt: {exc}. "
                             "Restore the state folder from a backup, or start over with a new state_dir") from exc
        self._check_base_model(job, bundle, resumed=True)
        configured = set(job.device_ranks) if job.model is not None else {
            adapter_rank(load_bundle(p, verify=False).manifest) for p in job.device_bundles
            if (p / "manifest.json").is_file()}
        if configured != set(self.rank_bundles[job.id]) - {adapter_rank(bundle.manifest)}:
            log.warning("job %s goes on with the LoRA ranks it started with, %s; the configuration's smaller ranks "
                        "%s are not used (a new job id would use them)", job.id, sorted(self.rank_bundles[job.id]),
                        sorted(configured))
        self._resume_engines(job, bundle)
        with self.engine.begin() as conn:
            statistics_round = conn.execute(select(adapters.c.version).where(
                adapters.c.job_id == job.id, adapters.c.version == -1)).first() is not None
        method = job.head_init.resolve(bundle.manifest) if statistics_round else "none"
        if statistics_round and method == "none":
            log.warning("job %s started with a statistics round; head_init 'none' does not undo it: %s builds the "
                        "head", job.id, DEFAULT_HEAD_INIT)
            method = DEFAULT_HEAD_INIT
        self.head_init[job.id] = method
        with self.engine.begin() as conn:  # evaluate what was not evaluated yet
            done = set(conn.execute(select(evaluations.c.round).where(evaluations.c.job_id == job.id)).scalars())
            versions = conn.execute(select(adapters.c.version).where(adapters.c.job_id == job.id)).scalars().all()
            open_rounds = conn.execute(select(rounds.c.number).where(rounds.c.job_id == job.id,
                                                                     rounds.c.status == "open")).scalars().all()
        for version in sorted(set(versions) - done - {-1}):  # -1: the exported head a statistics round replaced
            self._schedule_evaluation(job, version)
        with self._lock:
            for number in open_rounds:
                if job.secure_aggregation is not None:  # its protocol state was in the old process's memory only
                    self._fail_round(job, number, f"round {number} was a secure aggregation round in progress when "
                                     "the coordinator stopped; its protocol state (keys, shares, the masked sum) "
                                     "lives in memory only, so the round cannot go on and no input was unmasked")
                    continue
                self._maybe_close(job, number)

    def _check_base_model(self, job: JobConfig, bundle: Bundle, resumed: bool = False) -> None:
        """Refuse a bundle for another base model than the job's: its ``base_model_digest`` pin and, for a
        resumed job, the base model of the bundle or model folder the configuration names now."""
        base = bundle.manifest.base_model.get("digest", "")
        if job.base_model_digest is not None and base != job.base_model_digest:
            raise BundleError(f"job {job.id!r}: bundle {bundle.digest[:12]}... was exported from base model "
                              f"{base[:12]}..., not the job's base_model_digest {job.base_model_digest[:12]}...; "
                              "export the bundle from the job's base model")
        if not resumed:
            return
        configured = None
        if job.bundle is not None and (job.bundle / "manifest.json").is_file():
            source = load_bundle(job.bundle, verify=False)
            configured = source.manifest.base_model.get("digest", "")
            if configured == base and source.digest != bundle.digest:
                log.warning("job %s goes on with its stored bundle %s...; %s is another bundle of the same base "
                            "model and is not used (a new job id would use it)", job.id, bundle.digest[:12],
                            job.bundle)
        elif job.model is not None and job.model.is_dir():
            from edgeft.export.source import hf_base_digest

            configured = hf_base_digest(job.model)
        if configured is not None and configured != base:
            what = job.bundle if job.bundle is not None else job.model
            raise BundleError(f"job {job.id!r} runs on base model {base[:12]}... (its stored bundle), but {what} "
                              f"is for base model {configured[:12]}...: a job keeps its base model; give the new "
                              "model a new job id (or a new state_dir)")

    def _export(self, job: JobConfig, rank: int | None = None, engine: str | None = None) -> Path:
        """Export the job's model into a bundle under the state folder (once per base model; torch needed here
        only), at LoRA ``rank`` when given (mixed ranks), for training ``engine`` when given (several engines;
        default: [job.export]'s). An export of other weights left there (the folder's model changed before the
        job started) is redone."""
        from edgeft.export import export_hf
        from edgeft.export.source import hf_base_digest

        config = job.export
        name = job.id if rank is None else f"{job.id}-rank{rank}"
        if rank is not None:
            config = replace(config, adapter=replace(config.adapter, rank=rank))
        if engine is not None and engine != config.engine:  # the other engine's default opset
            config, name = replace(config, engine=engine, opset=None), f"{name}-{engine}"
        target = self.config.state_dir / "exports" / name
        if (target / "manifest.json").is_file():
            old = load_bundle(target, verify=False).manifest
            if old.base_model.get("digest") == hf_base_digest(job.model) and old.engine == config.engine:
                return target
            log.warning("job %s: %s holds an export of other weights; exporting %s again", job.id, target, job.model)
        shutil.rmtree(target, ignore_errors=True)
        export_hf(job.model, target, config)
        return target

    def _add_rank_bundles(self, job: JobConfig, bundle: Bundle) -> dict[int, Bundle]:
        """The job's bundles at smaller LoRA ranks (mixed ranks), stored and checked against its own bundle."""
        sources = job.device_bundles or [self._export(job, rank) for rank in job.device_ranks]
        out: dict[int, Bundle] = {}
        for source in sources:
            other = self.artifacts.add_bundle(source)
            try:
                rank = check_rank_bundle(bundle.manifest, other.manifest)
            except ConfigError as exc:
                raise ConfigError(f"job {job.id!r}: {source}: {exc}") from exc
            if rank in out:
                raise ConfigError(f"job {job.id!r}: two device bundles have LoRA rank {rank}; give one per rank")
            out[rank] = other
        return out

    def _add_engine_bundles(self, job: JobConfig, bundle: Bundle) -> dict[str, Bundle]:
        """The job's bundles at its own rank by training engine, in the order of preference its configuration
        gives, ``bundle`` (its own) among them: exported from job.model for each of job.engines, or
        job.engine_bundles; each stored and checked against ``bundle`` (``check_engine_bundle``)."""
        if job.model is not None:
            sources = [self._export(job, engine=e) for e in job.engines if e != bundle.manifest.engine]
        else:
            sources = list(job.engine_bundles)
        out = {bundle.manifest.engine: bundle}
        for source in sources:
            other = self.artifacts.add_bundle(source)
            try:
                engine = check_engine_bundle(bundle.manifest, other.manifest)
            except ConfigError as exc:
                raise ConfigError(f"job {job.id!r}: {source}: {exc}") from exc
            if engine in out:
                raise ConfigError(f"job {job.id!r}: two bundles are for the {engine!r} engine; give one per engine")
            out[engine] = other
        order = list(job.engines) or list(out)
        if set(order) != set(out):
            raise ConfigError(f"job {job.id!r}: job.engines={order}, but the job's bundles are for {list(out)} (its "
                              f"own bundle for {bundle.manifest.engine!r}): list the engines of bundle and "
                              "engine_bundles")
        return {engine: out[engine] for engine in order}

    def _store_engines(self, conn, job: JobConfig, engines: dict[str, Bundle]) -> None:  # noqa: ANN001
        """Record the engines a job serves (no rows for one engine: its own bundle's)."""
        conn.execute(job_engines.delete().where(job_engines.c.job_id == job.id))
        if len(engines) > 1:
            for position, (engine, bundle) in enumerate(engines.items()):
                conn.execute(insert(job_engines).values(job_id=job.id, engine=engine, position=position,
                                                        digest=bundle.digest))

    def _resume_engines(self, job: JobConfig, bundle: Bundle) -> None:
        """After a restart: serve the engines the configuration lists now, when they changed (an engine only
        changes which bundle a device downloads, never what is aggregated); the job's own bundle stays."""
        configured = list(job.engines) or [bundle.manifest.engine, *(
            load_bundle(p, verify=False).manifest.engine for p in job.engine_bundles)]
        if configured == list(self.engine_bundles[job.id]):
            return
        if bundle.manifest.engine not in configured:
            raise ConfigError(f"job {job.id!r}: job.engines={configured} leaves out {bundle.manifest.engine!r}, the "
                              "engine of the bundle the job started with (its global adapters are evaluated with "
                              "it); keep it in the list, or give the new setup a new job id")
        if len(configured) > 1 and len(self.rank_bundles[job.id]) > 1:
            raise ConfigError(f"job {job.id!r} started with mixed LoRA ranks {sorted(self.rank_bundles[job.id])}; "
                              "several training engines serve the job's own LoRA rank only: give the new setup a "
                              "new job id")
        engines = self._add_engine_bundles(job, bundle)
        with self.engine.begin() as conn:
            self._store_engines(conn, job, engines)
        log.info("job %s now serves the training engines %s (it served %s)", job.id, list(engines),
                 list(self.engine_bundles[job.id]))
        self.engine_bundles[job.id] = engines

    def _device_engine(self, job_id: str, capabilities: dict) -> str:
        """The training engine a device trains a job's bundle with: the first of the job's engines the device
        runs (its capabilities' ``engines``; none listed: an older agent, "ort-training" only). Rejected
        (FAILED_PRECONDITION) when it runs none of them, saying what to do."""
        served = list(self.engine_bundles[job_id])
        reported = [str(e) for e in capabilities.get("engines") or ()]
        runs = reported or ["ort-training"]
        for engine in served:
            if engine in runs:
                return engine
        raise Rejected(engine_refusal(job_id, served, reported, str(capabilities.get("ort_version") or "")),
                       reason="engine")

    def _device_bundle(self, job_id: str, capabilities: dict) -> tuple[int, Bundle]:
        """(LoRA rank, bundle) a device trains in a job: the bundle of the engine it runs
        (``_device_engine``) at the largest rank it asks for (``_device_rank``); refused when there is none."""
        engine = self._device_engine(job_id, capabilities)
        rank = self._device_rank(job_id, capabilities)
        if rank == max(self.rank_bundles[job_id]):
            return rank, self.engine_bundles[job_id][engine]
        return rank, self.rank_bundles[job_id][rank]  # mixed ranks: one engine, the job's own

    def _device_rank(self, job_id: str, capabilities: dict) -> int:
        """The LoRA rank a device trains in a job: the largest the job serves up to the device's
        ``max_lora_rank`` (0 or absent: the job's own rank). ConfigError when every served rank is above it."""
        served = self.rank_bundles[job_id]
        own = max(served)
        asked = int(capabilities.get("max_lora_rank") or 0)
        if not asked or own == 0:  # no limit, or no LoRA bundle
            return own
        fits = [r for r in served if r <= asked]
        if not fits:
            raise ConfigError(f"job {job_id!r} trains LoRA ranks {sorted(served, reverse=True)}; this device asks "
                              f"for at most rank {asked}. Raise --max-lora-rank, or have the job serve a smaller "
                              "rank too ([job] device_ranks)")
        return max(fits)

    def _for_rank(self, job_id: str, rank: int, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A global adapter as a rank-``rank`` device trains from it (``lora_ranks.truncate``)."""
        served = self.rank_bundles[job_id]
        if rank == max(served):
            return adapter
        own, theirs = served[max(served)].manifest.adapter, served[rank].manifest.adapter
        return truncate(adapter, rank, float(own["scale"]), float(theirs["scale"]))

    def job_status(self, job_id: str) -> dict:
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"unknown job {job_id!r}")
        return dict(row._mapping)

    def global_adapter(self, job_id: str, version: int | None = None) -> dict[str, np.ndarray]:
        """The global adapter after round ``version`` (default: the latest).

        Versions never change once written, so the last one read per job is kept decoded: every device's
        poll in a round asks for the same one."""
        cached = self._adapter_cache.get(job_id)
        if version is not None and cached is not None and cached[0] == version:
            return cached[1]
        with self.engine.begin() as conn:
            row = _adapter_row(conn, job_id, version)
        tensors = load_tensors(self.artifacts.get(row.blob))
        self._adapter_cache[job_id] = (row.version, tensors)
        return tensors

    def round_updates(self, job_id: str, number: int) -> list[AdapterUpdate]:
        """The updates accepted for a round, as stored."""
        return list(self._iter_updates(job_id, number))

    def _iter_updates(self, job_id: str, number: int, with_device: bool = False) -> Iterator:
        """The stored updates of a round one at a time (by device id), so aggregation holds one update in
        memory; with ``with_device``, (device id, update) pairs."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(updates).where(updates.c.job_id == job_id, updates.c.round == number)
                                .order_by(updates.c.device_id)).all()
        for r in rows:
            stored = AdapterUpdate(load_tensors(self.artifacts.get(r.blob)), r.n_examples, r.metrics)
            yield (r.device_id, stored) if with_device else stored

    def strategy_state(self, job_id: str, round_number: int) -> dict[str, np.ndarray] | None:
        """What the job's strategy kept after ``round_number`` (server optimiser moments, privacy ledger)."""
        with self.engine.begin() as conn:
            blob = conn.execute(select(aggregations.c.state_blob).where(
                aggregations.c.job_id == job_id, aggregations.c.round == round_number)).scalar()
        return load_tensors(self.artifacts.get(blob)) if blob else None

    # -- devices ------------------------------------------------------------------------------------
    def register(self, device_id: str, capabilities: dict, job_id: str, token_id: str = "") -> str:
        """Record a device (a new id when it has none) and enrol it in ``job_id`` with token ``token_id``."""
        if job_id not in self.jobs:
            raise NotFound(f"unknown job {job_id!r}")
        device_id = device_id or uuid.uuid4().hex
        self._device_bundle(job_id, capabilities)  # a device the job has no bundle for is refused now
        with self._lock, self.engine.begin() as conn:
            upsert_device(conn, device_id, capabilities)
            conn.execute(enrolments.delete().where(enrolments.c.device_id == device_id, enrolments.c.job_id == job_id))
            conn.execute(insert(enrolments).values(device_id=device_id, job_id=job_id, token_id=token_id,
                                                   enrolled_at=now()))
        return device_id

    def heartbeat(self, device_id: str, metrics: dict[str, float], job_id: str) -> None:
        """A device of ``job_id`` is alive; keep its latest metrics."""
        with self._lock, self.engine.begin() as conn:
            self._known_device(conn, device_id, job_id)
            conn.execute(update(devices).where(devices.c.id == device_id).values(metrics=metrics))

    def device(self, device_id: str) -> dict:
        with self.engine.begin() as conn:
            row = conn.execute(select(devices).where(devices.c.id == device_id)).first()
        if row is None:
            raise NotFound(f"unknown device {device_id!r}")
        return dict(row._mapping)

    def _known_device(self, conn, device_id: str, job_id: str) -> None:  # noqa: ANN001
        """The device is registered and enrolled in the job (PermissionDenied otherwise); it was seen now."""
        if conn.execute(select(devices.c.id).where(devices.c.id == device_id)).first() is None:
            raise NotFound(f"unknown device {device_id!r}: register first", reason="unknown_device")
        if conn.execute(select(enrolments.c.device_id).where(enrolments.c.device_id == device_id,
                                                             enrolments.c.job_id == job_id)).first() is None:
            raise PermissionDenied(f"device {device_id!r} is not enrolled in job {job_id!r}: register with a token "
                                   "of that job first")
        conn.execute(update(devices).where(devices.c.id == device_id).values(last_seen=now()))

    # -- rounds -------------------------------------------------------------------------------------
    def poll(self, device_id: str, job_id: str) -> TaskAssignment | str | None:
        """A task of job ``job_id`` for the device, the string reason when the job is over, or None (ask later)."""
        with self._lock:
            self.tick()
            with self.engine.begin() as conn:
                self._known_device(conn, device_id, job_id)
                job_row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
                if job_row is None or job_id not in self.jobs:
                    raise NotFound(f"unknown job {job_id!r}")
                if job_row.status != "running":
                    return f"job {job_row.id} {job_row.status}{': ' + job_row.message if job_row.message else ''}"
                job = self.jobs[job_id]
                round_row = self._open_round(conn, job, job_row.current_round)
                if round_row is None or device_id not in round_row.selected:
                    return None
                done = conn.execute(select(updates.c.device_id).where(
                    updates.c.job_id == job.id, updates.c.round == round_row.number,
                    updates.c.device_id == device_id)).first()
                ongoing = self._secure.get((job.id, round_row.number))
                if ongoing is not None and (device_id in ongoing.server.keys or ongoing.server.phase != "advertise"):
                    return None  # the device took part in (or missed) the secure protocol of this round already
                if done is None:
                    secure = (round_settings(job, len(round_row.selected)) if job.secure_aggregation is not None
                              else None)
                    capabilities = conn.execute(select(devices.c.capabilities)
                                                .where(devices.c.id == device_id)).scalar_one()
                    rank, bundle = self._device_bundle(job.id, capabilities)
                    adapter = self._for_rank(job.id, rank, self.global_adapter(job.id, round_row.number - 1))
                    return TaskAssignment(job, round_row.number, bundle.digest, adapter, round_row.deadline, secure,
                                          statistics=round_row.number == 0)
        return None

    def _open_round(self, conn, job: JobConfig, number: int):  # noqa: ANN001, ANN202
        row = conn.execute(select(rounds).where(rounds.c.job_id == job.id, rounds.c.number == number)).first()
        if row is not None:
            return row if row.status == "open" else None
        recent = now() - max(60.0, 4 * self.config.poll_wait_s)
        available = [r.id for r in conn.execute(
            select(devices.c.id).join(enrolments, enrolments.c.device_id == devices.c.id)
            .where(enrolments.c.job_id == job.id, devices.c.last_seen >= recent).order_by(devices.c.id)).all()]
        if len(available) < job.clients.min_available:
            return None
        rng = np.random.default_rng(int(hashlib.sha256(f"{job.id}:{number}".encode()).hexdigest()[:8], 16))
        chosen = self.strategies[job.id].configure_round(number, available, job.clients.fraction,
                                                         job.clients.min, job.clients.max, rng)
        conn.execute(insert(rounds).values(job_id=job.id, number=number, status="open", selected=chosen,
                                           opened_at=now(), deadline=now() + job.round_deadline_s, message=""))
        return conn.execute(select(rounds).where(rounds.c.job_id == job.id, rounds.c.number == number)).first()

    def submit(self, header: UploadHeader, update: AdapterUpdate, size: int = 0) -> bool:
        """Accept a device's update for the open round; returns False for a replay of the upload already
        received (the same ``upload_id``: counted once). Every refusal is counted under its reason."""
        job = self.jobs.get(header.job_id)
        if job is None:
            raise NotFound(f"unknown job {header.job_id!r}")
        try:
            if job.secure_aggregation is not None:
                raise Rejected(f"job {job.id!r} aggregates securely: a plain upload would show the coordinator a "
                               "single update, so it is refused; the device takes part in SecureAggregate instead",
                               reason="secure_aggregation")
            return self._submit(job, header, update, size)
        except EdgeftError as exc:
            self.count_rejection(job.id, exc)
            raise

    def _submit(self, job: JobConfig, header: UploadHeader, update: AdapterUpdate, size: int) -> bool:
        with self._lock:
            with self.engine.begin() as conn:
                self._known_device(conn, header.device_id, job.id)
                job_row = conn.execute(select(jobs).where(jobs.c.id == job.id)).first()
                round_row = conn.execute(select(rounds).where(rounds.c.job_id == job.id,
                                                               rounds.c.number == header.round)).first()
                received = conn.execute(select(updates.c.upload_id).where(
                    updates.c.job_id == job.id, updates.c.round == header.round,
                    updates.c.device_id == header.device_id)).first()
            if received is not None:
                if received.upload_id == header.upload_id:
                    self.count_rejection(job.id, "duplicate", f"upload {header.upload_id!r} of {header.device_id} "
                                         f"for round {header.round} again; counted once")
                    return False
                raise Rejected(f"device {header.device_id} already delivered upload {received.upload_id!r} for round "
                               f"{header.round} of job {job.id!r}; a device counts once per round, so upload "
                               f"{header.upload_id!r} is refused", reason="second_update")
            if round_row is None or job_row.current_round != header.round:
                raise Rejected(f"round {header.round} of job {job.id!r} is not open (current round: "
                               f"{job_row.current_round}, status {job_row.status})", reason="round")
            if round_row.status != "open":
                raise Rejected(f"round {header.round} of job {job.id!r} is {round_row.status}; the update came late",
                               reason="late")
            if header.device_id not in round_row.selected:
                raise Rejected(f"device {header.device_id} was not selected for round {header.round}",
                               reason="not_selected")
            if now() > round_row.deadline:
                raise Rejected(f"round {header.round} of job {job.id!r} passed its deadline; the update came late",
                               reason="late")
            try:
                manifest = self.bundles[job.id].manifest
                if header.round == 0:  # the statistics round: class statistics, not an adapter
                    if update.n_examples > job.max_update_examples:
                        raise DataError(f"n_examples={update.n_examples} is over max_update_examples="
                                        f"{job.max_update_examples}", reason="n_examples")
                    check_statistics(update.tensors, len(manifest.labels), int(manifest.pooling["dimension"]),
                                     update.n_examples)
                else:
                    reference = self.global_adapter(job.id, header.round - 1)
                    bound = self._norm_bound(job, header.round - 1, reference)
                    rank = _update_rank(update, self.rank_bundles[job.id])
                    manifest = self._given_bundle(job.id, header.device_id, rank).manifest
                    reference = self._for_rank(job.id, rank, reference)
                    check_update(update, manifest, max_examples=job.max_update_examples, reference=reference,
                                 max_norm=bound)
            except DataError as exc:
                raise DataError(f"update from {header.device_id} refused: {exc}", reason=exc.reason) from exc
            blob = self.artifacts.put(encode(update.tensors))
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(updates).values(
                        job_id=job.id, round=header.round, device_id=header.device_id, upload_id=header.upload_id,
                        n_examples=update.n_examples, metrics=update.metrics, blob=blob, received_at=now(),
                        bytes=size))
            except IntegrityError:
                return False
            self._maybe_close(job, header.round)
        return True

    def _given_bundle(self, job_id: str, device_id: str, rank: int) -> Bundle:
        """The bundle a device of ``job_id`` was given at LoRA ``rank``: its engine's at the job's own rank."""
        if rank != max(self.rank_bundles[job_id]):
            return self.rank_bundles[job_id][rank]
        with self.engine.begin() as conn:
            capabilities = conn.execute(select(devices.c.capabilities).where(devices.c.id == device_id)).scalar_one()
        return self.engine_bundles[job_id][self._device_engine(job_id, capabilities)]

    def _norm_bound(self, job: JobConfig, version: int, reference: dict[str, np.ndarray]) -> float:
        """The bound on the L2 norm of an update's change from global adapter ``version`` (``reference``)."""
        if job.max_update_norm is not None:
            return job.max_update_norm
        key = (job.id, version)
        if key not in self._norms:
            self._norms[key] = update_norm(reference)
        return job.max_update_norm_ratio * self._norms[key]

    def count_rejection(self, job_id: str, error: EdgeftError | str, message: str = "") -> None:
        """Count a refused upload of ``job_id`` under its reason (an EdgeftError's ``reason``, else its class;
        or the reason given as a string); reason ``duplicate`` counts replays answered duplicate=true."""
        if isinstance(error, EdgeftError):
            reason, message = error.reason or type(error).__name__, str(error)
        else:
            reason = error
        with self._count_lock, self.engine.begin() as conn:
            counted = conn.execute(update(rejections)
                                   .where(rejections.c.job_id == job_id, rejections.c.reason == reason)
                                   .values(count=rejections.c.count + 1, last_message=message[:500], last_at=now()))
            if counted.rowcount == 0:
                conn.execute(insert(rejections).values(job_id=job_id, reason=reason, count=1,
                                                       last_message=message[:500], last_at=now()))

    def rejections(self, job_id: str) -> dict[str, int]:
        """Refused uploads of a job per reason (``duplicate``: replays counted once, not refused)."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(rejections.c.reason, rejections.c.count)
                                .where(rejections.c.job_id == job_id)).all()
        return {r.reason: r.count for r in sorted(rows)}

    def tick(self) -> None:
        """Close rounds whose deadline passed (or fail them below the minimum)."""
        with self._lock:
            with self.engine.begin() as conn:
                due = conn.execute(select(rounds).where(rounds.c.status == "open", rounds.c.deadline < now())).all()
            for row in due:
                job = self.jobs.get(row.job_id)
                if job is not None:
                    self._maybe_close(job, row.number, deadline_passed=True)
            for (job_id, number), secure in list(self._secure.items()):
                if secure.expired() and secure.server.phase != "advertise":  # the first phase: the round's deadline
                    self._secure_advance(self.jobs[job_id], number, secure)

    def _maybe_close(self, job: JobConfig, number: int, deadline_passed: bool = False) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(select(rounds).where(rounds.c.job_id == job.id, rounds.c.number == number)).first()
            count = conn.execute(select(func.count()).select_from(updates).where(
                updates.c.job_id == job.id, updates.c.round == number)).scalar_one()
        if row is None or row.status != "open":
            return
        if job.secure_aggregation is not None:  # closes when its protocol ends; the round's deadline ends phase 1
            if deadline_passed:
                secure = self._secure_round(job, row)
                if secure.server.phase == "advertise":  # later phases end at their own deadlines (tick)
                    self._secure_advance(job, number, secure)
            return
        if count < len(row.selected) and not deadline_passed:
            return
        if count < job.clients.min:
            self._fail_round(job, number, f"round {number} got {count} updates by its deadline, fewer than the "
                             f"minimum {job.clients.min}")
            return
        started = time.perf_counter()
        devices_in_order = []
        state, report = None, {}
        try:
            if number == 0:  # the statistics round: the head from the summed class statistics
                result, report = self._head_from_statistics(job)
            else:
                context = RoundContext(round=number, selected=len(row.selected),
                                       state=self.strategy_state(job.id, number - 1))
                strategy = self.strategies[job.id]
                if len(self.rank_bundles[job.id]) > 1:  # mixed ranks: the mean of the LoRA products, re-factorised
                    adapter = self.bundles[job.id].manifest.adapter
                    strategy = HeteroRankFedAvg(int(adapter["rank"]), float(adapter["alpha"]))
                aggregation = strategy.start(self.global_adapter(job.id, number - 1), context)
                for device_id, stored in self._iter_updates(job.id, number, with_device=True):
                    aggregation.add(stored)
                    devices_in_order.append(device_id)
                result, state, report = aggregation.result(), aggregation.state(), aggregation.report()
            blob = self.artifacts.put(encode(result))
        except EdgeftError as exc:  # e.g. too few updates for Krum: the round fails, the job stops, nothing leaks
            what = "its class statistics could not make a head" if number == 0 else \
                f"could not be aggregated with {job.strategy}"
            self._fail_round(job, number, f"round {number} {what}: {exc}")
            return
        if "krum_selected" in report:  # indices in the order the updates were added: name the devices
            report["krum_selected"] = [devices_in_order[i] for i in report["krum_selected"]]
        self._store_round(job, number, blob, state, report, started)

    def _fail_round(self, job: JobConfig, number: int, message: str) -> None:
        """Record that round ``number`` failed and why; the job stops (nothing else is written)."""
        log.error("job %s: %s", job.id, message)
        with self.engine.begin() as conn:
            conn.execute(update(rounds).where(rounds.c.job_id == job.id, rounds.c.number == number)
                         .values(status="failed", closed_at=now(), message=message[:2000]))
            conn.execute(update(jobs).where(jobs.c.id == job.id).values(status="failed", message=message[:2000]))

    def _store_round(self, job: JobConfig, number: int, blob: str, state: dict | None, report: dict,
                     started: float) -> None:
        """Write a closed round: the new global adapter, the strategy's state and report, the job's progress."""
        state_blob = self.artifacts.put(encode(state)) if state else None
        self.last_close_seconds = time.perf_counter() - started
        finished = number >= job.rounds
        with self.engine.begin() as conn:  # the new global adapter and the strategy's state, together
            conn.execute(insert(adapters).values(job_id=job.id, version=number, blob=blob, created_at=now()))
            conn.execute(insert(aggregations).values(job_id=job.id, round=number, state_blob=state_blob,
                                                     report=report, created_at=now()))
            conn.execute(update(rounds).where(rounds.c.job_id == job.id, rounds.c.number == number)
                         .values(status="closed", closed_at=now()))
            conn.execute(update(jobs).where(jobs.c.id == job.id).values(
                current_round=number + 1, status="finished" if finished else "running"))
        self._schedule_evaluation(job, number)

    def _head_from_statistics(self, job: JobConfig) -> tuple[dict[str, np.ndarray], dict]:
        """Round 0's result: the exported adapter (version -1) with the head the job's method builds from the
        sum of the stored class statistics (``edgeft.aggregate.statistics``), and a report."""
        initial = dict(self.global_adapter(job.id, -1))
        weight, bias = self.bundles[job.id].manifest.head()
        total = sum_statistics([u.tensors for u in self._iter_updates(job.id, 0)])
        options = job.head_init
        initial[weight], initial[bias], report = head_from_statistics(
            total, self.head_init[job.id], options.scale, options.ridge, initial[weight], initial[bias])
        return initial, report

    # -- secure aggregation rounds (see edgeft.server.secure) -------------------------------------------
    def _secure_round(self, job: JobConfig, row) -> SecureRound:  # noqa: ANN001
        """The protocol state of open round ``row``, set up on first use (under the lock)."""
        key = (job.id, row.number)
        if key not in self._secure:
            template = self.global_adapter(job.id, row.number - 1)
            self._secure[key] = SecureRound.open(job, row.number, list(row.selected), template, row.deadline)
        return self._secure[key]

    def secure_ring_dtype(self, job_id: str, number: int) -> np.dtype | None:
        """The ring element type of secure round ``number`` (None: no such secure round in progress)."""
        secure = self._secure.get((job_id, number))
        return secure.settings.codec.dtype if secure is not None else None

    def secure_step(self, header: SecAggHeader, step: object) -> object:
        """Take a device's message for the current phase of a secure round; returns the phase's answer for it
        when ready (else None: ask again with ``secure_answer``). SecAggError when the device's part in the
        round is over (the round aborted or failed, the device came too late)."""
        job = self.jobs.get(header.job_id)
        if job is None:
            raise NotFound(f"unknown job {header.job_id!r}")
        if job.secure_aggregation is None:
            raise Rejected(f"job {job.id!r} does not aggregate securely; upload the update with UploadUpdate")
        with self._lock:
            with self.engine.begin() as conn:
                self._known_device(conn, header.device_id, job.id)
                row = conn.execute(select(rounds).where(rounds.c.job_id == job.id,
                                                        rounds.c.number == header.round)).first()
            if row is None or row.status != "open":
                why = f": {row.message}" if row is not None and row.message else ""
                raise SecAggError(f"round {header.round} of job {job.id!r} is not open"
                                  f"{' (' + row.status + ')' if row is not None else ''}{why}", reason="round")
            if header.device_id not in row.selected:
                raise Rejected(f"device {header.device_id} was not selected for round {header.round}",
                               reason="not_selected")
            secure = self._secure_round(job, row)
            try:
                phase = secure.receive(step)
            except SecAggError as exc:
                self.count_rejection(job.id, exc)
                raise
            if secure.server.complete() and secure.server.phase == phase:
                self._secure_advance(job, header.round, secure)
            return self.secure_answer(header, phase)

    def secure_answer(self, header: SecAggHeader, phase: str) -> object:
        """The answer of ``phase`` for the device once the phase closed (None before)."""
        with self._lock:
            secure = self._secure.get((header.job_id, header.round))
            if secure is None:
                with self.engine.begin() as conn:
                    row = conn.execute(select(rounds).where(rounds.c.job_id == header.job_id,
                                                            rounds.c.number == header.round)).first()
                if row is not None and row.status == "closed" and phase == "unmask":
                    return "accepted: the round closed"
                reason = f" ({row.status}: {row.message})" if row is not None else ""
                raise SecAggError(f"round {header.round} of job {header.job_id!r} has no secure aggregation in "
                                  f"progress{reason}", reason="round")
            return secure.answer(phase, header.device_id)

    def _secure_advance(self, job: JobConfig, number: int, secure: SecureRound) -> None:
        """Close the current phase of a secure round; on the last one, aggregate and close the round; below
        the threshold, fail the round (nothing unmasked, nothing stored but the reason)."""
        phase = secure.server.phase
        try:
            answer = secure.server.advance()
        except SecAggError as exc:
            self._secure.pop((job.id, number), None)
            self._fail_round(job, number, f"round {number}: {exc}")
            return
        secure.deadline = time.time() + job.secure_aggregation.phase_timeout_s
        if phase != "unmask":
            secure.answers[phase] = answer
            return
        self._secure.pop((job.id, number), None)
        self._secure_close(job, number, secure, answer)

    def _secure_close(self, job: JobConfig, number: int, secure: SecureRound, total: np.ndarray) -> None:
        """Decode the unmasked sum into the summed delta and hand it to the job's strategy; store the round."""
        started = time.perf_counter()
        server, settings = secure.server, secure.settings
        try:
            with self.engine.begin() as conn:
                selected = conn.execute(select(rounds.c.selected).where(
                    rounds.c.job_id == job.id, rounds.c.number == number)).scalar_one()
            template = self.global_adapter(job.id, number - 1)
            summed, weight = decode_sum(total, settings, template)
            context = RoundContext(round=number, selected=len(selected), state=self.strategy_state(job.id, number - 1))
            aggregation = self.strategies[job.id].start_secure(template, context)
            aggregation.add_sum(summed, float(weight), len(server.u3))
            blob = self.artifacts.put(encode(aggregation.result()))
        except EdgeftError as exc:
            self._fail_round(job, number, f"round {number}: the unmasked sum could not be aggregated: {exc}")
            return
        report = aggregation.report()
        report["secure_aggregation"] = {
            "selected": len(selected), "threshold": settings.threshold, "advertised": len(server.u1),
            "shared_keys": len(server.u2), "survivors": list(server.u3), "dropped_after_sharing":
                sorted(set(server.u2) - set(server.u3)), "bits": settings.bits, "clip": settings.clip,
            "ring_bits": settings.ring_bits, "step": settings.codec.step, "total_weight": weight}
        self._store_round(job, number, blob, aggregation.state(), report, started)

    def wait_until_finished(self, timeout: float) -> None:
        """Block until every job has finished or failed and its evaluations are stored (for scripts and tests)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.tick()
            with self.engine.begin() as conn:
                running = conn.execute(select(jobs.c.id).where(jobs.c.status == "running")).first()
            if not running and all(f.done() for f in self._pending):
                return
            time.sleep(0.2)
        raise TimeoutError("jobs still running")

    # -- evaluation and records ----------------------------------------------------------------------
    def _schedule_evaluation(self, job: JobConfig, version: int) -> None:
        if job.eval_data is not None:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._evaluator.submit(self._evaluate, job, version))

    def _evaluate(self, job: JobConfig, version: int) -> None:
        """Evaluate the global adapter after round ``version`` on the job's held-out data; store the metrics."""
        from edgeft.data import load_dataset
        from edgeft.train.trainer import evaluate, pad_id_of

        bundle = self.bundles[job.id]
        try:
            if job.id not in self._eval_sets:
                self._eval_sets[job.id] = load_dataset(job.eval_data, bundle)
            session = open_session(bundle, threads=job.train.threads)
            session.set_parameters(self.global_adapter(job.id, version))
            started = time.perf_counter()
            metrics = evaluate(session, self._eval_sets[job.id], bundle.manifest.task, pad_id_of(bundle))
            metrics["eval_seconds"] = round(time.perf_counter() - started, 2)
        except Exception as exc:  # an evaluation failure is recorded, never fatal to the job
            log.error("evaluation of job %s after round %d failed: %s", job.id, version, exc)
            metrics = {"error": f"{type(exc).__name__}: {exc}"}
        with self.engine.begin() as conn:
            if conn.execute(select(evaluations.c.round).where(evaluations.c.job_id == job.id,
                                                              evaluations.c.round == version)).first() is None:
                conn.execute(insert(evaluations).values(job_id=job.id, round=version, metrics=metrics,
                                                        created_at=now()))

    def record_download(self, job_id: str, number: int, device_id: str, size: int) -> None:
        """Count a task's bytes sent to a device (once per device and round)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(downloads).values(job_id=job_id, round=number, device_id=device_id, bytes=size,
                                                      sent_at=now()))
        except IntegrityError:
            pass

    def history(self, job_id: str) -> dict:
        """Everything recorded about a job, per round: status and wall time, the evaluation of the global
        adapter, per client its examples, training metrics and bytes up and down, and what the strategy
        reported (``aggregation``; with differential privacy ``privacy``: epsilon for the round and cumulative
        at delta). The job's ``privacy`` is the cumulative (epsilon, delta) spent so far (None without DP)."""
        status = self.job_status(job_id)
        with self.engine.begin() as conn:
            round_rows = conn.execute(select(rounds).where(rounds.c.job_id == job_id).order_by(rounds.c.number)).all()
            evals = {r.round: r.metrics for r in conn.execute(select(evaluations).where(evaluations.c.job_id == job_id))}
            ups = conn.execute(select(updates.c.round, updates.c.device_id, updates.c.n_examples, updates.c.metrics,
                                      updates.c.bytes).where(updates.c.job_id == job_id)).all()
            downs = {(r.round, r.device_id): r.bytes
                     for r in conn.execute(select(downloads).where(downloads.c.job_id == job_id))}
            reports = {r.round: r.report for r in conn.execute(
                select(aggregations.c.round, aggregations.c.report).where(aggregations.c.job_id == job_id))}
        refused = self.rejections(job_id)
        job = self.jobs.get(job_id)
        history = {"job": job_id, "status": status["status"], "message": status["message"],
                   "strategy": job.strategy if job else None, "privacy": None,
                   "duplicates": refused.pop("duplicate", 0), "rejections": refused,
                   "head_init": self.head_init.get(job_id),
                   "rounds": [] if any(r.number == 0 for r in round_rows) else
                   [{"round": 0, "status": "initial", "evaluation": evals.get(0), "clients": []}]}
        for row in round_rows:
            clients = [{"device_id": u.device_id, "n_examples": u.n_examples, "metrics": u.metrics,
                        "bytes_up": u.bytes, "bytes_down": downs.get((row.number, u.device_id), 0)}
                       for u in ups if u.round == row.number]
            history["rounds"].append({
                "round": row.number, "status": row.status, "message": row.message, "selected": list(row.selected),
                "seconds": round(row.closed_at - row.opened_at, 2) if row.closed_at else None,
                "evaluation": evals.get(row.number), "clients": sorted(clients, key=lambda c: c["device_id"]),
                "aggregation": reports.get(row.number), "privacy": (reports.get(row.number) or {}).get("privacy")})
            if history["rounds"][-1]["privacy"]:  # the job's privacy spent so far: the latest cumulative figure
                spent = history["rounds"][-1]["privacy"]
                history["privacy"] = {"epsilon": spent["epsilon_cumulative"], "delta": spent["delta"],
                                      "rounds": spent["rounds_accounted"]}
        return history
