"""Shared set-up for the benchmarks: the all-MiniLM-L6-v2 + LoRA(q, v) + head BANKING77 bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from edgeft.config import ExportConfig
from edgeft.datasets import banking77, banking77_labels

CONFIG = ExportConfig(labels=tuple(banking77_labels()))
TRAIN, TEST = banking77("train"), banking77("test")


def minilm_bundle(work: Path) -> Path:
    """Export the benchmark bundle afresh into ``work/bundle`` (about 10 s); returns its path."""
    import shutil

    from edgeft.demo import minilm_dir
    from edgeft.export import export_hf

    path = work / "bundle"
    shutil.rmtree(path, ignore_errors=True)
    export_hf(minilm_dir(), path, CONFIG)
    return path


def emit(result: dict, summary: str) -> None:
    """Print the JSON result, then the one-line summary."""
    print(json.dumps(result, indent=2))
    print(summary)
    sys.stdout.flush()


def coordinator_script(report: str, wait_s: float = 3600, then: str = "") -> str:
    """Python source of a coordinator process for ``python -c SOURCE jobs.toml``: it prints {"port": PORT}, waits
    until every job finished, prints {"peak_rss_mb": its VmHWM, <report>} (``report``: more dict entries, Python
    over ``coordinator``), runs ``then`` and stops."""
    return f"""
import sys, json
from pathlib import Path
from edgeft.server.config import load_server_config
from edgeft.server.servicer import create_server
config = load_server_config(sys.argv[1])
server, port, coordinator = create_server(config)
server.start()
print(json.dumps({{"port": port}}), flush=True)
coordinator.wait_until_finished(timeout={wait_s})
hwm = [int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0]
print(json.dumps({{"peak_rss_mb": hwm / 1024, {report}}}), flush=True)
{then}
server.stop(grace=1)
"""


def start_coordinator(script: str, config: Path, log: Path | None = None) -> subprocess.Popen:
    """A coordinator process running ``script`` (``coordinator_script``) on ``config``, returned once it serves, its
    port as ``.port`` (replicas start one after the other: the first stores the bundle and creates the job, the
    others find them); its stderr into ``log`` when given. Stop it with ``stop_coordinators``."""
    err = open(log, "w") if log is not None else None  # noqa: SIM115 - the child holds it; ours closes at once
    try:
        server = subprocess.Popen([sys.executable, "-c", script, str(config)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    finally:
        if err is not None:
            err.close()
    server.port = json.loads(server.stdout.readline())["port"]
    return server


def stop_coordinators(servers: list[subprocess.Popen]) -> None:
    """Kill (by process group) those of ``servers`` still running: a run that failed leaves them waiting."""
    for server in servers:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
