"""Handling stored events: run each through its handler and mark it in the same transaction.

`process_due` handles a batch of due events in one transaction: the customers waiting longest that no other
transaction is handling (the worker's drain loop), or one customer's (the API, right after a delivery) — every
due event of theirs, in the order received, so one customer's events are handled by one transaction at a time
and in order. `process` handles one event in a transaction of its own: `credits events replay`,
reconciliation's and backfill's fed events, and each event of a batch that failed. When a handler fails, its
transaction rolls back (no partial credits) and the failure is recorded in a fresh one, with a retry time or,
after the configured attempts, status `dead`.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime

import structlog
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from service.domain import accounts
from service.infra import logs, metrics, stripe_payloads
from service.infra.db import is_conflict, is_unreachable
from service.infra.models import Account, utcnow
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork
from webhooks import inbox
from webhooks.handlers import HANDLERS, Context

log = logs.get("dispatch")


def handle(uow: UnitOfWork, rt: Runtime, event: inbox.Claimed, now: datetime) -> inbox.Mark:
    """Handle a claimed event; returns the mark the caller writes in the same transaction (`inbox.finish`):
    its new status ("processed", "ignored" or "invalid") and outcome. Raises what the handler raised, leaving the caller
    to roll back."""
    structlog.contextvars.bind_contextvars(event_id=event.id, event_type=event.type)
    started = time.perf_counter()
    status, outcome = _run_handler(Context(uow, rt.catalogue, rt.stripe, event, now), rt)
    metrics.PROCESSING.labels(event.type, status).observe(time.perf_counter() - started)
    log.info("event.handled", status=status, outcome=outcome)
    return event, status, outcome, now


CUSTOMERS = 10  # customers a batch takes: fewer commits, but their accounts stay locked until it commits
MOST = 100  # events in one batch at most


def process_due(rt: Runtime, *, customer: str | None = None, customers: int = CUSTOMERS) -> Counter[str]:
    """Handle, in one transaction, every due event of `customer` (waiting for the transaction that handles it,
    if one does) or, without one, of the `customers` customers waiting longest that no other transaction is
    handling, with as many of the oldest due events that name no customer. When one fails, the batch rolls back
    and each of its events is handled alone, so the failure is recorded against its own event. Returns counts
    by the status each event ended in. A database that cannot be reached is raised, for the caller to wait out."""
    now = utcnow()
    claimed: list[inbox.Claimed] = []
    try:
        with rt.uow() as uow:
            if customer is None:
                claimed, taken = inbox.claim_due(uow, now, customers, MOST)
            else:
                uow.wait_for_customer(customer)
                claimed, taken = inbox.claim_of_customer(uow, now, customer, MOST), {customer}
            if taken:  # their accounts locked up front, in id order, all at once
                uow.lock_where(Account.stripe_customer_id.in_(taken))
            marks = [handle(uow, rt, event, now) for event in claimed]
            if marks:
                inbox.finish(uow, marks)
            uow.commit()
        return Counter(status for _, status, _, _ in marks)
    except Exception as exc:
        if is_unreachable(exc):
            raise
        if len(claimed) == 1 and not is_conflict(exc):  # its own failure: handling it alone would only repeat it
            return Counter([record_failure(rt, claimed[0].id, exc, now) or "skipped"])
        log.info("batch.failed", error=f"{type(exc).__name__}: {exc}", events=len(claimed))
    return Counter(process(rt, event.id) or "skipped" for event in claimed)


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
        customer = inbox.customer_of(uow, event_id)
        if customer:  # first, as every transaction handling events takes its customer: a batch may hold it now
            uow.wait_for_customer(customer)
        event = inbox.claim(uow, event_id, any_status=replay)
        if event is None:
            return None
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
                permanent=isinstance(exc, accounts.Unresolvable),
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
    data = event.payload.get("data")
    obj = data.get("object") if isinstance(data, dict) else data
    if not isinstance(obj, dict):
        return _invalid(f"data.object: not an object ({type(obj).__name__})")
    if obj.get("object") != expected:
        return "ignored", f"data.object is {obj.get('object')!r}, not {expected!r}"
    wrong = stripe_payloads.envelope_problem(event.payload) or stripe_payloads.problem(expected, obj)
    if wrong is not None:
        return _invalid(wrong)
    return "processed", handler(ctx, obj)


def _invalid(reason: str) -> tuple[str, str]:
    """An event whose object cannot be read: it would fail the same way at every retry, so it is refused at
    once and never retried."""
    log.warning("event.invalid", reason=reason)
    return "invalid", reason
