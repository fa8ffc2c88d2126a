"""What the coordinator and a device say to each other, as edgeft's own frozen dataclasses (no protobuf).

The device agent and the coordinator's servicer deal in these (``from edgeft.wire import Task, ...``); the rest
of ``edgeft.wire`` converts them to and from the edgeft.v1 messages of ``protos/edgeft/v1/edgeft.proto``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgeft.config import TrainConfig
from edgeft.data import DataSchema  # the one schema type (a job's [job.data], a task's data, edgeft train's flags)
from edgeft.secagg.updates import SecAggSettings

# gRPC message size limits, the same default on both ends: the largest message either way (a task carries the
# whole global adapter; uploads and bundles travel in chunks), and the least a coordinator or agent may set.
MAX_MESSAGE_BYTES = 8 << 20
MIN_MESSAGE_BYTES = 64 << 10
MESSAGE_HEADROOM = 64 << 10  # room for a message's other fields next to its tensors

TRAIN, STATISTICS = "train", "statistics"  # Task.kind


@dataclass(frozen=True)
class Capabilities:
    """What a device says it can do. ``max_lora_rank`` 0: the job's rank; ``engines`` empty: an agent from
    before training engines, which runs ``ort-training`` only."""

    os: str = ""
    cores: int = 0
    ram_bytes: int = 0
    free_disk_bytes: int = 0
    ort_version: str = ""
    execution_providers: tuple[str, ...] = ()
    max_lora_rank: int = 0
    engines: tuple[str, ...] = ()

    def record(self) -> dict:
        """The capabilities as the coordinator records them (JSON-ready)."""
        return {"os": self.os, "cores": self.cores, "ram_bytes": self.ram_bytes,
                "free_disk_bytes": self.free_disk_bytes, "ort_version": self.ort_version,
                "execution_providers": list(self.execution_providers), "max_lora_rank": self.max_lora_rank,
                "engines": list(self.engines)}


@dataclass(frozen=True)
class Registration:
    """A device introducing itself: its id ("" on first contact: the coordinator assigns one) and capabilities."""

    device_id: str
    capabilities: Capabilities = field(default_factory=Capabilities)


@dataclass(frozen=True)
class PollRequest:
    """A device asking for work; the coordinator may hold the call up to ``wait_seconds`` (long poll)."""

    device_id: str
    wait_seconds: int = 0


@dataclass(frozen=True)
class AsyncWork:
    """An asynchronous (FedBuff) job's task: ``global_adapter`` is global version ``base_version``; the device
    uploads its update with ``upload_id`` and that version (``UploadHeader.base_version``)."""

    base_version: int
    upload_id: str


@dataclass(frozen=True)
class Task:
    """One round's work for one device: train the bundle from ``global_adapter`` and upload the result for
    (``job_id``, ``round``), or (``kind`` statistics) upload the class statistics of the device's data.

    ``train``: the local training settings (only those that travel: epochs, max_steps, batch_size,
    learning_rate, warmup_ratio, grad_accum_steps). ``deadline``: when the round closes (Unix time, seconds;
    None: no deadline); an update that arrives later is refused. ``upload_dtype``: float32, or float16 to
    halve the upload. ``data``: the job's data schema. ``secure``: set when the job aggregates securely (the
    device takes part in the SecureAggregate phases instead of uploading). ``asynchronous``: set for an
    asynchronous job (the version trained from and the upload's id)."""

    job_id: str
    round: int
    bundle_digest: str
    train: TrainConfig
    global_adapter: dict[str, np.ndarray]
    deadline: float | None = None
    upload_dtype: str = "float32"
    data: DataSchema = field(default_factory=DataSchema)
    kind: str = TRAIN
    secure: SecAggSettings | None = None
    asynchronous: AsyncWork | None = None
    upload_message_bytes: int = 0

    @property
    def statistics(self) -> bool:
        return self.kind == STATISTICS

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until the deadline (negative once it passed; infinite without one). Device and coordinator
        clocks are assumed to agree (NTP)."""
        if self.deadline is None:
            return float("inf")
        return self.deadline - (time.time() if now is None else now)


@dataclass(frozen=True)
class Finished:
    """Every job the device is enrolled in is over: why."""

    reason: str


@dataclass(frozen=True)
class RetryLater:
    """Nothing to do yet: ask again after ``seconds``."""

    seconds: int = 1


PollOutcome = Task | Finished | RetryLater


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle: its name inside the bundle, size in bytes and sha256 (hex)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BundleInfo:
    """A bundle's manifest (its sha256 is the bundle's digest) and the files to download."""

    bundle_digest: str
    manifest_json: bytes
    files: tuple[BundleFile, ...] = ()


@dataclass(frozen=True)
class DownloadRequest:
    """Send ``file`` of bundle ``bundle_digest`` from byte ``offset`` on (a resumed download)."""

    bundle_digest: str
    file: str
    offset: int = 0


@dataclass(frozen=True)
class BundleChunk:
    """Bytes [offset, offset + len(data)) of a bundle file, with their sha256 (hex)."""

    file: str
    offset: int
    data: bytes
    chunk_sha256: str


@dataclass(frozen=True)
class UploadHeader:
    """Who sent an update, for which job and round, and its idempotence key; ``base_version``: the global
    version an asynchronous job's update trained from."""

    job_id: str
    round: int
    device_id: str
    upload_id: str
    base_version: int = 0


@dataclass(frozen=True)
class UploadReceipt:
    """The coordinator's answer to an upload: ``duplicate`` when it was received before (counted once)."""

    duplicate: bool
    message: str


@dataclass(frozen=True)
class Heartbeat:
    """A device's sign of life, with numbers it wants recorded."""

    device_id: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SecAggHeader:
    """Who sends a secure aggregation message, for which job and round."""

    job_id: str
    round: int
    device_id: str


@dataclass(frozen=True)
class SecAggCall:
    """The envelope of a secure aggregation message, read before its step (which needs the round's ring):
    the sender as it claims to be, the phase it answers (advertise, share_keys, masked_input, unmask; None:
    no step) and how long the coordinator may hold the call."""

    header: SecAggHeader
    phase: str | None
    wait_seconds: int = 0
