"""The byte-level codec of the wire: parsing messages from bytes, tensors as raw little-endian bytes (whole, or
cut into chunks well below gRPC's 4 MiB message limit), with every size, shape and dtype checked."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from edgeft.errors import WireError
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
        array = np.frombuffer(part.buffer, dtype=part.dtype).reshape(part.shape)  # writable: the bytearray's own
        tensors[name] = array if array.dtype == np.float32 else _widen(array)  # float32 as it came, no copy
    return tensors
