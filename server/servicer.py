"""The gRPC face of the coordinator: edgeft.v1.Coordinator over a ``Coordinator``.

Converts messages with ``edgeft.wire`` only, and maps ``EdgeftError`` to gRPC status codes (the error's
``grpc_code``); anything unexpected is INTERNAL with the request left unapplied.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from concurrent import futures
from typing import Callable

import grpc

from edgeft.bundle import MANIFEST
from edgeft.errors import EdgeftError, NotFound, WireError
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.v1 import edgeft_pb2_grpc as pb_grpc
from edgeft.wire import dtype_code, tensor_to_pb, train_spec, update_from_parts
from edgeft.server.config import ServerConfig
from edgeft.server.coordinator import Coordinator, TaskAssignment

log = logging.getLogger("edgeft.server")
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 8 << 20


def _status(exc: EdgeftError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


def rpc(method: Callable) -> Callable:
    """Turn EdgeftError into the matching gRPC status; log anything else as INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):  # noqa: ANN001, ANN202
        try:
            return method(self, request, context)
        except EdgeftError as exc:
            log.info("%s refused: %s", method.__name__, exc)
            context.abort(_status(exc), str(exc))
        except grpc.RpcError:
            raise
        except Exception as exc:  # the request is not applied; say so without leaking internals
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: {type(exc).__name__}")

    return wrapper


def stream_rpc(method: Callable) -> Callable:
    """rpc() for server-streaming methods (generators)."""

    @functools.wraps(method)
    def wrapper(self, request, context):  # noqa: ANN001, ANN202
        try:
            yield from method(self, request, context)
        except EdgeftError as exc:
            context.abort(_status(exc), str(exc))

    return wrapper


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, poll_wait_s: float):
        self.coordinator = coordinator
        self.poll_wait_s = poll_wait_s

    @rpc
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:  # noqa: ANN001, N802
        caps = request.capabilities
        capabilities = {"os": caps.os, "cores": caps.cores, "ram_bytes": caps.ram_bytes,
                        "free_disk_bytes": caps.free_disk_bytes, "ort_version": caps.ort_version,
                        "execution_providers": list(caps.execution_providers)}
        return pb.RegisterResponse(device_id=self.coordinator.register(request.device_id, capabilities))

    @rpc
    def PollTask(self, request: pb.PollTaskRequest, context) -> pb.PollTaskResponse:  # noqa: ANN001, N802
        wait = min(float(request.wait_seconds or 0), self.poll_wait_s)
        end = time.monotonic() + wait
        while True:
            outcome = self.coordinator.poll(request.device_id)
            if isinstance(outcome, TaskAssignment):
                reply = pb.PollTaskResponse(task=self._task(outcome))
                self.coordinator.record_download(outcome.job.id, outcome.round, request.device_id, reply.ByteSize())
                return reply
            if isinstance(outcome, str):
                return pb.PollTaskResponse(finished=outcome)
            if time.monotonic() >= end or not context.is_active():
                return pb.PollTaskResponse(retry_after_seconds=1)
            time.sleep(0.2)

    def _task(self, task: TaskAssignment) -> pb.Task:
        return pb.Task(job_id=task.job.id, round=task.round, bundle_digest=task.bundle_digest,
                       train=train_spec(task.job.train), deadline_unix_ms=int(task.deadline * 1000),
                       global_adapter=[tensor_to_pb(n, v) for n, v in task.global_adapter.items()],
                       upload_dtype=dtype_code(task.job.upload_dtype),
                       data=pb.DataSchema(text_column=task.job.data.text_column,
                                          label_column=task.job.data.label_column,
                                          format=task.job.data.format or ""))

    @rpc
    def GetBundle(self, request: pb.GetBundleRequest, context) -> pb.BundleInfo:  # noqa: ANN001, N802
        bundle = self.coordinator.artifacts.bundle(request.bundle_digest)
        files = [pb.BundleFile(name=name, size=bundle.file(name).stat().st_size, sha256=digest)
                 for name, digest in bundle.manifest.files.items()]
        return pb.BundleInfo(bundle_digest=bundle.digest, manifest_json=bundle.file(MANIFEST).read_bytes(),
                             files=files)

    @stream_rpc
    def DownloadBundle(self, request: pb.DownloadRequest, context):  # noqa: ANN001, ANN201, N802
        bundle = self.coordinator.artifacts.bundle(request.bundle_digest)
        if request.file not in bundle.manifest.files:
            raise NotFound(f"bundle {request.bundle_digest[:12]}... has no file {request.file!r}")
        path = bundle.file(request.file)
        size = path.stat().st_size
        if not 0 <= request.offset <= size:
            raise WireError(f"offset {request.offset} is outside {request.file} ({size} bytes)")
        with open(path, "rb") as fh:
            fh.seek(request.offset)
            offset = request.offset
            while block := fh.read(CHUNK_BYTES):
                yield pb.BundleChunk(file=request.file, offset=offset, data=block,
                                     chunk_sha256=hashlib.sha256(block).hexdigest())
                offset += len(block)

    @rpc
    def UploadUpdate(self, request_iterator, context) -> pb.UploadResponse:  # noqa: ANN001, N802
        sizes: list[int] = []  # the bytes that came over the wire

        def counted(parts):  # noqa: ANN001, ANN202
            for part in parts:
                sizes.append(part.ByteSize())
                yield part

        header, update = update_from_parts(counted(request_iterator))
        size = sum(sizes)
        accepted = self.coordinator.submit(header, update, size)
        return pb.UploadResponse(duplicate=not accepted,
                                 message="accepted" if accepted else "already received; counted once")

    @rpc
    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:  # noqa: ANN001, N802
        self.coordinator.heartbeat(request.device_id, dict(request.metrics))
        return pb.HeartbeatResponse()


def create_server(config: ServerConfig, coordinator: Coordinator | None = None) -> tuple[grpc.Server, int, Coordinator]:
    """A started-not-yet gRPC server bound to ``config.address`` (port 0 picks one): (server, port, coordinator)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    coordinator = coordinator or Coordinator(config)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator, config.poll_wait_s), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("edgeft.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    names = (pb.DESCRIPTOR.services_by_name["Coordinator"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise EdgeftError(f"cannot listen on {config.address}; is the port in use?")
    return server, port, coordinator


def serve(config: ServerConfig) -> None:
    """Run the coordinator until its jobs finish or it is interrupted."""
    server, port, coordinator = create_server(config)
    server.start()
    log.warning("edgeft coordinator listening on port %d (plaintext; TLS arrives with the trust issue)", port)
    try:
        coordinator.wait_until_finished(timeout=float("inf"))
        log.warning("all jobs are over; serving final answers for 10 s")
        time.sleep(10)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=5)
