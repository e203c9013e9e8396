"""Engine, sessions and the few dialect differences between SQLite and PostgreSQL.

Domain modules take a Session and never commit; the edge (a request, a worker iteration, a CLI command)
opens the transaction with `transaction()` and commits it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (ARRAY, ColumnElement, Engine, Executable, Result, TableValuedAlias, Text, any_, bindparam,
                        cast, column, create_engine, event, func, select)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, make_transient_to_detached, sessionmaker

Row = TypeVar("Row")
POOL_SIZE = 10  # connections kept open; up to 20 more are opened (and closed again) at peaks


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and write-locking transactions."""
    if not url.startswith("sqlite"):
        # Bounded waits: a partitioned or stalled server must surface as an error (a 503, a retry) within
        # seconds, not hang a request until the kernel's TCP timeouts.
        bounded = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                   "keepalives_count": 3, "tcp_user_timeout": 15000, "options": "-c statement_timeout=30000"}
        return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=20, connect_args=bounded, **kwargs)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # SQLite has no row locks: take the database write lock up front, so a spend's check and its
        # write can never interleave with another writer (the SQLite stand-in for SELECT ... FOR UPDATE).
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (responses are built from them)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session


def adopt(session: Session, instance: Row) -> Row:
    """A row this transaction has just written with a Core statement, given to the session as a persistent
    object with every column known: nothing to load or flush (the ORM loading a row a statement returned
    costs several times the statement's own CPU)."""
    make_transient_to_detached(instance)
    session.add(instance)
    return instance


def insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING on both SQLite and PostgreSQL."""
    return dialect_insert(session.get_bind().dialect.name, table)


def dialect_insert(dialect: str, table: Any) -> Any:
    """INSERT for the named dialect ("postgresql" or "sqlite"), for callers that hold an engine, not a session."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def among(column: Any, name: str, dialect: str) -> ColumnElement[bool]:
    """`column` is one of the list passed as parameter `name`.

    On PostgreSQL that is `= ANY(:name)`, the list sent as one array: a page's `IN` list of 100-200 values is
    otherwise rendered into the SQL by SQLAlchemy and parsed back out by psycopg on every query (~1 ms of CPU
    per 100 values, most of the invoices' query time in bench/reconcile), and the statement's text changes
    with the list's length, so it is never prepared. SQLite has no arrays: the list is expanded there.
    """
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(column.type)))  # type: ignore[no-any-return]
    return column.in_(bindparam(name, expanding=True))  # type: ignore[no-any-return]


def recordset(**types: Any) -> TableValuedAlias:
    """PostgreSQL: the parameter `rows`, a JSON array of objects, as a table of columns of these names and types
    (jsonb_to_recordset), for a `Bulk` statement."""
    rows = func.jsonb_to_recordset(cast(bindparam("rows", type_=Text), JSONB))
    return rows.table_valued(*(column(name, type_) for name, type_ in types.items())).render_derived("rows", with_types=True)


def listed(column: Any, name: str) -> ColumnElement[bool]:
    """PostgreSQL, in a `Bulk` UPDATE joined to its `recordset()`: `column` is one of the rows' `name` values, as
    `= ANY(ARRAY(…))`. Joined to the recordset alone, the planner takes the rows for 100 (a function's estimate),
    plans a hash join and scans the whole table — seconds apart as the table grows; with the list it looks the
    rows up by the column's index."""
    values = func.jsonb_array_elements(cast(bindparam("rows", type_=Text), JSONB)).table_valued("value").alias("listed")
    return column == any_(func.array(select(cast(values.c.value.op("->>")(name), column.type)).scalar_subquery()))  # type: ignore[no-any-return]


def table_columns(table: Any, *names: str) -> dict[str, Any]:
    """The types of `table`'s columns `names`, for `recordset`."""
    return {name: table.c[name].type for name in names}


@dataclass(frozen=True)
class Bulk:
    """One write of many rows, built once for each database: on PostgreSQL a statement over `recordset()`, the
    rows sent as ONE JSON parameter and expanded by the server; on SQLite (in-process: no round trips to save)
    an executemany of `other`, whose parameter names are the recordset's column names.

    An executemany on PostgreSQL pays, per row, psycopg's Python (binding, pipelining) and SQLAlchemy's, and a
    multi-row VALUES a new statement text for every count of rows, parsed again each time; the JSON array is
    one parameter encoded by the json module's C encoder, in a statement PostgreSQL prepares once. A batch of
    20 spends' four writes cost 4-5 ms of CPU as executemany against ~1 ms this way (bench/spend)."""

    postgresql: Executable
    other: Executable

    def execute(self, session: Session, rows: Sequence[dict[str, Any]]) -> Result[Any]:
        if session.get_bind().dialect.name == "postgresql":
            return session.execute(self.postgresql, recordset_parameters(rows))
        return session.execute(self.other, list(rows))


def recordset_parameters(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The parameters of a PostgreSQL statement over `recordset()`, for these rows (a `Bulk`'s, or a statement
    that holds one, as spends.CLAIM_AND_LOCK holds idempotency.CLAIM)."""
    return {"rows": json_rows(rows)}


def json_rows(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as the JSON array a PostgreSQL statement expands (jsonb_to_recordset); datetimes as ISO 8601."""
    return json.dumps(rows, default=_json_value)


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()  # timestamptz from ISO 8601 with its offset: the same instant
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def is_postgresql(session: Session) -> bool:
    """True when row locks (FOR UPDATE, SKIP LOCKED) are real."""
    return session.get_bind().dialect.name == "postgresql"
