"""The device agent: register, fetch the bundle once, train each round on local data, upload the update.

Never imports torch, and never builds or reads a protobuf message: it speaks in ``edgeft.wire``'s dataclasses
and functions. Network trouble (coordinator restarting, connection refused, timeouts, the coordinator's
concurrent-call limit) is retried with exponential backoff; a refusal that retrying cannot fix (bad data,
unknown job, a refused token or certificate) stops the agent with a message that says what to do. Every call
has a deadline (``call_timeout_s``).

Each task carries its round's deadline: training stops at a step boundary ``deadline_margin_s`` before it,
leaving time to upload, and nothing is sent for a round whose deadline passed (the coordinator would refuse the
update); either is logged. Test tooling changes the updates through the ``tamper`` hook, never by patching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import grpc
import numpy as np

from edgeft.bundle import MANIFEST, Bundle, check_bundle, load_bundle, member_name, sha256_of
from edgeft.client.device import capabilities, training_slot
from edgeft.client.transport import RETRYABLE, Transport, connection_hint, open_channel, retryable
from edgeft.data import DataConfig, Dataset, load_dataset
from edgeft.errors import BundleError, ConfigError, CoordinatorError, SecAggError
from edgeft.train.engines import open_session, runtime_version
from edgeft.train.trainer import plan_steps, train
from edgeft.update import AdapterUpdate
from edgeft.wire import (BundleFile, DataSchema, DownloadRequest, Finished, PollRequest, Registration, SecAggHeader,
                         Task, UploadHeader, UploadReceipt, bundle_chunk_from_pb, bundle_info_from_pb,
                         bundle_request_to_pb, coordinator_stub, download_request_to_pb, poll_request_to_pb,
                         poll_response_from_pb, registered_from_pb, registration_to_pb, secagg_request_to_pb,
                         secagg_response_from_pb, task_update_parts, upload_receipt_from_pb)

log = logging.getLogger("edgeft.client")
HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "the coordinator did not accept this device's enrolment token; get a valid "
                                     "token for the job from its operator (`edgeft server token create --job JOB`) "
                                     "and pass it with --token-file FILE or EDGEFT_TOKEN",
    grpc.StatusCode.PERMISSION_DENIED: "the enrolment token is valid but not for this; a token enrols a device in "
                                       "one job (run one agent per job)",
}
TLS_REFUSALS_BEFORE_STOP = 3  # connections closed during set-up in a row before the agent stops
# Test tooling's hook (edgeft.testing.byzantine): the tensors to send instead of an update's, given the task
Tamper = Callable[[dict[str, np.ndarray], Task], dict[str, np.ndarray]]


class Conditions(Protocol):
    """Test tooling's hook for a simulated device (edgeft.testing.fleet_profile): when it is online, whether it
    drops a task (never uploading it), and what it does after training (a slow device waits)."""

    def seconds_until_online(self) -> float: ...

    def drops(self) -> bool: ...

    def after_training(self, trained_s: float) -> None: ...


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
    image_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
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
    # Training stops at a step boundary once the round's deadline is this close, to leave time for the upload.
    deadline_margin_s: float = 5.0
    # TLS or plaintext, the enrolment token, message limits and keepalive.
    transport: Transport = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ConfigError(f"invalid max_lora_rank={self.max_lora_rank}: a LoRA rank is at least 1")
        if self.deadline_margin_s < 0:
            raise ConfigError(f"invalid deadline_margin_s={self.deadline_margin_s}: must be >= 0")


@dataclass
class Agent:
    """A device agent for the job of its enrolment token (``run``). ``tamper``: TEST TOOLING ONLY (Byzantine
    clients of simulated fleets): called with every update's tensors and its task just before sending, returns
    the tensors to send instead. ``conditions``: TEST TOOLING ONLY (simulated fleets), see ``Conditions``; a
    dropped task is recorded in ``rounds_dropped``. ``rounds_done``: the (job, round) it sent an update for (or
    tried to); ``rounds_missed``: those it sent nothing for because their deadline passed."""

    config: AgentConfig
    device_id: str = ""
    rounds_done: list[tuple[str, int]] = field(default_factory=list)
    tamper: Tamper | None = None
    rounds_missed: list[tuple[str, int]] = field(default_factory=list)
    conditions: Conditions | None = None
    rounds_dropped: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        self.channel = open_channel(self.config.server, self.config.transport)
        self.stub = coordinator_stub(self.channel)
        id_file = self.config.cache_dir / "device_id"
        self.device_id = self.device_id or (id_file.read_text().strip() if id_file.is_file() else "")
        self._data: dict[str, Dataset] = {}
        self._announced: set[str] = set()  # bundles whose engine, provider and runtime were logged
        self._got_through = False  # a call of this agent succeeded: its transport settings work

    # -- the one edge where grpc errors become edgeft errors or retries -----------------------------
    def _call(self, what: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        delay, started, closed, internal = 0.5, time.monotonic(), 0, 0
        while True:
            try:
                result = fn(*args, timeout=self.config.call_timeout_s, **kwargs)
                self._got_through = True
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                internal += code == grpc.StatusCode.INTERNAL
                if not retryable(code, internal):
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
        registration = Registration(self.device_id, capabilities(self.config.cache_dir, self.config.max_lora_rank))
        reply = self._call("register", self.stub.Register, registration_to_pb(registration))
        self.device_id = registered_from_pb(reply)
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
        info = bundle_info_from_pb(self._call("get bundle", self.stub.GetBundle, bundle_request_to_pb(digest)))
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

    def _download(self, digest: str, spec: BundleFile, path: Path) -> None:
        for _ in range(10):
            offset = path.stat().st_size if path.exists() else 0
            if path.exists() and offset == spec.size and sha256_of(path) == spec.sha256:
                return  # (an empty file is one too: a portable bundle whose frozen weights all fit in its graphs)
            if path.exists() and offset >= spec.size:
                path.unlink()
                offset = 0
            try:
                with open(path, "ab") as fh:
                    request = download_request_to_pb(DownloadRequest(digest, spec.name, offset))
                    for message in self.stub.DownloadBundle(request, timeout=self.config.call_timeout_s):
                        chunk = bundle_chunk_from_pb(message)
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

    def run_task(self, task: Task) -> AdapterUpdate:
        """Train the task's bundle from its global adapter on this device's data (stopping at a step boundary
        when its deadline comes within ``deadline_margin_s``), or gather the class statistics it asks for."""
        bundle = self.fetch_bundle(task.bundle_digest)
        if task.bundle_digest not in self._data:
            self._data[task.bundle_digest] = load_dataset(self.data_config(task.data), bundle)
            from edgeft.chat import truncation_note  # jinja2 only loads for datasets that need it

            note = truncation_note(getattr(self._data[task.bundle_digest], "notes", {}))
            if note:
                log.warning("job %s: %s", task.job_id, note)
        session = open_session(bundle, threads=self.config.threads, provider=self.config.provider)
        if bundle.digest not in self._announced:
            self._announced.add(bundle.digest)
            log.info("bundle %s...: training on the %s engine, execution provider %s (onnxruntime %s)",
                     bundle.digest[:12], session.engine, session.provider, runtime_version())
        session.set_parameters(dict(task.global_adapter))
        data = self._data[task.bundle_digest]
        if task.statistics:  # round 0 of a job with a head init: sums, no training
            from edgeft.train.trainer import class_statistics, pad_id_of

            tensors, n = class_statistics(session, data, len(bundle.manifest.labels), pad_id_of(bundle))
            return AdapterUpdate(tensors, n, {}, bundle.digest)
        config = dataclasses.replace(task.train, threads=self.config.threads, provider=self.config.provider,
                                     progress=False)
        margin = self.config.deadline_margin_s
        result = train(bundle, data, config, session=session, should_stop=lambda: task.seconds_left() < margin)
        if result.interrupted:
            log.warning("round %d of job %s: training stopped at step %d of %d, %.1f s before the round's deadline, "
                        "to leave time for the upload", task.round, task.job_id, result.steps,
                        plan_steps(len(data), config)[1], max(task.seconds_left(), 0.0))
        return AdapterUpdate(result.parameters, result.n_examples, result.final_metrics, bundle.digest)

    def data_config(self, schema: DataSchema) -> DataConfig:
        """The device's file read with the job's schema, unless the device overrides it."""
        c = self.config
        return DataConfig(c.data, text_column=c.text_column or schema.text_column,
                          label_column=c.label_column or schema.label_column, format=c.format or schema.format,
                          image_column=c.image_column or schema.image_column,
                          feature_columns=c.feature_columns or schema.feature_columns)

    def upload(self, task: Task, update: AdapterUpdate) -> UploadReceipt:
        work = task.asynchronous  # an asynchronous job names the upload and the version trained from
        header = UploadHeader(task.job_id, task.round, self.device_id, f"{self.device_id}:{task.job_id}:{task.round}"
                              if work is None else work.upload_id, 0 if work is None else work.base_version)
        dtype = "float32" if task.statistics else task.upload_dtype
        reply = self._call("upload", lambda **kw: self.stub.UploadUpdate(task_update_parts(task, header, update, dtype),
                                                                        **kw))
        return upload_receipt_from_pb(reply)

    def secure_upload(self, task: Task, update: AdapterUpdate) -> str:
        """Take part in a secure aggregation round with ``update`` (edgeft.secagg): the coordinator gets only a
        masked, fixed-point encoded delta and, with the other devices, learns just the sum. Returns the
        coordinator's last word; SecAggError when the round aborted or went on without this device."""
        from edgeft.secagg import SecAggClient
        from edgeft.secagg.updates import encode_update, round_context

        settings = task.secure
        vector, facts = encode_update(update.tensors, update.n_examples, task.global_adapter, settings)
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

    def handle(self, task: Task) -> None:
        """Work on one task and send its result, or nothing when the round's deadline passed first."""
        if self.conditions is not None and not task.statistics and self.conditions.drops():
            log.info("round %d of job %s: simulated dropout, the task is abandoned", task.round, task.job_id)
            self.rounds_dropped.append((task.job_id, task.round))
            self.rounds_missed.append((task.job_id, task.round))  # a synchronous round: wait for its close
            return
        with training_slot(self.config.training_slots):
            if self._missed(task, "before training started"):
                return
            log.info("round %d of job %s: %s", task.round, task.job_id,
                     "class statistics" if task.statistics else "training")
            started = time.monotonic()
            update = self.run_task(task)
        if self.conditions is not None and not task.statistics:
            self.conditions.after_training(time.monotonic() - started)  # outside the slot: others may train
        if self.tamper is not None:
            update = dataclasses.replace(update, tensors=self.tamper(update.tensors, task))
        if self._missed(task, "during training"):
            return
        try:
            message = self.secure_upload(task, update) if task.secure is not None else self.upload(task, update).message
            log.info("round %d of job %s: update %s", task.round, task.job_id, message)
        except (CoordinatorError, SecAggError) as exc:
            log.warning("round %d of job %s: update refused: %s", task.round, task.job_id, exc)
        self.rounds_done.append((task.job_id, task.round))

    def _missed(self, task: Task, when: str) -> bool:
        """Whether the task's deadline passed (then it is logged and recorded in ``rounds_missed``)."""
        late = -task.seconds_left()
        if late < 0:
            return False
        log.warning("round %d of job %s: its deadline passed %.1f s ago, %s; nothing is sent for this round (the "
                    "coordinator refuses late updates)", task.round, task.job_id, late, when)
        self.rounds_missed.append((task.job_id, task.round))
        return True

    def run(self) -> str:
        """Serve until the job of this agent's token is over; returns the coordinator's final word."""
        self.register()  # a known device id is kept; its capabilities are refreshed
        while True:
            offline = self.conditions.seconds_until_online() if self.conditions is not None else 0.0
            if offline > 0:  # a simulated device asks for work only while online
                time.sleep(min(offline, 30.0))
                continue
            request = poll_request_to_pb(PollRequest(self.device_id, self.config.poll_wait_s))
            outcome = poll_response_from_pb(self._call("poll", self.stub.PollTask, request))
            if isinstance(outcome, Finished):
                log.info("coordinator says: %s", outcome.reason)
                return outcome.reason
            if isinstance(outcome, Task):
                if outcome.asynchronous is None and (outcome.job_id, outcome.round) in self.rounds_missed:
                    # a synchronous round it missed: wait until the coordinator closes it (an asynchronous task
                    # comes with a deadline of its own each time)
                    time.sleep(1.0)
                    continue
                self.handle(outcome)
                continue
            # a long-poll's "nothing yet" (1 s): ask again soon; a longer wait (an asynchronous job's pace while its
            # concurrency cap is reached) is jittered +-50%, so devices told the same do not come back together
            time.sleep(outcome.seconds * 0.5 if outcome.seconds <= 1 else outcome.seconds * (0.5 + random.random()))
