"""The one serde boundary: edgeft.v1 protobuf messages <-> edgeft's own dataclasses and numpy arrays.

Tensors travel as raw little-endian bytes (float32, or float16 to halve an upload), cut into chunks well
below gRPC's 4 MiB message limit. Everything read from the wire is checked here; a malformed message
raises ``WireError`` (INVALID_ARGUMENT) naming the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from edgeft.config import TrainConfig
from edgeft import secagg
from edgeft.errors import WireError
from edgeft.secagg.updates import SecAggSettings
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb

CHUNK_BYTES = 1 << 20  # 1 MiB of tensor bytes per message
MAX_TENSOR_BYTES = 1 << 31
MAX_DIMS = 8

M = TypeVar("M", bound=Message)

_DTYPES = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2"), pb.INT64: np.dtype("<i8")}
_CODES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


def parse(message_type: type[M], data: bytes) -> M:
    """A message of ``message_type`` from its serialized bytes (as they came over the wire); truncated or
    garbled bytes raise ``WireError`` (INVALID_ARGUMENT) instead of an internal error."""
    try:
        return message_type.FromString(data)
    except (DecodeError, ValueError, TypeError) as exc:
        raise WireError(f"a {message_type.DESCRIPTOR.name} message that does not parse ({len(data)} bytes: "
                        f"{exc}); truncated or garbled", reason="malformed") from exc


def dtype_code(dtype: np.dtype | str) -> int:
    """The wire code of a numpy dtype (float32, float16 or int64)."""
    code = _CODES.get(np.dtype(dtype).newbyteorder("<").str)
    if code is None:
        raise WireError(f"dtype {np.dtype(dtype)} cannot travel; use float32, float16 or int64")
    return code


def _numpy_dtype(code: int, name: str) -> np.dtype:
    if code not in _DTYPES:
        raise WireError(f"tensor {name!r} has unknown dtype code {code}", reason="dtype")
    return _DTYPES[code]


def _expected_bytes(name: str, shape: Iterable[int], dtype: np.dtype) -> tuple[tuple[int, ...], int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_DIMS:
        raise WireError(f"tensor {name!r} has {len(shape)} dimensions; at most {MAX_DIMS} travel")
    if any(d < 0 for d in shape):
        raise WireError(f"tensor {name!r} has a negative dimension in shape {shape}")
    size = math.prod(shape) * dtype.itemsize  # Python integers: a product of huge dimensions cannot wrap around
    if size > MAX_TENSOR_BYTES:
        raise WireError(f"tensor {name!r} of shape {shape} is too large ({size} bytes)")
    return shape, size


def tensor_to_pb(name: str, array: np.ndarray, dtype: np.dtype | str | None = None) -> pb.Tensor:
    """A whole tensor message (for adapters small enough to fit one message)."""
    array = np.ascontiguousarray(array, dtype=np.dtype(dtype or array.dtype).newbyteorder("<"))
    return pb.Tensor(name=name, dtype=dtype_code(array.dtype), shape=list(array.shape), data=array.tobytes())


def tensor_from_pb(message: pb.Tensor) -> tuple[str, np.ndarray]:
    """(name, array) of a Tensor message; the array is float32 whatever the wire dtype of a float."""
    dtype = _numpy_dtype(message.dtype, message.name)
    shape, size = _expected_bytes(message.name, message.shape, dtype)
    if len(message.data) != size:
        raise WireError(f"tensor {message.name!r} of shape {shape} needs {size} bytes, got {len(message.data)}")
    array = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    return message.name, _widen(array)


def _widen(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype.kind == "f" else array.astype(array.dtype.newbyteorder("="))


def tensors_to_chunks(tensors: dict[str, np.ndarray], dtype: np.dtype | str | None = None,
                      chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Cut tensors into TensorChunk messages of at most ``chunk_bytes`` data bytes each."""
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.dtype(dtype or array.dtype).newbyteorder("<"))
        data, code, shape = array.tobytes(), dtype_code(array.dtype), list(array.shape)
        for offset in range(0, max(len(data), 1), chunk_bytes):
            yield pb.TensorChunk(name=name, dtype=code, shape=shape, offset=offset,
                                 data=data[offset: offset + chunk_bytes])


@dataclass
class _Assembly:
    dtype: np.dtype
    shape: tuple[int, ...]
    size: int
    buffer: bytearray = field(default_factory=bytearray)


def chunks_to_tensors(chunks: Iterable[pb.TensorChunk]) -> dict[str, np.ndarray]:
    """Reassemble TensorChunk messages (in order, each tensor's chunks contiguous) into float32 arrays."""
    parts: dict[str, _Assembly] = {}
    for chunk in chunks:
        dtype = _numpy_dtype(chunk.dtype, chunk.name)
        shape, size = _expected_bytes(chunk.name, chunk.shape, dtype)
        part = parts.get(chunk.name)
        if part is None:
            part = parts[chunk.name] = _Assembly(dtype, shape, size)
        elif (part.dtype, part.shape) != (dtype, shape):
            raise WireError(f"chunks of tensor {chunk.name!r} disagree on dtype or shape")
        if chunk.offset != len(part.buffer):
            raise WireError(f"tensor {chunk.name!r}: chunk at offset {chunk.offset}, expected {len(part.buffer)} "
                            "(missing, repeated or reordered chunk)")
        if len(part.buffer) + len(chunk.data) > size:
            raise WireError(f"tensor {chunk.name!r} of shape {shape} overflows its {size} bytes")
        part.buffer += chunk.data
    tensors = {}
    for name, part in parts.items():
        if len(part.buffer) != part.size:
            raise WireError(f"tensor {name!r} is truncated: {len(part.buffer)} of {part.size} bytes arrived")
        tensors[name] = _widen(np.frombuffer(bytes(part.buffer), dtype=part.dtype).reshape(part.shape))
    return tensors


@dataclass(frozen=True)
class UploadHeader:
    """Who sent an update, for which job and round, and its idempotence key."""

    job_id: str
    round: int
    device_id: str
    upload_id: str


def update_to_parts(header: UploadHeader, update: AdapterUpdate, dtype: str = "float32",
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.UpdatePart]:
    """The client-stream messages of one upload: the header, then the tensors' chunks."""
    yield pb.UpdatePart(header=pb.UpdateHeader(
        job_id=header.job_id, round=header.round, device_id=header.device_id, upload_id=header.upload_id,
        n_examples=update.n_examples, metrics={k: float(v) for k, v in update.metrics.items()
                                               if isinstance(v, (int, float))}))
    for chunk in tensors_to_chunks(update.tensors, dtype, chunk_bytes):
        yield pb.UpdatePart(chunk=chunk)


def update_from_parts(parts: Iterable[pb.UpdatePart]) -> tuple[UploadHeader, AdapterUpdate]:
    """Read one upload; the first message must be the header."""
    iterator = iter(parts)
    first = next(iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise WireError("an upload must start with its header")
    h = first.header
    if h.n_examples <= 0:
        raise WireError(f"n_examples must be positive, got {h.n_examples}", reason="n_examples")
    if not (h.job_id and h.device_id and h.upload_id):
        raise WireError("the upload header needs job_id, device_id and upload_id")

    def chunks() -> Iterator[pb.TensorChunk]:
        for part in iterator:
            if part.WhichOneof("part") != "chunk":
                raise WireError("an upload carries one header, then tensor chunks only")
            yield part.chunk

    tensors = chunks_to_tensors(chunks())
    return (UploadHeader(h.job_id, h.round, h.device_id, h.upload_id),
            AdapterUpdate(tensors, int(h.n_examples), dict(h.metrics)))


def capabilities_from_pb(caps: pb.Capabilities) -> dict:
    """What a device says it can do, as the coordinator records it (JSON-ready). ``engines``: the training
    engines it runs, as it listed them (empty: an agent from before engines, which runs ``ort-training``)."""
    return {"os": caps.os, "cores": caps.cores, "ram_bytes": caps.ram_bytes, "free_disk_bytes": caps.free_disk_bytes,
            "ort_version": caps.ort_version, "execution_providers": list(caps.execution_providers),
            "max_lora_rank": caps.max_lora_rank, "engines": list(caps.engines)}


def train_spec(config: TrainConfig) -> pb.TrainSpec:
    return pb.TrainSpec(epochs=config.epochs, max_steps=config.max_steps or 0, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio,
                        grad_accum_steps=config.grad_accum_steps)


def train_config(spec: pb.TrainSpec, **device_settings: object) -> TrainConfig:
    """The TrainConfig a Task asks for, plus the device's own settings (threads, progress)."""
    return TrainConfig(epochs=spec.epochs or 1, max_steps=spec.max_steps or None, batch_size=spec.batch_size or 32,
                       learning_rate=spec.learning_rate, warmup_ratio=spec.warmup_ratio,
                       grad_accum_steps=spec.grad_accum_steps or 1, **device_settings)  # type: ignore[arg-type]


# -- secure aggregation (edgeft.secagg) -------------------------------------------------------------------
def secagg_settings_to_pb(settings: SecAggSettings) -> pb.SecAggSettings:
    return pb.SecAggSettings(bits=settings.bits, clip=settings.clip, ring_bits=settings.ring_bits,
                             threshold=settings.threshold, weighted=settings.weighted,
                             max_weight=settings.max_weight, clip_norm=settings.clip_norm or 0.0)


def secagg_settings_from_pb(message: pb.SecAggSettings) -> SecAggSettings:
    """The settings of a task (ConfigError from FixedPoint for values out of range)."""
    settings = SecAggSettings(bits=message.bits, clip=message.clip, ring_bits=message.ring_bits,
                              threshold=message.threshold, weighted=message.weighted,
                              max_weight=message.max_weight or 1, clip_norm=message.clip_norm or None)
    settings.codec  # noqa: B018 - validates bits, clip and ring_bits
    return settings


@dataclass(frozen=True)
class SecAggHeader:
    """Who sends a secure aggregation message, for which job and round."""

    job_id: str
    round: int
    device_id: str


SecAggStep = secagg.PublicKeys | secagg.SharedKeys | secagg.MaskedInput | secagg.UnmaskShares
SecAggAnswer = secagg.Roster | secagg.Inbox | secagg.Survivors | str


def _keys_pb(keys: secagg.PublicKeys) -> pb.SecAggPublicKeys:
    return pb.SecAggPublicKeys(device_id=keys.device_id, cipher_public_key=keys.cipher_public,
                               mask_public_key=keys.mask_public)


def _shares_pb(items: Iterable[secagg.EncryptedShares]) -> list[pb.SecAggEncryptedShares]:
    return [pb.SecAggEncryptedShares(sender=s.sender, recipient=s.recipient, ciphertext=s.ciphertext) for s in items]


def _shares(items: Iterable[pb.SecAggEncryptedShares]) -> tuple[secagg.EncryptedShares, ...]:
    return tuple(secagg.EncryptedShares(s.sender, s.recipient, s.ciphertext) for s in items)


def secagg_request_to_pb(header: SecAggHeader, step: SecAggStep, wait_seconds: int = 0) -> pb.SecAggRequest:
    """A device's message for the current phase."""
    request = pb.SecAggRequest(job_id=header.job_id, round=header.round, device_id=header.device_id,
                               wait_seconds=wait_seconds)
    if isinstance(step, secagg.PublicKeys):
        request.advertise.CopyFrom(_keys_pb(step))
    elif isinstance(step, secagg.SharedKeys):
        request.share_keys.CopyFrom(pb.SecAggShareKeys(self_mask_commitment=step.self_mask_commitment,
                                                       shares=_shares_pb(step.shares)))
    elif isinstance(step, secagg.MaskedInput):
        data = np.ascontiguousarray(step.data, dtype=step.data.dtype.newbyteorder("<"))
        request.masked_input.CopyFrom(pb.SecAggMaskedInput(data=data.tobytes()))
    else:
        request.unmask.CopyFrom(pb.SecAggUnmask(
            self_mask_shares=[pb.SecAggShare(owner=k, share=v) for k, v in sorted(step.self_mask_shares.items())],
            mask_key_shares=[pb.SecAggShare(owner=k, share=v) for k, v in sorted(step.mask_key_shares.items())]))
    return request


def secagg_request_from_pb(request: pb.SecAggRequest, ring_dtype: np.dtype | None = None
                           ) -> tuple[SecAggHeader, SecAggStep]:
    """(header, step) of a device's message; ``ring_dtype`` reads a masked input (uint32 or uint64)."""
    if not (request.job_id and request.device_id):
        raise WireError("a secure aggregation request needs job_id and device_id")
    header = SecAggHeader(request.job_id, request.round, request.device_id)
    kind = request.WhichOneof("step")
    if kind == "advertise":
        k = request.advertise
        if k.device_id != request.device_id:
            raise WireError("the advertised keys name another device", reason="secagg")
        return header, secagg.PublicKeys(k.device_id, k.cipher_public_key, k.mask_public_key)
    if kind == "share_keys":
        return header, secagg.SharedKeys(request.device_id, request.share_keys.self_mask_commitment,
                                         _shares(request.share_keys.shares))
    if kind == "masked_input":
        dtype = np.dtype(ring_dtype or np.uint32).newbyteorder("<")
        raw = request.masked_input.data
        if len(raw) % dtype.itemsize:
            raise WireError(f"a masked input of {len(raw)} bytes is not a whole number of {dtype.itemsize}-byte ring "
                            "elements", reason="secagg")
        return header, secagg.MaskedInput(request.device_id,
                                          np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")))
    if kind == "unmask":
        def table(items) -> dict[str, bytes]:  # noqa: ANN001
            out = {s.owner: s.share for s in items}
            if len(out) != len(items):
                raise WireError("an unmask message repeats an owner", reason="secagg")
            return out

        return header, secagg.UnmaskShares(request.device_id, table(request.unmask.self_mask_shares),
                                           table(request.unmask.mask_key_shares))
    raise WireError("a secure aggregation request carries no step", reason="secagg")


def secagg_response_to_pb(answer: SecAggAnswer | None, retry_after_seconds: int = 1) -> pb.SecAggResponse:
    """The coordinator's answer to a phase (None: not yet; a string: the device's part is accepted)."""
    if answer is None:
        return pb.SecAggResponse(retry_after_seconds=retry_after_seconds)
    if isinstance(answer, secagg.Roster):
        return pb.SecAggResponse(roster=pb.SecAggRoster(threshold=answer.threshold,
                                                        keys=[_keys_pb(k) for k in answer.keys]))
    if isinstance(answer, secagg.Inbox):
        return pb.SecAggResponse(inbox=pb.SecAggInbox(shares=_shares_pb(answer.shares)))
    if isinstance(answer, secagg.Survivors):
        return pb.SecAggResponse(survivors=pb.SecAggSurvivors(device_ids=list(answer.devices)))
    return pb.SecAggResponse(accepted=answer)


def secagg_aborted_pb(reason: str) -> pb.SecAggResponse:
    return pb.SecAggResponse(aborted=reason)


def secagg_response_from_pb(response: pb.SecAggResponse) -> tuple[str, SecAggAnswer | int]:
    """(kind, value): ``retry_after_seconds`` (int), ``roster``, ``inbox``, ``survivors``, ``accepted`` or
    ``aborted`` (strings)."""
    kind = response.WhichOneof("outcome")
    if kind == "roster":
        keys = tuple(secagg.PublicKeys(k.device_id, k.cipher_public_key, k.mask_public_key)
                     for k in response.roster.keys)
        return kind, secagg.Roster(response.roster.threshold, keys)
    if kind == "inbox":
        return kind, secagg.Inbox(_shares(response.inbox.shares))
    if kind == "survivors":
        return kind, secagg.Survivors(tuple(response.survivors.device_ids))
    if kind in ("accepted", "aborted"):
        return kind, getattr(response, kind)
    if kind == "retry_after_seconds":
        return kind, response.retry_after_seconds
    raise WireError("a secure aggregation response carries no outcome", reason="secagg")
