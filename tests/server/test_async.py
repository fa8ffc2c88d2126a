"""Asynchronous jobs (FedBuff, ``mode = "async"``) with a real coordinator on a loopback port and real agent
processes: versions advance every ``buffer_size`` accepted updates, each the staleness-weighted step recomputed here
from the stored updates; an update staler than ``max_staleness`` is refused and counted; the concurrency cap holds;
a coordinator SIGKILLed between versions loses no accepted update and counts none twice after its restart; config
errors name the field."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load as load_tensors
from sqlalchemy import select

from edgeft.aggregate.fedbuff import FedBuffOptions
from edgeft.errors import ConfigError, NotFound, PermissionDenied, Rejected
from edgeft.server.artifacts import ArtifactStore
from edgeft.server.config import load_server_config
from edgeft.server.async_state import AsyncState
from edgeft.server.state import State
from edgeft.server.store import adapters, async_updates, jobs, open_database
from edgeft.testing.ports import free_port
from edgeft.update import AdapterUpdate
from edgeft.v1 import edgeft_pb2 as pb
from edgeft.server.rounds import TaskAssignment
from edgeft.wire import RetryLater, UploadHeader, update_to_parts

from conftest_server import agent, enrol, five_intents, start, stub, write_csv
from faults import CoordinatorProcess, agent_process, make_token, output, wait_for, write_config

ASYNC = {"buffer_size": 2, "staleness": "polynomial", "exponent": 0.5, "max_staleness": 2, "max_concurrency": 4}


def fleet_shards(folder: Path, sizes: list[int]) -> list[Path]:
    """One shard per device; its size sets how long the device trains (different speeds)."""
    rows = five_intents("train")
    return [write_csv(folder / f"shard{i}.csv", rows[i::len(sizes)][:size]) for i, size in enumerate(sizes)]


def stored(state_dir: Path, job: str = "banking") -> dict:
    """What the coordinator's database holds of an asynchronous job: the job row, adapter blobs by version, and
    its async_updates rows in arrival order."""
    engine = open_database(state_dir / "state.db")
    try:
        with engine.begin() as conn:
            return {"job": conn.execute(select(jobs).where(jobs.c.id == job)).first(),
                    "adapters": {r.version: r.blob for r in conn.execute(
                        select(adapters).where(adapters.c.job_id == job))},
                    "updates": conn.execute(select(async_updates).where(async_updates.c.job_id == job)
                                            .order_by(async_updates.c.seq)).all()}
    finally:
        engine.dispose()


def check_versions(state_dir: Path, options: FedBuffOptions) -> dict:
    """Every global version v is version v-1 plus server_lr times the staleness-weighted mean of the deltas of
    exactly buffer_size stored updates (each from the version it trained from), recomputed here; every update is
    in at most one version. Returns the stored facts."""
    facts = stored(state_dir)
    store = ArtifactStore(state_dir / "artifacts")
    versions = sorted(facts["adapters"])
    assert versions == list(range(len(versions))), versions
    assert len({r.upload_id for r in facts["updates"]}) == len(facts["updates"]), "an upload stored twice"
    adapter = {v: load_tensors(store.get(facts["adapters"][v])) for v in versions}
    for version in versions[1:]:
        rows = [r for r in facts["updates"] if r.version == version]
        assert len(rows) == options.buffer_size, (version, len(rows))
        rows = [r for r in rows if version - 1 - r.base_version <= options.max_staleness]  # aggregate_buffer's rule
        total = sum(r.n_examples for r in rows)
        for name, previous in adapter[version - 1].items():
            step = sum(options.weight(version - 1 - r.base_version) * r.n_examples / total
                       * (load_tensors(store.get(r.blob))[name].astype(np.float64) - adapter[r.base_version][name])
                       for r in rows)
            np.testing.assert_allclose(adapter[version][name], previous + options.server_lr * step, rtol=0,
                                       atol=1e-6, err_msg=f"version {version} {name}")
    return facts


def upload(device_stub, device_id: str, tensors: dict, base_version: int, upload_id: str):
    header = UploadHeader("banking", base_version + 1, device_id, upload_id, base_version)
    return device_stub.UploadUpdate(update_to_parts(header, AdapterUpdate(tensors, 40)), timeout=30)


def test_six_agents_of_different_speeds_advance_versions_every_k_updates(tmp_path, tiny_bundle):
    settings = {**ASYNC, "versions": 8}
    server, port, coordinator = start(tmp_path, tiny_bundle, minimum=1, deadline=120,
                                      job_settings={"mode": "async", "asynchronous": settings})
    procs = []
    try:
        token = enrol(coordinator, tmp_path)
        shards = fleet_shards(tmp_path, [16, 24, 40, 60, 90, 130])
        # a stale upload, made by hand: a device takes work at version 0 and uploads once the job is 3 versions on
        late = stub(port, token)
        late_id = late.Register(pb.RegisterRequest()).device_id
        work = late.PollTask(pb.PollTaskRequest(device_id=late_id, wait_seconds=1)).task.asynchronous
        assert work.base_version == 0 and work.upload_id
        initial = coordinator.global_adapter("banking", 0)
        procs = [agent(port, shard, tmp_path / f"device{i}", token) for i, shard in enumerate(shards)]
        holding, seen_version = [], 0
        while seen_version < 3:
            holding.append(coordinator.async_rounds.state.holding("banking"))
            seen_version = coordinator.job_status("banking")["current_round"] - 1
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as info:
            upload(late, late_id, {k: v + 0.01 for k, v in initial.items()}, 0, work.upload_id)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "versions behind" in info.value.details() and "max_staleness is 2" in info.value.details()
        while coordinator.job_status("banking")["status"] == "running":
            holding.append(coordinator.async_rounds.state.holding("banking"))
            time.sleep(0.1)
        coordinator.wait_until_finished(timeout=120)
        outputs = [p.communicate(timeout=60)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        assert all("job banking finished" in out for out in outputs), outputs
        assert max(holding) <= settings["max_concurrency"], holding
        status = coordinator.job_status("banking")
        assert status["status"] == "finished" and status["current_round"] == 9, status
        facts = check_versions(tmp_path / "state", FedBuffOptions(**{k: v for k, v in settings.items()
                                                                     if k in ("buffer_size", "staleness",
                                                                              "exponent", "max_staleness")}))
        assert sorted(facts["adapters"]) == list(range(9))
        history = coordinator.history("banking")
        keys = ("version", "accepted", "refused_stale", "mean_staleness")
        print("ASYNC history:", {"rejections": history["rejections"],
                                 "versions": [{k: v[k] for k in keys} for v in history["versions"]]})
        assert [v["version"] for v in history["versions"]] == list(range(1, 9))
        assert all(v["accepted"] == 2 and len(v["updates"]) == 2 for v in history["versions"])
        assert all(0 <= v["mean_staleness"] <= settings["max_staleness"] for v in history["versions"])
        assert history["rejections"].get("stale", 0) >= 1  # the hand-made one, and any an agent sent
        assert sum(v["refused_stale"] for v in history["versions"]) <= history["rejections"]["stale"]
        devices = {u["device_id"] for v in history["versions"] for u in v["updates"]}
        assert len(devices) >= 3, devices  # the buffer fills from several devices, not one
    finally:
        server.stop(grace=None)
        coordinator.close()
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_coordinator_killed_between_versions_loses_nothing_and_counts_nothing_twice(tmp_path, tiny_bundle):
    port = free_port()
    table = "\n".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}"
                      for k, v in {**ASYNC, "buffer_size": 3, "max_staleness": 3, "versions": 4}.items())
    config = write_config(tmp_path, tiny_bundle.path, port, rounds=1, minimum=1, deadline=120,
                          extra=f'mode = "async"\n[job.async]\n{table.replace(chr(39), chr(34))}\n')
    token = make_token(tmp_path / "state")
    coordinator = CoordinatorProcess(config, port, tmp_path / "coordinator.log")
    shards = fleet_shards(tmp_path, [20, 40, 70])
    clients = []
    try:
        coordinator.start()
        coordinator.wait_ready()
        clients = [agent_process(port, shard, tmp_path / f"device{i}", token, give_up_after=120)
                   for i, shard in enumerate(shards)]

        def between_versions() -> bool:  # version 1 made, and an accepted update waiting in the buffer
            facts = stored(tmp_path / "state")
            return len(facts["adapters"]) >= 2 and any(r.version is None for r in facts["updates"])

        wait_for(between_versions, 120, "version 1 and a buffered update", interval=0.05)
        coordinator.kill()
        before = stored(tmp_path / "state")
        accepted = {r.upload_id: r.blob for r in before["updates"]}
        assert accepted and before["job"].status == "running"
        coordinator.start()
        coordinator.wait_ready()
        outputs = [output(p, timeout=150) for p in clients]
        assert all(p.returncode == 0 for p in clients), outputs
        after = check_versions(tmp_path / "state", FedBuffOptions(buffer_size=3, max_staleness=3))
        assert after["job"].status == "finished" and sorted(after["adapters"]) == [0, 1, 2, 3, 4]
        kept = {r.upload_id: r.blob for r in after["updates"]}
        assert all(kept.get(u) == blob for u, blob in accepted.items()), "an accepted update was lost"
        in_versions = [r for r in after["updates"] if r.version is not None]
        assert len(in_versions) == 4 * 3  # each version from exactly three updates, none counted twice
        for upload_id in accepted:  # what was buffered at the kill went into a version after the restart
            row = next(r for r in after["updates"] if r.upload_id == upload_id)
            assert row.version is not None or row.seq > max(r.seq for r in in_versions), upload_id
    finally:
        coordinator.kill()
        for p in clients:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize(("lines", "message"), [
    ('[job.async]\nstaleness = "linear"\nversions = 3',
     "invalid job.async.staleness='linear': expected one of constant, polynomial, hinge"),
    ("[job.async]\nbuffer_size = 0\nversions = 3", "invalid job.async.buffer_size=0: must be an integer >= 1"),
    ("[job.async]\nbuffer_size = 2", "an asynchronous job needs a stop condition"),
    ("[job.async]\nversions = 3\nbufer_size = 2", "unknown job.async.bufer_size"),
    ('strategy = "krum"\n[job.async]\nversions = 3',
     'invalid job.strategy=\'krum\': is not supported with mode = "async"'),
    ("[job.async]\nversions = 3\n[job.secure_aggregation]\nbits = 16",
     'invalid job.secure_aggregation=\'set\': is not supported with mode = "async"'),
])
def test_config_errors_name_the_field(tmp_path, lines, message):
    path = tmp_path / "jobs.toml"
    head, _, table = lines.partition("[job.async]")
    path.write_text(f'[server]\ninsecure = true\n[[job]]\nid = "banking"\nbundle = "b"\nmode = "async"\n{head}'
                    f"[job.async]{table}\n[job.clients]\nmin = 2\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert message in str(info.value)


def test_async_settings_on_a_synchronous_job_are_refused(tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text('[server]\ninsecure = true\n[[job]]\nid = "banking"\nbundle = "b"\n[job.async]\nversions = 3\n')
    with pytest.raises(ConfigError, match=r'invalid job.async=.*applies to mode = "async" only'):
        load_server_config(path)


def test_the_cap_makes_devices_wait_a_server_optimiser_steps_and_the_time_budget_ends_the_job(tmp_path, tiny_bundle,
                                                                                             database):
    """Transport-free, on SQLite and PostgreSQL: one device may hold work at a time; a buffer of two makes version 1
    with FedAdam's step over the FedBuff step (its moments kept for the next version); a replay counts once; the
    time budget ends the job."""
    settings = {"buffer_size": 2, "staleness": "constant", "max_concurrency": 1, "versions": 100, "time_budget_s": 4}
    server, _, coordinator = start(tmp_path, tiny_bundle, minimum=1, database=database, job_settings={
        "mode": "async", "asynchronous": settings, "strategy": "fedadam", "strategy_options": {"server_lr": 0.05}})
    try:
        first, second = (coordinator.register("", {}, "banking") for _ in range(2))
        task = coordinator.poll(first, "banking")
        assert task.asynchronous.base_version == 0 and task.round == 1
        wait = coordinator.poll(second, "banking")  # the cap: one device holds work; the other is told when to ask
        assert isinstance(wait, RetryLater) and wait.seconds >= 1, wait
        initial = coordinator.global_adapter("banking", 0)
        rng = np.random.default_rng(0)
        trained = [{k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in initial.items()}
                   for _ in range(2)]

        def send(device: str, work, tensors: dict, n: int) -> bool:
            header = UploadHeader("banking", work.base_version + 1, device, work.upload_id, work.base_version)
            return coordinator.submit(header, AdapterUpdate(tensors, n))

        assert send(first, task.asynchronous, trained[0], 30) is True
        assert send(first, task.asynchronous, trained[0], 30) is False  # a replay: counted once
        other = coordinator.poll(second, "banking")  # the first one's work is done: the second gets some
        assert other.asynchronous.base_version == 0 and other.asynchronous.upload_id != task.asynchronous.upload_id
        assert send(second, other.asynchronous, trained[1], 10) is True
        assert coordinator.job_status("banking")["current_round"] == 2  # version 1 is made
        for name, x in initial.items():  # FedAdam's first step over the buffer's mean delta, by hand
            mean = (30 * (trained[0][name] - x.astype(np.float64)) + 10 * (trained[1][name] - x)) / 40
            m, v = 0.1 * mean, 0.99 * 1e-6 + 0.01 * mean * mean
            np.testing.assert_allclose(coordinator.global_adapter("banking", 1)[name],
                                       x + 0.05 * m / (np.sqrt(v) + 1e-3), rtol=0, atol=1e-6)
        assert any(k.startswith("m/") for k in coordinator.strategy_state("banking", 1))
        assert coordinator.history("banking")["duplicates"] == 1
        wait_for(lambda: coordinator.job_status("banking")["status"] == "finished", 30, "the time budget")
        assert "time budget of 4 s spent after 1 global versions" in coordinator.job_status("banking")["message"]
        assert coordinator.poll(first, "banking").startswith("job banking finished")
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_differential_privacy_in_an_asynchronous_job_clips_weighs_each_update_one_and_noises_each_version(
        tmp_path, tiny_bundle):
    """Transport-free: with clip_norm and noise_multiplier, a version is the global adapter plus the mean of the
    buffer's clipped deltas (each weighing 1, whatever its example count) plus Gaussian noise of std sigma * C over
    the buffer's size: what the strategy's DeltaMean gives for the same updates and seed; its report accounts for
    epsilon."""
    from edgeft.aggregate import StrategyOptions
    from edgeft.aggregate.base import RoundContext
    from edgeft.aggregate.delta import DeltaMean

    options = {"clip_norm": 0.5, "noise_multiplier": 1.0, "noise_seed": 3, "dp_delta": 1e-5}
    settings = {"buffer_size": 2, "staleness": "constant", "max_concurrency": 4, "versions": 1}
    server, _, coordinator = start(tmp_path, tiny_bundle, minimum=1, job_settings={
        "mode": "async", "asynchronous": settings, "strategy": "fedavg", "strategy_options": options})
    try:
        devices = [coordinator.register("", {}, "banking") for _ in range(2)]
        tasks = [coordinator.poll(device, "banking").asynchronous for device in devices]
        initial = coordinator.global_adapter("banking", 0)
        rng = np.random.default_rng(0)
        trained = [{k: (v + offset * rng.choice([-1, 1], size=v.shape)).astype(np.float32) for k, v in initial.items()}
                   for offset in (0.02, 0.0001)]  # the first one's delta is far above the clip norm, not the second
        for device, work, tensors, n in zip(devices, tasks, trained, (300, 10)):
            header = UploadHeader("banking", 1, device, work.upload_id, work.base_version)
            assert coordinator.submit(header, AdapterUpdate(tensors, n)) is True
        assert coordinator.job_status("banking")["status"] == "finished"  # versions = 1
        expected = DeltaMean(initial, StrategyOptions(**options), RoundContext(round=1, selected=2))
        for tensors in trained:
            expected.add(AdapterUpdate(tensors, 1))
        for name, value in expected.result().items():
            np.testing.assert_allclose(coordinator.global_adapter("banking", 1)[name], value, rtol=0, atol=1e-6)
        (version,) = coordinator.history("banking")["versions"]
        report = version["aggregation"]
        assert version["version"] == 1 and report["privacy"]["noise_std"] == 0.5
        assert report["privacy"]["denominator"] == 2
        assert report["privacy"]["epsilon"] > 0 and report["asynchronous"]["accepted"] == 2, report
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_an_upload_from_a_version_not_made_yet_is_refused_counted_and_frees_its_slot(tmp_path, tiny_bundle):
    """Transport-free: an upload naming a global version the job has not made is refused (reason "version",
    counted) and frees the device's slot."""
    server, _, coordinator = start(tmp_path, tiny_bundle, minimum=1, job_settings={
        "mode": "async", "asynchronous": {**ASYNC, "max_concurrency": 1, "versions": 10}})
    try:
        device, other = (coordinator.register("", {}, "banking") for _ in range(2))
        work = coordinator.poll(device, "banking").asynchronous
        tensors = coordinator.global_adapter("banking", 0)
        header = UploadHeader("banking", 6, device, work.upload_id, base_version=5)
        with pytest.raises(Rejected, match="latest global version is 0") as refused:
            coordinator.submit(header, AdapterUpdate(tensors, 10))
        assert refused.value.reason == "version" and coordinator.rejections("banking") == {"version": 1}
        time.sleep(1.1)  # past the moment the cap was seen reached (CAP_RECHECK_S)
        assert isinstance(coordinator.poll(other, "banking"), TaskAssignment)  # the refused device's slot is free
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_the_store_refuses_an_update_that_would_be_too_stale_in_the_version_it_goes_into(database, tmp_path):
    """On SQLite and PostgreSQL: an update goes into the job's next version, or a later one when full buffers are
    ahead of it (uploads stored while it was checked); the store refuses it, storing nothing, when it would be more
    than max_staleness versions behind that version."""
    state = State(open_database(database or f"sqlite:///{tmp_path / 'state.db'}"))
    try:
        state.create_job("job", "digest", 10, 1, "blob0", {}, {})  # version 0 made; the next one is 1
        store = AsyncState(state)
        for i, max_staleness in enumerate((0, 0, 1, 1)):  # buffer_size 2: two into version 1, two into version 2
            assert store.add_update("job", f"u{i}", "d", 0, 10, {}, f"b{i}", 1, 2, max_staleness) == i + 1
        assert store.add_update("job", "late", "d", 0, 10, {}, "b", 1, 2, 1) is None  # version 3: 2 behind
        assert store.buffered("job") == 4 and not store.received("job", "late")
        assert store.add_update("job", "late", "d", 0, 10, {}, "b", 1, 2, 2) == 5
        assert store.add_update("job", "late", "d", 0, 10, {}, "b", 1, 2, 2) == 0  # stored already
    finally:
        state.engine.dispose()


def test_an_upload_of_a_device_not_registered_or_not_enrolled_is_refused_and_nothing_is_stored(tmp_path, tiny_bundle):
    """Transport-free, a job serving one bundle (its uploads' checks of the device and the replay are made in the
    transaction that stores them): an unknown device is NotFound, a device enrolled in another job
    PermissionDenied, nothing is stored for either; a replay is counted once."""
    server, _, coordinator = start(tmp_path, tiny_bundle, minimum=1, job_settings={
        "mode": "async", "asynchronous": {**ASYNC, "versions": 10}})
    try:
        device = coordinator.register("", {}, "banking")
        work = coordinator.poll(device, "banking").asynchronous
        tensors = coordinator.global_adapter("banking", 0)
        coordinator.state.enrol("elsewhere", {}, "other-job", "")  # registered, enrolled in another job only

        def send(device_id: str) -> bool:
            header = UploadHeader("banking", 1, device_id, work.upload_id if device_id == device else
                                  f"{device_id}:banking:v0:x", 0)
            return coordinator.submit(header, AdapterUpdate(tensors, 10))

        with pytest.raises(NotFound, match="unknown device 'nobody': register first"):
            send("nobody")
        with pytest.raises(PermissionDenied, match="device 'elsewhere' is not enrolled in job 'banking'"):
            send("elsewhere")
        assert coordinator.async_rounds.state.buffered("banking") == 0
        assert send(device) is True and send(device) is False  # the device's own upload, then its replay
        assert coordinator.async_rounds.state.buffered("banking") == 1
        assert coordinator.history("banking")["duplicates"] == 1
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_the_time_budget_ends_the_job_even_while_full_buffers_wait_for_their_versions(tmp_path, tiny_bundle):
    """Transport-free: the budget is checked before each version is made, so uploads taken in faster than versions
    are made cannot hold a job past its budget (the clock used to make every waiting version first: a 300 s job ran
    428 s under load). The buffer's updates stay stored."""
    server, _, coordinator = start(tmp_path, tiny_bundle, minimum=1, job_settings={
        "mode": "async", "asynchronous": {**ASYNC, "max_concurrency": 10, "time_budget_s": 3}})
    try:
        rounds = coordinator.async_rounds
        devices = [coordinator.register("", {}, "banking") for _ in range(2)]
        works = [coordinator.poll(d, "banking").asynchronous for d in devices]
        tensors = coordinator.global_adapter("banking", 0)
        with rounds._making:  # a version is being made: the uploads fill the buffer without making one
            for device, work in zip(devices, works):
                assert coordinator.submit(UploadHeader("banking", 1, device, work.upload_id, 0),
                                          AdapterUpdate(tensors, 10))
            assert rounds.state.buffered("banking") == 2
            wait_for(lambda: time.time() - rounds.state.started_at("banking") > 3.2, 30, "the budget to pass")
        wait_for(lambda: coordinator.job_status("banking")["status"] == "finished", 30, "the clock to end the job")
        assert "time budget of 3 s spent after 0 global versions" in coordinator.job_status("banking")["message"]
        assert rounds.state.buffered("banking") == 2
    finally:
        server.stop(grace=None)
        coordinator.close()


def test_an_upload_refused_as_it_is_stored_is_not_kept_for_a_version(tmp_path, tiny_bundle):
    """Transport-free: the delta an upload adds to a version is kept from before the transaction that stores it (a
    version may read it at once); one that transaction refuses (here the job ended meanwhile: "late") is no longer
    kept, where it would push out updates that wait for a version."""
    server, _, coordinator = start(tmp_path, tiny_bundle, minimum=1, job_settings={
        "mode": "async", "asynchronous": {**ASYNC, "time_budget_s": 1}})
    try:
        device = coordinator.register("", {}, "banking")
        work = coordinator.poll(device, "banking").asynchronous
        tensors = {k: v + 0.01 for k, v in coordinator.global_adapter("banking", 0).items()}
        wait_for(lambda: coordinator.job_status("banking")["status"] == "finished", 30, "the clock to end the job")
        with pytest.raises(Rejected, match="ended while the update was checked"):
            coordinator.submit(UploadHeader("banking", 1, device, work.upload_id, 0), AdapterUpdate(tensors, 10))
        blob = coordinator.artifacts.put_tensors(tensors)  # content-addressed: the digest the upload was stored as
        assert coordinator.async_rounds._deltas.get(("banking", blob, 0)) is None
        assert coordinator.async_rounds.state.buffered("banking") == 0
    finally:
        server.stop(grace=None)
        coordinator.close()
