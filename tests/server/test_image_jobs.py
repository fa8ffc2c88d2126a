"""A federated job on an image model: three devices, each with its own share of the digits PNG folders, build
the CNN's head from their class statistics (round 0) and train it with a real coordinator (round 1); the aggregate
is the example-weighted mean of the stored updates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeft.datasets
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.export import export_module
from edgeft.images import ImagePreprocessing
from conftest_server import enrol, run_fleet, start
from small_models import SmallCNN

DIGITS = Path(edgeft.datasets.__file__).parent / "digits" / "train"


def image_shards(folder: Path, sizes: tuple[int, ...] = (60, 80, 100)) -> list[Path]:
    """Per device, an image folder of ``size`` digits (every class), copied from the shipped train split."""
    files = sorted(DIGITS.glob("*/*.png"))
    shards = []
    for device, size in enumerate(sizes):
        shard = folder / f"images{device}"
        for path in files[device::len(sizes)][:size]:
            (shard / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, shard / path.parent.name / path.name)
        shards.append(shard)
    return shards


ADAPTERS = {"lora": AdapterConfig(target_modules=("features.4",), trainable_modules=("fc",)),
            # head-only: the bundle holds a head bundle in a folder (head/), which the devices download and train on
            # cached features
            "head": AdapterConfig(kind="head", trainable_modules=("fc",))}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_three_image_devices_train_one_round(tmp_path, adapter):
    torch.manual_seed(0)
    spec = ImagePreprocessing(size=16, resize=16, channels="L", mean=(0.5,), std=(0.5,), augment=False)
    bundle = export_module(SmallCNN(), {"pixel_values": torch.zeros(2, 1, 16, 16)}, tmp_path / "cnn",
                           ExportConfig(task="classification", labels=tuple(str(i) for i in range(10)),
                                        adapter=ADAPTERS[adapter]), preprocessing=spec)
    assert ("head_bundle" in bundle.manifest.pooling) == (adapter == "head")
    server, port, coordinator = start(tmp_path, bundle, rounds=1)  # image folders: labels are folder names
    try:
        shards = image_shards(tmp_path)
        run_fleet(coordinator, port, shards, tmp_path, enrol(coordinator, tmp_path))
        history = coordinator.history("banking")
        # round 0 is the statistics round: the CNN's graphs output its head's input, summed per class by the devices
        assert history["head_init"] == "class_means" and history["rounds"][0]["status"] == "closed"
        received = coordinator.round_updates("banking", 1)
        assert sorted(u.n_examples for u in received) == [60, 80, 100]
        weight = sum(u.n_examples for u in received)
        result, start_adapter = coordinator.global_adapter("banking", 1), coordinator.global_adapter("banking", 0)
        for name, value in result.items():
            expected = sum(u.n_examples * u.tensors[name].astype(np.float64) for u in received) / weight
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)
        assert any(not np.allclose(result[n], start_adapter[n]) for n in result)
    finally:
        server.stop(grace=None)
