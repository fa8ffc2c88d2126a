"""Helpers for the coordinator tests: BANKING77 shards, a coordinator on a loopback port, agent processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from edgeft.config import TrainConfig
from edgeft.datasets import BANKING77_DIR
from edgeft.client.transport import Transport, open_channel
from edgeft.server.config import ClientSelection, DataSchema, JobConfig, ServerConfig
from edgeft.server.servicer import create_server
from edgeft.v1 import edgeft_pb2_grpc as pb_grpc


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


def start(tmp_path, bundle, rounds=2, minimum=3, deadline=300.0, available=None, job_settings=None, **server_settings):
    """A coordinator for job "banking" on a loopback port; plaintext unless ``tls`` is given. ``job_settings``:
    more JobConfig fields."""
    job = JobConfig(id="banking", bundle=bundle.path, rounds=rounds, round_deadline_s=deadline,
                    clients=ClientSelection(fraction=1.0, min=minimum, min_available=available), data=DataSchema(label_column="category"),
                    train=TrainConfig(epochs=2, learning_rate=3e-2, progress=False), **(job_settings or {}))
    server_settings.setdefault("insecure", server_settings.get("tls") is None)
    server_settings.setdefault("poll_wait_s", 1)
    config = ServerConfig(address="127.0.0.1:0", state_dir=tmp_path / "state", jobs=(job,), **server_settings)
    server, port, coordinator = create_server(config)
    server.start()
    return server, port, coordinator


def enrol(coordinator, folder: Path, job: str = "banking", **kwargs) -> Path:
    """A file holding a new enrolment token for ``job`` (as an operator hands it to devices)."""
    _, token = coordinator.tokens.create(job, **kwargs)
    path = folder / f"{job}-{token[-6:]}.token"
    path.write_text(token + "\n")
    return path


def stub(port: int, token: str | Path, **transport) -> pb_grpc.CoordinatorStub:
    """A Coordinator stub that sends ``token`` (or the token in that file) with every call; plaintext unless
    TLS settings are given."""
    token = Path(token).read_text().strip() if isinstance(token, Path) else token
    transport.setdefault("insecure", not any(k in transport for k in ("ca_cert", "client_cert")))
    return pb_grpc.CoordinatorStub(open_channel(f"127.0.0.1:{port}", Transport(token=token, **transport)))


# Agents run as a device would: torch, transformers and peft cannot be imported in their process.
NO_TORCH = "import sys\nfor name in ('torch', 'transformers', 'peft'): sys.modules[name] = None\n"


def agent(port: int, data: Path, cache: Path, token: Path, *extra: str, tls: bool = False,
          python: Path | None = None) -> subprocess.Popen:
    """An agent process with the token in file ``token``; plaintext (--insecure) unless ``tls``, when
    ``extra`` carries its TLS flags. ``python``: another interpreter, a device's virtualenv with edgeft installed
    (run outside the checkout, none of this process's environment)."""
    argv = ["client", "--server", f"127.0.0.1:{port}", "--data", str(data), "--token-file", str(token),
            "--cache-dir", str(cache), "--threads", "1", "--give-up-after", "60", *([] if tls else ["--insecure"]),
            *extra]
    code = NO_TORCH + f"from edgeft.cli import main\nsys.exit(main({argv!r}))"
    where = {}
    if python is not None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        where = {"cwd": Path(cache).parent, "env": {**env, "PYTHONNOUSERSITE": "1"}}
    return subprocess.Popen([str(python or sys.executable), "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **where)


def run_fleet(coordinator, port: int, shards: list[Path], folder: Path, token: Path,
              flags: list[tuple[str, ...]] | None = None, timeout: float = 240,
              pythons: list[Path | None] | None = None) -> list[str]:
    """One agent per shard (cache ``folder/device<i>``, ``flags[i]`` its extra flags, ``pythons[i]`` its
    interpreter, None: this one) until job "banking" ends; checks that every agent exited 0 and the job finished;
    returns the agents' outputs."""
    flags = flags or [()] * len(shards)
    pythons = pythons or [None] * len(shards)
    procs = [agent(port, shard, folder / f"device{i}", token, *flags[i], python=pythons[i])
             for i, shard in enumerate(shards)]
    coordinator.wait_until_finished(timeout=timeout)
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert coordinator.job_status("banking")["status"] == "finished"
    return outputs


def health_status(port: int, timeout_s: float = 10.0) -> int:
    """The coordinator's gRPC health status (grpc.health.v1, service edgeft.v1.Coordinator)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="edgeft.v1.Coordinator"), timeout=timeout_s).status


def wait_for(condition, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    """Poll ``condition()`` until it is true (AssertionError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def race(calls) -> list:
    """Run ``calls`` (functions) at once from threads; their results, or the exceptions they raised."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - what leaked is the finding
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results
