"""Process one stored event: claim it, run its handler, and mark it — all in one transaction.

A failing handler's transaction rolls back (no partial credits) and the failure is recorded in a fresh
one, with a retry time or, after the configured attempts, status `dead`. The same function serves the
request that received the event (right after its 2xx), the worker, and `credits events replay`; the worker
first tries several lanes' events together in one transaction (`process_together`), and falls back to `process`
event by event when one of them fails.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import structlog

from service.domain import accounts

from service.infra import logs, metrics
from service.infra.db import transaction
from service.infra.models import utcnow
from service.infra.runtime import Runtime
from webhooks import inbox
from webhooks.handlers import HANDLERS, Context

log = logs.get("dispatch")


def process(rt: Runtime, event_id: str, *, replay: bool = False, now: datetime | None = None) -> str | None:
    """Handle the event if it is due (or any status, with `replay`); returns its new status, or None when
    there was nothing to do (already handled, or another process holds it)."""
    now = now or utcnow()
    structlog.contextvars.bind_contextvars(event_id=event_id)
    started, event_type = time.perf_counter(), "unknown"
    try:
        with transaction(rt.sessions) as session:
            event = inbox.claim(session, event_id, any_status=replay)
            if event is None:
                return None
            event_type = event.type
            structlog.contextvars.bind_contextvars(event_type=event_type)
            status, outcome = _handle(Context(session, rt.catalogue, rt.stripe, event, now), rt)
            inbox.finish(session, (event, status, outcome, now))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried, none may be lost
        failed = _failed(rt, event_id, exc, now, replay)
        metrics.PROCESSING.labels(event_type, failed or "unrecorded").observe(time.perf_counter() - started)
        return failed
    metrics.PROCESSING.labels(event_type, status).observe(time.perf_counter() - started)
    log.info("event.handled", status=status, outcome=outcome)
    return status


def process_together(rt: Runtime, lanes: list[list[str]], stop: threading.Event | None = None) -> list[list[str | None]] | None:
    """The worker's way through several lanes (each one customer's due events, in order): all of them in ONE
    transaction — one connection, one claim, one mark, one COMMIT — instead of one transaction each. Returns
    each lane's statuses in order, a lane ending early at `stop` or at an event another process holds (None,
    as `process` says it).

    When anything fails, the whole transaction rolls back and None is returned: the caller then processes the
    lanes one event at a time with `process`, which records the failure against the event that caused it and
    stops that lane there. Handlers are idempotent and nothing of the rolled-back attempt remains, so the
    failure semantics are exactly `process`'s own; the saving is for the common case. A deadlock with another
    transaction (the lanes' accounts are locked lane after lane, not in one order) is such a failure too."""
    handled: list[tuple[inbox.Claimed, str, str, datetime]] = []
    took: list[float] = []
    done: list[list[str | None]] = []
    try:
        with transaction(rt.sessions) as session:
            for claimed, asked in zip(inbox.claim_lanes(session, lanes), lanes):
                statuses: list[str | None] = []
                for event in claimed:
                    if stop is not None and stop.is_set():
                        break
                    structlog.contextvars.bind_contextvars(event_id=event.id, event_type=event.type)
                    started, now = time.perf_counter(), utcnow()
                    if handled:  # each event reads afresh the rows it uses, as in a transaction of its own, but
                        accounts.expire_all_but_locked(session)  # the accounts held locked: nobody else can change them
                    status, outcome = _handle(Context(session, rt.catalogue, rt.stripe, event, now), rt)
                    handled.append((event, status, outcome, now))
                    took.append(time.perf_counter() - started)
                    statuses.append(status)
                held_elsewhere = len(claimed) < len(asked) and len(statuses) == len(claimed)
                done.append([*statuses, None] if held_elsewhere else statuses)
            if handled:
                inbox.finish(session, *handled)
    except Exception as exc:  # noqa: BLE001 - nothing of the lanes happened; `process` redoes them event by event
        log.info("lanes.failed", error=f"{type(exc).__name__}: {exc}", lanes=len(lanes))
        return None
    for (event, status, outcome, _), seconds in zip(handled, took):  # once committed, as `process` reports
        metrics.PROCESSING.labels(event.type, status).observe(seconds)
        log.info("event.handled", event_id=event.id, event_type=event.type, status=status, outcome=outcome)
    return done


def _handle(ctx: Context, rt: Runtime) -> tuple[str, str]:
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


def _failed(rt: Runtime, event_id: str, exc: Exception, now: datetime, replay: bool) -> str | None:
    try:
        status = inbox.record_failure(
            rt.sessions,
            event_id,
            exc,
            any_status=replay,
            max_attempts=rt.settings.worker_max_attempts,
            backoff_seconds=rt.settings.worker_backoff_seconds,
            now=now,
        )
    except Exception:  # noqa: BLE001 - still pending or failed: the worker retries it; nothing may end the caller
        log.exception("event.failure_not_recorded")
        return None
    log.warning("event.failed", status=status, error=f"{type(exc).__name__}: {exc}")
    return status
