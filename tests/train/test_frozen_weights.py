"""The portable engine's frozen weights on the device: ``portable_frozen.bin`` is memory-mapped once, for the
gradient and the eval session together, so that training holds no private copy of the frozen base (what lets a
model whose frozen weights are most of the device's memory train at all); training never writes to the file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeft.bundle import PORTABLE_FROZEN, load_bundle
from edgeft.config import AdapterConfig, ExportConfig
from edgeft.export import export_module
from edgeft.train.engines import open_session

ROWS, WIDTH = 200_000, 128  # a 102 MB frozen table: far more than anything else the session allocates


class Lookup(nn.Module):
    """A large frozen embedding table and a small projection (the LoRA target) to three classes."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(ROWS, WIDTH)
        self.proj = nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids).mean(dim=1))


def memory_mb() -> dict[str, float]:
    """This process's resident memory by kind: RssAnon (private) and RssFile (pages of mapped files), in MB."""
    status = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
            if line.startswith(("RssAnon:", "RssFile:"))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and /proc/self/maps")
def test_frozen_weights_are_mapped_from_the_bundle_not_copied(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, ROWS, (4, 256))
    config = ExportConfig(labels=("a", "b", "c"), adapter=AdapterConfig(rank=2, target_modules=("proj",)))
    bundle = export_module(Lookup(), {"ids": ids}, tmp_path / "bundle", config)
    frozen = bundle.path / PORTABLE_FROZEN
    frozen_mb = frozen.stat().st_size / 2**20
    assert frozen_mb > 95  # the table is frozen, in the shared file

    rng = np.random.default_rng(0)
    before = memory_mb()
    session = open_session(bundle, threads=1)
    for _ in range(3):  # rows all over the table: its pages become resident
        batch = {"ids": rng.integers(0, ROWS, (64, 256)), "labels": rng.integers(0, 3, 64)}
        session.train_step(batch)
        session.optimizer_step(1e-2)
    after = memory_mb()
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(frozen))]
    assert len(maps) == 1, maps  # one mapping, shared by the gradient and the eval session
    start, end = (int(part, 16) for part in maps[0].split()[0].split("-"))
    assert end - start >= frozen.stat().st_size
    private = after["RssAnon"] - before["RssAnon"]
    assert private < 0.3 * frozen_mb, (private, frozen_mb)  # reading the file into memory would add all of it
    assert after["RssFile"] - before["RssFile"] > 0.3 * frozen_mb  # the pages read are the file's
    session.eval_step({"ids": ids.numpy(), "labels": np.zeros(4, dtype=np.int64)})
    load_bundle(bundle.path, verify=True)  # the file is unchanged (sha256 as exported)
