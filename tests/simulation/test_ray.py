"""edgeft simulate --backend ray: the same real agents as Ray actors (edgeft.testing.ray_fleet) give the same job."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgeft.cli import main
from edgeft.config import TrainConfig
from edgeft.data import DataConfig
from edgeft.errors import ConfigError
from edgeft.testing import SimulationConfig, run_simulation


def _job(out, backend: str, tiny_bundle, small_banking) -> SimulationConfig:  # noqa: ANN001
    return SimulationConfig(
        out=out, train=DataConfig(small_banking["train"], label_column="category"), bundle=tiny_bundle.path,
        clients=3, rounds=1, concurrency=2, baseline=False, head_init="none", backend=backend,
        local=TrainConfig(epochs=1, batch_size=16, learning_rate=3e-2, progress=False))


@pytest.mark.slow
def test_ray_actors_train_the_same_global_adapter_as_processes(tmp_path, tiny_bundle, small_banking):
    pytest.importorskip("ray")
    from edgeft.server.coordinator import stored_adapter

    adapters = {}
    for backend in ("process", "ray"):
        summary = run_simulation(_job(tmp_path / backend, backend, tiny_bundle, small_banking))
        history = summary["history"]
        assert history["status"] == "finished", history["message"]
        assert len(history["rounds"][-1]["clients"]) == 3
        log = (tmp_path / backend / "devices" / "client-000" / "agent.log").read_text()
        assert "done: job simulation finished" in log  # the agent's log came back from its actor
        _, adapters[backend], last = stored_adapter(tmp_path / backend / "state", "simulation")
        _, initial, _ = stored_adapter(tmp_path / backend / "state", "simulation", 0)
        assert last == 1 and any(not np.allclose(adapters[backend][k], initial[k]) for k in initial)  # trained
    assert adapters["ray"].keys() == adapters["process"].keys()
    for name, tensor in adapters["process"].items():  # FedAvg sums in arrival order: equal up to rounding
        np.testing.assert_allclose(adapters["ray"][name], tensor, rtol=1e-5, atol=1e-7, err_msg=name)
    import ray

    assert not ray.is_initialized()  # the local instance was shut down


def test_the_ray_backend_without_ray_says_how_to_install_it(tmp_path, tiny_bundle, small_banking, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    with pytest.raises(ConfigError, match=r"the ray backend needs Ray: pip install 'edgeft\[ray\]'"):
        run_simulation(_job(tmp_path / "sim", "ray", tiny_bundle, small_banking))
    assert not (tmp_path / "sim").exists()  # refused before any work


def test_a_bad_ray_address_is_named_with_what_to_do(tmp_path, capsys):
    pytest.importorskip("ray")
    code = main(["simulate", "--backend", "ray", "--address", "ray://127.0.0.1:1", "--bundle",
                 str(tmp_path / "bundle"), "--out", str(tmp_path / "sim")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "edgeft simulate: error: cannot reach the Ray cluster at ray://127.0.0.1:1" in err
    assert "ray start --head" in err and "leave out --address" in err
    assert not (tmp_path / "sim").exists()
    with pytest.raises(ConfigError, match="ray_address"):  # an address belongs to the ray backend
        SimulationConfig(out=tmp_path, train=DataConfig(tmp_path / "x.csv"), bundle=tmp_path, ray_address="auto")
