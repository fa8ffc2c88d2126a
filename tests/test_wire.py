"""The serde boundary: tensors and uploads survive the wire exactly; malformed messages are refused."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.errors import WireError
from edgeft.wire import (UploadHeader, chunks_to_tensors, tensor_from_pb, tensor_to_pb, tensors_to_chunks,
                         train_config, train_spec, update_from_parts, update_to_parts)

HEADER = UploadHeader("job", 3, "dev-1", "upload-1")


def tensors():
    rng = np.random.default_rng(0)
    return {"a": rng.normal(size=(300, 700)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}


def test_chunked_round_trip_is_exact_and_below_the_message_limit():
    chunks = list(tensors_to_chunks(tensors(), chunk_bytes=100_000))
    assert max(c.ByteSize() for c in chunks) < 4 * 2**20 and len(chunks) > 8
    back = chunks_to_tensors(chunks)
    for name, value in tensors().items():
        np.testing.assert_array_equal(back[name], value)


def test_float16_halves_the_bytes():
    full = sum(len(c.data) for c in tensors_to_chunks(tensors()))
    half = list(tensors_to_chunks(tensors(), dtype="float16"))
    assert sum(len(c.data) for c in half) == full // 2
    back = chunks_to_tensors(half)
    assert back["a"].dtype == np.float32
    np.testing.assert_allclose(back["a"], tensors()["a"], atol=2e-3)


def test_whole_tensor_round_trip_and_size_check():
    name, value = tensor_from_pb(tensor_to_pb("w", np.arange(6, dtype=np.float32).reshape(2, 3)))
    assert name == "w" and value.shape == (2, 3) and value[1, 2] == 5
    with pytest.raises(WireError, match="needs 24 bytes, got 20"):
        tensor_from_pb(pb.Tensor(name="w", dtype=pb.FLOAT32, shape=[2, 3], data=b"\x00" * 20))
    with pytest.raises(WireError, match="unknown dtype"):
        tensor_from_pb(pb.Tensor(name="w", dtype=99, shape=[1], data=b"\x00" * 4))


def test_truncated_reordered_and_inconsistent_chunks_are_refused():
    chunks = list(tensors_to_chunks(tensors(), chunk_bytes=100_000))
    with pytest.raises(WireError, match="truncated"):
        chunks_to_tensors(chunks[:3])
    with pytest.raises(WireError, match="offset"):
        chunks_to_tensors([chunks[1], chunks[0], *chunks[2:]])
    bad = pb.TensorChunk()
    bad.CopyFrom(chunks[1])
    bad.shape[:] = [10, 10]
    with pytest.raises(WireError, match="disagree"):
        chunks_to_tensors([chunks[0], bad])
    huge = pb.TensorChunk(name="x", dtype=pb.FLOAT32, shape=[2], offset=0, data=b"\x00" * 12)
    with pytest.raises(WireError, match="overflows"):
        chunks_to_tensors([huge])


def test_upload_round_trip():
    update = AdapterUpdate(tensors(), 42, {"val_accuracy": 0.5})
    header, back = update_from_parts(update_to_parts(HEADER, update, chunk_bytes=200_000))
    assert header == HEADER and back.n_examples == 42 and back.metrics == {"val_accuracy": 0.5}
    np.testing.assert_array_equal(back.tensors["a"], update.tensors["a"])


def test_upload_without_header_or_with_bad_count_is_refused():
    parts = list(update_to_parts(HEADER, AdapterUpdate(tensors(), 1)))
    with pytest.raises(WireError, match="start with its header"):
        update_from_parts(parts[1:])
    parts[0].header.n_examples = 0
    with pytest.raises(WireError, match="n_examples"):
        update_from_parts(parts)


def test_train_spec_round_trip():
    config = TrainConfig(epochs=2, max_steps=None, batch_size=16, learning_rate=1e-3, grad_accum_steps=2)
    back = train_config(train_spec(config), threads=1, progress=False)
    assert (back.epochs, back.max_steps, back.batch_size, back.learning_rate, back.grad_accum_steps) == (2, None, 16, 1e-3, 2)
    assert back.threads == 1


def test_bytes_that_do_not_parse_and_absurd_shapes_are_wire_errors():
    from edgeft.wire import parse

    header = pb.UpdatePart(header=pb.UpdateHeader(job_id="j", round=1, device_id="d", upload_id="u", n_examples=3))
    data = header.SerializeToString()
    assert parse(pb.UpdatePart, data) == header
    for garbled in (data[:-3], b"\xff\xff\xff\xff", b"\x0a\x7f" + b"x" * 5):
        with pytest.raises(WireError, match="does not parse") as info:
            parse(pb.UpdatePart, garbled)
        assert info.value.reason == "malformed"
    # dimensions whose product wraps around in int64 (2**64 elements) must not pass as an empty tensor
    huge = pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[2**32, 2**32], offset=0, data=b"")
    with pytest.raises(WireError, match="too large"):
        chunks_to_tensors([huge])
    with pytest.raises(WireError, match="at most 8"):
        chunks_to_tensors([pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[1] * 9, data=b"\0" * 4)])


def test_secure_aggregation_messages_survive_the_wire():
    from edgeft import secagg
    from edgeft.secagg.updates import SecAggSettings
    from edgeft.wire import (SecAggHeader, parse, secagg_request_from_pb, secagg_request_to_pb,
                             secagg_response_from_pb, secagg_response_to_pb, secagg_settings_from_pb,
                             secagg_settings_to_pb)

    header = SecAggHeader("job", 2, "dev-1")
    steps = [secagg.PublicKeys("dev-1", b"c" * 32, b"m" * 32),
             secagg.SharedKeys("dev-1", b"h" * 32, (secagg.EncryptedShares("dev-1", "dev-2", b"x" * 160),)),
             secagg.UnmaskShares("dev-1", {"dev-1": b"s" * 66}, {"dev-3": b"k" * 66})]
    for step in steps:
        raw = secagg_request_to_pb(header, step, wait_seconds=3).SerializeToString()
        assert secagg_request_from_pb(parse(pb.SecAggRequest, raw)) == (header, step)
    for dtype in (np.uint32, np.uint64):
        data = np.array([0, 1, np.iinfo(dtype).max], dtype=dtype)
        back = secagg_request_from_pb(secagg_request_to_pb(header, secagg.MaskedInput("dev-1", data)), dtype)[1]
        assert back.data.dtype == dtype and np.array_equal(back.data, data)
    with pytest.raises(WireError, match="whole number"):
        secagg_request_from_pb(pb.SecAggRequest(job_id="j", device_id="d",
                                                masked_input=pb.SecAggMaskedInput(data=b"12345")), np.uint32)
    with pytest.raises(WireError, match="name another device"):
        secagg_request_from_pb(secagg_request_to_pb(SecAggHeader("job", 2, "dev-2"), steps[0]))
    with pytest.raises(WireError, match="no step"):
        secagg_request_from_pb(pb.SecAggRequest(job_id="j", device_id="d"))
    for answer, kind in ((secagg.Roster(3, (steps[0],)), "roster"), (secagg.Inbox(steps[1].shares), "inbox"),
                         (secagg.Survivors(("dev-1", "dev-2")), "survivors"), ("ok", "accepted")):
        assert secagg_response_from_pb(secagg_response_to_pb(answer)) == (kind, answer)
    assert secagg_response_from_pb(secagg_response_to_pb(None, 2)) == ("retry_after_seconds", 2)
    settings = SecAggSettings(bits=8, clip=0.05, ring_bits=64, threshold=7, weighted=False, max_weight=1,
                              clip_norm=1.5)
    assert secagg_settings_from_pb(secagg_settings_to_pb(settings)) == settings
