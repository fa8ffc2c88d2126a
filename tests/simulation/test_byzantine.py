"""Test tooling for Byzantine clients in simulated fleets: the corruptions by hand, and a simulated fleet in
which one agent process sends blown-up updates that Krum leaves out."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.data import DataConfig
from edgeft.errors import ConfigError
from edgeft.testing import SimulationConfig, run_simulation
from edgeft.testing.byzantine import Attack, corrupt

G = {"w": np.array([1.0, 2.0], np.float32)}
X = {"w": np.array([1.5, 1.0], np.float32)}  # delta (0.5, -1)


def test_corruptions_by_hand():
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(corrupt(X, G, Attack.parse("sign_flip"), rng)["w"], [0.5, 3.0])
    np.testing.assert_allclose(corrupt(X, G, Attack.parse("sign_flip:4"), rng)["w"], [-1.0, 6.0])
    np.testing.assert_allclose(corrupt(X, G, Attack.parse("scaled"), rng)["w"], [6.0, -8.0])
    noise = corrupt({"w": np.zeros(100_000, np.float32)}, {"w": np.zeros(100_000, np.float32)},
                    Attack.parse("random:0.5"), rng)["w"]
    assert noise.dtype == np.float32 and noise.std() == pytest.approx(0.5, rel=0.02)


@pytest.mark.parametrize("spec", ["flip", "scaled:x", "random:-1", "scaled:inf"])
def test_bad_attack_specs(spec):
    with pytest.raises(ConfigError, match="invalid attack"):
        Attack.parse(spec)


def delta_norms(state_dir) -> dict[str, float]:  # noqa: ANN001
    from safetensors.numpy import load
    from sqlalchemy import select

    from edgeft.server.artifacts import ArtifactStore
    from edgeft.server.store import adapters, open_database, updates

    engine, store = open_database(state_dir / "state.db"), ArtifactStore(state_dir / "artifacts")
    with engine.begin() as conn:
        start = load(store.get(conn.execute(select(adapters.c.blob).where(adapters.c.version == 0)).scalar_one()))
        rows = conn.execute(select(updates.c.device_id, updates.c.blob).where(updates.c.round == 1)).all()
    engine.dispose()
    norms = {}
    for device, blob in rows:
        tensors = load(store.get(blob))
        norms[device] = float(np.sqrt(sum(np.square(tensors[k] - start[k]).sum() for k in start)))
    return norms


def test_simulated_attacker_is_left_out_by_krum(tmp_path, tiny_bundle, small_banking):
    config = SimulationConfig(
        out=tmp_path / "sim", train=DataConfig(small_banking["train"], label_column="category"),
        bundle=tiny_bundle.path, clients=5, rounds=1, concurrency=2, baseline=False,
        local=TrainConfig(epochs=1, batch_size=16, learning_rate=3e-2, progress=False),
        strategy="krum", strategy_options={"byzantine": 1}, attack="scaled:1000", attackers=1,
        max_update_norm=1e9)  # let the attack past validation: Krum has to leave it out
    history = run_simulation(config)["history"]
    assert history["status"] == "finished"
    picked = history["rounds"][1]["aggregation"]["krum_selected"]
    assert picked != ["client-000"] and len(picked) == 1
    # the attacker's stored update is the blown-up one; the others trained honestly
    norms = delta_norms(tmp_path / "sim" / "state")
    assert norms["client-000"] > 100 * max(v for k, v in norms.items() if k != "client-000")
    with pytest.raises(ConfigError, match="attackers"):
        SimulationConfig(out=tmp_path, train=config.train, bundle=tiny_bundle.path, clients=2, attackers=3,
                         attack="random")
