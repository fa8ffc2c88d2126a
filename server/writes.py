"""Rows written once by the database's unique keys, with any number of writers (several coordinator processes may
share one database): ``insert_ignore`` and ``upsert``, in the dialect's INSERT ... ON CONFLICT where it has one
(PostgreSQL, SQLite), else with a savepoint.
"""

from __future__ import annotations

import importlib

from sqlalchemy import Table, bindparam, insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ClauseElement


def dialect_insert_of(conn: Connection):  # noqa: ANN202
    """The INSERT with ON CONFLICT of the connection's dialect (PostgreSQL, SQLite), or None."""
    name = conn.dialect.name
    return importlib.import_module(f"sqlalchemy.dialects.{name}").insert if name in ("postgresql", "sqlite") else None


_BUILT: dict[tuple, object] = {}  # (dialect, write, table, keys, columns) -> the statement, built once


def _bound(table: Table, *names: str) -> dict:
    """A bound parameter per column, typed as the column (a JSON column's value is encoded as JSON)."""
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


def insert_ignore(conn: Connection, table: Table, keys: tuple[str, ...], **values: object) -> bool:
    """Insert a row unless one with the same ``keys`` (a unique key of ``table``) is stored; True when inserted.
    Atomic with any number of writers: the database's unique key decides. Where every value is plain (no SQL
    expression), the statement is built once for each set of columns: building one costs more than running it
    (~0.1 ms), and every upload stores a row."""
    dialect_insert = dialect_insert_of(conn)
    if dialect_insert is None:
        try:
            with conn.begin_nested():
                conn.execute(insert(table).values(**values))
        except IntegrityError:
            return False
        return True
    plain = not any(isinstance(value, ClauseElement) for value in values.values())
    cache_key = (conn.dialect.name, "ignore", table.name, keys, tuple(values))
    statement = _BUILT.get(cache_key) if plain else None
    if statement is None:
        statement = dialect_insert(table).values(_bound(table, *values) if plain else values)
        statement = statement.on_conflict_do_nothing(index_elements=list(keys))
        if conn.dialect.name != "sqlite":  # SQLite's rowcount counts the row inserted (RETURNING needs SQLite 3.35)
            statement = statement.returning(table.c[keys[0]])
        if plain:
            statement = _BUILT.setdefault(cache_key, statement)
    result = conn.execute(statement, values if plain else {})
    return result.rowcount == 1 if conn.dialect.name == "sqlite" else result.first() is not None


def upsert(conn: Connection, table: Table, keys: tuple[str, ...], values: dict,
           changes: dict | tuple[str, ...]) -> None:
    """Insert ``values``, or when a row with the same ``keys`` is stored apply ``changes`` to it, atomically:
    column values or expressions over its columns, or a tuple of column names to set as in ``values`` (plain values:
    the statement is then built once for each set of columns, as ``insert_ignore``'s)."""
    dialect_insert = dialect_insert_of(conn)
    if dialect_insert is not None and isinstance(changes, tuple):
        cache_key = (conn.dialect.name, "upsert", table.name, keys, tuple(values), changes)
        statement = _BUILT.get(cache_key)
        if statement is None:
            inserted = dialect_insert(table).values(_bound(table, *values))
            statement = _BUILT.setdefault(cache_key, inserted.on_conflict_do_update(
                index_elements=list(keys), set_={name: inserted.excluded[name] for name in changes}))
        conn.execute(statement, values)
        return
    if isinstance(changes, tuple):
        changes = {name: values[name] for name in changes}
    if dialect_insert is not None:
        conn.execute(dialect_insert(table).values(**values).on_conflict_do_update(index_elements=list(keys),
                                                                                  set_=changes))
        return
    where = [table.c[k] == values[k] for k in keys]
    if conn.execute(table.update().where(*where).values(**changes)).rowcount == 0 and not insert_ignore(
            conn, table, keys, **values):
        conn.execute(table.update().where(*where).values(**changes))
