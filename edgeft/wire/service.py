"""The Coordinator service's messages: registration, polls and tasks, bundle downloads, uploads, heartbeats; and
the service itself (its methods for registering handlers, request parsing, the client stub)."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from google.protobuf.message import Message

from edgeft.config import TrainConfig
from edgeft.errors import WireError
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.v1 import edgeft_pb2_grpc as pb_grpc
from edgeft.wire.codec import (CHUNK_BYTES, chunks_to_tensors, dtype_code, parse, tensor_from_pb, tensor_to_pb,
                               tensors_to_chunks)
from edgeft.wire.secure import secagg_settings_from_pb, secagg_settings_to_pb
from edgeft.wire.types import (STATISTICS, TRAIN, AsyncWork, BundleChunk, BundleFile, BundleInfo, Capabilities,
                               DataSchema, DownloadRequest, Finished, Heartbeat, PollOutcome, PollRequest, Registration,
                               RetryLater, Task, UploadHeader, UploadReceipt)


# -- uploads and training settings -------------------------------------------------------------------------
def update_to_parts(header: UploadHeader, update: AdapterUpdate, dtype: str = "float32",
                    chunk_bytes: int = CHUNK_BYTES, packed: bool = False) -> Iterator[pb.UpdatePart]:
    """The client-stream messages of one upload: the header, then the tensors' chunks, one a message or (``packed``,
    for a coordinator whose task set ``upload_message_bytes``) as many a message as ``chunk_bytes`` holds."""
    yield pb.UpdatePart(header=pb.UpdateHeader(
        job_id=header.job_id, round=header.round, device_id=header.device_id, upload_id=header.upload_id,
        base_version=header.base_version, n_examples=update.n_examples,
        metrics={k: float(v) for k, v in update.metrics.items() if isinstance(v, (int, float))}))
    if not packed:
        for chunk in tensors_to_chunks(update.tensors, dtype, chunk_bytes):
            yield pb.UpdatePart(chunk=chunk)
        return
    batch: list[pb.TensorChunk] = []
    size = 0
    for chunk in tensors_to_chunks(update.tensors, dtype, chunk_bytes):
        if batch and size + len(chunk.data) > chunk_bytes:
            yield pb.UpdatePart(chunks=pb.TensorChunks(chunks=batch))
            batch, size = [], 0
        batch.append(chunk)
        size += len(chunk.data)
    if batch:
        yield pb.UpdatePart(chunks=pb.TensorChunks(chunks=batch))


def upload_of_bytes(channel):  # noqa: ANN001, ANN201
    """UploadUpdate over ``channel`` (asyncio or not) taking messages serialized already (``serialized``): a
    simulator sending the same chunks many times serializes them once."""
    return channel.stream_unary(f"/{SERVICE_NAME}/UploadUpdate", response_deserializer=pb.UploadResponse.FromString)


def serialized(parts: Iterable[Message]) -> list[bytes]:
    """Messages as they go on the wire."""
    return [part.SerializeToString() for part in parts]


def task_update_parts(task: Task, header: UploadHeader, update: AdapterUpdate,
                      dtype: str | None = None) -> Iterator[pb.UpdatePart]:
    """The upload of ``task``'s update as its coordinator reads it: packed when the task set upload_message_bytes;
    in ``dtype`` (default the task's upload_dtype)."""
    size = task.upload_message_bytes
    return update_to_parts(header, update, dtype or task.upload_dtype, size or CHUNK_BYTES, packed=size > 0)


def update_from_parts(parts: Iterable[pb.UpdatePart]) -> tuple[UploadHeader, AdapterUpdate]:
    """Read one upload from its messages; the first must be the header."""
    return _update(iter(parts))


def update_from_wire(messages: Iterable[bytes], observe: Callable[[int, UploadHeader | None], None]
                     ) -> tuple[UploadHeader, AdapterUpdate]:
    """Read one upload from its messages as they came over the wire (each parsed as it is read: WireError when it
    does not parse). ``observe(size, claim)`` runs on every message before it is read, with its size on the wire and,
    for a leading header, what it claims (unchecked): the caller's checks (the sender's job, a size limit) stop a
    stream as it arrives. (The size is the bytes' length: ``ByteSize`` serializes a message again, ~0.5 ms for
    an update of 400 kB.)"""
    def observed() -> Iterator[pb.UpdatePart]:
        for index, data in enumerate(messages):
            part = parse(pb.UpdatePart, data)
            h = part.header if index == 0 and part.WhichOneof("part") == "header" else None
            observe(len(data), None if h is None else _header(h))
            yield part

    return _update(observed())


def _update(parts: Iterator[pb.UpdatePart]) -> tuple[UploadHeader, AdapterUpdate]:
    first = next(parts, None)
    if first is None or first.WhichOneof("part") != "header":
        raise WireError("an upload must start with its header")
    h = first.header
    if h.n_examples <= 0:
        raise WireError(f"n_examples must be positive, got {h.n_examples}", reason="n_examples")
    if not (h.job_id and h.device_id and h.upload_id):
        raise WireError("the upload header needs job_id, device_id and upload_id")

    def chunks() -> Iterator[pb.TensorChunk]:
        for part in parts:
            kind = part.WhichOneof("part")
            if kind == "chunk":
                yield part.chunk
            elif kind == "chunks":
                yield from part.chunks.chunks
            else:
                raise WireError("an upload carries one header, then tensor chunks only")

    tensors = chunks_to_tensors(chunks())
    return _header(h), AdapterUpdate(tensors, int(h.n_examples), dict(h.metrics))


def _header(h: pb.UpdateHeader) -> UploadHeader:
    return UploadHeader(h.job_id, h.round, h.device_id, h.upload_id, h.base_version)


def upload_receipt_to_pb(receipt: UploadReceipt) -> pb.UploadResponse:
    return pb.UploadResponse(duplicate=receipt.duplicate, message=receipt.message)


def upload_receipt_from_pb(message: pb.UploadResponse) -> UploadReceipt:
    return UploadReceipt(message.duplicate, message.message)


def train_spec(config: TrainConfig) -> pb.TrainSpec:
    return pb.TrainSpec(epochs=config.epochs, max_steps=config.max_steps or 0, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio,
                        grad_accum_steps=config.grad_accum_steps, pack=config.pack)


def train_config(spec: pb.TrainSpec, **device_settings: object) -> TrainConfig:
    """The TrainConfig a Task asks for, plus the device's own settings (threads, progress)."""
    return TrainConfig(epochs=spec.epochs or 1, max_steps=spec.max_steps or None, batch_size=spec.batch_size or 32,
                       learning_rate=spec.learning_rate, warmup_ratio=spec.warmup_ratio,
                       grad_accum_steps=spec.grad_accum_steps or 1, pack=spec.pack, **device_settings)  # type: ignore[arg-type]


# -- registration, polling, tasks ---------------------------------------------------------------------------
def capabilities_to_pb(caps: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(os=caps.os, cores=caps.cores, ram_bytes=caps.ram_bytes,
                           free_disk_bytes=caps.free_disk_bytes, ort_version=caps.ort_version,
                           execution_providers=list(caps.execution_providers), max_lora_rank=caps.max_lora_rank,
                           engines=list(caps.engines))


def capabilities_from_pb(caps: pb.Capabilities) -> Capabilities:
    """What a device says it can do (``Capabilities.record()``: as the coordinator records it)."""
    return Capabilities(os=caps.os, cores=caps.cores, ram_bytes=caps.ram_bytes, free_disk_bytes=caps.free_disk_bytes,
                        ort_version=caps.ort_version, execution_providers=tuple(caps.execution_providers),
                        max_lora_rank=caps.max_lora_rank, engines=tuple(caps.engines))


def registration_to_pb(registration: Registration) -> pb.RegisterRequest:
    return pb.RegisterRequest(device_id=registration.device_id,
                              capabilities=capabilities_to_pb(registration.capabilities))


def registration_from_pb(message: pb.RegisterRequest) -> Registration:
    return Registration(message.device_id, capabilities_from_pb(message.capabilities))


def registered_to_pb(device_id: str) -> pb.RegisterResponse:
    return pb.RegisterResponse(device_id=device_id)


def registered_from_pb(message: pb.RegisterResponse) -> str:
    """The device id the coordinator assigned (or confirmed)."""
    return message.device_id


def poll_request_to_pb(request: PollRequest) -> pb.PollTaskRequest:
    return pb.PollTaskRequest(device_id=request.device_id, wait_seconds=request.wait_seconds)


def poll_request_from_pb(message: pb.PollTaskRequest) -> PollRequest:
    return PollRequest(message.device_id, message.wait_seconds)


def task_to_pb(task: Task, into: pb.Task | None = None) -> pb.Task:
    """The Task message (written into ``into``, a field of a larger message, when given: no copy of its tensors)."""
    message = _task_fields(task, into)
    message.global_adapter.extend(_encoded(task.global_adapter).messages)
    return message


def task_reply(task: Task) -> bytes:
    """The PollTaskResponse carrying ``task``, serialized. The global adapter's part is serialized once per adapter
    (every device polling a version gets the same bytes) and the task's other fields appended: protobuf parses
    concatenated messages as one, merged. (Building and serializing the whole message again took ~0.5 ms a task.)"""
    reply = pb.PollTaskResponse()
    _task_fields(task, reply.task)
    return _encoded(task.global_adapter).reply + reply.SerializeToString()


def _task_fields(task: Task, into: pb.Task | None) -> pb.Task:
    """The Task message without its global adapter."""
    secure = {} if task.secure is None else {"secure_aggregation": secagg_settings_to_pb(task.secure)}
    deadline = {} if task.deadline is None else {"deadline_unix_ms": int(task.deadline * 1000)}
    work = task.asynchronous
    if work is not None:
        secure["asynchronous"] = pb.AsyncTask(base_version=work.base_version, upload_id=work.upload_id)
    message = pb.Task() if into is None else into
    message.MergeFrom(pb.Task(
        **secure, **deadline, job_id=task.job_id, round=task.round, bundle_digest=task.bundle_digest,
        train=train_spec(task.train), upload_dtype=dtype_code(task.upload_dtype),
        kind=pb.STATISTICS if task.statistics else pb.TRAIN, upload_message_bytes=task.upload_message_bytes,
        data=pb.DataSchema(text_column=task.data.text_column, label_column=task.data.label_column,
                           image_column=task.data.image_column or "",
                           feature_columns=list(task.data.feature_columns or ()), format=task.data.format or "")))
    return message


@dataclass(frozen=True)
class _Encoded:
    adapter: dict[str, np.ndarray]  # held: its id is not reused while it is memoised
    messages: list[pb.Tensor]
    reply: bytes  # a PollTaskResponse whose task holds only ``messages``, serialized


_ENCODED: OrderedDict[int, _Encoded] = OrderedDict()  # id(adapter) -> its encodings
_ENCODED_LOCK = threading.Lock()


def _encoded(adapter: dict[str, np.ndarray]) -> _Encoded:
    """An adapter's Tensor messages and task reply part, encoded once for the last few adapters: a coordinator sends
    the same global adapter (one dict per version, kept decoded and never changed: ``Rounds.global_adapter``) to
    every device."""
    key = id(adapter)
    with _ENCODED_LOCK:
        hit = _ENCODED.get(key)
    if hit is not None and hit.adapter is adapter:
        return hit
    messages = [tensor_to_pb(n, v) for n, v in adapter.items()]
    encoded = _Encoded(adapter, messages,
                       pb.PollTaskResponse(task=pb.Task(global_adapter=messages)).SerializeToString())
    with _ENCODED_LOCK:
        _ENCODED[key] = encoded
        while len(_ENCODED) > 8:
            _ENCODED.popitem(last=False)
    return encoded


def task_from_pb(message: pb.Task) -> Task:
    """A task as the device reads it (its tensors checked, its secure aggregation settings validated)."""
    secure = secagg_settings_from_pb(message.secure_aggregation) if message.HasField("secure_aggregation") else None
    work = None
    if message.HasField("asynchronous"):
        if not message.asynchronous.upload_id or message.asynchronous.base_version < 0:
            raise WireError("an asynchronous task needs an upload_id and a base_version >= 0")
        work = AsyncWork(message.asynchronous.base_version, message.asynchronous.upload_id)
    schema = message.data
    return Task(job_id=message.job_id, round=message.round, bundle_digest=message.bundle_digest,
                train=train_config(message.train),
                global_adapter=dict(tensor_from_pb(t) for t in message.global_adapter),
                deadline=message.deadline_unix_ms / 1000 if message.deadline_unix_ms else None,
                upload_dtype="float16" if message.upload_dtype == pb.FLOAT16 else "float32",
                data=DataSchema(schema.text_column or "text", schema.label_column or "label", schema.format or None,
                                schema.image_column or None, tuple(schema.feature_columns) or None),
                kind=STATISTICS if message.kind == pb.STATISTICS else TRAIN, secure=secure, asynchronous=work,
                upload_message_bytes=max(int(message.upload_message_bytes), 0))


def poll_response_to_pb(outcome: PollOutcome) -> pb.PollTaskResponse:
    if isinstance(outcome, Task):
        message = pb.PollTaskResponse()
        task_to_pb(outcome, into=message.task)
        return message
    if isinstance(outcome, Finished):
        return pb.PollTaskResponse(finished=outcome.reason)
    return pb.PollTaskResponse(retry_after_seconds=outcome.seconds)


def poll_response_from_pb(message: pb.PollTaskResponse,
                          held: Callable[[str, int], dict | None] | None = None) -> PollOutcome:
    """The poll's outcome. ``held(job_id, version)``: a global adapter the caller holds decoded already for a task's
    version (its round, or an asynchronous task's base version), or None; when it holds one, the task carries it and
    the message's tensors are cleared, not decoded (a simulator's thousands of devices given the same version)."""
    kind = message.WhichOneof("outcome")
    if kind == "task":
        task = message.task
        version = task.asynchronous.base_version if task.HasField("asynchronous") else task.round
        adapter = None if held is None else held(task.job_id, version)
        if adapter is None:
            return task_from_pb(task)
        task.ClearField("global_adapter")
        return dataclasses.replace(task_from_pb(task), global_adapter=adapter)
    if kind == "finished":
        return Finished(message.finished)
    return RetryLater(message.retry_after_seconds)


def heartbeat_to_pb(heartbeat: Heartbeat) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(device_id=heartbeat.device_id, metrics=dict(heartbeat.metrics))


def heartbeat_from_pb(message: pb.HeartbeatRequest) -> Heartbeat:
    return Heartbeat(message.device_id, dict(message.metrics))


def heartbeat_reply_to_pb() -> pb.HeartbeatResponse:
    return pb.HeartbeatResponse()


# -- bundle downloads --------------------------------------------------------------------------------------
def bundle_request_to_pb(bundle_digest: str) -> pb.GetBundleRequest:
    return pb.GetBundleRequest(bundle_digest=bundle_digest)


def bundle_request_from_pb(message: pb.GetBundleRequest) -> str:
    """The digest of the bundle asked for."""
    return message.bundle_digest


def bundle_info_to_pb(info: BundleInfo) -> pb.BundleInfo:
    return pb.BundleInfo(bundle_digest=info.bundle_digest, manifest_json=info.manifest_json,
                         files=[pb.BundleFile(name=f.name, size=f.size, sha256=f.sha256) for f in info.files])


def bundle_info_from_pb(message: pb.BundleInfo) -> BundleInfo:
    return BundleInfo(message.bundle_digest, message.manifest_json,
                      tuple(BundleFile(f.name, f.size, f.sha256) for f in message.files))


def download_request_to_pb(request: DownloadRequest) -> pb.DownloadRequest:
    return pb.DownloadRequest(bundle_digest=request.bundle_digest, file=request.file, offset=request.offset)


def download_request_from_pb(message: pb.DownloadRequest) -> DownloadRequest:
    return DownloadRequest(message.bundle_digest, message.file, message.offset)


def bundle_chunk_to_pb(chunk: BundleChunk) -> pb.BundleChunk:
    return pb.BundleChunk(file=chunk.file, offset=chunk.offset, data=chunk.data, chunk_sha256=chunk.chunk_sha256)


def bundle_chunk_from_pb(message: pb.BundleChunk) -> BundleChunk:
    return BundleChunk(message.file, message.offset, message.data, message.chunk_sha256)


# -- the gRPC service ---------------------------------------------------------------------------------------
_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
SERVICE_NAME = _SERVICE.full_name  # edgeft.v1.Coordinator


@dataclass(frozen=True)
class RpcMethod:
    """One method of the Coordinator service, for registering handlers by hand."""

    name: str
    client_streaming: bool
    server_streaming: bool
    serialize_response: Callable[[Message | bytes], bytes]


def _sent_as_is(message: Message | bytes) -> bytes:
    """A reply's bytes: serialized now, or by the handler already (``serialized``: it needed their size)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def coordinator_methods() -> list[RpcMethod]:
    """The Coordinator service's methods (as in protos/edgeft/v1/edgeft.proto); a handler may return its reply
    serialized already."""
    return [RpcMethod(m.name, m.client_streaming, m.server_streaming, _sent_as_is) for m in _SERVICE.methods]


def parse_request(method: str, data: bytes) -> Message:
    """The request message of Coordinator method ``method`` from its bytes (``parse``: WireError when they do
    not parse); read it with the ``*_from_pb`` function for that message."""
    return parse(getattr(pb, _SERVICE.methods_by_name[method].input_type.name), data)


def coordinator_stub(channel) -> pb_grpc.CoordinatorStub:  # noqa: ANN001
    """The client side of the Coordinator service over ``channel``; its methods take and return the messages
    built and read by the functions of this module."""
    return pb_grpc.CoordinatorStub(channel)
