"""The engine, and every difference between SQLite and PostgreSQL the service has to know about.

Everything else is portable SQLAlchemy: `FOR UPDATE` and `SKIP LOCKED` render on PostgreSQL and are left out
on SQLite, where the transaction's write lock (taken at BEGIN, below) serialises writers instead.
"""

from __future__ import annotations

import functools
from typing import Any

import psycopg
from sqlalchemy import (
    ColumnElement,
    Engine,
    Table,
    Text,
    any_,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    text,
    true,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker
from sqlalchemy.sql.dml import ReturningInsert

# Connections per process, kept open: as many as requests, worker threads and inline processing use at once.
# No overflow beyond: a connection opened for a peak and closed after it costs more CPU than the work it does
# (authentication included), so at a peak a transaction waits for one of these instead.
POOL_SIZE = 20
# Bounded waits on PostgreSQL: a partitioned or stalled server surfaces as an error (a 503, a retry) within
# seconds instead of hanging a request until the kernel's TCP timeouts.
POSTGRESQL_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,
    "options": "-c statement_timeout=30000",
}

Insert = postgresql.Insert | sqlite.Insert
DIALECTS = ("postgresql", "sqlite")  # for statements built once for each database
# PostgreSQL's SQLSTATEs for a transaction that lost to a concurrent one: a deadlock, a serialization failure,
# a lock it was told not to wait for. Trying again can succeed at once.
CONFLICTS = frozenset({"40P01", "40001", "55P03"})
# Connection errors (class 08) and a server shutting down or restarting (57P01-57P03): the database, not the work.
UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03")


def make_engine(url: str) -> Engine:
    """An engine for `url`: a bounded pool on PostgreSQL; WAL, foreign keys and write-locking transactions
    on SQLite."""
    if not url.startswith("sqlite"):
        # No ping at every checkout: a round trip per transaction. A connection found dead on use (a restart)
        # fails that one transaction (a 503, a retried event) and makes the pool drop every connection it holds.
        return create_engine(url, pool_size=POOL_SIZE, max_overflow=0, connect_args=POSTGRESQL_CONNECT_ARGS)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _sqlite_connected)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connected(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy, not the driver, decides when a transaction begins (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # SQLite has no row locks: every transaction takes the database's write lock up front, so a spend's check
    # and the write that depends on it never interleave with another writer (SELECT … FOR UPDATE's stand-in).
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (answers are built from them)."""
    return sessionmaker(engine, expire_on_commit=False, autobegin=True)


def among(dialect: str, column: ColumnElement[Any] | QueryableAttribute[Any], name: str) -> ColumnElement[bool]:
    """`column` is one of the list passed as the parameter `name`.

    On PostgreSQL `= ANY(:name)`, the list sent as one array: an `IN` list of a page's 100 values is rendered
    into the SQL by SQLAlchemy and parsed back out by psycopg on every query, and its text changes with the
    list's length, so it is never prepared (bench/README.md, "What the mechanisms save"). SQLite has no
    arrays: the list is expanded there."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


def insert(dialect: str, table: type[Any] | Table) -> Insert:
    """The dialect's INSERT, which offers ON CONFLICT DO NOTHING / DO UPDATE on both databases."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


def insert_many(session: Session, statement: ReturningInsert[Any], rows: list[dict[str, Any]]) -> list[Any]:
    """Run `statement`, an INSERT … RETURNING of one column, once for each of `rows` (dicts with the same keys);
    the values it returned.

    On PostgreSQL through psycopg's own executemany, which pipelines the one-row statement: one round trip, and
    a text that never changes, so psycopg converts it once and PostgreSQL prepares it once. SQLAlchemy would
    send one multi-row VALUES list instead, new text for every number of rows, which psycopg converts on every
    call: twice the client CPU per row. The inbox's writer stores every delivery this way (bench/README.md,
    "What the mechanisms save"). Errors are raised as SQLAlchemy's, as on every other path."""
    if session.get_bind().dialect.name != "postgresql" or not rows:
        return list(session.scalars(statement, rows))
    connection = session.connection()
    sql = _psycopg_text(statement, tuple(rows[0]), connection.dialect)
    pooled = connection.connection
    driver = pooled.driver_connection
    assert isinstance(driver, psycopg.Connection)  # the engine's driver on PostgreSQL (make_engine)
    try:
        with driver.cursor() as cursor:
            cursor.executemany(sql, rows, returning=True)
            returned: list[Any] = []
            while True:
                returned.extend(value for (value,) in cursor.fetchall())
                if not cursor.nextset():
                    return returned
    except psycopg.Error as exc:
        if driver.broken:  # not to be handed out again by the pool
            pooled.invalidate(exc)
        raise DBAPIError.instance(sql, rows, exc, psycopg.Error, connection_invalidated=driver.broken) from exc


@functools.cache
def _psycopg_text(statement: ReturningInsert[Any], keys: tuple[str, ...], dialect: Dialect) -> str:
    """The statement's SQL for psycopg, with a parameter for each of `keys` (compiled once per statement)."""
    return str(statement.compile(dialect=dialect, column_keys=list(keys)))


def json_from_text(dialect: str, name: str) -> ColumnElement[Any]:
    """The bind parameter `name`, JSON text, as a JSON column's value: cast to jsonb on PostgreSQL (which parses
    it itself), kept as the text on SQLite (which stores JSON as text). A body received as text is so stored
    without being decoded and encoded again."""
    text = bindparam(name, type_=Text)
    return cast(text, postgresql.JSONB) if dialect == "postgresql" else text


def customer_free(dialect: str, customer: ColumnElement[str]) -> ColumnElement[bool]:
    """A condition that takes, for the rest of the transaction, a lock on `customer` if no other transaction holds
    it — and is false, without waiting, if one does: one customer's events are never handled by two transactions
    at once, even before its account row exists. On PostgreSQL an advisory lock on a hash of the customer's id;
    on SQLite, where one writer works at a time, always true."""
    if dialect != "postgresql":
        return true()
    return func.pg_try_advisory_xact_lock(func.hashtextextended(customer, 0))


# PostgreSQL: `customer_free`'s lock, taken by waiting for the transaction that holds it.
def wait_for_customer(session: Session, customer: str) -> None:
    """Take the customer's lock of `customer_free` for the rest of the transaction, waiting for whichever
    transaction holds it (SQLite's one writer at a time makes it moot there)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(WAIT_FOR_CUSTOMER, {"customer": customer})


WAIT_FOR_CUSTOMER = text("SELECT pg_advisory_xact_lock(hashtextextended(:customer, 0))")


def is_postgresql(engine: Engine) -> bool:
    """Whether several writers can work at once (row locks); on SQLite one writer at a time does."""
    return engine.dialect.name == "postgresql"


# What an HTTP answer calls the database being unavailable (a 503, so the client retries): an error of the
# connection, or no pooled connection free in time.
UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def is_conflict(error: BaseException) -> bool:
    """Whether the transaction lost to a concurrent one (a deadlock, say): the same work may succeed at once."""
    return isinstance(error, DBAPIError) and getattr(error.orig, "sqlstate", None) in CONFLICTS


def is_unreachable(error: BaseException) -> bool:
    """Whether the database could not be reached (refused, broken, timed out, restarting), rather than the work
    failing: what is worth waiting out. SQLite's errors carry no SQLSTATE; a locked database counts as this."""
    if isinstance(error, InterfaceError | PoolTimeout):
        return True
    if not isinstance(error, OperationalError) or is_conflict(error):
        return False
    state = getattr(error.orig, "sqlstate", None)
    return state is None or state.startswith(UNREACHABLE_STATES)
