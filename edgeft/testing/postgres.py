"""A throwaway PostgreSQL cluster for tests: ``initdb`` in a temporary folder, ``pg_ctl start`` on a free loopback
port with its unix socket in that folder, trust authentication, stopped by its pid at the end.

PostgreSQL refuses to run as root, so as root the cluster runs as the unprivileged ``postgres`` user (Debian's
``postgresql`` package makes it) through ``runuser``. The binaries come from PATH or Debian's
/usr/lib/postgresql/<version>/bin (the newest). fsync is off: a test cluster's commits survive its server stopping
(a test may stop it on purpose), not the machine crashing; nothing here is for production.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from edgeft.testing.ports import free_port

USER = "edgeft"  # the cluster's superuser; trust authentication, no password


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def missing() -> str | None:
    """Why a cluster cannot run here (None: it can)."""
    if binaries() is None:
        return ("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                "scripts/install.sh installs Debian's postgresql package when run as root")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run PostgreSQL as (it refuses to run as root)"
        if shutil.which("runuser") is None:
            return "running as root without runuser to run PostgreSQL as the 'postgres' user"
    return None


def _alive(pid: int) -> bool:
    """The process runs (a zombie left for a parent to reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class PostgresCluster:
    """One PostgreSQL server in a temporary folder (``start``, ``stop``, ``start`` again: the same data and port)."""

    def __init__(self) -> None:
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        self.bin = binaries()
        self._as_root = os.geteuid() == 0  # then the folder must be reachable by 'postgres': under /tmp
        self.root = Path(tempfile.mkdtemp(prefix="edgeft-pg-", dir="/tmp" if self._as_root else None))
        self.data = self.root / "data"
        self.port = 0
        if self._as_root:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        self._databases = 0
        atexit.register(self.close)

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin / tool), *args]
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and proc.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")
        return proc

    def start(self) -> None:
        """Start the server (on a free loopback port the first time; the same port after a ``stop``)."""
        for attempt in range(3):  # another process may take the free port between the probe and the bind
            self.port = self.port or free_port()
            # fsync off: committed data survives a stop (even -m immediate), not a crash of the machine
            options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c full_page_writes=off -c max_connections=200")
            proc = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                             "-o", options, "start", check=False)
            if proc.returncode == 0:
                return
            if attempt == 2:
                raise RuntimeError(f"pg_ctl start failed: {proc.stderr.strip()}\n"
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            self.port = 0

    def pid(self) -> int | None:
        """The server's process id while it runs (postmaster.pid's first line)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``; killed by its pid if it is still there)."""
        pid = self.pid()
        if pid is None:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-W", "stop", check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of a database of this cluster (TCP on loopback, no password)."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        if name is None:
            self._databases += 1
            name = f"test{self._databases}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.close)
