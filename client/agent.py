"""The device agent: register, fetch the bundle once, train each round on local data, upload the update.

Never imports torch. Network trouble (coordinator restarting, connection refused, timeouts, the
coordinator's concurrent-call limit) is retried with exponential backoff; a refusal that retrying cannot
fix (bad data, unknown job, a refused token or certificate) stops the agent with a message that says what
to do. Every call has a deadline (``call_timeout_s``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc

from edgeft.bundle import MANIFEST, Bundle, check_bundle, load_bundle, member_name, sha256_of
from edgeft.client.transport import Transport, connection_hint, open_channel
from edgeft.data import DataConfig, Dataset, Encoder, load_dataset
from edgeft.errors import BundleError, ConfigError, CoordinatorError, SecAggError
from edgeft.train.engines import available_engines, open_session, runtime_version
from edgeft.train.trainer import train
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.v1 import edgeft_pb2_grpc as pb_grpc
from edgeft.wire import (SecAggHeader, UploadHeader, secagg_request_to_pb, secagg_response_from_pb,
                         secagg_settings_from_pb, tensor_from_pb, train_config, update_to_parts)

log = logging.getLogger("edgeft.client")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED}
HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "the coordinator did not accept this device's enrolment token; get a valid "
                                     "token for the job from its operator (`edgeft server token create --job JOB`) "
                                     "and pass it with --token-file FILE or EDGEFT_TOKEN",
    grpc.StatusCode.PERMISSION_DENIED: "the enrolment token is valid but not for this; a token enrols a device in "
                                       "one job (run one agent per job)",
}
TLS_REFUSALS_BEFORE_STOP = 3  # connections closed during set-up in a row before the agent stops


@dataclass(frozen=True)
class AgentConfig:
    """Where the coordinator is, where the device's data and cache are, how patient to be."""

    server: str
    data: Path
    cache_dir: Path = Path(".edgeft-device")
    # Override the job's data schema (which columns hold text and label, the file format).
    text_column: str | None = None
    label_column: str | None = None
    format: str | None = None
    threads: int | None = None
    poll_wait_s: int = 5
    max_backoff_s: float = 30.0
    give_up_after_s: float = 600.0  # stop when the coordinator stays unreachable this long
    call_timeout_s: float = 120.0
    # Share the machine with other agents (a simulated fleet): at most ``training_slots[1]`` of the agents
    # given the same folder train at once; the others wait their turn. None: train whenever a task comes.
    training_slots: tuple[Path, int] | None = None
    # The largest LoRA rank this device trains (less memory: a smaller rank); the coordinator serves the
    # largest rank of the job up to it. None: the job's rank.
    max_lora_rank: int | None = None
    # The execution provider the device trains on (cpu, cuda, coreml, qnn, openvino... or a full provider name;
    # ``edgeft.predict.choose_provider``). None: CPU. Portable bundles train on any provider the runtime offers.
    provider: str | None = None
    # TLS or plaintext, the enrolment token, message limits and keepalive.
    transport: Transport = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ConfigError(f"invalid max_lora_rank={self.max_lora_rank}: a LoRA rank is at least 1")


@dataclass
class Agent:
    config: AgentConfig
    device_id: str = ""
    rounds_done: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        self.channel = open_channel(self.config.server, self.config.transport)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        id_file = self.config.cache_dir / "device_id"
        self.device_id = self.device_id or (id_file.read_text().strip() if id_file.is_file() else "")
        self._data: dict[str, Dataset] = {}
        self._announced: set[str] = set()  # bundles whose engine, provider and runtime were logged
        self._got_through = False  # a call of this agent succeeded: its transport settings work

    # -- the one edge where grpc errors become edgeft errors or retries -----------------------------
    def _call(self, what: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        delay, started, closed = 0.5, time.monotonic(), 0
        while True:
            try:
                result = fn(*args, timeout=self.config.call_timeout_s, **kwargs)
                self._got_through = True
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRYABLE:
                    raise self._refusal(what, exc) from exc
                hint = connection_hint(exc.details(), self.config.transport) if code == grpc.StatusCode.UNAVAILABLE \
                    else None
                # "Socket closed" also ends the calls in flight when a coordinator goes down (a crash, a restart):
                # only an agent that never got through reads it as a TLS refusal and stops
                closed = closed + 1 if hint is not None and (hint[1] or not self._got_through) else 0
                if hint is not None and (hint[1] or closed >= TLS_REFUSALS_BEFORE_STOP):
                    raise CoordinatorError(f"{what}: cannot connect to {self.config.server}: {hint[0]} "
                                           f"({exc.details()})") from exc
                if time.monotonic() - started > self.config.give_up_after_s:
                    raise CoordinatorError(f"coordinator {self.config.server} unreachable for "
                                           f"{self.config.give_up_after_s:.0f} s ({exc.details()}); check the "
                                           "address and that `edgeft server` runs") from exc
                log.warning("%s: %s (%s); retrying in %.1f s", what, code.name, exc.details(), delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.config.max_backoff_s)

    def _refusal(self, what: str, exc: grpc.RpcError) -> CoordinatorError:
        """The error for a refusal that retrying will not fix, with what to do about it."""
        code = exc.code()
        hint = f"; {HINTS[code]}" if code in HINTS else ""
        return CoordinatorError(f"{what} refused by {self.config.server}: {code.name}: {exc.details()}{hint}")

    # -- protocol steps ------------------------------------------------------------------------------
    def register(self) -> str:
        caps = pb.Capabilities(os=f"{platform.system()} {platform.release()}", cores=os.cpu_count() or 1,
                               ram_bytes=_ram_bytes(), free_disk_bytes=shutil.disk_usage(self.config.cache_dir).free,
                               ort_version=runtime_version(), execution_providers=_providers(),
                               max_lora_rank=self.config.max_lora_rank or 0, engines=available_engines())
        reply = self._call("register", self.stub.Register,
                           pb.RegisterRequest(device_id=self.device_id, capabilities=caps))
        self.device_id = reply.device_id
        (self.config.cache_dir / "device_id").write_text(self.device_id)
        return self.device_id

    def fetch_bundle(self, digest: str) -> Bundle:
        """The bundle from the cache, or downloaded (resuming partial files), verified against its manifest and
        checked (``check_bundle``: onnx.checker, external data inside the bundle) before it is cached."""
        target = self.config.cache_dir / "bundles" / digest
        if target.is_dir():
            try:
                return load_bundle(target)
            except BundleError as exc:
                log.warning("cached bundle %s is damaged (%s); downloading it again", digest[:12], exc)
                shutil.rmtree(target)
        info = self._call("get bundle", self.stub.GetBundle, pb.GetBundleRequest(bundle_digest=digest))
        partial = self.config.cache_dir / "partial" / digest
        partial.mkdir(parents=True, exist_ok=True)
        if hashlib.sha256(info.manifest_json).hexdigest() != digest:
            shutil.rmtree(partial)
            raise BundleError(f"the coordinator sent a manifest whose digest is not {digest[:12]}...")
        for spec in info.files:
            (partial / member_name(spec.name)).parent.mkdir(parents=True, exist_ok=True)  # never outside partial/
            self._download(digest, spec, partial / spec.name)
        (partial / MANIFEST).write_bytes(info.manifest_json)
        try:
            check_bundle(load_bundle(partial))  # every file against the manifest, then the ONNX files
        except BundleError:
            shutil.rmtree(partial)
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
        return load_bundle(target, verify=False)

    def _download(self, digest: str, spec: pb.BundleFile, path: Path) -> None:
        for _ in range(10):
            offset = path.stat().st_size if path.exists() else 0
            if offset == spec.size and sha256_of(path) == spec.sha256:
                return
            if offset >= spec.size:
                path.unlink()
                offset = 0
            try:
                with open(path, "ab") as fh:
                    for chunk in self.stub.DownloadBundle(pb.DownloadRequest(bundle_digest=digest, file=spec.name,
                                                                             offset=offset),
                                                          timeout=self.config.call_timeout_s):
                        if chunk.offset != fh.tell() or hashlib.sha256(chunk.data).hexdigest() != chunk.chunk_sha256:
                            raise BundleError(f"chunk of {spec.name} at offset {chunk.offset} is corrupt")
                        fh.write(chunk.data)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise self._refusal(f"download of {spec.name}", exc) from exc
                log.warning("download of %s interrupted at %d bytes (%s); resuming", spec.name, path.stat().st_size,
                            exc.code().name)
                time.sleep(1)
            except BundleError as exc:
                log.warning("%s; downloading %s again", exc, spec.name)
                path.unlink(missing_ok=True)
        raise BundleError(f"could not download {spec.name} intact after 10 attempts")

    def run_task(self, task: pb.Task) -> AdapterUpdate:
        bundle = self.fetch_bundle(task.bundle_digest)
        if task.bundle_digest not in self._data:
            self._data[task.bundle_digest] = load_dataset(self.data_config(task.data), bundle, Encoder(bundle))
        session = open_session(bundle, threads=self.config.threads, provider=self.config.provider)
        if bundle.digest not in self._announced:
            self._announced.add(bundle.digest)
            log.info("bundle %s...: training on the %s engine, execution provider %s (onnxruntime %s)",
                     bundle.digest[:12], session.engine, session.provider, runtime_version())
        session.set_parameters(dict(tensor_from_pb(t) for t in task.global_adapter))
        if task.kind == pb.STATISTICS:  # round 0 of a job with a head init: sums, no training
            from edgeft.train.trainer import class_statistics, pad_id_of

            tensors, n = class_statistics(session, self._data[task.bundle_digest], len(bundle.manifest.labels),
                                          pad_id_of(bundle))
            return AdapterUpdate(tensors, n, {}, bundle.digest)
        config = train_config(task.train, threads=self.config.threads, provider=self.config.provider,
                              progress=False)
        result = train(bundle, self._data[task.bundle_digest], config, session=session)
        return AdapterUpdate(result.parameters, result.n_examples, result.final_metrics, bundle.digest)

    def data_config(self, schema: pb.DataSchema) -> DataConfig:
        """The device's file read with the job's schema, unless the device overrides it."""
        c = self.config
        return DataConfig(c.data, text_column=c.text_column or schema.text_column or "text",
                          label_column=c.label_column or schema.label_column or "label",
                          format=c.format or schema.format or None)

    def upload(self, task: pb.Task, update: AdapterUpdate) -> pb.UploadResponse:
        header = UploadHeader(task.job_id, task.round, self.device_id, f"{self.device_id}:{task.job_id}:{task.round}")
        dtype = "float16" if task.upload_dtype == pb.FLOAT16 and task.kind == pb.TRAIN else "float32"
        return self._call("upload", lambda **kw: self.stub.UploadUpdate(update_to_parts(header, update, dtype), **kw))

    def secure_upload(self, task: pb.Task, update: AdapterUpdate) -> str:
        """Take part in a secure aggregation round with ``update`` (edgeft.secagg): the coordinator gets only a
        masked, fixed-point encoded delta and, with the other devices, learns just the sum. Returns the
        coordinator's last word; SecAggError when the round aborted or went on without this device."""
        from edgeft.secagg import SecAggClient
        from edgeft.secagg.updates import encode_update, round_context

        settings = secagg_settings_from_pb(task.secure_aggregation)
        global_adapter = dict(tensor_from_pb(t) for t in task.global_adapter)
        vector, facts = encode_update(update.tensors, update.n_examples, global_adapter, settings)
        if facts.get("values_clipped"):
            log.info("round %d: %d values of the update's delta lie outside the secure aggregation range "
                     "+-%g and were clipped", task.round, int(facts["values_clipped"]), settings.clip)
        client = SecAggClient(self.device_id, round_context(task.job_id, task.round))
        header = SecAggHeader(task.job_id, task.round, self.device_id)
        roster = self._secure_call(header, client.advertise(), "roster")
        inbox = self._secure_call(header, client.share_keys(roster), "inbox")
        survivors = self._secure_call(header, client.masked_input(inbox, vector), "survivors")
        return self._secure_call(header, client.unmask(survivors), "accepted")

    def _secure_call(self, header: SecAggHeader, step: object, expect: str):  # noqa: ANN202
        """Send this phase's message until its answer comes (the coordinator counts a resend once)."""
        request = secagg_request_to_pb(header, step, wait_seconds=self.config.poll_wait_s)
        while True:
            kind, value = secagg_response_from_pb(self._call("secure aggregation", self.stub.SecureAggregate, request))
            if kind == expect:
                return value
            if kind == "aborted":
                raise SecAggError(f"secure aggregation of round {header.round}: {value}", reason="aborted")
            if kind != "retry_after_seconds":
                raise SecAggError(f"the coordinator answered {kind} where {expect} was due", reason="phase")
            time.sleep(max(int(value), 0) * 0.2)

    def run(self) -> str:
        """Serve until the job of this agent's token is over; returns the coordinator's final word."""
        self.register()  # a known device id is kept; its capabilities are refreshed
        while True:
            reply = self._call("poll", self.stub.PollTask,
                               pb.PollTaskRequest(device_id=self.device_id, wait_seconds=self.config.poll_wait_s))
            outcome = reply.WhichOneof("outcome")
            if outcome == "finished":
                log.info("coordinator says: %s", reply.finished)
                return reply.finished
            if outcome == "task":
                task = reply.task
                with training_slot(self.config.training_slots):
                    log.info("round %d of job %s: %s", task.round, task.job_id,
                             "class statistics" if task.kind == pb.STATISTICS else "training")
                    update = self.run_task(task)
                try:
                    if task.HasField("secure_aggregation"):
                        message = self.secure_upload(task, update)
                    else:
                        message = self.upload(task, update).message
                    log.info("round %d of job %s: update %s", task.round, task.job_id, message)
                except (CoordinatorError, SecAggError) as exc:
                    log.warning("round %d of job %s: update refused: %s", task.round, task.job_id, exc)
                self.rounds_done.append((task.job_id, task.round))
                continue
            time.sleep(max(reply.retry_after_seconds, 0) * 0.5)


@contextmanager
def training_slot(slots: tuple[Path, int] | None) -> Iterator[None]:
    """Hold one of ``slots[1]`` lock files in folder ``slots[0]`` (advisory file locks, released by the OS
    if the process dies) while the block runs; no-op for None."""
    if slots is None:
        yield
        return
    import fcntl

    folder, count = slots
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            fh = open(folder / f"slot-{index}.lock", "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        time.sleep(0.2)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())
