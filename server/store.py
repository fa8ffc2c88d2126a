"""The coordinator's state in SQL (SQLite with WAL by default) through SQLAlchemy Core.

Every state change is one transaction, so a crash at any point leaves either the old or the new state:
an accepted update is a row (unique per job, round and device), a closed round and the global adapter it
produced are written together.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import (JSON, Column, Float, Integer, MetaData, String, Table, UniqueConstraint, create_engine,
                        event, insert, select, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError

from edgeft.errors import StateError

metadata = MetaData()

devices = Table(
    "devices", metadata,
    Column("id", String, primary_key=True),
    Column("capabilities", JSON, nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("metrics", JSON, nullable=False, default=dict),  # the latest heartbeat's metrics
)

jobs = Table(
    "jobs", metadata,
    Column("id", String, primary_key=True),
    Column("bundle_digest", String, nullable=False),
    Column("rounds", Integer, nullable=False),
    Column("current_round", Integer, nullable=False),  # the round being trained (1-based); rounds+1 when done
    Column("status", String, nullable=False),  # running | finished | failed
    Column("message", String, nullable=False, default=""),
)

job_bundles = Table(
    "job_bundles", metadata,  # a job's bundles at smaller LoRA ranks (mixed ranks); its own: jobs.bundle_digest
    Column("job_id", String, primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("digest", String, nullable=False),
)

job_engines = Table(
    "job_engines", metadata,  # a job serving several training engines: its own-rank bundle for each, in the order
    # of preference (position 0 first). No rows: one engine, that of jobs.bundle_digest (jobs before engines).
    Column("job_id", String, primary_key=True),
    Column("engine", String, primary_key=True),
    Column("position", Integer, nullable=False),
    Column("digest", String, nullable=False),
)

rounds = Table(
    "rounds", metadata,
    Column("job_id", String, primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("status", String, nullable=False),  # open | closed | failed
    Column("selected", JSON, nullable=False),
    Column("opened_at", Float, nullable=False),
    Column("deadline", Float, nullable=False),
    Column("closed_at", Float),
    Column("message", String, nullable=False, default=""),
)

updates = Table(
    "updates", metadata,
    Column("job_id", String, nullable=False),
    Column("round", Integer, nullable=False),
    Column("device_id", String, nullable=False),
    Column("upload_id", String, nullable=False),
    Column("n_examples", Integer, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("blob", String, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("bytes", Integer, nullable=False),
    UniqueConstraint("job_id", "round", "device_id"),
)

adapters = Table(
    "adapters", metadata,
    Column("job_id", String, primary_key=True),
    Column("version", Integer, primary_key=True),  # version r is the global adapter after round r (0: initial)
    Column("blob", String, nullable=False),
    Column("created_at", Float, nullable=False),
)

evaluations = Table(
    "evaluations", metadata,  # the global adapter after round r on the job's held-out data (0: initial)
    Column("job_id", String, primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("metrics", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

downloads = Table(
    "downloads", metadata,  # bytes of each task (the global adapter and training spec) sent to a device
    Column("job_id", String, nullable=False),
    Column("round", Integer, nullable=False),
    Column("device_id", String, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("sent_at", Float, nullable=False),
    UniqueConstraint("job_id", "round", "device_id"),
)

aggregations = Table(
    "aggregations", metadata,  # per closed round: what its strategy keeps for the next round and reports
    Column("job_id", String, primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("state_blob", String),  # server optimiser moments and the privacy ledger (safetensors), or NULL
    Column("report", JSON, nullable=False),  # e.g. clipped updates, Krum's picks, {"privacy": {"epsilon", ...}}
    Column("created_at", Float, nullable=False),
)

tokens = Table(
    "tokens", metadata,  # device enrolment tokens: only the sha256 of the secret is kept, never the token
    Column("id", String, primary_key=True),  # a public name for listing and revoking
    Column("job_id", String, nullable=False),
    Column("sha256", String, nullable=False, unique=True),
    Column("note", String, nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),  # None: never
    Column("revoked_at", Float),  # None: valid
)

enrolments = Table(
    "enrolments", metadata,  # which devices registered for which job, with which token
    Column("device_id", String, primary_key=True),
    Column("job_id", String, primary_key=True),
    Column("token_id", String, nullable=False),
    Column("enrolled_at", Float, nullable=False),
)


rejections = Table(
    "rejections", metadata,  # uploads refused per job and reason; reason "duplicate": replays counted once
    Column("job_id", String, primary_key=True),
    Column("reason", String, primary_key=True),
    Column("count", Integer, nullable=False),
    Column("last_message", String, nullable=False, default=""),
    Column("last_at", Float, nullable=False),
)


def open_database(url_or_path: str | Path) -> Engine:
    """An engine for a database URL, or a SQLite file path (WAL journal, foreign writers serialised).

    A SQLite file that is not a database or fails SQLite's ``quick_check`` (truncated, garbled) raises
    ``StateError``: a corrupt state is never used."""
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False} if url.startswith("sqlite")
                           else {})
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()
    try:
        if url.startswith("sqlite"):
            with engine.connect() as conn:
                problems = [" ".join(p.split()) for p in conn.exec_driver_sql("PRAGMA quick_check").scalars()
                            if p != "ok"]
            if problems:
                raise StateError(f"the state database {url.removeprefix('sqlite:///')} is corrupt "
                                 f"({'; '.join(problems[:3])}); restore the state folder from a backup, or start "
                                 "over with a new state_dir")
        metadata.create_all(engine)
    except DatabaseError as exc:
        engine.dispose()
        raise StateError(f"the state database {url.removeprefix('sqlite:///')} is corrupt or not a database "
                         f"({exc.orig}); restore the state folder from a backup, or start over with a new "
                         "state_dir") from exc
    except StateError:
        engine.dispose()
        raise
    return engine


def now() -> float:
    return time.time()


def upsert_device(conn: Connection, device_id: str, capabilities: dict) -> None:
    row = conn.execute(select(devices.c.id).where(devices.c.id == device_id)).first()
    if row is None:
        conn.execute(insert(devices).values(id=device_id, capabilities=capabilities, registered_at=now(),
                                            last_seen=now(), metrics={}))
    else:
        conn.execute(update(devices).where(devices.c.id == device_id).values(capabilities=capabilities,
                                                                               last_seen=now()))
