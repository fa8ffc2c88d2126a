"""Helpers for the coordinator tests: BANKING77 shards, a coordinator on a loopback port, agent processes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.config import TrainConfig
from edgeft.datasets import BANKING77_DIR
from edgeft.server.config import ClientSelection, DataSchema, JobConfig, ServerConfig
from edgeft.server.servicer import create_server


def five_intents(split: str) -> list[dict]:
    """BANKING77 rows of its first five intents (real queries)."""
    labels = json.loads((BANKING77_DIR / "categories.json").read_text())[:5]
    with open(BANKING77_DIR / f"{split}.csv", newline="") as fh:
        return [row for row in csv.DictReader(fh) if row["category"] in labels]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def shards(tmp_path) -> list[Path]:
    rows = five_intents("train")
    return [write_csv(tmp_path / f"shard{i}.csv", rows[i::3][: 150 + 40 * i]) for i in range(3)]


def start(tmp_path, bundle, rounds=2, minimum=3, deadline=300.0, available=None):
    job = JobConfig(id="banking", bundle=bundle.path, rounds=rounds, round_deadline_s=deadline,
                    clients=ClientSelection(fraction=1.0, min=minimum, min_available=available), data=DataSchema(label_column="category"),
                    train=TrainConfig(epochs=2, learning_rate=3e-2, progress=False))
    config = ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "state", jobs=(job,), poll_wait_s=1)
    server, port, coordinator = create_server(config)
    server.start()
    return server, port, coordinator


# Agents run as a device would: torch, transformers and peft cannot be imported in their process.
NO_TORCH = "import sys\nfor name in ('torch', 'transformers', 'peft'): sys.modules[name] = None\n"


def agent(port: int, data: Path, cache: Path, *extra: str) -> subprocess.Popen:
    argv = ["client", "--server", f"127.0.0.1:{port}", "--data", str(data),
            "--cache-dir", str(cache), "--threads", "1", "--give-up-after", "60", *extra]
    code = NO_TORCH + f"from edgeft.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
