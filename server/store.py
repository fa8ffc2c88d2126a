"""The coordinator's state in SQL through SQLAlchemy Core: a SQLite file with WAL by default, or any database
SQLAlchemy reaches (``[server] database``, e.g. PostgreSQL through psycopg).

Every state change is one transaction, so a crash at any point leaves either the old or the new state: an accepted
update is a row (unique per job, round and device), a closed round and the global adapter it produced are written
together. Nothing here relies on a single writer: rows that must exist once are kept once by unique keys
(``edgeft.server.writes``), never by a lock in this process (SQLite's turn lock in ``transaction`` only spares
waiting), so several coordinator processes may share one database. The schema's versions are
``edgeft.server.schema``'s (Alembic).
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from sqlalchemy import (JSON, Column, Float, Index, Integer, MetaData, String, Table, UniqueConstraint, create_engine,
                        event, select)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import (ArgumentError, DatabaseError, DisconnectionError, InterfaceError, NoSuchModuleError,
                            OperationalError)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from edgeft.errors import ConfigError, StateError, Unavailable
from edgeft.server.turn import Turn
from edgeft.server.writes import upsert

log = logging.getLogger("edgeft.server")
IDLE_PING_S = 5.0  # a database connection unused this long is tested before use
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
    Column("running_sum", String),  # the flushed running sum that covers it (revision 0005); NULL: streamed at closing
    UniqueConstraint("job_id", "round", "device_id"),
)

running_sums = Table(
    "running_sums", metadata,  # updates a replica folded as they came (edgeft.server.running_sums); revision 0005
    Column("id", String, primary_key=True),
    Column("job_id", String, nullable=False),
    Column("round", Integer, nullable=False),
    Column("blob", String, nullable=False),  # totals, weight, norms, count (safetensors)
    Column("updates", Integer, nullable=False),  # how many update rows it covers (running_sum = id)
    Column("holder", String, nullable=False),  # the replica that folded them
    Column("created_at", Float, nullable=False),
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
Index("ix_enrolments_job_id", enrolments.c.job_id)  # a job's devices (round selection); schema revision 0002


rejections = Table(
    "rejections", metadata,  # uploads refused per job and reason; reason "duplicate": replays counted once
    Column("job_id", String, primary_key=True),
    Column("reason", String, primary_key=True),
    Column("count", Integer, nullable=False),
    Column("last_message", String, nullable=False, default=""),
    Column("last_at", Float, nullable=False),
)


leases = Table(
    "leases", metadata,  # work one coordinator replica does at a time (edgeft.server.lease); schema revision 0003
    Column("name", String, primary_key=True),  # e.g. close/<job>/<round>, evaluate/<job>/<version>
    Column("holder", String, nullable=False),  # the coordinator process holding it
    Column("expires_at", Float, nullable=False),  # seconds since the epoch, by the database's clock
    Column("taken_at", Float, nullable=False),
)


async_updates = Table(
    "async_updates", metadata,  # asynchronous jobs' accepted updates: the buffer (version NULL) and those a global
    # version was made from; schema revision 0004
    Column("seq", Integer, primary_key=True, autoincrement=True),  # arrival order: buffers take the oldest first
    Column("job_id", String, nullable=False),
    Column("upload_id", String, nullable=False),
    Column("device_id", String, nullable=False),
    Column("base_version", Integer, nullable=False),  # the global version it trained from
    Column("n_examples", Integer, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("blob", String, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("version", Integer),  # the global version it went into; NULL: still in the buffer; -1: left out (stale)
    UniqueConstraint("job_id", "upload_id", name="uq_async_updates_upload"),
)
Index("ix_async_updates_buffer", async_updates.c.job_id, async_updates.c.version)

async_work = Table(
    "async_work", metadata,  # asynchronous jobs: the device holding work now (the concurrency cap); revision 0004
    Column("job_id", String, primary_key=True),
    Column("device_id", String, primary_key=True),
    Column("upload_id", String, nullable=False),
    Column("base_version", Integer, nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # afterwards the device no longer counts as holding work
)


def database_url(url_or_path: URL | str | Path) -> URL:
    """A database URL from a SQLAlchemy URL or a SQLite file path (ConfigError naming what is wrong)."""
    if isinstance(url_or_path, URL):
        return url_or_path
    text = str(url_or_path)
    if "://" not in text:
        return URL.create("sqlite", database=text)
    try:
        return make_url(text)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigError("invalid server.database: not a SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db "
                          "or sqlite:////path/to/state.db)") from exc


def label(url: URL | str | Path) -> str:
    """A database URL as it may be logged and shown: the password masked (``***``)."""
    return database_url(url).render_as_string(hide_password=True)


def connect(url_or_path: URL | str | Path) -> Engine:
    """An engine for a database URL or a SQLite file path, with its first connection made.

    SQLite: the file's folder is made, WAL journal; a file that is not a database or fails ``quick_check``
    (truncated, garbled) raises StateError: a corrupt state is never used. A database server that cannot be
    reached raises Unavailable naming the URL (password masked) and what to do."""
    url = database_url(url_or_path)
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite:
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        options = {"connect_args": {"timeout": 30, "check_same_thread": False}}
    else:  # a bounded wait for a dead host; idle connections are tested before use (_ping_idle_connections)
        options = {"pool_size": 8, "max_overflow": 24, "pool_timeout": 10,
                   **({"connect_args": {"connect_timeout": 10}} if url.get_backend_name() == "postgresql"
                      and "connect_timeout" not in url.query else {})}
    try:
        engine = create_engine(url, **options)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise ConfigError(f"invalid server.database={label(url)!r}: SQLAlchemy has no driver {url.drivername!r} "
                          f"here ({exc}); PostgreSQL is postgresql+psycopg://..., installed by "
                          "pip install 'edgeft[server]'") from exc
    if not sqlite:
        _ping_idle_connections(engine)
    if sqlite:
        _SQLITE_WRITERS[engine] = Turn()  # this process's transactions take turns (``transaction``)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()
    try:
        with engine.connect() as conn:
            problems = [" ".join(p.split()) for p in conn.exec_driver_sql("PRAGMA quick_check").scalars()
                        if p != "ok"] if sqlite else []
        if problems:
            raise StateError(f"the state database {url.database} is corrupt ({'; '.join(problems[:3])}); restore "
                             "the state folder from a backup, or start over with a new state_dir")
    except (DatabaseError, InterfaceError) as exc:
        engine.dispose()
        raise _open_error(url, exc) from exc
    except StateError:
        engine.dispose()
        raise
    return engine


def open_database(url_or_path: URL | str | Path, upgrade: bool = True) -> Engine:
    """``connect``, then bring the schema to this edgeft's version (``edgeft.server.schema.upgrade``; StateError for
    a schema a newer edgeft made). ``upgrade=False``: read as it is (a reader beside a running coordinator)."""
    from edgeft.server.schema import upgrade as upgrade_schema

    engine = connect(url_or_path)
    if upgrade:
        try:
            upgrade_schema(engine)
        except (DatabaseError, InterfaceError) as exc:
            engine.dispose()
            raise _open_error(engine.url, exc) from exc
        except BaseException:
            engine.dispose()
            raise
    return engine


def _open_error(url: URL, exc: Exception) -> StateError | Unavailable:
    """What a database error while opening the state means: a server that cannot be reached (Unavailable), or
    a SQLite file that is not a database (StateError), each naming the database and what to do."""
    if url.get_backend_name() != "sqlite" and isinstance(exc, (OperationalError, InterfaceError)):
        return Unavailable(f"cannot reach the coordinator's database {label(url)} ({_cause(exc)}): start the "
                           "database server (or make it reachable from here), or fix [server] database, then start "
                           "again")
    where = url.database if url.get_backend_name() == "sqlite" else label(url)
    return StateError(f"the state database {where} is corrupt or not a database ({_cause(exc)}); restore the "
                      "state folder from a backup, or start over with a new state_dir")


def _cause(exc: Exception) -> str:
    """The first line of a database driver's error."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _ping_idle_connections(engine: Engine) -> None:
    """Test a pooled connection before use when it sat unused for more than IDLE_PING_S (a server restarted or a
    proxy dropped it meanwhile: a fresh one replaces it); not one in steady use (``pool_pre_ping`` cost a round trip
    per transaction). Should the server go away under load, the first transaction on a dead connection fails
    (UNAVAILABLE: the device retries) and SQLAlchemy replaces every connection of the pool."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record) -> None:  # noqa: ANN001
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy) -> None:  # noqa: ANN001
        if time.monotonic() - record.info.get("idle_since", time.monotonic()) <= IDLE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # noqa: BLE001 - any failure: the pool discards it and connects afresh
            raise DisconnectionError(f"an idle database connection is gone: {exc}") from exc


_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, Turn] = weakref.WeakKeyDictionary()


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction (committed at the end, rolled back on any error). A database that cannot be reached or did
    not answer (a SQLite file locked past its timeout) raises Unavailable (UNAVAILABLE on the wire: retry later),
    logged here, never sent to devices. On SQLite (one writer; its busy handler polls a locked file with sleeps of up
    to 100 ms) this process's transactions take turns (``edgeft.server.turn``: urgent ones first), handed over at
    once."""
    turn = _SQLITE_WRITERS.get(engine) or nullcontext()
    try:
        with turn, engine.begin() as conn:
            yield conn
    except (OperationalError, InterfaceError, PoolTimeout) as exc:
        if engine.dialect.name == "sqlite" and not any(w in str(exc) for w in ("locked", "busy")):
            raise  # SQLite's OperationalError is also "no such table" and the like: not a matter of waiting
        log.warning("the state database %s failed a transaction: %s", label(engine.url), _cause(exc))
        raise Unavailable("the coordinator's database is unavailable; retry later") from exc


now = time.time


def upsert_device(conn: Connection, device_id: str, capabilities: dict) -> None:
    upsert(conn, devices, ("id",), dict(id=device_id, capabilities=capabilities, registered_at=now(),
                                        last_seen=now(), metrics={}),
           dict(capabilities=capabilities, last_seen=now()))
