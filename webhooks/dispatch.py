"""Handling stored events: run each through its handler and mark it in the same transaction.

`handle` does one claimed event's work inside a unit of work the caller opened: the worker's batches, and
`process`, which handles one event in a transaction of its own — the API's processing right after its 2xx,
`credits events replay`, reconciliation's and backfill's fed events. When a handler fails, its transaction
rolls back (no partial credits) and `process` records the failure in a fresh one, with a retry time or,
after the configured attempts, status `dead`.
"""

from __future__ import annotations

import time
from datetime import datetime

import structlog
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from service.infra import logs, metrics
from service.infra.db import is_conflict
from service.infra.models import utcnow
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork
from webhooks import inbox
from webhooks.handlers import HANDLERS, Context

log = logs.get("dispatch")


def handle(uow: UnitOfWork, rt: Runtime, event: inbox.Claimed, now: datetime) -> inbox.Mark:
    """Handle a claimed event; returns the mark the caller writes in the same transaction (`inbox.finish`):
    its new status ("processed" or "ignored") and outcome. Raises what the handler raised, leaving the caller
    to roll back."""
    structlog.contextvars.bind_contextvars(event_id=event.id, event_type=event.type)
    started = time.perf_counter()
    status, outcome = _run_handler(Context(uow, rt.catalogue, rt.stripe, event, now), rt)
    metrics.PROCESSING.labels(event.type, status).observe(time.perf_counter() - started)
    log.info("event.handled", status=status, outcome=outcome)
    return event, status, outcome, now


def process(rt: Runtime, event_id: str, *, replay: bool = False, now: datetime | None = None) -> str | None:
    """Handle the event in a transaction of its own if it is due (or whatever its status, with `replay`);
    returns its new status, or None when there was nothing to do (already handled, or another process holds
    it). A transaction that loses to a concurrent one (a deadlock) is tried again at once, a few times; any
    other failure is recorded on the event, never raised."""
    now = now or utcnow()
    try:
        return CONFLICT_RETRIES(_process_once, rt, event_id, replay, now)
    except Exception as exc:
        return record_failure(rt, event_id, exc, now, replay=replay)


CONFLICT_RETRIES = Retrying(retry=retry_if_exception(is_conflict), stop=stop_after_attempt(3), reraise=True)


def _process_once(rt: Runtime, event_id: str, replay: bool, now: datetime) -> str | None:
    with rt.uow() as uow:
        event = inbox.claim(uow, event_id, any_status=replay)
        if event is None:
            return None
        if event.customer:
            uow.wait_for_customer(event.customer)  # a worker's batch may be handling its customer's other events
        mark = handle(uow, rt, event, now)
        inbox.finish(uow, [mark])
        uow.commit()
    return mark[1]


def record_failure(rt: Runtime, event_id: str, exc: Exception, now: datetime, *, replay: bool = False) -> str | None:
    """Record a failed attempt on the event in a fresh transaction; its new status, or None when even that
    failed (the event stays due, so a worker tries it again)."""
    try:
        with rt.uow() as uow:
            status = inbox.record_failure(
                uow,
                event_id,
                exc,
                any_status=replay,
                max_attempts=rt.settings.worker_max_attempts,
                backoff_seconds=rt.settings.worker_backoff_seconds,
                now=now,
            )
            uow.commit()
    except Exception:
        log.exception("event.failure_not_recorded", event_id=event_id)
        return None
    log.warning("event.failed", event_id=event_id, status=status, error=f"{type(exc).__name__}: {exc}")
    return status


def _run_handler(ctx: Context, rt: Runtime) -> tuple[str, str]:
    event = ctx.event
    if event.livemode != rt.settings.stripe_livemode:
        return "ignored", f"livemode={event.livemode} but this service runs livemode={rt.settings.stripe_livemode}"
    entry = HANDLERS.get(event.type)
    if entry is None:
        return "ignored", f"no handler for {event.type}"
    expected, handler = entry
    obj = (event.payload.get("data") or {}).get("object")
    if not isinstance(obj, dict) or obj.get("object") != expected:
        found = obj.get("object") if isinstance(obj, dict) else type(obj).__name__
        return "ignored", f"data.object is {found!r}, not {expected!r}"
    return "processed", handler(ctx, obj)
