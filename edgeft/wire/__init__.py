"""The one serde boundary: edgeft.v1 protobuf messages <-> edgeft's own dataclasses and numpy arrays.

Nothing outside this package builds or reads a protobuf message. The device agent and the coordinator's
servicer deal in the dataclasses of ``types`` (a ``Task``, ``Capabilities``, an ``UploadHeader``, ...) and call
the ``*_to_pb`` / ``*_from_pb`` functions here; ``coordinator_stub`` is the client side of the service,
``coordinator_methods`` and ``parse_request`` what its registration needs. Import everything from
``edgeft.wire``; the modules inside are ``types`` (the dataclasses, no protobuf), ``codec`` (bytes and
tensors), ``service`` (the Coordinator's messages) and ``secure`` (secure aggregation's messages).

Tensors travel as raw little-endian bytes (float32, or float16 to halve an upload), cut into chunks well
below gRPC's 4 MiB message limit. Everything read from the wire is checked here; a malformed message
raises ``WireError`` (INVALID_ARGUMENT) naming the problem.
"""

from edgeft.wire.codec import (CHUNK_BYTES, MAX_DIMS, MAX_TENSOR_BYTES, chunks_to_tensors, dtype_code, parse,
                               tensor_from_pb, tensor_to_pb, tensors_to_chunks)
from edgeft.wire.secure import (SecAggAnswer, SecAggStep, secagg_aborted_pb, secagg_call_from_pb,
                                secagg_request_from_pb, secagg_request_to_pb, secagg_response_from_pb,
                                secagg_response_to_pb, secagg_settings_from_pb, secagg_settings_to_pb)
from edgeft.wire.service import (SERVICE_NAME, RpcMethod, bundle_chunk_from_pb, bundle_chunk_to_pb,
                                 bundle_info_from_pb, bundle_info_to_pb, bundle_request_from_pb,
                                 bundle_request_to_pb, capabilities_from_pb, capabilities_to_pb,
                                 coordinator_methods, coordinator_stub, download_request_from_pb,
                                 download_request_to_pb, heartbeat_from_pb, heartbeat_reply_to_pb, heartbeat_to_pb,
                                 parse_request, poll_request_from_pb, poll_request_to_pb, poll_response_from_pb,
                                 poll_response_to_pb, registered_from_pb, registered_to_pb, registration_from_pb,
                                 registration_to_pb, serialized, task_from_pb, task_reply, task_to_pb,
                                 task_update_parts, train_config, train_spec, update_from_parts, update_from_wire,
                                 update_to_parts, upload_of_bytes, upload_receipt_from_pb, upload_receipt_to_pb)
from edgeft.wire.types import (STATISTICS, TRAIN, AsyncWork, BundleChunk, BundleFile, BundleInfo, Capabilities,
                               DataSchema, DownloadRequest, Finished, Heartbeat, PollOutcome, PollRequest, Registration,
                               RetryLater, SecAggCall, SecAggHeader, Task, UploadHeader, UploadReceipt)

__all__ = [
    # the dataclasses
    "AsyncWork", "BundleChunk", "BundleFile", "BundleInfo", "Capabilities", "DataSchema", "DownloadRequest",
    "Finished", "Heartbeat", "PollOutcome", "PollRequest", "Registration", "RetryLater", "SecAggAnswer", "SecAggCall",
    "SecAggHeader", "SecAggStep", "STATISTICS", "TRAIN", "Task", "UploadHeader", "UploadReceipt",
    # bytes and tensors
    "CHUNK_BYTES", "MAX_DIMS", "MAX_TENSOR_BYTES", "chunks_to_tensors", "dtype_code", "parse", "tensor_from_pb",
    "tensor_to_pb", "tensors_to_chunks",
    # the Coordinator service
    "RpcMethod", "SERVICE_NAME", "bundle_chunk_from_pb", "bundle_chunk_to_pb", "bundle_info_from_pb",
    "bundle_info_to_pb", "bundle_request_from_pb", "bundle_request_to_pb", "capabilities_from_pb",
    "capabilities_to_pb", "coordinator_methods", "coordinator_stub", "download_request_from_pb",
    "download_request_to_pb", "heartbeat_from_pb", "heartbeat_reply_to_pb", "heartbeat_to_pb", "parse_request",
    "poll_request_from_pb", "poll_request_to_pb", "poll_response_from_pb", "poll_response_to_pb",
    "registered_from_pb", "registered_to_pb", "registration_from_pb", "registration_to_pb", "serialized",
    "task_from_pb", "task_reply", "task_to_pb", "task_update_parts", "train_config", "train_spec", "update_from_parts",
    "update_from_wire", "update_to_parts", "upload_of_bytes", "upload_receipt_from_pb", "upload_receipt_to_pb",
    # secure aggregation
    "secagg_aborted_pb", "secagg_call_from_pb", "secagg_request_from_pb", "secagg_request_to_pb",
    "secagg_response_from_pb", "secagg_response_to_pb", "secagg_settings_from_pb", "secagg_settings_to_pb",
]
