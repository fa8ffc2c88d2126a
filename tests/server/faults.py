"""Fault-injection harness: a coordinator process (`edgeft server --config`) that is SIGKILLed from outside or
kills itself mid-write, agents that die at chosen points (mid-upload included), and the checks that the state a
crash leaves is consistent: every round's global adapter is the FedAvg of that round's stored updates, no device
counted twice. Figures go to a JSON report (``record``) for the closing note and bench/faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select

from edgeft.server.artifacts import ArtifactStore
from edgeft.server.store import adapters, jobs, open_database, rejections, rounds, updates
from edgeft.update import AdapterUpdate

from conftest_server import NO_TORCH

# Runs `edgeft server` with an optional self-inflicted crash (environment EDGEFT_FAULT):
#   commit:K  SIGKILL inside the K-th database commit (statements executed, transaction not committed)
#   put:K     SIGKILL halfway through writing the K-th artifact blob (half its bytes in a temporary file); with an
#             S3 bucket ([server] artifacts), right after the K-th blob was stored, before the database knows it
# With EDGEFT_FAULT_ARM=PATH, only commits and blobs written while the file PATH exists count (replicas: the test
# arms one replica's fault while the other serves).
COORDINATOR = '''
import hashlib, os, signal, sys
fault = os.environ.get("EDGEFT_FAULT", "")
arm = os.environ.get("EDGEFT_FAULT_ARM", "")
if fault:
    kind, limit = fault.split(":")
    limit, seen = int(limit), [0]

    def due():
        if arm and not os.path.exists(arm):
            return False
        seen[0] += 1
        return seen[0] >= limit

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "commit":
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "commit")
        def _commit(conn):
            if due():
                die()
    else:
        from edgeft.server import artifacts
        put = artifacts.ArtifactStore.put

        def dying_put(self, data):
            if due():
                path = self._blob_path(hashlib.sha256(data).hexdigest())
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.parent / ".tmp-crash", "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                die()
            return put(self, data)

        artifacts.ArtifactStore.put = dying_put
        from edgeft.server import s3
        s3_put = s3.S3Store.put

        def dying_s3_put(self, data):
            digest = s3_put(self, data)
            if due():
                die()
            return digest

        s3.S3Store.put = dying_s3_put
from edgeft.cli import main
sys.exit(main(sys.argv[1:]))
'''

# An agent that dies after sending its update's header and first chunk (environment EDGEFT_FAULT=mid_upload), or
# 0.3 s into its local training (EDGEFT_FAULT=mid_training; right after it when training is quicker than that).
AGENT = NO_TORCH + '''
import os, signal, threading, time
if os.environ.get("EDGEFT_FAULT") == "mid_training":
    import edgeft.client.agent as agent_module
    real_train = agent_module.train

    def dying_train(*args, **kwargs):
        worker = threading.Thread(target=real_train, args=args, kwargs=kwargs, daemon=True)
        worker.start()
        worker.join(timeout=0.3)
        os.kill(os.getpid(), signal.SIGKILL)

    agent_module.train = dying_train
if os.environ.get("EDGEFT_FAULT") == "mid_upload":
    import edgeft.client.agent as agent_module
    whole = agent_module.task_update_parts

    def cut_short(*args, **kwargs):
        parts = whole(*args, **kwargs)
        yield next(parts)
        first = next(parts)
        if first.WhichOneof("part") == "chunks":  # packed: the first tensor of the message only (a stream that
            del first.chunks.chunks[1:]  # ends after whole messages of every tensor would be a whole upload)
        yield first
        time.sleep(0.5)  # let them reach the coordinator
        os.kill(os.getpid(), signal.SIGKILL)

    agent_module.task_update_parts = cut_short
from edgeft.cli import main
sys.exit(main(sys.argv[1:]))
'''


def wait_for(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def write_config(folder: Path, bundle_path: Path, port: int, *, rounds: int, minimum: int, deadline: float,
                 available: int | None = None, poll_wait_s: float = 1, extra: str = "", state: str = "state",
                 server_extra: str = "", name: str = "jobs.toml") -> Path:
    """A plaintext coordinator configuration ``folder/name`` for job "banking" (state in folder/``state``);
    ``server_extra``: more [server] lines, ``extra``: more [[job]] lines."""
    path = folder / name
    path.write_text(f"""
[server]
address = "127.0.0.1:{port}"
state_dir = "{state}"
poll_wait_s = {poll_wait_s}
insecure = true
{server_extra}

[[job]]
id = "banking"
bundle = "{bundle_path}"
rounds = {rounds}
round_deadline_s = {deadline}
{extra}
[job.clients]
min = {minimum}
min_available = {available or minimum}
[job.train]
epochs = 2
learning_rate = 0.03
[job.data]
label_column = "category"
""")
    return path


def make_token(state_dir: Path, job: str = "banking", database: str | None = None) -> str:
    """An enrolment token made before the coordinator first starts, as an operator may (in ``database``, default:
    the state folder's SQLite file)."""
    from edgeft.server.auth import TokenStore

    engine = open_database(database or state_dir / "state.db")
    try:
        return TokenStore(engine, [job]).create(job)[1]
    finally:
        engine.dispose()


class CoordinatorProcess:
    """`edgeft server --config` in its own process, its output in a log file (never a pipe nobody reads)."""

    def __init__(self, config: Path, port: int, log: Path):
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen | None = None

    def start(self, fault: str = "", arm: Path | None = None) -> CoordinatorProcess:
        env = {**os.environ, "EDGEFT_FAULT": fault, "EDGEFT_FAULT_ARM": str(arm or "")}
        with open(self.log, "a") as out:
            out.write(f"\n=== start (fault: {fault or 'none'}) ===\n")
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-c", COORDINATOR, "server", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: self.listening() or self.proc.poll() is not None, timeout, "the coordinator to listen")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def agent_process(port: int | str, data: Path, cache: Path, token: str, fault: str = "",
                  give_up_after: float = 120) -> subprocess.Popen:
    """An agent process (no torch importable) with the token in EDGEFT_TOKEN, for the coordinator on loopback
    ``port`` (or at the addresses ``port`` names: replicas); ``fault="mid_upload"`` makes it die halfway through
    its first upload. Its output goes to ``cache``/agent.log (through coordinator restarts an agent logs every
    retry: a pipe read only at the end would fill up and block it); ``output`` reads it."""
    server = f"127.0.0.1:{port}" if isinstance(port, int) else port
    argv = ["client", "--server", server, "--data", str(data), "--cache-dir", str(cache),
            "--threads", "1", "--give-up-after", str(give_up_after), "--insecure"]
    env = {**os.environ, "EDGEFT_TOKEN": token, "EDGEFT_FAULT": fault}
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "agent.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", AGENT, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)


def output(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for an agent_process to end; its output."""
    proc.wait(timeout=timeout)
    cache = Path(proc.args[proc.args.index("--cache-dir") + 1])
    return (cache / "agent.log").read_text()


def committed(state_dir: Path, snapshot: Path, database: str | None = None) -> dict:
    """What a stopped coordinator's database holds (read from a copy in ``snapshot``, so the coordinator itself
    recovers the original; a ``database`` server is read as it is): {(round, device): blob} of the updates, round
    statuses, adapter versions."""
    import shutil

    if database is None:
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        for path in state_dir.glob("state.db*"):
            shutil.copyfile(path, snapshot / path.name)
    engine = open_database(database or snapshot / "state.db")
    try:
        with engine.begin() as conn:
            ups = {(r.round, r.device_id): r.blob for r in conn.execute(select(updates))}
            closed = {r.number: r.status for r in conn.execute(select(rounds))}
            versions = {r.version: r.blob for r in conn.execute(select(adapters))}
    finally:
        engine.dispose()
    return {"updates": ups, "rounds": closed, "adapters": versions}


def check_consistent(state_dir: Path, job: str = "banking", database: str | None = None, store=None) -> dict:  # noqa: ANN001
    """Every closed round's global adapter equals the example-weighted mean (FedAvg) of the updates stored for it,
    recomputed here from the stored blobs; a device has at most one update per round; SQLite's integrity check
    passes. ``database`` and ``store``: the coordinator's when not the state folder's. Returns the job's status,
    rounds and updates per round."""
    from safetensors.numpy import load as load_tensors

    engine = open_database(database or state_dir / "state.db")
    store = store or ArtifactStore(state_dir / "artifacts")
    try:
        with engine.begin() as conn:
            if database is None:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            status = conn.execute(select(jobs).where(jobs.c.id == job)).first()
            round_rows = conn.execute(select(rounds).where(rounds.c.job_id == job).order_by(rounds.c.number)).all()
            update_rows = conn.execute(select(updates).where(updates.c.job_id == job)).all()
            versions = {r.version: r.blob for r in conn.execute(select(adapters).where(adapters.c.job_id == job))}
    finally:
        engine.dispose()
    per_round: dict[int, list] = {}
    for row in update_rows:
        per_round.setdefault(row.round, []).append(row)
    for number, rows in per_round.items():
        devices = [r.device_id for r in rows]
        assert len(devices) == len(set(devices)), f"round {number}: a device counted twice: {devices}"
    for row in round_rows:
        if row.status != "closed":
            continue
        stored = [AdapterUpdate(load_tensors(store.get(r.blob)), r.n_examples) for r in per_round[row.number]]
        weight = sum(u.n_examples for u in stored)
        result = load_tensors(store.get(versions[row.number]))
        for name, value in result.items():
            expected = sum(u.n_examples * u.tensors[name].astype(np.float64) for u in stored) / weight
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=f"round {row.number} {name}")
    assert sorted(versions) == list(range(len([r for r in round_rows if r.status == "closed"]) + 1))
    return {"status": status.status, "message": status.message, "rounds": [r.status for r in round_rows],
            "updates_per_round": {n: len(rows) for n, rows in sorted(per_round.items())}}


def rejection_counts(state_dir: Path, job: str = "banking", database: str | None = None) -> dict[str, int]:
    engine = open_database(database or state_dir / "state.db")
    try:
        with engine.begin() as conn:
            return {r.reason: r.count for r in conn.execute(select(rejections).where(rejections.c.job_id == job))}
    finally:
        engine.dispose()


def record(report: Path, name: str, figures: dict) -> None:
    """Add a scenario's figures to the JSON report (and $EDGEFT_FAULT_REPORT when set) and print them."""
    for path in {report, *([Path(os.environ["EDGEFT_FAULT_REPORT"])] if os.environ.get("EDGEFT_FAULT_REPORT") else [])}:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[name] = figures
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    print(f"\nFAULTS {name}: {json.dumps(figures, sort_keys=True, default=str)}")
