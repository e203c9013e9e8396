"""The worker: processes every event that is due — never processed, or failed and now past its backoff — and
retries referral payouts left one-sided. `credits worker` runs it; so does `credits serve`, on threads of its
own, unless told not to: the same `drain`, the same loop.

Several workers, threads and API processes share the inbox safely: each batch claims its events with
`FOR UPDATE SKIP LOCKED`, so no two take the same event, and handlers are idempotent by key anyway. A batch
then locks the accounts of the customers its events name, in id order, skipping those another transaction
holds: the events of a customer busy elsewhere stay due for a later batch, so batches neither wait for each
other nor deadlock over one customer's account. A batch of events is one unit of work (one claim, one
commit); when any event in it fails, the batch rolls back and each of its events is done again alone, so the
failure is recorded against the event that caused it.
"""

from __future__ import annotations

import threading
from collections import Counter

from sqlalchemy import select
from tenacity import Retrying, retry_if_exception, stop_after_delay, stop_when_event_set, wait_exponential

from service.domain import referrals
from service.infra import logs
from service.infra.db import is_postgresql, is_unreachable
from service.infra.models import Account, utcnow
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork
from webhooks import dispatch, inbox

log = logs.get("worker")
BATCH = 25  # events in one transaction: fewer commits, but the accounts they lock are held until it commits
SETTLED = ("processed", "ignored", "failed", "dead")  # an event that needs nothing more for now


def drain(rt: Runtime, stop: threading.Event | None = None, *, referrals_too: bool = True) -> Counter[str]:
    """Process what is due now, batch after batch, until nothing is due (or `stop` is set); then retry the
    referral payouts left one-sided. Returns counts by the status each event ended in."""
    counts: Counter[str] = Counter()
    while stop is None or not stop.is_set():
        done = drain_batch(rt)
        counts.update(done)
        if not any(status in SETTLED for status in done.elements()):
            break  # nothing due, or only events another process holds or that could not be recorded
    if referrals_too and (stop is None or not stop.is_set()):
        counts.update(retry_referrals(rt))
    return counts


def drain_batch(rt: Runtime, limit: int = BATCH) -> Counter[str]:
    """Claim up to `limit` due events and handle, in one transaction, those whose customer no other transaction
    holds; when one fails, handle each alone. Events left for later count as "skipped". A database that cannot
    be reached is raised, for the caller to wait out."""
    now = utcnow()
    workable: list[inbox.Claimed] = []
    try:
        with rt.uow() as uow:
            claimed = inbox.claim_due(uow, now, limit)
            workable = _of_free_customers(uow, claimed)
            statuses = [dispatch.handle(uow, rt, event, now) for event in workable]
            uow.commit()
        return Counter(statuses) + Counter(skipped=len(claimed) - len(workable))
    except Exception as exc:
        if is_unreachable(exc):
            raise
        log.info("batch.failed", error=f"{type(exc).__name__}: {exc}", events=len(workable))
    return Counter(dispatch.process(rt, event.id) or "skipped" for event in workable)


def _of_free_customers(uow: UnitOfWork, claimed: list[inbox.Claimed]) -> list[inbox.Claimed]:
    """The claimed events whose customer's account this transaction could lock without waiting (or that name
    no customer with an account yet), in their order; the accounts stay locked for the batch."""
    customers = {event.customer for event in claimed if event.customer}
    if not customers:
        return claimed
    known = set(uow.session.scalars(select(Account.stripe_customer_id).where(Account.stripe_customer_id.in_(customers))))
    held = {account.stripe_customer_id for account in uow.lock_where(Account.stripe_customer_id.in_(known),
                                                                      skip_locked=True)}
    busy = known - held
    return [event for event in claimed if event.customer not in busy]


def retry_referrals(rt: Runtime) -> Counter[str]:
    """Retry the referral payouts left one-sided, each referral in a transaction of its own: one that fails —
    most often a deadlock lost to a handler paying the same accounts — is logged and left for the next drain."""
    counts: Counter[str] = Counter()
    with rt.uow() as uow:
        due = referrals.unpaid(uow)
    for referral_id in due:
        try:
            with rt.uow() as uow:
                referrals.retry(uow, rt.catalogue, referral_id)
                uow.commit()
        except Exception as exc:  # noqa: BLE001 - one referral's failure must not hold up the others
            log.warning("referral.retry_failed", referral=referral_id, error=f"{type(exc).__name__}: {exc}")
            counts["referral retries failed"] += 1
            continue
        counts["referrals retried"] += 1
    return counts


def run(rt: Runtime, stop: threading.Event, *, outage_seconds: float | None = None) -> None:
    """Drain, wait WORKER_POLL_SECONDS, drain again, until `stop` is set (SIGTERM): the events in hand are always
    finished. On PostgreSQL WORKER_THREADS threads drain side by side (processing mostly waits on the database);
    SQLite has one writer at a time, so one does. The first thread also retries referral payouts.

    A drain that cannot reach the database (a connection broken, refused or timed out) is tried again with
    backoff for up to `outage_seconds` (default WORKER_OUTAGE_SECONDS), so a database restart does not stop the
    worker; an outage that lasts longer is raised from here, and `credits worker` exits 1 for its service
    manager to restart it and the outage to be seen. The handlers' own failures never get here: each is
    recorded on its event."""
    outage = rt.settings.worker_outage_seconds if outage_seconds is None else outage_seconds
    count = rt.settings.worker_threads if is_postgresql(rt.engine) else 1
    failures: list[BaseException] = []
    threads = [threading.Thread(target=_loop, args=(rt, stop, outage, n == 0, failures), name=f"worker-{n}", daemon=True)
               for n in range(count)]
    log.info("worker.started", threads=count)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.info("worker.stopped")
    if failures:
        raise failures[0]


def _loop(rt: Runtime, stop: threading.Event, outage: float, referrals_too: bool, failures: list[BaseException]) -> None:
    """One thread's drains until `stop` is set; an outage it could not wait out stops every thread."""
    riding_out = Retrying(
        retry=retry_if_exception(is_unreachable),
        stop=stop_after_delay(outage) | stop_when_event_set(stop),
        wait=wait_exponential(multiplier=0.25, max=5),
        sleep=stop.wait,
        before_sleep=lambda state: log.warning("worker.drain_failed", attempt=state.attempt_number,
                                               error=_error(state.outcome.exception() if state.outcome else None)),
        reraise=True,
    )
    try:
        while not stop.is_set():
            counts = riding_out(drain, rt, stop, referrals_too=referrals_too)
            if counts:
                log.info("worker.drained", **counts)
            stop.wait(rt.settings.worker_poll_seconds)
    except Exception as exc:  # noqa: BLE001 - handed to `run`, which raises it once every thread has stopped
        log.error("worker.unreachable", error=_error(exc))
        failures.append(exc)
        stop.set()


def _error(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
