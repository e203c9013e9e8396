"""The inbox of Stripe events (table stripe_events): store once, claim, mark, retry with backoff.

Storing is INSERT … ON CONFLICT DO NOTHING on the event id, so a redelivery or a concurrent duplicate is a
no-op. Claiming is SELECT … FOR UPDATE SKIP LOCKED, so API processes and workers share the work without
taking the same event twice; on SQLite the database's write lock serialises them instead.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from service.infra.models import StripeEvent
from service.infra.stripe_objects import ref, timestamp
from service.infra.uow import UnitOfWork

DUE = ("pending", "failed")
STATUSES = ("pending", "processed", "ignored", "failed", "dead")
MAX_BACKOFF_SECONDS = 6 * 3600


@dataclass(frozen=True)
class Claimed:
    """An event claimed for processing: what its handler reads."""

    id: str
    type: str
    livemode: bool
    created: datetime
    payload: dict[str, Any]

    @property
    def customer(self) -> str | None:
        """The Stripe customer the event's object names, if any: whose account its handler will lock."""
        data = self.payload.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        return ref(obj.get("customer")) if isinstance(obj, dict) else None


def store(uow: UnitOfWork, event: dict[str, Any], now: datetime) -> bool:
    """Store a verified event, its facts pulled out for listing and look-ups; False when it was already there
    (a redelivery)."""
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    obj = obj if isinstance(obj, dict) else {}
    object_type, object_id = obj.get("object"), ref(obj)
    api_version = event.get("api_version")
    statement = uow.insert(StripeEvent).values(
        id=event["id"],
        type=event["type"],
        object_type=object_type[:100] if isinstance(object_type, str) else None,
        object_id=object_id[:255] if object_id else None,
        api_version=api_version if isinstance(api_version, str) else None,
        livemode=event.get("livemode") is True,
        created=timestamp(event.get("created")) or now,
        payload=event,
        status="pending",
        attempts=0,
        next_attempt_at=now,
        received_at=now,
    )
    stored = uow.session.scalar(statement.on_conflict_do_nothing(index_elements=["id"]).returning(StripeEvent.id))
    return stored is not None


_CLAIMED = (StripeEvent.id, StripeEvent.type, StripeEvent.livemode, StripeEvent.created, StripeEvent.payload)


def claim(uow: UnitOfWork, event_id: str, *, any_status: bool = False) -> Claimed | None:
    """Lock one event for processing: None when another process holds it or it needs nothing more (with
    `any_status`, a replay, whatever its status)."""
    query = select(*_CLAIMED).where(StripeEvent.id == event_id)
    if not any_status:
        query = query.where(StripeEvent.status.in_(DUE))
    found = uow.session.execute(query.with_for_update(skip_locked=True)).one_or_none()
    return Claimed(*found) if found is not None else None


def claim_due(uow: UnitOfWork, now: datetime, limit: int) -> list[Claimed]:
    """Lock up to `limit` events that are due (never processed, or failed and past their backoff), oldest
    first, skipping those another process holds."""
    query = (select(*_CLAIMED).where(StripeEvent.status.in_(DUE), StripeEvent.next_attempt_at <= now)
             .order_by(StripeEvent.next_attempt_at, StripeEvent.received_at).limit(limit)
             .with_for_update(skip_locked=True))
    return [Claimed(*row) for row in uow.session.execute(query)]


def finish(uow: UnitOfWork, event: Claimed, status: str, outcome: str | None, now: datetime) -> None:
    """Mark an event handled, in its handler's own transaction: "processed" and the credits it caused commit
    together."""
    uow.session.execute(update(StripeEvent).where(StripeEvent.id == event.id).values(
        status=status, outcome=outcome, processed_at=now, attempts=StripeEvent.attempts + 1, last_error=None))


def record_failure(uow: UnitOfWork, event_id: str, error: BaseException, *, max_attempts: int,
                   backoff_seconds: float, now: datetime, any_status: bool = False) -> str:
    """For a handler's transaction that rolled back: count the attempt, keep the error, and schedule a retry
    with exponential backoff, or declare the event dead. Returns the new status.

    An event another process handled meanwhile (this waited for its row lock) keeps its status: the attempt
    that failed changed nothing, and the event needs nothing more — unless this was a replay (`any_status`),
    whose failure is recorded whatever the status was."""
    event = uow.session.get_one(StripeEvent, event_id, with_for_update=True)
    if event.status not in DUE and not any_status:
        return event.status
    attempts = event.attempts + 1
    status = "dead" if attempts >= max_attempts else "failed"
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
