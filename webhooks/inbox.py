"""The inbox of Stripe events (table stripe_events): store once, claim, mark, retry with backoff.

Storing is INSERT … ON CONFLICT DO NOTHING on the event id, so a redelivery or a concurrent duplicate is a
no-op. Claiming is SELECT … FOR UPDATE SKIP LOCKED on PostgreSQL, so API replicas and workers share the
work without processing an event twice at once; on SQLite the write lock serialises them instead.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import takewhile
from typing import Any

from collections.abc import Callable

import psycopg
from sqlalchemy import Connection, Text, bindparam, cast, func, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service.infra.db import among, dialect_insert, is_postgresql, transaction
from service.infra.models import StripeEvent
from service.infra.stripe_objects import ref, timestamp

DUE = ("pending", "failed")
EVENTS = StripeEvent.__table__  # the hot statements below are Core: no ORM row to build, track or flush
STATUSES = ("pending", "processed", "ignored", "failed", "dead")


def row(event: dict[str, Any], now: datetime, payload: str | None = None) -> dict[str, Any]:
    """The parameters of `insert_new` for a verified event: its facts pulled out for indexing, the payload
    kept whole as JSON text (`payload`, the body as received, when the caller has it: no re-encoding)."""
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    obj = obj if isinstance(obj, dict) else {}
    object_type, object_id = obj.get("object"), ref(obj)
    lane = ref(obj.get("customer")) or object_id or event["id"]
    return {
        "id": event["id"],
        "type": event["type"],
        "object_type": object_type[:100] if isinstance(object_type, str) else None,
        "object_id": object_id[:255] if object_id else None,
        "lane": lane[:255],
        "api_version": event.get("api_version") if isinstance(event.get("api_version"), str) else None,
        "livemode": event.get("livemode") is True,
        "created": timestamp(event.get("created")) or now,
        "payload_text": json.dumps(event) if payload is None else payload,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "received_at": now,
    }


def insert_new(dialect: str) -> Any:
    """INSERT … ON CONFLICT (id) DO NOTHING RETURNING id, for one `row` or (executemany) a list of them:
    SQLAlchemy sends a list as one multi-row statement, compiled once. The payload is bound as JSON text,
    cast to jsonb by PostgreSQL itself, so the body is not parsed into objects and encoded again."""
    payload = bindparam("payload_text", type_=Text)
    value = cast(payload, JSONB) if dialect == "postgresql" else payload
    statement = dialect_insert(dialect, StripeEvent).values(payload=value)
    return statement.on_conflict_do_nothing(index_elements=["id"]).returning(StripeEvent.id)


Inserter = Callable[[Connection, list[dict[str, Any]]], set[str]]


def inserter(dialect: str) -> Inserter:
    """Stores a batch of `row`s and returns the ids that were new.

    On PostgreSQL the batch goes to psycopg's own executemany with RETURNING, which pipelines the one-row
    INSERT of `insert_new` — one round trip, and a statement whose text never changes, so psycopg parses it
    once and PostgreSQL prepares it once. SQLAlchemy would send the batch as one multi-row VALUES list
    instead: new text for every batch size, parsed by psycopg on every batch (the profile put it at a sixth
    of the endpoint's CPU; measured in-process, 102 against 46 µs of CPU per row in batches of 32). Errors
    are raised as SQLAlchemy's, as on every other path. SQLite gets the multi-row INSERT."""
    statement = insert_new(dialect)
    if dialect != "postgresql":
        return lambda conn, rows: set(conn.scalars(statement, rows))
    texts: dict[tuple[str, ...], str] = {}  # the statement's text for `row`'s keys, compiled once

    def pipelined(conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
        keys = tuple(rows[0])
        if keys not in texts:
            texts[keys] = str(statement.compile(dialect=conn.dialect, column_keys=list(keys)))
        compiled = texts[keys]
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(compiled, rows, returning=True)
            new = set()
            while True:
                new.update(found for (found,) in cursor.fetchall())
                if not cursor.nextset():
                    return new
        except psycopg.Error as exc:
            raise DBAPIError.instance(compiled, rows, exc, psycopg.Error) from exc
        finally:
            cursor.close()

    return pipelined


def store(session: Session, event: dict[str, Any], now: datetime) -> bool:
    """Store a verified event; False when it was already there (a redelivery)."""
    return session.scalar(insert_new(session.get_bind().dialect.name), row(event, now)) is not None


@dataclass(frozen=True)
class Partition:
    """One of `count` disjoint shares of the lanes, by a hash of the lane: each of `credits worker`'s processes
    drains its own (WORKER_PROCESSES), so they neither fetch the same events nor run one lane's side by side."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} of {self.count}")

    def __str__(self) -> str:
        """As the logs name it: "1 of 2"."""
        return f"{self.index + 1} of {self.count}"


WHOLE = Partition()


def due(session: Session, now: datetime, limit: int, partition: Partition = WHOLE) -> list[tuple[str, str]]:
    """Events waiting to be (re)processed, oldest first, each as (id, lane): the Stripe customer the event's
    object names, else the object itself. One lane's events are processed in order, because one customer's
    events build on each other (a renewal's rollover on the invoice before it); lanes may run side by side.
    Only the lanes of `partition` (PostgreSQL: SQLite's one writer leaves nothing to share out)."""
    if partition != WHOLE and not is_postgresql(session):
        raise ValueError("lane partitions need PostgreSQL")
    statement = DUE_NOW if partition == WHOLE else DUE_IN_PARTITION
    found = session.execute(statement, {"now": now, "limit": limit, "parts": partition.count, "part": partition.index})
    return [(event_id, lane) for event_id, lane in found]


# The lane is the column `row` fills; a row stored before it existed (migration 0006), or by a replica still
# running older code, has none, and its lane is read from its payload as before. COALESCE stops at the first
# value that is not NULL, so a row with its lane stored is not detoasted: for a batch of 100 events of ~6 KB
# that was 7 ms of the database's time a batch, against 0.8 ms (bench/README.md, end to end).
_STORED_LANE = func.coalesce(
    StripeEvent.lane, StripeEvent.payload["data"]["object"]["customer"].as_string(), StripeEvent.object_id, StripeEvent.id
)
DUE_NOW = (
    select(StripeEvent.id, _STORED_LANE)
    .where(StripeEvent.status.in_(DUE), StripeEvent.next_attempt_at <= bindparam("now"))
    .order_by(StripeEvent.next_attempt_at, StripeEvent.received_at)
    .limit(bindparam("limit"))
)
# abs() of the remainder, not of the hash: hashtext is a signed int4, and abs(-2^31) is out of range.
DUE_IN_PARTITION = DUE_NOW.where(func.abs(func.hashtext(_STORED_LANE) % bindparam("parts")) == bindparam("part"))


@dataclass(frozen=True)
class Claimed:
    """An event claimed for processing: the columns its handler reads, not the ORM row — nothing for the
    session's unit of work to track or flush; `finish` marks it with one UPDATE."""

    id: str
    type: str
    livemode: bool
    created: datetime
    payload: dict[str, Any]


def _claims() -> dict[tuple[str, bool], Any]:
    """The claim statement for each (which, row locks?), built once: they run for every event. `due`: the event
    `id` if it is due; `any`: whatever its status (a replay); `lane`: those of the events `ids` that are due.
    Row locks are PostgreSQL's (SQLite's write lock serialises instead), so `locking` is also the dialect: the
    ids go as one array there (db.among), which costs less than the event's whole handling did (bench/e2e)."""
    by_id, is_due = EVENTS.c.id == bindparam("id"), EVENTS.c.status.in_(DUE)
    built = {}
    for locking in (False, True):
        in_lane = among(EVENTS.c.id, "ids", "postgresql" if locking else "sqlite")
        for name, where in {"due": (by_id, is_due), "any": (by_id,), "lane": (in_lane, is_due)}.items():
            query = select(EVENTS.c.id, EVENTS.c.type, EVENTS.c.livemode, EVENTS.c.created, EVENTS.c.payload).where(*where)
            built[name, locking] = query.with_for_update(skip_locked=True) if locking else query
    return built


CLAIMS = _claims()
FINISH = (
    EVENTS.update()
    .where(EVENTS.c.id == bindparam("event_id"))
    .values(status=bindparam("new_status"), outcome=bindparam("new_outcome"), processed_at=bindparam("at"),
            attempts=EVENTS.c.attempts + 1, last_error=None)
)


def claim(session: Session, event_id: str, *, any_status: bool = False) -> Claimed | None:
    """Lock the event for processing; None when another process holds it or it needs nothing more."""
    query = CLAIMS["any" if any_status else "due", is_postgresql(session)]
    found = session.execute(query, {"id": event_id}).one_or_none()
    return Claimed(*found) if found is not None else None


def claim_lanes(session: Session, lanes: list[list[str]]) -> list[list[Claimed]]:
    """Lock several lanes' events for processing with one statement, not one each: of each lane's event ids,
    in that order, those up to the first that another process holds or that needs nothing more — a lane
    stops there."""
    rows = session.execute(CLAIMS["lane", is_postgresql(session)], {"ids": [i for lane in lanes for i in lane]})
    found = {row.id: Claimed(*row) for row in rows}
    return [list(takewhile(lambda event: event is not None, map(found.get, lane))) for lane in lanes]  # type: ignore[misc]


def finish(session: Session, *handled: tuple[Claimed, str, str | None, datetime]) -> None:
    """Mark events handled — each (event, status, outcome, when) — in their handlers' own transaction: one
    UPDATE statement for them all (a lane's sent in one round trip)."""
    marks = [{"event_id": event.id, "new_status": status, "new_outcome": outcome, "at": at}
             for event, status, outcome, at in handled]
    session.execute(FINISH, marks)


def record_failure(
    sessions: sessionmaker[Session],
    event_id: str,
    error: BaseException,
    *,
    max_attempts: int,
    backoff_seconds: float,
    now: datetime,
    any_status: bool = False,
) -> str:
    """In a fresh transaction (the handler's was rolled back): count the attempt, keep the error, and
    schedule a retry with exponential backoff, or declare the event dead. Returns the new status. An event
    that another process handled meanwhile (this waited for its row lock) keeps its status: the attempt that
    failed changed nothing, and the event needs nothing more — unless this was a replay (`any_status`), whose
    failure is recorded whatever the status was."""
    with transaction(sessions) as session:
        event = session.get_one(StripeEvent, event_id, with_for_update=True)
        if event.status not in DUE and not any_status:
            return event.status
        attempts = event.attempts + 1
        status = "dead" if attempts >= max_attempts else "failed"
        delay = min(backoff_seconds * 2 ** (attempts - 1), 6 * 3600)
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        session.execute(
            update(StripeEvent)
            .where(StripeEvent.id == event_id)
            .values(attempts=attempts, status=status, last_error=detail[:4000], next_attempt_at=now + timedelta(seconds=delay))
        )
    return status


def listing(session: Session, status: str | None, limit: int) -> list[StripeEvent]:
    """Events newest first, optionally of one status."""
    query = select(StripeEvent).order_by(StripeEvent.received_at.desc(), StripeEvent.id).limit(limit)
    if status:
        query = query.where(StripeEvent.status == status)
    return list(session.scalars(query))


