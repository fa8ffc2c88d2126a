"""Running sums (edgeft.server.running_sums), transport-free on real coordinators, database and artifact store: a
round closed from flushed running sums plus streamed updates has the global adapter and the report of the round
streamed in full, whichever replica flushed, died before flushing or got a replay; robust strategies never fold."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from edgeft.aggregate import RoundContext, StrategyOptions, Summable, WeightedMean, build_strategy
from edgeft.aggregate.delta import DeltaMean
from edgeft.config import TrainConfig
from edgeft.server.config import ClientSelection, DataSchema, JobConfig, ServerConfig
from edgeft.server.coordinator import Coordinator
from edgeft.errors import Unavailable
from edgeft.server.artifacts import FolderStore
from edgeft.server.running_sums import RunningSums, partial_tensors, tensors_partial
from edgeft.server.store import running_sums, updates
from edgeft.update import AdapterUpdate
from edgeft.wire import UploadHeader

DEVICES = 6


def replica(tmp_path, bundle, backend: dict, strategy: str = "fedavg", options: dict | None = None) -> Coordinator:
    """A coordinator of job "banking" (one round of DEVICES devices) without transport or clock: the tests decide
    when running sums flush. Replicas made with the same arguments share the database and the artifact store."""
    job = JobConfig(id="banking", bundle=bundle.path, rounds=1, round_deadline_s=300.0, strategy=strategy,
                    strategy_options=options or {}, clients=ClientSelection(fraction=1.0, min=DEVICES),
                    data=DataSchema(label_column="category"), train=TrainConfig(epochs=1, progress=False))
    return Coordinator(ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "state", jobs=(job,),
                                    insecure=True, **backend))


def trained(coordinator: Coordinator, count: int, scale: float = 0.02) -> list[AdapterUpdate]:
    """``count`` updates of round 1 from the initial global adapter, of different sizes and example counts."""
    initial = coordinator.global_adapter("banking", 0)
    rng = np.random.default_rng(7)
    return [AdapterUpdate({k: (v + scale * (i + 1) * rng.standard_normal(v.shape)).astype(np.float32)
                           for k, v in initial.items()}, 10 + 7 * i) for i in range(count)]


def round_one(coordinator: Coordinator) -> list[str]:
    """DEVICES devices registered, each polled into round 1; their ids."""
    devices = [coordinator.register("", {}, "banking") for _ in range(DEVICES)]
    assert all(coordinator.poll(d, "banking").round == 1 for d in devices)
    return devices


def streamed(coordinator: Coordinator, strategy: str, options: dict | None) -> tuple[dict, dict]:
    """Round 1 aggregated the way it was before running sums: every stored update added one by one."""
    aggregation = build_strategy(strategy, options or {}).start(coordinator.global_adapter("banking", 0),
                                                                RoundContext(round=1, selected=DEVICES))
    for stored in coordinator.round_updates("banking", 1):
        aggregation.add(stored)
    return aggregation.result(), aggregation.report()


def marks(coordinator: Coordinator) -> tuple[int, list]:
    """(running sums stored, the running_sum mark of each update row by device id)."""
    with coordinator.engine.connect() as conn:
        sums = len(conn.execute(select(running_sums.c.id)).all())
        return sums, [r.running_sum for r in conn.execute(select(updates).order_by(updates.c.device_id))]


@pytest.mark.parametrize("strategy, options, kind", [
    ("fedavg", None, WeightedMean),
    ("fedadam", {"server_lr": 0.05, "clip_norm": 0.5}, DeltaMean)])  # some deltas clipped: the report counts them
def test_two_replicas_flushed_dead_and_replayed_give_the_streamed_round(tmp_path, tiny_bundle, backend, strategy,
                                                                         options, kind):
    """Replica a folds and flushes two updates; replica b folds two and dies before flushing (its sums are gone, its
    updates are streamed); a replay to b counts once; a takes the last two and closes the round, flushing its own
    first. The global adapter equals the streamed aggregate (for FedAvg: the weighted mean of the stored updates)
    and the stored report is the streamed one exactly."""
    a = replica(tmp_path, tiny_bundle, backend, strategy, options)
    b = replica(tmp_path, tiny_bundle, backend, strategy, options)
    try:
        devices = [a.register("", {}, "banking") for _ in range(DEVICES)]
        assert all(a.poll(d, "banking").round == 1 for d in devices)
        sent = trained(a, DEVICES)
        assert isinstance(a.strategies["banking"].start(a.global_adapter("banking", 0)), kind)

        def send(coordinator: Coordinator, i: int) -> bool:
            return coordinator.submit(UploadHeader("banking", 1, devices[i], f"upload-{i}"), sent[i])

        assert send(a, 0) and send(a, 1)
        assert a.rounds.sums.unflushed() == 2
        a.rounds.tick()  # the clock's turn flushes a's sum
        assert a.rounds.sums.unflushed() == 0 and marks(a)[0] == 1
        assert send(b, 2) and send(b, 3)
        assert send(b, 3) is False  # a replay: stored once, folded once
        assert b.rounds.sums.unflushed() == 2
        b.rounds.sums.drop()  # b dies before its clock flushed: devices 2 and 3 are left to the stream
        assert send(a, 4) and send(a, 5)  # the last update: a flushes its own sum, then closes
        assert a.job_status("banking")["status"] == "finished"
        sums, marked = marks(a)
        assert sums == 2 and sum(m is None for m in marked) == 2 and len(set(marked) - {None}) == 2
        expected, report = streamed(a, strategy, options)
        for name, value in expected.items():
            np.testing.assert_allclose(a.global_adapter("banking", 1)[name], value, rtol=1e-6, atol=1e-7,
                                       err_msg=name)
        assert a.state.job_record("banking")["reports"][1] == report
        assert report["updates"] == DEVICES and (kind is WeightedMean or report["clipped"] > 0)
        if strategy == "fedavg":  # the weighted mean of the stored updates, by hand
            weights = np.array([u.n_examples for u in sent], dtype=np.float64)
            for name in expected:
                mean = sum(w * u.tensors[name].astype(np.float64) for w, u in zip(weights, sent)) / weights.sum()
                np.testing.assert_allclose(a.global_adapter("banking", 1)[name], mean, rtol=1e-6, atol=1e-7)
        assert b.rejections("banking") == {"duplicate": 1}
    finally:
        a.close()
        b.close()


def test_robust_strategies_never_fold(tmp_path, tiny_bundle):
    """Median: nothing folded, nothing flushed, every update streamed at closing; the result is the streamed one."""
    coordinator = replica(tmp_path, tiny_bundle, {}, "median")
    try:
        devices = round_one(coordinator)
        for i, update in enumerate(trained(coordinator, DEVICES)):
            assert coordinator.submit(UploadHeader("banking", 1, devices[i], f"upload-{i}"), update)
            assert coordinator.rounds.sums.unflushed() == 0
        assert coordinator.job_status("banking")["status"] == "finished"
        assert marks(coordinator) == (0, [None] * DEVICES)
        expected, report = streamed(coordinator, "median", None)
        for name, value in expected.items():
            np.testing.assert_array_equal(coordinator.global_adapter("banking", 1)[name], value)
        assert coordinator.state.job_record("banking")["reports"][1] == report
    finally:
        coordinator.close()


def test_a_flush_never_marks_a_row_twice_nor_after_the_closing(tmp_path, tiny_bundle):
    """A sum naming a row another sum covers is refused whole (nothing written); a sum of a closed round is
    dropped; a closing that sees a sum whose count does not match its marked rows streams those rows."""
    coordinator = replica(tmp_path, tiny_bundle, {})
    try:
        devices = round_one(coordinator)
        sent = trained(coordinator, DEVICES)
        for i in range(3):
            assert coordinator.submit(UploadHeader("banking", 1, devices[i], f"upload-{i}"), sent[i])
        coordinator.rounds.tick()
        state, blob = coordinator.rounds.sums.state, coordinator.artifacts.put_tensors({"x": np.zeros(1)})
        assert state.record("banking", 1, "again", blob, [devices[0]], "other") is False  # covered already
        assert state.record("banking", 1, "absent", blob, ["nobody"], "other") is False  # no such row
        assert marks(coordinator)[0] == 1
        for i in range(3, DEVICES):
            assert coordinator.submit(UploadHeader("banking", 1, devices[i], f"upload-{i}"), sent[i])
        assert coordinator.job_status("banking")["status"] == "finished"
        assert state.record("banking", 1, "late", blob, [devices[0]], "other") is False  # the round is closed
        expected, _ = streamed(coordinator, "fedavg", None)
        for name, value in expected.items():
            np.testing.assert_allclose(coordinator.global_adapter("banking", 1)[name], value, rtol=1e-6, atol=1e-7)
    finally:
        coordinator.close()


class StoreAway(FolderStore):
    """The coordinator's artifact folder, unreachable for writes while ``away`` is set (as a bucket that stopped)."""

    away = False

    def put(self, data: bytes) -> str:
        if self.away:
            raise Unavailable("the artifact store is away")
        return super().put(data)


def test_a_flush_the_store_refused_is_kept_and_tried_again(tmp_path, tiny_bundle):
    """A replica whose flush found the store away keeps its sum (nothing marked), folds on, and its next flush
    writes one sum covering all of them; the round closes with the streamed aggregate."""
    coordinator = replica(tmp_path, tiny_bundle, {})
    try:
        devices = round_one(coordinator)
        sent = trained(coordinator, DEVICES)
        for i in range(3):
            assert coordinator.submit(UploadHeader("banking", 1, devices[i], f"upload-{i}"), sent[i])
        coordinator.rounds.sums.drop()  # these three are folded below by another replica, whose store goes away
        store = StoreAway(coordinator.artifacts.root)
        other = RunningSums(coordinator.rounds.sums.state, store, coordinator.rounds.sums.start, "other")
        job = coordinator.jobs["banking"]
        other.fold(job, 1, devices[0], sent[0])
        other.fold(job, 1, devices[1], sent[1])
        store.away = True
        other.flush()
        assert other.unflushed() == 2 and marks(coordinator) == (0, [None] * 3)
        other.fold(job, 1, devices[2], sent[2])  # into the sum kept from the refused flush
        store.away = False
        other.flush()
        assert other.unflushed() == 0 and marks(coordinator)[0] == 1
        for i in range(3, DEVICES):
            assert coordinator.submit(UploadHeader("banking", 1, devices[i], f"upload-{i}"), sent[i])
        assert coordinator.job_status("banking")["status"] == "finished"
        covered = [m for m in marks(coordinator)[1] if m is not None]
        assert len(covered) == DEVICES and len(set(covered)) == 2  # the other replica's 3, the closer's own 3
        expected, report = streamed(coordinator, "fedavg", None)
        for name, value in expected.items():
            np.testing.assert_allclose(coordinator.global_adapter("banking", 1)[name], value, rtol=1e-6, atol=1e-7)
        assert coordinator.state.job_record("banking")["reports"][1] == report
    finally:
        coordinator.close()


def test_partials_fold_like_single_updates():
    """DeltaMean and WeightedMean: updates added in two aggregations, one folded into the other through its blob
    form, give the result and report of adding them all to one (norms, clipping, weights)."""
    rng = np.random.default_rng(3)
    reference = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    sent = [AdapterUpdate({k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in reference.items()},
                          5 + i) for i in range(5)]
    for options in (StrategyOptions(clip_norm=2.0), StrategyOptions()):
        whole, first, second = (DeltaMean(reference, options) for _ in range(3))
        if options.clip_norm is None:
            whole, first, second = (WeightedMean(reference) for _ in range(3))
        assert isinstance(first, Summable)
        for i, update in enumerate(sent):
            whole.add(update)
            (first if i < 2 else second).add(update)
        first.add_partial(tensors_partial(partial_tensors(second.partial())))
        folded = first.result()
        for name, value in whole.result().items():
            np.testing.assert_allclose(folded[name], value, rtol=1e-6, atol=1e-7)
        assert first.report() == whole.report()
