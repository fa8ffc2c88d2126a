"""Fault injection with real processes: clients killed at random points (mid-upload included), the coordinator
SIGKILLed at random points (mid-write included) and restarted on its state, corrupt state files, replayed and
old-round updates, and fuzzed malformed uploads against a coordinator process whose memory is watched.

Quick variants run in the default suite (3 clients, 3 coordinator kills; the 1000 fuzzed uploads take about 10 s
and run in full); the full-size ones (10 clients, 20 coordinator kills) are marked slow: ``pytest -m slow tests/server/test_fault_injection.py -s`` or ``bench/faults.py``.
Each scenario prints a ``FAULTS name: {...}`` line and adds its figures to ``fault_report.json`` in pytest's
base temporary folder (and to $EDGEFT_FAULT_REPORT when set).

Transport and identity faults are covered in test_security.py, not repeated here: another CA's certificate or
none (UNAVAILABLE at the handshake, test_mutual_tls_refuses_devices_without_a_certificate_of_its_ca); no,
malformed, unknown, revoked or expired token (UNAUTHENTICATED on every method,
test_calls_without_a_valid_token_are_unauthenticated); another job's token (PERMISSION_DENIED,
test_another_jobs_token_is_permission_denied).
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgeft.client.transport import Transport, open_channel
from edgeft.errors import StateError
from edgeft.server.config import load_server_config
from edgeft.server.coordinator import Coordinator
from edgeft.testing.ports import free_port
from edgeft.update import AdapterUpdate, update_norm
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.wire import UploadHeader, update_to_parts

from conftest_server import enrol, five_intents, start, stub, write_csv
from faults import (CoordinatorProcess, agent_process, check_consistent, committed, make_token, output, record,
                    rejection_counts, wait_for, write_config)

Code = grpc.StatusCode


def partitions(folder: Path, n: int) -> list[Path]:
    rows = five_intents("train")
    return [write_csv(folder / f"part{i}.csv", rows[i::n][:120]) for i in range(n)]


def honest(reference: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in reference.items()}


# -- replays and old rounds ------------------------------------------------------------------------------------------
def test_an_update_replayed_ten_times_counts_once_and_old_round_updates_are_refused(tmp_path, tiny_bundle,
                                                                                     fault_report):
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=2, minimum=2)
    try:
        token = enrol(coordinator, tmp_path)
        devices = [stub(port, token) for _ in range(3)]
        ids = [s.Register(pb.RegisterRequest()).device_id for s in devices[:2]]
        for s, device in zip(devices, ids):
            s.PollTask(pb.PollTaskRequest(device_id=device, wait_seconds=1))
        reference = coordinator.global_adapter("banking", 0)
        updates = [AdapterUpdate(honest(reference, i), 100 + 50 * i) for i in range(2)]

        def upload(i, round_number=1, upload_id=None):
            who = ids[i] if i < 2 else late
            header = UploadHeader("banking", round_number, who, upload_id or f"{i}:{round_number}")
            return devices[i].UploadUpdate(update_to_parts(header, updates[i % 2]), timeout=10)

        answers = [upload(0).duplicate for _ in range(10)]  # the same upload, as a flaky network may repeat it
        assert answers == [False] + [True] * 9
        with pytest.raises(grpc.RpcError) as info:  # another upload id for a round the device already delivered
            upload(0, upload_id="second")
        assert info.value.code() == Code.FAILED_PRECONDITION and "counts once per round" in info.value.details()
        assert len(coordinator.round_updates("banking", 1)) == 1
        assert upload(1).duplicate is False  # the round closes with both
        assert coordinator.job_status("banking")["current_round"] == 2
        late = devices[2].Register(pb.RegisterRequest()).device_id  # a device that never trained round 1
        refused = {}
        for who, upload_id in ((2, "late:1"), (0, "0:again")):  # round 1 is closed
            with pytest.raises(grpc.RpcError) as info:
                upload(who, round_number=1, upload_id=upload_id)
            refused[who] = (info.value.code(), info.value.details())
        assert refused[2][0] == Code.FAILED_PRECONDITION and "not open" in refused[2][1]
        assert refused[0][0] == Code.FAILED_PRECONDITION and "counts once per round" in refused[0][1]
        assert upload(1).duplicate is True  # a replay of round 1 after it closed: still counted once, nothing changes
        stored = coordinator.round_updates("banking", 1)
        assert sorted(u.n_examples for u in stored) == [100, 150]
        weight = sum(u.n_examples for u in stored)
        for name, value in coordinator.global_adapter("banking", 1).items():
            expected = sum(u.n_examples * u.tensors[name].astype(np.float64) for u in stored) / weight
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6)
        history = coordinator.history("banking")
        assert history["duplicates"] == 10
        assert history["rejections"] == {"second_update": 2, "round": 1}
        record(fault_report, "replays", {"replays_sent": 11, "answered_duplicate": history["duplicates"],
                                         "stored_per_device_and_round": 1, "refused": history["rejections"]})
    finally:
        server.stop(grace=None)


# -- clients killed --------------------------------------------------------------------------------------------------
def kill_clients(tmp_path, bundle, n: int, victims: dict[int, str], minimum: int, deadline: float, seed: int) -> dict:
    """``n`` agents on one round; ``victims`` (index -> "at_open", "mid_training" or "mid_upload") die there.
    Returns the figures; asserts the round closed with the survivors' FedAvg or failed cleanly below the minimum."""
    started = time.monotonic()
    server, port, coordinator = start(tmp_path, bundle, rounds=1, minimum=minimum, deadline=deadline, available=n)
    procs = []
    try:
        token = enrol(coordinator, tmp_path).read_text().strip()
        data = partitions(tmp_path, n)
        procs = [agent_process(port, data[i], tmp_path / f"device{i}", token,
                               fault=victims.get(i) if victims.get(i) in ("mid_upload", "mid_training") else "")
                 for i in range(n)]
        wait_for(lambda: _round_open(coordinator), 120, "round 1 to open")
        for i in [i for i, kind in victims.items() if kind == "at_open"]:
            procs[i].send_signal(signal.SIGKILL)
        coordinator.wait_until_finished(timeout=deadline + 180)
        outputs = {i: output(p, timeout=120) for i, p in enumerate(procs) if i not in victims}
        assert all(procs[i].returncode == 0 for i in outputs), outputs
        status = coordinator.job_status("banking")
        stored = {c["device_id"] for c in coordinator.history("banking")["rounds"][1]["clients"]}
        ids = {i: (tmp_path / f"device{i}" / "device_id").read_text() for i in range(n)
               if (tmp_path / f"device{i}" / "device_id").is_file()}
        assert all(ids[i] in stored for i in outputs), "every survivor's update was stored"
        for i in victims:  # a client killed before, while training or during its upload left nothing behind
            assert ids.get(i) not in stored, (i, victims[i])
        survivors = len(stored)
        if survivors >= minimum:
            assert status["status"] == "finished", status
            state = check_consistent(tmp_path / "state")  # the aggregate is the FedAvg of the survivors' updates
            assert state["updates_per_round"] == {1: survivors}
        else:
            assert status["status"] == "failed" and f"fewer than the minimum {minimum}" in status["message"], status
            assert all("job banking failed" in out for out in outputs.values()), outputs
        return {"clients": n, "killed": {kind: sum(1 for k in victims.values() if k == kind)
                                         for kind in sorted(set(victims.values()))},
                "minimum": minimum, "updates_stored": survivors, "job": status["status"],
                # a device killed mid-upload looks like a stream that ended early: refused for its missing or
                # truncated tensors (or "incomplete" when gRPC reports the cancellation first)
                "cut_uploads_refused": sum(coordinator.rejections("banking").get(r, 0)
                                           for r in ("names", "malformed", "incomplete")),
                "seconds": round(time.monotonic() - started, 1)}
    finally:
        server.stop(grace=None)
        for p in procs:
            p.kill()


def _round_open(coordinator) -> bool:
    return len(coordinator.history("banking")["rounds"]) > 1


def test_a_client_killed_mid_upload_leaves_nothing_and_the_round_closes_with_the_others(tmp_path, tiny_bundle,
                                                                                        fault_report):
    figures = kill_clients(tmp_path, tiny_bundle, n=3, victims={2: "mid_upload"}, minimum=2, deadline=12, seed=1)
    assert figures["cut_uploads_refused"] == 1
    record(fault_report, "clients_killed_quick", figures)


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["completes", "aborts"])
def test_thirty_percent_of_clients_killed_at_random_points(tmp_path, tiny_bundle, fault_report, outcome):
    """10 clients, 3 killed (one when the round opens, one while it trains, one halfway through its upload): the
    round completes with the 7 survivors when the minimum is 7, and fails cleanly when it is 8. Either way the round
    waits out its deadline for the dead: 20 s, where the survivors deliver about 3 s after the round opens (and an
    agent stops training 5 s before a deadline, to upload in time)."""
    rng = random.Random(6)
    victims = dict(zip(rng.sample(range(10), 3), ["at_open", "mid_training", "mid_upload"]))
    figures = kill_clients(tmp_path, tiny_bundle, n=10, victims=victims, minimum=7 if outcome == "completes" else 8,
                           deadline=20, seed=6)
    assert figures["job"] == ("finished" if outcome == "completes" else "failed")
    record(fault_report, f"clients_killed_30pct_{outcome}", figures)


# -- the coordinator killed ------------------------------------------------------------------------------------------
def kill_coordinator(tmp_path, bundle, shards, plan: list[str], rounds: int, seed: int) -> dict:
    """Run a job with three agents while the coordinator process is SIGKILLed once per ``plan`` entry ("time": from
    outside at a random moment; "commit": inside a random database commit; "put": halfway through writing an
    artifact blob) and restarted on its state folder. After each kill, what the database had committed must
    still be there at the end; at the end every round's adapter is the FedAvg of its stored updates, once each."""
    rng = random.Random(seed)
    started = time.monotonic()
    port = free_port()
    # the agents, all in every round, hear that the job is over within a poll (1 s): 3 s of final answers (not 10)
    config = write_config(tmp_path, bundle.path, port, rounds=rounds, minimum=3, deadline=600,
                          server_extra="final_answers_s = 3")
    token = make_token(tmp_path / "state")
    coordinator = CoordinatorProcess(config, port, tmp_path / "coordinator.log")
    clients = [agent_process(port, shard, tmp_path / f"device{i}", token, give_up_after=180)
               for i, shard in enumerate(shards)]
    snapshots, kills = [], {"time": 0, "commit": 0, "put": 0, "put_fell_back_to_time": 0, "commit_fell_back_to_time": 0}
    try:
        for number, kind in enumerate(plan):
            fault = {"time": "", "commit": f"commit:{rng.randint(5, 60)}", "put": f"put:{rng.randint(1, 3)}"}[kind]
            coordinator.start(fault)
            coordinator.wait_ready()
            if kind == "time":
                time.sleep(rng.uniform(0.5, 4.0))
            else:
                try:
                    wait_for(lambda: not coordinator.alive(), 20, f"the coordinator to crash at {fault}")
                except AssertionError:  # the job had no such write left (it finished): kill it from outside
                    kind = f"{kind}_fell_back_to_time"
            coordinator.kill()
            kills[kind] += 1
            snapshots.append(committed(tmp_path / "state", tmp_path / f"snapshot{number}"))
        coordinator.start()  # the last start runs the job to its end
        outputs = [output(c, timeout=300) for c in clients]
        log_tail = (tmp_path / "coordinator.log").read_text()[-3000:]
        assert all(c.returncode == 0 for c in clients), (outputs[:1], log_tail)
        coordinator.proc.wait(timeout=60)
    finally:
        coordinator.kill()
        for c in clients:
            c.kill()
    final = committed(tmp_path / "state", tmp_path / "snapshot-final")
    for snapshot in snapshots:  # nothing committed before a kill was lost, nothing was rewritten
        assert snapshot["updates"].items() <= final["updates"].items()
        assert snapshot["adapters"].items() <= final["adapters"].items()
    state = check_consistent(tmp_path / "state")
    assert state["status"] == "finished" and state["rounds"] == ["closed"] * rounds, state
    assert state["updates_per_round"] == {n: 3 for n in range(1, rounds + 1)}
    log = (tmp_path / "coordinator.log").read_text()
    return {"kills": len(plan), "by_kind": {k: v for k, v in kills.items() if v},
            "restarts": len(plan), "rounds": rounds, "updates_per_round": 3,
            "replays_answered_duplicate": rejection_counts(tmp_path / "state").get("duplicate", 0),
            "committed_updates_seen_at_kills": [len(s["updates"]) for s in snapshots],
            "kills_with_a_round_open": sum(1 for s in snapshots if "open" in s["rounds"].values()),
            "tracebacks_in_log": log.count("Traceback"), "seconds": round(time.monotonic() - started, 1)}


def test_coordinator_sigkilled_at_three_points_resumes_without_double_counting(tmp_path, tiny_bundle, shards,
                                                                                 fault_report):
    plan = ["time", "put", "commit"]
    figures = kill_coordinator(tmp_path, tiny_bundle, shards, plan, rounds=3, seed=3)
    record(fault_report, "coordinator_killed_quick", figures)


@pytest.mark.slow
def test_coordinator_sigkilled_at_twenty_random_points(tmp_path, tiny_bundle, shards, fault_report):
    rng = random.Random(20)
    plan = ["time"] * 8 + ["commit"] * 7 + ["put"] * 5
    rng.shuffle(plan)
    figures = kill_coordinator(tmp_path, tiny_bundle, shards, plan, rounds=10, seed=20)
    record(fault_report, "coordinator_killed_20", figures)


# -- corrupt state ---------------------------------------------------------------------------------------------------
def test_a_corrupt_state_is_detected_not_used(tmp_path, tiny_bundle, fault_report):
    """A state folder with a closed round and an open one, then damaged copies of it: each is named at start."""
    server, port, coordinator = start(tmp_path, tiny_bundle, rounds=3, minimum=2)
    try:
        token = enrol(coordinator, tmp_path)
        devices = [stub(port, token) for _ in range(2)]
        ids = [s.Register(pb.RegisterRequest()).device_id for s in devices]

        def deliver(i: int, number: int) -> None:
            devices[i].PollTask(pb.PollTaskRequest(device_id=ids[i], wait_seconds=1))
            reference = coordinator.global_adapter("banking", number - 1)
            parts = update_to_parts(UploadHeader("banking", number, ids[i], f"{i}:{number}"),
                                    AdapterUpdate(honest(reference, 10 * number + i), 50))
            devices[i].UploadUpdate(parts, timeout=10)

        deliver(0, 1)
        deliver(1, 1)  # round 1 closes
        deliver(0, 2)  # round 2 stays open with one update
        with coordinator.engine.begin() as conn:
            latest = conn.exec_driver_sql("SELECT blob FROM adapters ORDER BY version DESC LIMIT 1").scalar()
            pending = conn.exec_driver_sql("SELECT blob FROM updates WHERE round = 2").scalar()
    finally:
        server.stop(grace=None)
        coordinator.engine.dispose()
    config = tmp_path / "jobs.toml"
    config.write_text(f'[server]\nstate_dir = "copy"\ninsecure = true\n[[job]]\nid = "banking"\n'
                      f'bundle = "{tiny_bundle.path}"\nrounds = 3\n')

    def damaged(how) -> str:
        shutil.rmtree(tmp_path / "copy", ignore_errors=True)
        shutil.copytree(tmp_path / "state", tmp_path / "copy")
        how(tmp_path / "copy")
        with pytest.raises(StateError) as info:
            Coordinator(load_server_config(config))
        return str(info.value)

    def truncate(path: Path, size: int) -> None:
        with open(path, "r+b") as fh:
            fh.truncate(size)

    def garble(path: Path, offset: int = 0, length: int = 64) -> None:
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(bytes(random.Random(0).randrange(256) for _ in range(length)))

    size = (tmp_path / "state" / "state.db").stat().st_size
    assert not (tmp_path / "state" / "state.db-wal").exists()  # checkpointed when the coordinator closed it
    blob_rel = Path("artifacts/blobs") / pending[:2] / pending
    latest_rel = Path("artifacts/blobs") / latest[:2] / latest
    cases = {
        "state.db truncated to half": (lambda d: truncate(d / "state.db", size // 2), "state database"),
        "state.db header garbled": (lambda d: garble(d / "state.db"), "not a database"),
        "state.db pages garbled": (lambda d: [garble(d / "state.db", o + 10, 64) for o in range(4096, size, 8192)],
                                   "is corrupt"),
        "state.db emptied": (lambda d: truncate(d / "state.db", 0), "the database was lost"),
        "state.db deleted": (lambda d: (d / "state.db").unlink(), "the database was lost"),
        "global adapter blob garbled": (lambda d: garble(d / latest_rel, 20), "sha256 mismatch"),
        "open round's update blob truncated": (lambda d: truncate(d / blob_rel, 10), "sha256 mismatch"),
        "bundle file garbled": (lambda d: garble(next((d / "artifacts" / "bundles").glob("*/eval_model.onnx")), 100),
                                "eval_model.onnx is corrupt"),
    }
    detected = {}
    for name, (how, words) in cases.items():
        message = damaged(how)
        assert words in message, (name, message)
        detected[name] = message[:160]
    # the command line says it and stops (exit status 2), rather than serving from a damaged state
    import subprocess
    import sys

    shutil.rmtree(tmp_path / "copy")
    shutil.copytree(tmp_path / "state", tmp_path / "copy")
    truncate(tmp_path / "copy" / "state.db", size // 2)
    proc = subprocess.run([sys.executable, "-m", "edgeft.cli", "server", "--config", str(config)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "is corrupt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    record(fault_report, "corrupt_state", {"cases_detected": len(detected), "cases": sorted(detected)})


# -- fuzzed uploads --------------------------------------------------------------------------------------------------
CATEGORIES = {  # what the fuzzer sends -> the statuses it must get back
    "garbled_bytes": {Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED},  # garbage that parses as another job's header
    "truncated_protobuf": {Code.INVALID_ARGUMENT},
    "wrong_keys": {Code.INVALID_ARGUMENT},
    "bad_shape": {Code.INVALID_ARGUMENT},
    "bad_dtype": {Code.INVALID_ARGUMENT},
    "nan_inf": {Code.INVALID_ARGUMENT},
    "norm_over_bound": {Code.INVALID_ARGUMENT},
    "absurd_examples": {Code.INVALID_ARGUMENT},
    "bad_chunks": {Code.INVALID_ARGUMENT},
    "old_or_future_round": {Code.FAILED_PRECONDITION},
    "another_job": {Code.PERMISSION_DENIED},
    "unknown_device": {Code.NOT_FOUND},
}


def fuzzed(rng: np.random.Generator, category: str, device: str, reference: dict[str, np.ndarray],
           bound: float, serial: int) -> list[bytes]:
    """The raw messages of one malformed upload of ``category``."""
    names = sorted(reference)  # the order tensors arrive in is not (safetensors' own map)
    good = honest(reference, serial)

    def parts(tensors=good, n=100, round_number=1, job="banking", who=device, dtype="float32") -> list[pb.UpdatePart]:
        return list(update_to_parts(UploadHeader(job, round_number, who, f"fuzz-{serial}"), AdapterUpdate(tensors, n),
                                    dtype))

    def raw(messages: list[pb.UpdatePart]) -> list[bytes]:
        return [m.SerializeToString() for m in messages]

    name = names[int(rng.integers(len(names)))]
    if category == "garbled_bytes":
        return [rng.bytes(int(rng.integers(1, 300)))]
    if category == "truncated_protobuf":
        messages = raw(parts())
        i = int(rng.integers(1, len(messages)))
        return messages[:i] + [messages[i][: int(rng.integers(0, len(messages[i])))]]
    if category == "wrong_keys":
        choice = int(rng.integers(3))
        tensors = ({k: v for k, v in good.items() if k != name} if choice == 0 else
                   {**good, f"{name}.evil": good[name]} if choice == 1 else
                   {(f"x{k}" if k == name else k): v for k, v in good.items()})
        return raw(parts(tensors))
    if category == "bad_shape":
        value = good[name]
        shapes = [v for v in (value.reshape(-1), value.reshape(1, -1), value.reshape(-1)[:-1],
                              np.zeros((3, 3), np.float32), value[..., None]) if v.shape != value.shape]
        return raw(parts({**good, name: shapes[int(rng.integers(len(shapes)))]}))
    if category == "bad_dtype":
        if rng.random() < 0.5:
            return raw(parts(dtype="int64"))
        messages = parts()
        messages[int(rng.integers(1, len(messages)))].chunk.dtype = int(rng.choice([0, 7, 99]))
        return raw(messages)
    if category == "nan_inf":
        value = good[name].copy()
        value.reshape(-1)[int(rng.integers(value.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return raw(parts({**good, name: value}))
    if category == "norm_over_bound":
        target = bound * float(rng.choice([1.05, 2.0, 10.0, 1e3, 1e6]))
        scale = target / update_norm(good, reference)
        return raw(parts({k: (reference[k] + scale * (v - reference[k])).astype(np.float32) for k, v in good.items()}))
    if category == "absurd_examples":
        return raw(parts(n=int(rng.choice([0, -1, -(2**40), 10**6 + 1, 2**62]))))
    if category == "bad_chunks":
        messages = parts()
        choice = int(rng.integers(5))
        if choice == 0:  # a chunk at the wrong offset
            messages[int(rng.integers(1, len(messages)))].chunk.offset += int(rng.integers(1, 1000))
        elif choice == 1:  # more bytes than the shape holds
            messages[1].chunk.data += b"\0" * 4
        elif choice == 2:  # a chunk sent twice
            messages.insert(2, messages[1])
        elif choice == 3:  # two headers
            messages.insert(1, messages[0])
        else:  # chunks first
            messages = messages[1:] + messages[:1]
        return raw(messages)
    if category == "old_or_future_round":
        return raw(parts(round_number=int(rng.choice([0, -3, 2, 99, 2**40]))))
    if category == "another_job":
        return raw(parts(job=str(rng.choice(["other", "banking2", "", "BANKING"]))))
    if category == "unknown_device":
        return raw(parts(who=f"device-{rng.integers(1 << 30)}"))
    raise ValueError(category)


def fuzz_coordinator(tmp_path, bundle, shard, messages: int, warmup: int, seed: int) -> dict:
    """A coordinator process, one honest agent and a fuzzer device in the same round: ``warmup`` then ``messages``
    malformed uploads, each answered with its category's status; the server's RSS measured around the second
    batch; then the honest agent's round completes."""
    import psutil

    started = time.monotonic()
    port = free_port()
    config = write_config(tmp_path, bundle.path, port, rounds=1, minimum=2, deadline=600)
    token = make_token(tmp_path / "state")
    coordinator = CoordinatorProcess(config, port, tmp_path / "coordinator.log").start()
    honest_agent = None
    try:
        coordinator.wait_ready()
        device_stub = stub(port, token)
        device = device_stub.Register(pb.RegisterRequest(), timeout=10).device_id
        honest_agent = agent_process(port, shard, tmp_path / "honest", token)
        task = None
        while task is None:
            reply = device_stub.PollTask(pb.PollTaskRequest(device_id=device, wait_seconds=1), timeout=10)
            task = reply.task if reply.WhichOneof("outcome") == "task" else None
        reference = {t.name: np.frombuffer(t.data, np.float32).reshape(t.shape) for t in task.global_adapter}
        bound = 10.0 * update_norm(reference)
        channel = open_channel(f"127.0.0.1:{port}", Transport(token=token, insecure=True))
        upload = channel.stream_unary("/edgeft.v1.Coordinator/UploadUpdate", request_serializer=lambda b: b,
                                      response_deserializer=pb.UploadResponse.FromString)
        rng = np.random.default_rng(seed)
        categories = sorted(CATEGORIES)
        counts = {c: 0 for c in categories}
        codes: dict[str, dict[str, int]] = {c: {} for c in categories}
        server = psutil.Process(coordinator.proc.pid)
        rss = {}
        honest_done_at = None
        for serial in range(warmup + messages):
            if serial == warmup:
                rss["before_mb"] = server.memory_info().rss / 2**20
            category = categories[serial % len(categories)]
            try:
                reply = upload(iter(fuzzed(rng, category, device, reference, bound, serial)), timeout=30)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
            else:
                pytest.fail(f"fuzzed upload {serial} ({category}) was accepted: {reply}")
            assert code in CATEGORIES[category] and details, (serial, category, code, details)
            if serial >= warmup:
                counts[category] += 1
                codes[category][code.name] = codes[category].get(code.name, 0) + 1
            if honest_done_at is None and honest_agent.poll() is None and _delivered(tmp_path / "state") == 1:
                honest_done_at = serial
        rss["after_mb"] = server.memory_info().rss / 2**20
        # honest clients are still served: the fuzzer's own valid update closes the round with the agent's
        good = honest(reference, 7)
        reply = upload(iter(m.SerializeToString() for m in update_to_parts(
            UploadHeader("banking", 1, device, "honest"), AdapterUpdate(good, 100))), timeout=30)
        assert reply.duplicate is False
        said = output(honest_agent, timeout=240)
        assert honest_agent.returncode == 0 and "job banking finished" in said, said
        state = check_consistent(tmp_path / "state")
        assert state["status"] == "finished" and state["updates_per_round"] == {1: 2}
        counted = rejection_counts(tmp_path / "state")
        assert sum(counted.values()) == warmup + messages, counted  # every refusal counted, none twice
        growth = rss["after_mb"] - rss["before_mb"]
        assert growth < max(20.0, 0.15 * rss["before_mb"]), rss
        return {"messages": messages, "warmup_messages": warmup, "rejected_per_category": counts,
                "status_per_category": {c: codes[c] for c in categories},
                "counted_by_coordinator_per_reason": counted,
                "rss_mb_before": round(rss["before_mb"], 1), "rss_mb_after": round(rss["after_mb"], 1),
                "honest_update_stored_during_fuzzing": honest_done_at is not None,
                "seconds": round(time.monotonic() - started, 1)}
    finally:
        coordinator.kill()
        if honest_agent is not None:
            honest_agent.kill()


def _delivered(state_dir: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute("SELECT count(*) FROM updates").fetchone()[0]


def test_a_thousand_fuzzed_uploads_are_each_refused_memory_stays_flat_and_honest_clients_are_served(
        tmp_path, tiny_bundle, shards, fault_report):
    figures = fuzz_coordinator(tmp_path, tiny_bundle, shards[0], messages=1000, warmup=100, seed=0)
    record(fault_report, "fuzz_1000", figures)
