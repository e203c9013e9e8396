"""The inbox of Stripe events (table stripe_events): store once, claim, mark, retry with backoff.

Storing is INSERT … ON CONFLICT DO NOTHING on the event id, so a redelivery or a concurrent duplicate is a
no-op. Claiming is SELECT … FOR UPDATE SKIP LOCKED, so API processes and workers share the work without
taking the same event twice; on SQLite the database's write lock serialises them instead. A worker's batch
claims customers whole — every due event of the customers it takes, in the order received (a customer's
events build on each other) — and events that name no customer one by one.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update

from service.infra import db
from service.infra.models import StripeEvent
from service.infra.stripe_objects import ref, timestamp
from service.infra.uow import UnitOfWork

DUE = ("pending", "failed")
STATUSES = ("pending", "processed", "ignored", "invalid", "failed", "dead")
MAX_BACKOFF_SECONDS = 6 * 3600


@dataclass(frozen=True)
class Claimed:
    """An event claimed for processing: what its handler reads."""

    id: str
    type: str
    livemode: bool
    created: datetime
    payload: dict[str, Any]
    customer: str | None  # the Stripe customer the object names, if any: whose account its handler locks


def store(uow: UnitOfWork, event: dict[str, Any], now: datetime) -> bool:
    """Store a verified event; False when it was already there (a redelivery)."""
    return event["id"] in store_many(uow, [(event, None)], now)


def store_many(uow: UnitOfWork, events: list[tuple[dict[str, Any], str | None]], now: datetime) -> set[str]:
    """Store verified events with one statement, each with its facts pulled out for listing and look-ups and its
    payload kept whole (its text, the body as received, when given: it is not encoded again); the ids of those
    that were new (not redeliveries)."""
    # in id order, as every writer inserts: two writers storing the same redelivered events never wait for each
    # other's rows in a cycle
    rows = sorted((_row(event, text, now) for event, text in events), key=lambda row: row["id"])
    return set(db.insert_many(uow.session, STORE[uow.dialect], rows))


def customer_named(event: dict[str, Any]) -> str | None:
    """The Stripe customer an event's object names: the customer itself, or the customer it belongs to."""
    obj = _object(event)
    customer = ref(obj) if obj.get("object") == "customer" else ref(obj.get("customer"))
    return customer[:255] if customer else None


def _object(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


def _row(event: dict[str, Any], text: str | None, now: datetime) -> dict[str, Any]:
    obj = _object(event)
    object_type, object_id, api_version = obj.get("object"), ref(obj), event.get("api_version")
    return {
        "id": event["id"],
        "type": event["type"],
        "object_type": object_type[:100] if isinstance(object_type, str) else None,
        "object_id": object_id[:255] if object_id else None,
        "customer": customer_named(event),
        "api_version": api_version if isinstance(api_version, str) else None,
        "livemode": event.get("livemode") is True,
        "created": timestamp(event.get("created")) or now,
        "payload_text": json.dumps(event) if text is None else text,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "received_at": now,
    }


def claim(uow: UnitOfWork, event_id: str, *, any_status: bool = False) -> Claimed | None:
    """Lock one event for processing: None when another process holds it or it needs nothing more (with
    `any_status`, a replay, whatever its status)."""
    found = uow.session.execute(CLAIM_ANY if any_status else CLAIM_DUE, {"id": event_id}).one_or_none()
    return Claimed(*found) if found is not None else None


def claim_due(uow: UnitOfWork, now: datetime, customers: int, most: int) -> tuple[list[Claimed], set[str]]:
    """Lock, for processing, every due event (never processed, or failed and past its backoff) of the `customers`
    customers with the oldest due events that no other transaction is handling — those customers are this
    transaction's until it ends — and as many of the oldest due events that name no customer; at most `most`
    events in all, in the order received. Returns the events and the customers taken."""
    taken = set(
        uow.session.scalars(FREE_CUSTOMERS[uow.dialect], {"now": now, "scan": 20 * customers, "take": customers})
    )
    loose = list(uow.session.scalars(OLDEST_WITHOUT_CUSTOMER, {"now": now, "limit": customers}))
    if not taken and not loose:
        return [], taken
    rows = uow.session.execute(CLAIM_OF, {"now": now, "customers": sorted(taken), "ids": loose, "limit": most})
    return [Claimed(*row) for row in rows], taken


def claim_of_customer(uow: UnitOfWork, now: datetime, customer: str, most: int) -> list[Claimed]:
    """Lock, for processing, the due events of `customer` (at most `most`), in the order received; for a caller
    that holds the customer (`UnitOfWork.wait_for_customer`)."""
    rows = uow.session.execute(CLAIM_OF, {"now": now, "customers": [customer], "ids": [], "limit": most})
    return [Claimed(*row) for row in rows]


def customer_of(uow: UnitOfWork, event_id: str) -> str | None:
    """The customer a stored event names, if any (read without a lock)."""
    return uow.session.scalar(CUSTOMER_OF, {"id": event_id})


Mark = tuple[Claimed, str, str | None, datetime]  # an event, its new status, its outcome, when


def finish(uow: UnitOfWork, marks: list[Mark]) -> None:
    """Mark events handled, in their handlers' own transaction: "processed" and the credits it caused commit
    together. One statement for all of them."""
    uow.session.execute(
        FINISH,
        [
            {"event_id": event.id, "new_status": status, "new_outcome": outcome, "at": at}
            for event, status, outcome, at in marks
        ],
    )


def record_failure(
    uow: UnitOfWork,
    event_id: str,
    error: BaseException,
    *,
    max_attempts: int,
    backoff_seconds: float,
    now: datetime,
    any_status: bool = False,
    permanent: bool = False,
) -> str:
    """For a handler's transaction that rolled back: count the attempt, keep the error, and schedule a retry
    with exponential backoff, or declare the event dead — or, for an error no retry can mend (`permanent`),
    invalid at once. Returns the new status.

    An event another process handled meanwhile (this waited for its row lock) keeps its status: the attempt
    that failed changed nothing, and the event needs nothing more — unless this was a replay (`any_status`),
    whose failure is recorded whatever the status was."""
    event = uow.session.get_one(StripeEvent, event_id, with_for_update=True)
    if event.status not in DUE and not any_status:
        return event.status
    attempts = event.attempts + 1
    status = "invalid" if permanent else "dead" if attempts >= max_attempts else "failed"
    delay = timedelta(seconds=min(backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS))
    detail = "".join(traceback.format_exception_only(type(error), error)).strip()
    event.attempts, event.status, event.last_error, event.next_attempt_at = attempts, status, detail[:4000], now + delay
    return status


def listing(uow: UnitOfWork, status: str | None, limit: int) -> list[StripeEvent]:
    """Events newest first, optionally of one status."""
    query = select(StripeEvent).order_by(StripeEvent.received_at.desc(), StripeEvent.id).limit(limit)
    if status:
        query = query.where(StripeEvent.status == status)
    return list(uow.session.scalars(query))


def ids_in(uow: UnitOfWork, status: str, since: datetime | None = None) -> list[str]:
    """The ids of the events in `status` (received since `since`, when given), oldest first: for a bulk replay."""
    query = select(StripeEvent.id).where(StripeEvent.status == status)
    if since is not None:
        query = query.where(StripeEvent.received_at >= since)
    return list(uow.session.scalars(query.order_by(StripeEvent.received_at, StripeEvent.id)))


# Built once: every delivery, claim and mark runs one of them.
_events = StripeEvent.__table__
STORE = {
    dialect: db.insert(dialect, _events)
    .values(payload=db.json_from_text(dialect, "payload_text"))
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(_events.c.id)
    for dialect in db.DIALECTS
}
_CLAIMED = select(
    _events.c.id, _events.c.type, _events.c.livemode, _events.c.created, _events.c.payload, _events.c.customer
)
_IS_DUE = (_events.c.status.in_(DUE), _events.c.next_attempt_at <= bindparam("now"))
CUSTOMER_OF = select(_events.c.customer).where(_events.c.id == bindparam("id"))
CLAIM_ANY = _CLAIMED.where(_events.c.id == bindparam("id")).with_for_update(skip_locked=True)
CLAIM_DUE = _CLAIMED.where(_events.c.id == bindparam("id"), _events.c.status.in_(DUE)).with_for_update(skip_locked=True)
# The customers of the oldest `scan` due events, those waiting longest first.
_OLDEST = (
    select(_events.c.customer, _events.c.received_at)
    .where(*_IS_DUE)
    .order_by(_events.c.next_attempt_at, _events.c.received_at)
    .limit(bindparam("scan"))
    .subquery()
)
_WAITING_LONGEST = (
    select(_OLDEST.c.customer)
    .where(_OLDEST.c.customer.is_not(None))
    .group_by(_OLDEST.c.customer)
    .order_by(func.min(_OLDEST.c.received_at))
    .offset(0)  # a fence: the lock condition below is tried on these customers in order, up to the limit, and
    .subquery()  # never pushed into the grouping, where it would take a lock on every customer scanned
)
FREE_CUSTOMERS = {
    dialect: select(_WAITING_LONGEST.c.customer)
    .where(db.customer_free(dialect, _WAITING_LONGEST.c.customer))
    .limit(bindparam("take"))
    for dialect in db.DIALECTS
}
OLDEST_WITHOUT_CUSTOMER = (
    select(_events.c.id)
    .where(*_IS_DUE, _events.c.customer.is_(None))
    .order_by(_events.c.next_attempt_at, _events.c.received_at)
    .limit(bindparam("limit"))
)
CLAIM_OF = (
    _CLAIMED.where(
        *_IS_DUE,
        or_(
            _events.c.customer.in_(bindparam("customers", expanding=True)),
            _events.c.id.in_(bindparam("ids", expanding=True)),
        ),
    )
    .order_by(_events.c.received_at, _events.c.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
FINISH = (
    update(_events)
    .where(_events.c.id == bindparam("event_id"))
    .values(
        status=bindparam("new_status"),
        outcome=bindparam("new_outcome"),
        processed_at=bindparam("at"),
        attempts=_events.c.attempts + 1,
        last_error=None,
    )
)
