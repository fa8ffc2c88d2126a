"""A coordinator's jobs before and beside their rounds: the bundles each job serves (its own, smaller LoRA ranks,
other training engines), exported or stored once when the coordinator starts or resumes, and which bundle a
device gets.

Runs once before serving (``JobBundles.start``); afterwards only its lookups are used.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgeft.aggregate.lora_ranks import adapter_rank, check_engine_bundle, check_rank_bundle, lora_pairs, truncate
from edgeft.bundle import Bundle, Manifest, load_bundle
from edgeft.config import ENGINES
from edgeft.errors import BundleError, ConfigError, DataError, Rejected, StateError
from edgeft.server.artifacts import Artifacts
from edgeft.server.config import DEFAULT_HEAD_INIT, JobConfig, ServerConfig
from edgeft.server.state import State
from edgeft.train.engines import open_session
from edgeft.update import AdapterUpdate, update_norm

log = logging.getLogger("edgeft.server")

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


@dataclass
class Started:
    """What a job needs once its bundles are in place: global adapter versions to evaluate, open rounds to go
    on with (a resumed job)."""

    evaluate: list[int] = field(default_factory=list)
    open_rounds: list[int] = field(default_factory=list)


class JobBundles:
    """Every job's bundles by LoRA rank and by training engine, and its statistics round's head method."""

    def __init__(self, config: ServerConfig, artifacts: Artifacts, state: State):
        self.config, self.artifacts, self.state = config, artifacts, state
        # every job's bundles by LoRA rank, its own (the largest) included; more than one: mixed ranks (the key
        # of a bundle whose adapter is not LoRA is 0)
        self.rank_bundles: dict[str, dict[int, Bundle]] = {}
        # every job's bundles at its own rank by training engine, in its order of preference, its own bundle among
        # them; more than one: devices get the first engine they run (several engines never go with mixed ranks)
        self.engine_bundles: dict[str, dict[str, Bundle]] = {}
        self.head_init: dict[str, str] = {}  # per job: its statistics round's head method, or "none"

    @property
    def bundles(self) -> dict[str, Bundle]:
        """Every job's own bundle (its largest LoRA rank)."""
        return {job_id: served[max(served)] for job_id, served in self.rank_bundles.items()}

    def served_bundles(self, job_id: str) -> dict[str, Bundle]:
        """Every bundle job ``job_id`` serves to devices (its LoRA ranks and its engines), by digest."""
        served = [*self.rank_bundles.get(job_id, {}).values(), *self.engine_bundles.get(job_id, {}).values()]
        return {bundle.digest: bundle for bundle in served}

    # -- start and resume ---------------------------------------------------------------------------
    def start(self, job: JobConfig, check: Callable[[Manifest], None]) -> Started:
        """Put a job's bundles in place: a new job's exported or given, a resumed job's from the state.
        ``check`` refuses a bundle the job's strategy cannot train (before anything of a new job is stored)."""
        row = self.state.job(job.id)
        if row is not None:
            started = self._resume(job, row)
            check(self.bundles[job.id].manifest)
            return started
        bundle = self.artifacts.add_bundle(job.bundle if job.bundle is not None else self._export(job))
        self._check_base_model(job, bundle)
        check(bundle.manifest)
        # the statistics round does not run under secure aggregation yet: the head starts as exported
        self.head_init[job.id] = method = ("none" if job.secure_aggregation is not None or job.mode == "async"
                                           else job.head_init.resolve(bundle.manifest))
        initial = open_session(bundle, threads=1).get_parameters()
        if job.max_update_norm is None and update_norm(initial) == 0:
            raise ConfigError(f"job {job.id!r}: its initial adapter is all zeros, so max_update_norm_ratio has no "
                              "scale; set [job] max_update_norm (an absolute bound on an update's L2 norm)")
        blob = self.artifacts.put_tensors(initial)
        smaller = self._add_rank_bundles(job, bundle)
        engines = self._add_engine_bundles(job, bundle)
        # with a head init, round 0 is the statistics round: the exported adapter is version -1 and the
        # statistics-built head makes version 0, which round 1 trains from
        first = 0 if method != "none" else 1
        length = job.asynchronous.rounds if job.asynchronous is not None else job.rounds  # versions to make
        if not self.state.create_job(job.id, bundle.digest, length, first, blob,
                                     {rank: b.digest for rank, b in smaller.items()},
                                     {engine: b.digest for engine, b in engines.items()}):
            return self._resume(job, self.state.job(job.id))  # another coordinator process created it meanwhile
        self.rank_bundles[job.id] = {adapter_rank(bundle.manifest): bundle, **smaller}
        self.engine_bundles[job.id] = engines
        return Started(evaluate=[0] if first == 1 else [])

    def _resume(self, job: JobConfig, row) -> Started:  # noqa: ANN001
        """After a restart: check the stored state the job goes on from (bundle files, the latest global
        adapter, the open round's updates; StateError when corrupt), refuse a configured bundle or model for
        another base model; say what to evaluate and which rounds were open."""
        try:
            bundle = self.artifacts.bundle(row.bundle_digest, verify=True)
            self.rank_bundles[job.id] = {adapter_rank(bundle.manifest): bundle, **{
                rank: self.artifacts.bundle(digest, verify=True) for rank, digest in self.state.rank_bundles(job.id).items()}}
            self.engine_bundles[job.id] = {engine: bundle if digest == bundle.digest else
                                           self.artifacts.bundle(digest, verify=True)
                                           for engine, digest in self.state.engines(job.id).items()} or {
                bundle.manifest.engine: bundle}
            for blob in self.state.resume_blobs(job.id):
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
        versions = self.state.adapter_versions(job.id)
        statistics_round = -1 in versions
        method = job.head_init.resolve(bundle.manifest) if statistics_round else "none"
        if statistics_round and method == "none":
            log.warning("job %s started with a statistics round; head_init 'none' does not undo it: %s builds the "
                        "head", job.id, DEFAULT_HEAD_INIT)
            method = DEFAULT_HEAD_INIT
        self.head_init[job.id] = method
        # -1: the exported head a statistics round replaced
        return Started(evaluate=sorted(set(versions) - self.state.evaluated(job.id) - {-1}),
                       open_rounds=[r.number for r in self.state.open_rounds(job.id)])

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
        return self._add_bundles(job, bundle, sources, check_rank_bundle, {},
                                 "two device bundles have LoRA rank {key}; give one per rank")

    def _add_engine_bundles(self, job: JobConfig, bundle: Bundle) -> dict[str, Bundle]:
        """The job's bundles at its own rank by training engine, in the order of preference its configuration
        gives, ``bundle`` (its own) among them: exported from job.model for each of job.engines, or
        job.engine_bundles; each stored and checked against ``bundle`` (``check_engine_bundle``)."""
        if job.model is not None:
            sources = [self._export(job, engine=e) for e in job.engines if e != bundle.manifest.engine]
        else:
            sources = list(job.engine_bundles)
        out = self._add_bundles(job, bundle, sources, check_engine_bundle, {bundle.manifest.engine: bundle},
                                "two bundles are for the {key!r} engine; give one per engine")
        order = list(job.engines) or list(out)
        if set(order) != set(out):
            raise ConfigError(f"job {job.id!r}: job.engines={order}, but the job's bundles are for {list(out)} (its "
                              f"own bundle for {bundle.manifest.engine!r}): list the engines of bundle and "
                              "engine_bundles")
        return {engine: out[engine] for engine in order}

    def _add_bundles(self, job: JobConfig, bundle: Bundle, sources: list, check, out: dict,  # noqa: ANN001
                     duplicate: str) -> dict:
        """Store each source bundle and key it by ``check(bundle.manifest, its manifest)`` (which raises ConfigError
        when it does not fit the job's own bundle) into ``out``; two with one key are refused (``duplicate``)."""
        for source in sources:
            other = self.artifacts.add_bundle(source)
            try:
                key = check(bundle.manifest, other.manifest)
            except ConfigError as exc:
                raise ConfigError(f"job {job.id!r}: {source}: {exc}") from exc
            if key in out:
                raise ConfigError(f"job {job.id!r}: " + duplicate.format(key=key))
            out[key] = other
        return out

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
        self.state.set_engines(job.id, {engine: b.digest for engine, b in engines.items()})
        log.info("job %s now serves the training engines %s (it served %s)", job.id, list(engines),
                 list(self.engine_bundles[job.id]))
        self.engine_bundles[job.id] = engines

    # -- which bundle a device trains -----------------------------------------------------------------
    def device_engine(self, job_id: str, capabilities: dict) -> str:
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

    def device_bundle(self, job_id: str, capabilities: dict) -> tuple[int, Bundle]:
        """(LoRA rank, bundle) a device trains in a job: the bundle of the engine it runs (``device_engine``)
        at the largest rank it asks for (``device_rank``); refused when there is none."""
        engine = self.device_engine(job_id, capabilities)
        rank = self.device_rank(job_id, capabilities)
        if rank == max(self.rank_bundles[job_id]):
            return rank, self.engine_bundles[job_id][engine]
        return rank, self.rank_bundles[job_id][rank]  # mixed ranks: one engine, the job's own

    def device_rank(self, job_id: str, capabilities: dict) -> int:
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

    def given_bundle(self, job_id: str, capabilities: dict, rank: int) -> Bundle:
        """The bundle a device of ``job_id`` was given at LoRA ``rank``: its engine's at the job's own rank."""
        if rank != max(self.rank_bundles[job_id]):
            return self.rank_bundles[job_id][rank]
        return self.engine_bundles[job_id][self.device_engine(job_id, capabilities)]

    def one_bundle(self, job_id: str) -> Bundle | None:
        """The job's bundle when it serves one (one training engine, one LoRA rank): every device trains it, whatever
        its capabilities; None when a device's capabilities choose among several."""
        ranks, engines = self.rank_bundles[job_id], self.engine_bundles[job_id]
        return next(iter(engines.values())) if len(ranks) == 1 and len(engines) == 1 else None

    def update_rank(self, job_id: str, update: AdapterUpdate) -> int:
        """The LoRA rank an update was trained at (the rows of its first LoRA A), one of the ranks the job
        serves; DataError (reason shape) otherwise."""
        served = self.rank_bundles[job_id]
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

    def for_rank(self, job_id: str, rank: int, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A global adapter as a rank-``rank`` device trains from it (``lora_ranks.truncate``)."""
        served = self.rank_bundles[job_id]
        if rank == max(served):
            return adapter
        own, theirs = served[max(served)].manifest.adapter, served[rank].manifest.adapter
        return truncate(adapter, rank, float(own["scale"]), float(theirs["scale"]))
