"""Engine, sessions and the few dialect differences between SQLite and PostgreSQL.

Domain modules take a Session and never commit; the edge (a request, a worker iteration, a CLI command)
opens the transaction with `transaction()` and commits it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

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


def insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING on both SQLite and PostgreSQL."""
    return dialect_insert(session.get_bind().dialect.name, table)


def dialect_insert(dialect: str, table: Any) -> Any:
    """INSERT for the named dialect ("postgresql" or "sqlite"), for callers that hold an engine, not a session."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def is_postgresql(session: Session) -> bool:
    """True when row locks (FOR UPDATE, SKIP LOCKED) are real."""
    return session.get_bind().dialect.name == "postgresql"
