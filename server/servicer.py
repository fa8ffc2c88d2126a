"""The gRPC face of the coordinator: edgeft.v1.Coordinator over a ``Coordinator``.

Never touches a protobuf message itself: ``edgeft.wire`` parses the requests, turns them into its dataclasses
and builds the replies. Maps ``EdgeftError`` to gRPC status codes (the error's ``grpc_code``); anything
unexpected is INTERNAL with the request left unapplied. Every Coordinator call is authenticated in one place,
the ``rpc``/``stream_rpc`` decorators: the caller's enrolment token (call metadata ``authorization: Bearer
<token>``) gives a ``Principal`` whose job bounds what the call may touch. Requests arrive as raw bytes and are
parsed only after that (``edgeft.wire.parse_request``), so truncated or garbled messages are INVALID_ARGUMENT
like any other malformed request. Refused uploads are counted per job and reason.
Health checking and reflection are separate services and need no token. The methods run on the server's one event
loop (``server.loop``): a long poll awaits, it never sleeps holding a thread.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from typing import Callable

import grpc
from threadpoolctl import threadpool_limits

from edgeft.bundle import MANIFEST
from edgeft.errors import ConfigError, EdgeftError, NotFound, PermissionDenied, SecAggError, WireError
from edgeft import wire
from edgeft.wire.types import MESSAGE_HEADROOM
from edgeft.wire import (STATISTICS, TRAIN, BundleChunk, BundleFile, BundleInfo, Finished, RetryLater, Task,
                         UploadHeader, UploadReceipt)
from edgeft.server.admission import InProgress
from edgeft.server.auth import Principal, bearer_token
from edgeft.server.config import ServerConfig, ServerLimits
from edgeft.server.coordinator import Coordinator, TaskAssignment
from edgeft.server.health import HealthProbe
from edgeft.server.loop import LoopServer

log = logging.getLogger("edgeft.server")
CHUNK_BYTES = ServerLimits.chunk_bytes  # defaults; [server.limits] sets them per coordinator


def _status(exc: EdgeftError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


async def _refused(name: str, context, exc: EdgeftError) -> None:  # noqa: ANN001
    log.info("%s from %s refused [%s]: %s", name, context.peer(), exc.reason or type(exc).__name__, exc)
    await context.abort(_status(exc), str(exc))


def rpc(stream: bool = False) -> Callable:
    """Authenticate the caller, parse its request (``stream``: a client stream, passed on as its async iterator of raw
    messages for the method to read and parse with ``edgeft.wire``) and pass both on with the Principal; turn
    EdgeftError into the matching gRPC status (UNAUTHENTICATED without a valid token, INVALID_ARGUMENT for bytes that
    do not parse); log anything else as INTERNAL."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        async def wrapper(self, request, context):  # noqa: ANN001, ANN202
            try:
                principal = self.authenticate(context)
                return await method(self, request if stream else wire.parse_request(method.__name__, request),
                                    context, principal)
            except EdgeftError as exc:
                await _refused(method.__name__, context, exc)
            except Exception as exc:  # the request is not applied; say so without leaking internals
                log.exception("%s failed", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"internal error in {method.__name__}: {type(exc).__name__}")

        return wrapper

    return decorate


def stream_rpc() -> Callable:
    """rpc() for server-streaming methods (generators; each message is sent before the next is made)."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        async def wrapper(self, request, context):  # noqa: ANN001, ANN202
            try:
                principal = self.authenticate(context)
                for message in method(self, wire.parse_request(method.__name__, request), context, principal):
                    yield message
            except EdgeftError as exc:
                await _refused(method.__name__, context, exc)

        return wrapper

    return decorate


class CoordinatorServicer:
    """edgeft.v1.Coordinator's methods (registered by ``add_coordinator_service``); each gets its request parsed,
    its caller authenticated, and returns the reply message ``edgeft.wire`` built."""

    def __init__(self, coordinator: Coordinator, poll_wait_s: float, limits: ServerLimits | None = None):
        self.coordinator = coordinator
        self.poll_wait_s = poll_wait_s
        self.limits = limits or ServerLimits()
        # uploads in progress; those beyond upload_workers wait (asynchronous jobs' admission reads them)
        self.uploads = InProgress(coordinator.upload_load, self.limits.upload_workers)

    def authenticate(self, context) -> Principal:  # noqa: ANN001
        """The caller's principal from its bearer token (Unauthenticated without a valid one)."""
        principal = self.coordinator.tokens.authenticate(bearer_token(context.invocation_metadata()))
        if principal.job_id not in self.coordinator.jobs:
            raise PermissionDenied(f"the token's job {principal.job_id!r} is not served by this coordinator")
        return principal

    def _bundle(self, principal: Principal, digest: str):  # noqa: ANN202
        """The bundle ``digest`` if it is a bundle of the caller's job, at any of its LoRA ranks or engines
        (PermissionDenied otherwise)."""
        if digest not in self.coordinator.served_bundles(principal.job_id):
            raise PermissionDenied(f"bundle {digest[:12]}... is not a bundle of job {principal.job_id!r}, the "
                                   "only job this device's token enrols it in")
        return self.coordinator.artifacts.bundle(digest)

    @rpc()
    async def Register(self, request, context, principal: Principal):  # noqa: ANN001, ANN201, N802
        registration = wire.registration_from_pb(request)
        device_id = self.coordinator.register(registration.device_id, registration.capabilities.record(),
                                              principal.job_id, principal.token_id)
        return wire.registered_to_pb(device_id)

    @rpc()
    async def PollTask(self, request, context, principal: Principal):  # noqa: ANN001, ANN201, N802
        poll = wire.poll_request_from_pb(request)
        wait = min(float(poll.wait_seconds or 0), self.poll_wait_s)
        end = time.monotonic() + wait
        while True:
            outcome = self.coordinator.poll(poll.device_id, principal.job_id)
            if isinstance(outcome, TaskAssignment):
                # serialized here, once: its size is counted (ByteSize would serialize it again, ~0.5 ms a task)
                reply = wire.task_reply(_task(outcome, self.limits.chunk_bytes))
                self.coordinator.record_download(outcome.job.id, outcome.round, poll.device_id, len(reply))
                return reply
            if isinstance(outcome, str):
                return wire.poll_response_to_pb(Finished(outcome))
            if isinstance(outcome, RetryLater):  # not held in a long-poll: the device comes back when told
                return wire.poll_response_to_pb(outcome)
            if time.monotonic() >= end:  # (a call cancelled meanwhile is cancelled in its sleep)
                return wire.poll_response_to_pb(RetryLater(1))
            await asyncio.sleep(0.2)

    @rpc()
    async def GetBundle(self, request, context, principal: Principal):  # noqa: ANN001, ANN201, N802
        bundle = self._bundle(principal, wire.bundle_request_from_pb(request))
        files = tuple(BundleFile(name, bundle.file(name).stat().st_size, digest)
                      for name, digest in bundle.manifest.files.items())
        return wire.bundle_info_to_pb(BundleInfo(bundle.digest, bundle.file(MANIFEST).read_bytes(), files))

    @stream_rpc()
    def DownloadBundle(self, request, context, principal: Principal):  # noqa: ANN001, ANN201, N802
        asked = wire.download_request_from_pb(request)
        bundle = self._bundle(principal, asked.bundle_digest)
        if asked.file not in bundle.manifest.files:
            raise NotFound(f"bundle {asked.bundle_digest[:12]}... has no file {asked.file!r}")
        path = bundle.file(asked.file)
        size = path.stat().st_size
        if not 0 <= asked.offset <= size:
            raise WireError(f"offset {asked.offset} is outside {asked.file} ({size} bytes)")
        with open(path, "rb") as fh:
            fh.seek(asked.offset)
            offset = asked.offset
            while block := fh.read(self.limits.chunk_bytes):
                yield wire.bundle_chunk_to_pb(BundleChunk(asked.file, offset, block, hashlib.sha256(block).hexdigest()))
                offset += len(block)

    @rpc(stream=True)
    async def UploadUpdate(self, request_iterator, context, principal: Principal):  # noqa: ANN001, ANN201, N802
        messages: list[bytes] = []  # as they came over the wire
        size = 0

        def check(_: int, claim: UploadHeader | None) -> None:  # every message as it is parsed
            if claim is not None and claim.job_id != principal.job_id:
                raise PermissionDenied(f"this device's token enrols it in job {principal.job_id!r}, not "
                                       f"{claim.job_id!r}", reason="wrong_job")

        with self.uploads:
            try:
                async for message in request_iterator:
                    size += len(message)
                    if size > self.limits.max_upload_bytes:  # stops the stream as it arrives
                        raise WireError(f"the upload exceeds the coordinator's limit of "
                                        f"{self.limits.max_upload_bytes} bytes ([server.limits] max_upload_bytes)",
                                        reason="too_large")
                    messages.append(message)
                header, update = wire.update_from_wire(messages, observe=check)
            except EdgeftError as exc:  # malformed before it reached the coordinator's rules: counted here
                self.coordinator.count_rejection(principal.job_id, exc)
                raise
            except asyncio.CancelledError:  # the call was cancelled mid-upload: nothing is stored. (A device that
                # dies mid-upload usually looks like a stream that ended early instead: refused, as every tensor must
                # arrive whole.)
                log.info("UploadUpdate from %s broke off after %d messages; nothing stored", context.peer(),
                         len(messages))
                self.coordinator.count_rejection(principal.job_id, "incomplete", f"upload from {context.peer()} "
                                                 f"broke off after {len(messages)} messages")
                raise
            accepted = self.coordinator.submit(header, update, size)
        return wire.upload_receipt_to_pb(UploadReceipt(duplicate=not accepted, message="accepted" if accepted
                                                       else "already received; counted once"))

    @rpc()
    async def SecureAggregate(self, request, context, principal: Principal):  # noqa: ANN001, ANN201, N802
        """One device's message for the current phase of a secure round; the answer once the phase closes
        (long-poll up to ``wait_seconds``), ``retry_after_seconds`` before, ``aborted`` when the device's part
        in the round is over (the round aborted or failed, or the device came too late)."""
        call = wire.secagg_call_from_pb(request)
        if call.header.job_id != principal.job_id:
            raise PermissionDenied(f"this device's token enrols it in job {principal.job_id!r}, not "
                                   f"{call.header.job_id!r}", reason="wrong_job")
        try:
            header, step = wire.secagg_request_from_pb(
                request, self.coordinator.secure_ring_dtype(call.header.job_id, call.header.round))
            answer = self.coordinator.secure_step(header, step)
            end = time.monotonic() + min(float(call.wait_seconds or 0), self.poll_wait_s)
            while answer is None and time.monotonic() < end:
                await asyncio.sleep(0.1)
                answer = self.coordinator.secure_answer(header, call.phase)
        except SecAggError as exc:
            log.info("SecureAggregate from %s: %s", call.header.device_id, exc)
            return wire.secagg_aborted_pb(str(exc))
        return wire.secagg_response_to_pb(answer)

    @rpc()
    async def Heartbeat(self, request, context, principal: Principal):  # noqa: ANN001, ANN201, N802
        heartbeat = wire.heartbeat_from_pb(request)
        self.coordinator.heartbeat(heartbeat.device_id, dict(heartbeat.metrics), principal.job_id)
        return wire.heartbeat_reply_to_pb()


def _task(task: TaskAssignment, message_bytes: int = 0) -> Task:
    """The coordinator's assignment as the device gets it (``message_bytes``: packed uploads, that many tensor bytes
    a message at most)."""
    job = task.job
    return Task(job_id=job.id, round=task.round, bundle_digest=task.bundle_digest, train=job.train,
                global_adapter=task.global_adapter, deadline=task.deadline, upload_dtype=job.upload_dtype,
                data=job.data, kind=STATISTICS if task.statistics else TRAIN, secure=task.secure,
                asynchronous=task.asynchronous, upload_message_bytes=message_bytes)


def add_coordinator_service(servicer: CoordinatorServicer, server: grpc.aio.Server) -> None:
    """Register edgeft.v1.Coordinator like the generated ``add_CoordinatorServicer_to_server``, but with its
    requests left as raw bytes: the servicer parses them after authenticating the caller (see ``rpc``)."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {m.name: kinds[m.client_streaming, m.server_streaming](
        getattr(servicer, m.name), request_deserializer=None, response_serializer=m.serialize_response)
        for m in wire.coordinator_methods()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(wire.SERVICE_NAME, handlers)


def server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    """gRPC channel arguments of the coordinator: message sizes and keepalive (see ServerLimits)."""
    return [("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.keepalive_time_ms", int(limits.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(limits.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(limits.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0)]


def create_server(config: ServerConfig, coordinator: Coordinator | None = None) -> tuple[LoopServer, int, Coordinator]:
    """A started-not-yet gRPC server bound to ``config.address`` (port 0 picks one): (server, port, coordinator).

    TLS from ``config.tls`` (mutual with ``client_ca``), or plaintext when ``config.insecure`` (logged loudly)."""
    from grpc_health.v1 import health, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    credentials = None
    if config.tls is not None:
        from edgeft.server.certs import server_credentials

        credentials = server_credentials(config.tls)  # before the coordinator: bad files fail fast
    limits = config.limits
    coordinator = coordinator or Coordinator(config)
    _check_adapters_fit(coordinator, limits)
    # One BLAS thread: BLAS's own pool of busy-waiting threads (numpy's OpenBLAS starts one per core) took half the
    # coordinator's CPU under load, for vectors of 10^5 values.
    threadpool_limits(1, user_api="blas")
    health_servicer = health.HealthServicer()

    def setup(server: grpc.aio.Server) -> int:
        add_coordinator_service(CoordinatorServicer(coordinator, config.poll_wait_s, limits), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((wire.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            return (server.add_insecure_port(config.address) if credentials is None
                    else server.add_secure_port(config.address, credentials))
        except RuntimeError:
            return 0

    server = LoopServer(setup, server_options(limits), limits.max_concurrent_rpcs, limits.max_workers)
    port = server.ready
    if port == 0:
        server.stop(grace=None)
        raise EdgeftError(f"cannot listen on {config.address}; is the port in use?")
    probe = HealthProbe(health_servicer, {"database": coordinator.state.ping,
                                          "artifact store": coordinator.artifacts.check})
    if config.insecure:
        log.warning("PLAINTEXT: the coordinator on %s serves without TLS (insecure = true). Enrolment tokens and "
                    "model updates cross the network readable and forgeable by anyone on the path; use this on a "
                    "trusted development network only, never in production.", config.address)
    coordinator.start_clock()  # rounds close at their deadlines on the coordinator's clock, never inside a poll
    probe.start()  # NOT_SERVING while the database or the artifact store does not answer
    stop = server.stop

    def stop_server_and_clock(grace: float | None) -> None:
        probe.stop()
        coordinator.stop_clock()
        stop(grace)

    server.stop = stop_server_and_clock
    return server, port, coordinator


def _check_adapters_fit(coordinator: Coordinator, limits: ServerLimits) -> None:
    """Every job's global adapter must fit one task message (it travels whole)."""
    for job_id in coordinator.jobs:
        size = sum(v.nbytes for v in coordinator.global_adapter(job_id).values())
        if size + MESSAGE_HEADROOM > limits.max_message_bytes:
            raise ConfigError(f"job {job_id!r}: its adapter ({size} bytes) does not fit one task message; raise "
                              f"[server.limits] max_message_bytes above {size + MESSAGE_HEADROOM} (devices: "
                              "--max-message-bytes too)")
        if coordinator.jobs[job_id].secure_aggregation is not None:  # a masked input: up to 8 bytes a value
            masked = 2 * size + 8 + MESSAGE_HEADROOM
            if masked > limits.max_message_bytes:
                raise ConfigError(f"job {job_id!r}: a masked input of its adapter (up to {masked} bytes) does not "
                                  f"fit one message; raise [server.limits] max_message_bytes above {masked} "
                                  "(devices: --max-message-bytes too)")


def serve(config: ServerConfig) -> None:
    """Run the coordinator until its jobs finish or it is interrupted."""
    server, port, coordinator = create_server(config)
    server.start()
    wire = ("PLAINTEXT" if config.insecure else
            "mutual TLS" if config.tls.client_ca is not None else "TLS")
    log.warning("edgeft coordinator listening on port %d (%s); state database %s, artifacts in %s", port, wire,
                coordinator.engine.url.render_as_string(hide_password=True), coordinator.artifacts.describe())
    try:
        coordinator.wait_until_finished(timeout=float("inf"))
        log.warning("all jobs are over; serving final answers for %g s", config.final_answers_s)
        time.sleep(config.final_answers_s)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=5)
