"""Leases in the coordinator's database: work that one coordinator replica must do at a time (close a round,
evaluate a global adapter) is done by the replica that holds its lease.

A lease is a row of ``store.leases``: its name (e.g. ``close/banking/3``), its holder (one id per coordinator
process) and when it expires, by the database's clock (replicas' clocks may differ; the database has one). Taking
one is a single conditional write (insert it, or take it over when it expired or is ours), so two replicas never
hold the same lease; while the work runs a thread renews it every third of its time; the work's final commit checks,
in the same transaction, that the lease is still its holder's (``guard``), so a replica that stalled past its lease
while another took over writes nothing. A replica that dies holding a lease leaves it to expire: after
``[server] lease_s`` another replica takes it and does the work again.

The module speaks SQL for its table only (``edgeft.server.state`` keeps the rest).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import delete, func, literal, or_, update
from sqlalchemy.engine import Connection, Engine

from edgeft.server.store import leases, transaction
from edgeft.server.writes import insert_ignore

log = logging.getLogger("edgeft.server")


def replica_id() -> str:
    """A new holder id for this coordinator process: host, pid and a random part (a restarted process is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def database_clock(conn: Connection):  # noqa: ANN201
    """The database's current time in seconds since the epoch, as a SQL expression of the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    if conn.dialect.name == "sqlite":
        return (func.julianday("now") - 2440587.5) * 86400.0
    import time

    return literal(time.time())


class Lease:
    """A lease this replica holds: ``guard(conn)`` inside a commit keeps that commit to its holder; ``lost`` is
    set when a renewal found it taken over."""

    def __init__(self, leases: "Leases", name: str):
        self.leases, self.name = leases, name
        self.lost = False

    def guard(self, conn: Connection) -> bool:
        """Renew the lease inside ``conn``'s transaction; False when another replica holds it now (the caller's
        transaction must then write nothing)."""
        return self.leases.renew_in(conn, self.name)


class Leases:
    """The leases of one coordinator process (``holder``), each held for ``duration_s`` unless renewed."""

    def __init__(self, engine: Engine, duration_s: float, holder: str | None = None):
        self.engine, self.duration_s = engine, duration_s
        self.holder = holder or replica_id()

    def take(self, name: str) -> bool:
        """Take lease ``name`` when it is free, expired or already ours; False when another replica holds it."""
        with transaction(self.engine) as conn:
            clock = database_clock(conn)
            if insert_ignore(conn, leases, ("name",), name=name, holder=self.holder,
                             expires_at=clock + self.duration_s, taken_at=clock):
                return True
            return conn.execute(update(leases).where(
                leases.c.name == name, or_(leases.c.holder == self.holder, leases.c.expires_at < clock))
                .values(holder=self.holder, expires_at=clock + self.duration_s, taken_at=clock)).rowcount == 1

    def renew_in(self, conn: Connection, name: str) -> bool:
        """Extend our lease ``name`` inside ``conn``'s transaction; False when it is not ours any more."""
        return conn.execute(update(leases).where(leases.c.name == name, leases.c.holder == self.holder)
                            .values(expires_at=database_clock(conn) + self.duration_s)).rowcount == 1

    def renew(self, name: str) -> bool:
        with transaction(self.engine) as conn:
            return self.renew_in(conn, name)

    def release(self, name: str) -> None:
        """Give lease ``name`` up (when ours), so that nobody waits for it to expire."""
        with transaction(self.engine) as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.holder == self.holder))

    @contextmanager
    def hold(self, name: str) -> Iterator[Lease | None]:
        """Lease ``name`` for the block, renewed every third of its duration from a thread of its own and
        released at the end; yields None (and holds nothing) when another replica holds it."""
        if not self.take(name):
            yield None
            return
        lease, done = Lease(self, name), threading.Event()

        def renew() -> None:
            while not done.wait(self.duration_s / 3):
                try:
                    if not self.renew(name):
                        lease.lost = True
                        log.warning("lease %s was taken over by another replica; its work here will not commit",
                                    name)
                        return
                except Exception as exc:  # noqa: BLE001 - the database is away: the next turn tries again
                    log.warning("renewing lease %s failed: %s", name, exc)

        renewer = threading.Thread(target=renew, name=f"edgeft-lease-{name}", daemon=True)
        renewer.start()
        try:
            yield lease
        finally:
            done.set()
            renewer.join(timeout=10)
            try:
                self.release(name)
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("releasing lease %s failed (it expires in %.0f s): %s", name, self.duration_s, exc)
