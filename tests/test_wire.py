"""The serde boundary: tensors and uploads survive the wire exactly; malformed messages are refused."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.errors import WireError
from edgeft.wire import (UploadHeader, chunks_to_tensors, tensor_from_pb, tensor_to_pb, tensors_to_chunks,
                         train_config, train_spec, update_from_parts, update_from_wire, update_to_parts)

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
    whole = list(tensors_to_chunks({"w": np.ones(3, dtype=np.float32)}))  # a tensor in one chunk, then again
    with pytest.raises(WireError, match="offset"):
        chunks_to_tensors(whole + whole)


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
    config = TrainConfig(epochs=2, max_steps=None, batch_size=16, learning_rate=1e-3, grad_accum_steps=2, pack=True)
    back = train_config(train_spec(config), threads=1, progress=False)
    assert (back.epochs, back.max_steps, back.batch_size, back.learning_rate, back.grad_accum_steps) == (2, None, 16, 1e-3, 2)
    assert back.threads == 1 and back.pack


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


def test_a_task_survives_the_wire_and_its_bytes_are_those_of_the_contract():
    """The dataclass a poll returns, both ways; the message is field for field what edgeft.v1 defines (the
    deadline in milliseconds, the schema's format empty for "from the suffix")."""
    from edgeft.secagg.updates import SecAggSettings
    from edgeft.wire import (DataSchema, Finished, RetryLater, Task, parse, poll_response_from_pb,
                             poll_response_to_pb, task_from_pb, task_to_pb)

    adapter = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "lora_B": np.zeros((3, 2), np.float32)}
    secure = SecAggSettings(bits=16, clip=1.0, ring_bits=32, threshold=2)
    task = Task("job", 4, "d" * 64, TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3), adapter,
                deadline=1_700_000_123.456, upload_dtype="float16", data=DataSchema("q", "intent", "csv"),
                kind="statistics", secure=secure)
    message = task_to_pb(task)
    expected = pb.Task(job_id="job", round=4, bundle_digest="d" * 64, train=train_spec(task.train),
                       global_adapter=[tensor_to_pb(n, v) for n, v in adapter.items()],
                       deadline_unix_ms=1_700_000_123_456, upload_dtype=pb.FLOAT16, kind=pb.STATISTICS,
                       data=pb.DataSchema(text_column="q", label_column="intent", format="csv"),
                       secure_aggregation=pb.SecAggSettings(bits=16, clip=1.0, ring_bits=32, threshold=2,
                                                            weighted=True, max_weight=1_000_000))
    assert message.SerializeToString() == expected.SerializeToString()
    back = poll_response_from_pb(parse(pb.PollTaskResponse, poll_response_to_pb(task).SerializeToString()))
    assert isinstance(back, Task) and back.statistics and back.secure == secure
    assert (back.job_id, back.round, back.deadline, back.upload_dtype, back.data) == (
        "job", 4, 1_700_000_123.456, "float16", DataSchema("q", "intent", "csv"))
    assert (back.train.epochs, back.train.batch_size, back.train.learning_rate) == (2, 16, 1e-3)
    for name, value in adapter.items():
        np.testing.assert_array_equal(back.global_adapter[name], value)
    assert back.seconds_left(now=1_700_000_120.0) == pytest.approx(3.456)
    plain = task_from_pb(pb.Task(job_id="j", round=1, bundle_digest="x",  # a coordinator that sets less
                                 train=pb.TrainSpec(learning_rate=0.01)))
    assert plain.deadline is None and plain.seconds_left() == float("inf") and plain.secure is None
    assert plain.kind == "train" and plain.upload_dtype == "float32"
    for outcome in (Finished("job j finished"), RetryLater(1)):
        assert poll_response_from_pb(poll_response_to_pb(outcome)) == outcome
    held = {"lora_A": np.ones((2, 3), np.float32)}  # an adapter a simulator holds decoded for (job, 4) already
    reply = poll_response_to_pb(task)
    shared = poll_response_from_pb(reply, lambda job_id, version: held if (job_id, version) == ("job", 4) else None)
    assert shared.global_adapter is held and not reply.task.global_adapter  # not decoded: cleared
    assert poll_response_from_pb(poll_response_to_pb(task), lambda *_: None).global_adapter.keys() == adapter.keys()
    assert poll_response_to_pb(Finished("over")).SerializeToString() == pb.PollTaskResponse(
        finished="over").SerializeToString()


def test_a_task_reply_serialized_from_its_adapters_memo_parses_as_the_whole_message():
    """The coordinator's task reply: the global adapter's part serialized once per adapter, the task's own fields
    appended; it parses to the message poll_response_to_pb builds, for every task given that adapter."""
    from edgeft.wire import AsyncWork, Task, parse, poll_response_from_pb, poll_response_to_pb, task_reply

    adapter = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "lora_B": np.ones((3, 2), np.float32)}
    for upload_id in ("u1", "u2"):
        task = Task("job", 5, "d" * 64, TrainConfig(epochs=1), adapter, deadline=1_700_000_000.5,
                    asynchronous=AsyncWork(4, upload_id), upload_message_bytes=1 << 20)
        reply = parse(pb.PollTaskResponse, task_reply(task))
        assert reply == poll_response_to_pb(task)
        back = poll_response_from_pb(reply)
        assert back.asynchronous == AsyncWork(4, upload_id) and back.global_adapter.keys() == adapter.keys()
        np.testing.assert_array_equal(back.global_adapter["lora_A"], adapter["lora_A"])


def test_registration_downloads_receipts_and_heartbeats_survive_the_wire():
    from edgeft.wire import (BundleChunk, BundleFile, BundleInfo, Capabilities, DownloadRequest, Heartbeat,
                             PollRequest, Registration, UploadReceipt, bundle_chunk_from_pb, bundle_chunk_to_pb,
                             bundle_info_from_pb, bundle_info_to_pb, bundle_request_from_pb, bundle_request_to_pb,
                             download_request_from_pb, download_request_to_pb, heartbeat_from_pb, heartbeat_to_pb,
                             poll_request_from_pb, poll_request_to_pb, registered_from_pb, registered_to_pb,
                             registration_from_pb, registration_to_pb, upload_receipt_from_pb,
                             upload_receipt_to_pb)

    caps = Capabilities("Linux 6", 8, 2**34, 2**36, "1.19.2", ("CPUExecutionProvider",), 4, ("portable",))
    registration = Registration("dev-1", caps)
    assert registration_from_pb(registration_to_pb(registration)) == registration
    assert caps.record() == {"os": "Linux 6", "cores": 8, "ram_bytes": 2**34, "free_disk_bytes": 2**36,
                             "ort_version": "1.19.2", "execution_providers": ["CPUExecutionProvider"],
                             "max_lora_rank": 4, "engines": ["portable"]}
    assert Capabilities().record()["engines"] == []  # an agent from before engines
    assert registered_from_pb(registered_to_pb("dev-9")) == "dev-9"
    assert poll_request_from_pb(poll_request_to_pb(PollRequest("dev-1", 5))) == PollRequest("dev-1", 5)
    info = BundleInfo("b" * 64, b'{"files": {}}', (BundleFile("checkpoint", 10, "c" * 64),))
    assert bundle_info_from_pb(bundle_info_to_pb(info)) == info
    assert bundle_request_from_pb(bundle_request_to_pb("b" * 64)) == "b" * 64
    asked = DownloadRequest("b" * 64, "checkpoint", 7)
    assert download_request_from_pb(download_request_to_pb(asked)) == asked
    chunk = BundleChunk("checkpoint", 7, b"abc", "e" * 64)
    assert bundle_chunk_from_pb(bundle_chunk_to_pb(chunk)) == chunk
    receipt = UploadReceipt(True, "already received; counted once")
    assert upload_receipt_from_pb(upload_receipt_to_pb(receipt)) == receipt
    beat = Heartbeat("dev-1", {"battery": 0.5})
    assert heartbeat_from_pb(heartbeat_to_pb(beat)) == beat


def test_an_upload_is_observed_message_by_message_before_it_is_read():
    """What the coordinator checks as an upload arrives: each message's size, and the header's claim first."""
    messages = [p.SerializeToString() for p in update_to_parts(HEADER, AdapterUpdate(tensors(), 3),
                                                               chunk_bytes=400_000)]
    seen = []
    header, back = update_from_wire(messages, observe=lambda size, claim: seen.append((size, claim)))
    assert header == HEADER and [s for s, _ in seen] == [len(m) for m in messages]
    assert seen[0][1] == HEADER and all(claim is None for _, claim in seen[1:])
    assert all(np.array_equal(back.tensors[k], v) for k, v in tensors().items())

    def refuse(size, claim):  # noqa: ANN001, ANN202
        if claim is None:
            raise WireError("too large")

    with pytest.raises(WireError, match="too large"):
        update_from_wire(messages, observe=refuse)
    with pytest.raises(WireError, match="does not parse"):  # garbled bytes: INVALID_ARGUMENT, not an internal error
        update_from_wire([messages[0], messages[1][:-7]], observe=lambda size, claim: None)


def test_the_service_is_described_for_registration_and_requests_parse_by_method():
    from edgeft.wire import SERVICE_NAME, coordinator_methods, parse_request, registration_from_pb

    methods = {m.name: m for m in coordinator_methods()}
    assert SERVICE_NAME == "edgeft.v1.Coordinator"
    assert set(methods) == {"Register", "PollTask", "GetBundle", "DownloadBundle", "UploadUpdate", "Heartbeat",
                            "SecureAggregate"}
    assert methods["UploadUpdate"].client_streaming and methods["DownloadBundle"].server_streaming
    assert methods["PollTask"].serialize_response(pb.PollTaskResponse(finished="x")) == pb.PollTaskResponse(
        finished="x").SerializeToString()
    raw = pb.RegisterRequest(device_id="dev-1").SerializeToString()
    assert registration_from_pb(parse_request("Register", raw)).device_id == "dev-1"
    with pytest.raises(WireError, match="does not parse"):
        parse_request("Register", raw[:-1] + b"\xff")


def test_an_asynchronous_task_and_its_upload_carry_the_version_trained_from():
    """mode = "async": the task names its global version and upload id (AsyncTask), the upload names the version
    back (UpdateHeader.base_version); a task without an upload id is malformed."""
    from edgeft.wire import AsyncWork, Task, task_from_pb, task_to_pb

    task = Task("job", 8, "d" * 64, TrainConfig(), {"w": np.ones(2, np.float32)},
                asynchronous=AsyncWork(base_version=7, upload_id="dev-1:job:v7:abc"))
    message = task_to_pb(task)
    assert (message.asynchronous.base_version, message.asynchronous.upload_id) == (7, "dev-1:job:v7:abc")
    assert task_from_pb(message).asynchronous == AsyncWork(7, "dev-1:job:v7:abc")
    plain = pb.Task(job_id="j", round=1, bundle_digest="x", train=pb.TrainSpec(learning_rate=0.01))
    assert task_from_pb(plain).asynchronous is None
    with pytest.raises(WireError, match="upload_id"):
        plain.asynchronous.base_version = 3
        task_from_pb(plain)
    header = UploadHeader("job", 8, "dev-1", "dev-1:job:v7:abc", base_version=7)
    back, _ = update_from_parts(update_to_parts(header, AdapterUpdate(tensors(), 12)))
    assert back == header


def test_a_packed_upload_is_fewer_messages_and_the_same_update():
    """A coordinator that sets Task.upload_message_bytes reads tensors packed several to a message
    (UpdatePart.chunks): an adapter of many small tensors travels in a few messages, each within the size, and
    reads back exactly; without it (an older coordinator) a device sends one chunk a message."""
    from edgeft.wire import Task, task_from_pb, task_to_pb, task_update_parts

    rng = np.random.default_rng(1)
    small = {f"layer{i}.lora_{ab}": rng.normal(size=(8, 384)).astype(np.float32) for i in range(6) for ab in "AB"}
    update = AdapterUpdate({**small, **tensors()}, 7, {"loss": 0.25})
    task = Task("job", 3, "d" * 64, TrainConfig(), {}, upload_message_bytes=300_000)
    assert task_from_pb(task_to_pb(task)).upload_message_bytes == 300_000
    packed = list(task_update_parts(task, HEADER, update))
    plain = list(task_update_parts(Task("job", 3, "d" * 64, TrainConfig(), {}), HEADER, update))
    assert [p.WhichOneof("part") for p in packed[1:]] == ["chunks"] * (len(packed) - 1)
    assert {p.WhichOneof("part") for p in plain[1:]} == {"chunk"}
    assert len(plain) == 1 + 12 + 2  # the header, then a message per tensor (each within 1 MiB)
    assert len(packed) == 1 + 4  # the 12 small ones together; "a" (840 kB) in 300 kB pieces, "b" with its last
    assert all(sum(len(c.data) for c in p.chunks.chunks) <= 300_000 for p in packed[1:])
    for parts in (packed, plain):
        header, back = update_from_parts(parts)
        assert header == HEADER and back.n_examples == 7 and back.metrics == {"loss": 0.25}
        for name, value in update.tensors.items():
            np.testing.assert_array_equal(back.tensors[name], value)
