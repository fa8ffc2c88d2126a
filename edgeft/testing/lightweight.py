"""TEST TOOLING: lightweight simulated devices, for load and scale figures (bench/scale.py, bench/round_overhead.py).

A lightweight device holds no model and no data: it registers with the job's enrolment token, polls for tasks over
real gRPC (asyncio channels with the agent's transport, ``edgeft.client.transport.open_aio_channel``, and the agent's
wire functions, ``edgeft.wire``), waits a simulated training time, and uploads a synthetic update: the task's global
adapter (its names, shapes and size) plus N(0, ``noise``^2), with a plausible example count. Thousands share one
process and one event loop (a coroutine each, over a few channels), so one machine drives 10^4 - 10^5 of them
against a real coordinator, synchronous or asynchronous jobs alike. Speed, availability and dropouts come from a
``FleetProfile`` (a device's training time is ``train_s x`` its slowdown).

A lightweight device cannot answer a statistics round (it has no data): give its jobs ``head_init = "none"``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from edgeft.client.transport import Transport, open_aio_channel, retryable
from edgeft.errors import ConfigError, check_config
from edgeft.testing.fleet_profile import FleetProfile
from edgeft.update import AdapterUpdate
from edgeft.wire import (Capabilities, Finished, PollRequest, Registration, Task, UploadHeader, coordinator_stub,
                         poll_request_to_pb, poll_response_from_pb, registered_from_pb, registration_to_pb,
                         serialized, task_update_parts, upload_of_bytes, upload_receipt_from_pb)



@dataclass(frozen=True)
class LightFleetConfig:
    """``devices`` lightweight devices against the coordinator at ``server``.

    train_s: simulated training time of a task (times the device's slowdown). idle_s: a device's pause after each
    task before it asks for work again (the duty cycle). examples: (low, high) range of an update's n_examples.
    noise: the synthetic update's spread around the global adapter. channels: gRPC connections the devices share.
    register_concurrency: registrations in flight at once. duration_s: stop after this long (None: when the job
    ends). retry_s: a device's wait before it asks again when told to retry later (None: the coordinator's
    advice), jittered +-50%. give_up_after_s: a device stops when the coordinator stays unreachable this long.
    keep_updates: record every update sent (tests compare the aggregate with them). update_pool: draw each
    update's tensors from this many per global version, each drawn and encoded once (0: every update drawn
    afresh): at 100 uploads a second, drawing and encoding 416 kB each takes much of the fleet's core.
    start_together: every device asks for work only once all have registered (a large fleet registers at the
    coordinator's full speed first), after resting a random part of ``idle_s`` (the fleet's devices come to work
    spread out, not all at once)."""

    server: str
    transport: Transport
    devices: int
    train_s: float = 1.0
    idle_s: float = 0.0
    examples: tuple[int, int] = (50, 500)
    noise: float = 1e-3
    profile: FleetProfile = field(default_factory=FleetProfile)
    poll_wait_s: int = 5
    channels: int = 4
    register_concurrency: int = 256
    duration_s: float | None = None
    call_timeout_s: float = 120.0
    give_up_after_s: float = 120.0
    retry_s: float | None = None
    keep_updates: bool = False
    update_pool: int = 0
    start_together: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_config(self.devices >= 1, "devices", self.devices, "must be >= 1")
        check_config(self.train_s >= 0 and self.idle_s >= 0, "train_s", (self.train_s, self.idle_s),
                     "train_s and idle_s must be >= 0")
        check_config(1 <= self.examples[0] <= self.examples[1], "examples", self.examples,
                     "(low, high) with 1 <= low <= high")
        check_config(self.channels >= 1 and self.register_concurrency >= 1, "channels", self.channels,
                     "channels and register_concurrency must be >= 1")
        check_config(self.duration_s is None or self.duration_s > 0, "duration_s", self.duration_s, "must be > 0")


@dataclass(frozen=True)
class SentUpdate:
    """One update a lightweight device sent (kept with ``keep_updates``)."""

    device_id: str
    round: int
    base_version: int | None  # an asynchronous task's version; None in a synchronous job
    upload_id: str
    update: AdapterUpdate


@dataclass
class FleetReport:
    """What the fleet did: devices registered, tasks received, uploads accepted or refused (by the coordinator's
    message), tasks dropped, each accepted upload's (end time, latency in seconds; Unix time and seconds), calls
    retried, polls told to ask again later, bytes of tasks received and updates sent, when the last device
    registered (Unix time), and errors that stopped a device."""

    registered: int = 0
    tasks: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    refused_details: dict[str, str] = field(default_factory=dict)  # the first refusal's message of each status
    dropped: int = 0
    uploads: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: list[SentUpdate] = field(default_factory=list)
    finished: int = 0
    seconds: float = 0.0
    retries: int = 0
    retried: dict[str, int] = field(default_factory=dict)  # retries by status code
    waits: int = 0  # polls answered "ask again later" (RetryLater)
    bytes_down: int = 0
    bytes_up: int = 0
    all_registered_at: float = 0.0

    def summary(self) -> dict:
        latency = np.array([lat for _, lat in self.uploads]) if self.uploads else np.zeros(1)
        return {"registered": self.registered, "tasks": self.tasks, "accepted": self.accepted,
                "refused": dict(self.refused), "refused_details": dict(self.refused_details),
                "dropped": self.dropped, "finished": self.finished,
                "errors": len(self.errors), "seconds": round(self.seconds, 2),
                "retries": self.retries, "retried": dict(self.retried), "waits": self.waits,
                "upload_p50_s": round(float(np.percentile(latency, 50)), 4),
                "upload_p99_s": round(float(np.percentile(latency, 99)), 4)}


class _Stop(Exception):
    """The run's time is up."""


class LightFleet:
    """The devices of ``config`` in one event loop (``run``)."""

    def __init__(self, config: LightFleetConfig):
        self.config = config
        self.report = FleetReport()
        self._deadline = float("inf")
        self._adapters: dict[tuple[str, int], dict[str, np.ndarray]] = {}  # (job, version) -> its global adapter
        self._pool: dict[tuple, tuple] = {}  # (job, version, slot) -> (tensors, their encoded messages): update_pool

    def run(self) -> FleetReport:
        """Run every device until its job ends (or ``duration_s`` passes); returns the report."""
        return asyncio.run(self.run_async())

    async def run_async(self) -> FleetReport:
        c = self.config
        started = time.monotonic()
        self._deadline = started + c.duration_s if c.duration_s is not None else float("inf")
        channels = [open_aio_channel(c.server, c.transport) for _ in range(c.channels)]
        # uploads take serialized messages: a pooled update's chunks are serialized once, not at every upload
        stubs = [(coordinator_stub(ch), upload_of_bytes(ch)) for ch in channels]
        gate = asyncio.Semaphore(c.register_concurrency)
        self._registrations_ended, self._all_registered = 0, asyncio.Event()
        try:
            await asyncio.gather(*(self._device(i, stubs[i % len(stubs)], gate, started) for i in range(c.devices)))
        finally:
            for channel in channels:
                await channel.close(grace=None)
        self.report.seconds = time.monotonic() - started
        return self.report

    async def _call(self, fn, request, stop_at_deadline: bool = True):  # noqa: ANN001, ANN202
        """One call, retried with backoff while the coordinator is busy or away; grpc.RpcError for a refusal.
        ``request``: a message, or a function making it afresh for each try (an upload's stream of parts)."""
        delay, started, internal = 0.5, time.monotonic(), 0
        while True:
            if stop_at_deadline and time.monotonic() > self._deadline:
                raise _Stop
            try:
                return await fn(request() if callable(request) else request, timeout=self.config.call_timeout_s)
            except grpc.RpcError as exc:
                internal += exc.code() == grpc.StatusCode.INTERNAL
                if not retryable(exc.code(), internal) or time.monotonic() - started > self.config.give_up_after_s:
                    raise
                self.report.retries += 1
                self.report.retried[exc.code().name] = self.report.retried.get(exc.code().name, 0) + 1
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 30.0)

    async def _sleep(self, seconds: float) -> None:
        if time.monotonic() + seconds > self._deadline:
            await asyncio.sleep(max(self._deadline - time.monotonic(), 0))
            raise _Stop
        await asyncio.sleep(seconds)

    async def _device(self, index: int, stubs: tuple, gate: asyncio.Semaphore, started: float) -> None:
        c = self.config
        stub, upload = stubs
        profile = c.profile.device(index)
        rng = np.random.default_rng([c.seed, index])
        try:
            try:
                async with gate:
                    registration = Registration("", Capabilities(engines=("portable", "ort-training")))
                    device_id = registered_from_pb(await self._call(stub.Register, registration_to_pb(registration)))
                self.report.registered += 1
                if self.report.registered == c.devices:
                    self.report.all_registered_at = time.time()
            finally:  # registered or failed: once every device is one or the other, start_together's wait ends
                self._registrations_ended += 1
                if self._registrations_ended == c.devices:
                    self._all_registered.set()
            if c.start_together:  # then each rests a random part of idle_s first: 100,000 first polls at once
                await self._all_registered.wait()  # exhausted the coordinator's call slots and devices gave up
                await self._sleep(c.idle_s * random.random())
            done: set[tuple[str, int]] = set()  # synchronous rounds this device worked on (or dropped)
            while True:
                offline = profile.seconds_until_online(time.monotonic() - started)
                if offline > 0:
                    await self._sleep(offline)
                    continue
                request = poll_request_to_pb(PollRequest(device_id, c.poll_wait_s))
                reply = await self._call(stub.PollTask, request)
                size = reply.ByteSize()
                outcome = self._outcome(reply)
                if isinstance(outcome, Finished):
                    self.report.finished += 1
                    return
                if not isinstance(outcome, Task):
                    self.report.waits += 1
                    wait = c.retry_s if c.retry_s is not None else max(outcome.seconds, 0.2)
                    await self._sleep(wait * (0.5 + random.random()))
                    continue
                if outcome.asynchronous is None and (outcome.job_id, outcome.round) in done:
                    await self._sleep(1.0)
                    continue
                self.report.bytes_down += size
                task, reply, outcome = outcome, None, None  # the message is not held while training
                await self._work(upload, device_id, task, profile, rng)
                if task.asynchronous is None:
                    done.add((task.job_id, task.round))
                if c.idle_s:
                    await self._sleep(c.idle_s * (0.5 + random.random()))
        except _Stop:
            return
        except (grpc.RpcError, ConfigError) as exc:
            details = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            self.report.errors.append(f"device {index}: {details}")

    def _outcome(self, reply):  # noqa: ANN001, ANN202
        """The poll's outcome; a task's global adapter is decoded once per version and shared by every device given
        that version: thousands of devices training at once would otherwise each hold (and decode) their own copy."""
        outcome = poll_response_from_pb(reply, lambda job_id, version: self._adapters.get((job_id, version)))
        if isinstance(outcome, Task):
            key = (outcome.job_id, outcome.round if outcome.asynchronous is None else outcome.asynchronous.base_version)
            self._adapters.setdefault(key, outcome.global_adapter)
            if len(self._adapters) > 64:  # old versions: nobody is given them any more
                self._adapters.pop(next(iter(self._adapters)))
        return outcome

    async def _work(self, upload, device_id: str, task: Task, profile, rng: np.random.Generator) -> None:  # noqa: ANN001
        """Train (wait), then upload a synthetic update, or drop the task."""
        c = self.config
        if task.statistics:
            raise ConfigError("a lightweight device cannot answer a statistics round: give the job "
                              "head_init = \"none\"")
        self.report.tasks += 1
        dropping = profile.drops()
        await self._sleep(c.train_s * profile.slowdown)
        if dropping:
            self.report.dropped += 1
            return
        work = task.asynchronous
        header = UploadHeader(task.job_id, task.round, device_id, f"{device_id}:{task.job_id}:{task.round}"
                              if work is None else work.upload_id, 0 if work is None else work.base_version)
        update, parts, size = self._update(task, header, rng)
        self.report.bytes_up += size
        begun = time.monotonic()
        try:
            receipt = upload_receipt_from_pb(await self._call(upload, lambda: iter(parts), stop_at_deadline=False))
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise
            reason = exc.code().name
            self.report.refused[reason] = self.report.refused.get(reason, 0) + 1
            self.report.refused_details.setdefault(reason, exc.details() or "")
            return
        self.report.accepted += not receipt.duplicate
        self.report.uploads.append((time.time(), time.monotonic() - begun))
        if c.keep_updates:
            self.report.sent.append(SentUpdate(device_id, task.round, None if work is None else work.base_version,
                                               header.upload_id, update))

    def _update(self, task: Task, header: UploadHeader, rng: np.random.Generator) -> tuple[AdapterUpdate, list, int]:
        """A synthetic update of ``task``, its upload's messages (serialized) and their size: drawn afresh, or
        (update_pool) from the pool, all but its smallest tensor shared, that one drawn afresh: every upload is still
        a blob of its own."""
        c = self.config
        if not c.update_pool:
            update = synthetic_update(task.global_adapter, rng, c.noise, c.examples)
            parts = serialized(task_update_parts(task, header, update))
            return update, parts, sum(map(len, parts))
        version = task.round if task.asynchronous is None else task.asynchronous.base_version
        key = (task.job_id, version, int(rng.integers(c.update_pool)))
        if key not in self._pool:
            drawn = synthetic_update(task.global_adapter, rng, c.noise, c.examples).tensors
            own = min(drawn, key=lambda name: drawn[name].nbytes)
            shared = {name: value for name, value in drawn.items() if name != own}
            chunks = serialized(task_update_parts(task, header, AdapterUpdate(shared, 1)))[1:]
            self._pool[key] = drawn, own, chunks, sum(map(len, chunks))  # serialized and sized once
            if len(self._pool) > 4 * c.update_pool:  # older versions' draws: nobody is given those versions now
                self._pool.pop(next(iter(self._pool)))
        drawn, own, chunks, size = self._pool[key]
        fresh = synthetic_update({own: drawn[own]}, rng, c.noise, c.examples)
        head, *tail = serialized(task_update_parts(task, header, fresh))
        size += len(head) + sum(map(len, tail))
        return dataclasses.replace(fresh, tensors={**drawn, **fresh.tensors}), [head, *chunks, *tail], size


def synthetic_update(global_adapter: dict[str, np.ndarray], rng: np.random.Generator, noise: float,
                     examples: tuple[int, int]) -> AdapterUpdate:
    """The global adapter plus N(0, noise^2) (float32, the same names and shapes), with n_examples drawn
    uniformly from ``examples``."""
    scale = np.float32(noise)  # drawn in float32: half the time of float64 draws, which a large fleet notices
    tensors = {name: value.astype(np.float32, copy=False) + scale * rng.standard_normal(value.shape, dtype=np.float32)
               for name, value in global_adapter.items()}
    return AdapterUpdate(tensors, int(rng.integers(examples[0], examples[1] + 1)), {"loss": float(rng.random())})
