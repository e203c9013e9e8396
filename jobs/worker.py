"""The worker: processes every event that is due — never processed, or failed and now past its backoff —,
retries referral payouts left one-sided, and when a month starts pays the referrals an earlier month's cap
held (`run`, once a month; `credits worker --once`, every time). `credits worker` runs it; so does `credits
serve`, on threads of its own, unless told not to: the same `drain`, the same loop.

Several workers, threads and API processes share the inbox safely. A batch takes the customers waiting
longest — a lock per customer, skipping those another transaction is handling — and claims every due event of
theirs with `FOR UPDATE SKIP LOCKED`: one customer's events are handled by one transaction at a time, in the
order received, so batches neither wait for each other nor deadlock over one customer's account (or over
creating it); and handlers are idempotent by key anyway. A batch of events is one unit of work (one claim, one
commit); when any event in it fails, the batch rolls back and each of its events is done again alone, so the
failure is recorded against the event that caused it.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from tenacity import Retrying, retry_if_exception, stop_after_delay, stop_when_event_set, wait_exponential

from service.domain import periods, referrals
from service.infra import logs
from service.infra.db import is_postgresql, is_unreachable
from service.infra.models import utcnow
from service.infra.runtime import Runtime
from webhooks import dispatch

log = logs.get("worker")
SETTLED = ("processed", "ignored", "invalid", "failed", "dead")  # an event that needs nothing more for now


def drain(
    rt: Runtime, stop: threading.Event | None = None, *, threads: int = 1, referrals_too: bool = True
) -> Counter[str]:
    """Process what is due now, batch after batch, until nothing is due (or `stop` is set); then retry the
    referral payouts left one-sided. Returns counts by the status each event ended in.

    While batches come back full (a backlog), `threads` of them run side by side, each its own transaction:
    processing mostly waits on the database. Otherwise one at a time, so an idle worker asks one query a poll."""
    counts: Counter[str] = Counter()
    side_by_side = 1
    with ThreadPoolExecutor(threads, thread_name_prefix="worker") as pool:
        while stop is None or not stop.is_set():
            done = list(pool.map(lambda _: dispatch.process_due(rt), range(side_by_side)))
            for batch in done:
                counts.update(batch)
            if not any(status in SETTLED for batch in done for status in batch):
                break  # nothing due, or only the customers of other transactions
            side_by_side = threads if any(batch.total() >= dispatch.CUSTOMERS for batch in done) else 1
    if referrals_too and (stop is None or not stop.is_set()):
        counts.update(retry_referrals(rt))
    return counts


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
        except Exception as exc:
            log.warning("referral.retry_failed", referral=referral_id, error=f"{type(exc).__name__}: {exc}")
            counts["referral retries failed"] += 1
            continue
        counts["referrals retried"] += 1
    return counts


def release_held_referrals(rt: Runtime, now: datetime | None = None) -> Counter[str]:
    """Once a month starts, pay the referrals held by an earlier month's cap whose referrer is back under it,
    each in a transaction of its own, audited as `system`; a referrer still over the cap stays held."""
    counts: Counter[str] = Counter()
    now = now or utcnow()
    with rt.uow() as uow:
        due = referrals.held_before(uow, periods.month_start(now))
    for referral_id in due:
        try:
            with rt.uow() as uow:
                released = referrals.release(
                    uow,
                    rt.catalogue,
                    referral_id,
                    now,
                    actor="system",
                    reason="the referrer is back under the monthly cap",
                    past_cap=False,
                )
                uow.commit()
        except referrals.ReleaseRefused:
            continue  # paid meanwhile by someone else
        except Exception as exc:
            log.warning("referral.release_failed", referral=referral_id, error=f"{type(exc).__name__}: {exc}")
            counts["held referral releases failed"] += 1
            continue
        if released.audit_id is not None:
            counts["held referrals released"] += 1
    return counts


def run(rt: Runtime, stop: threading.Event, *, outage_seconds: float | None = None) -> None:
    """Drain, wait WORKER_POLL_SECONDS, drain again, until `stop` is set (SIGTERM): the batches in hand are always
    finished. On PostgreSQL a backlog is drained by WORKER_THREADS batches side by side; SQLite has one writer at
    a time, so by one.

    A drain that cannot reach the database (a connection broken, refused or timed out) is tried again with
    backoff for up to `outage_seconds` (default WORKER_OUTAGE_SECONDS), so a database restart does not stop the
    worker; an outage that lasts longer is raised from here, and `credits worker` exits 1 for its service
    manager to restart it and the outage to be seen. The handlers' own failures never get here: each is
    recorded on its event."""
    threads = rt.settings.worker_threads if is_postgresql(rt.engine) else 1
    outage = rt.settings.worker_outage_seconds if outage_seconds is None else outage_seconds

    def wait(seconds: float) -> None:
        stop.wait(seconds)  # a stop ends the wait at once

    riding_out = Retrying(
        retry=retry_if_exception(is_unreachable),
        stop=stop_after_delay(outage) | stop_when_event_set(stop),
        wait=wait_exponential(multiplier=0.25, max=5),
        sleep=wait,
        before_sleep=lambda state: log.warning(
            "worker.drain_failed",
            attempt=state.attempt_number,
            error=_error(state.outcome.exception() if state.outcome else None),
        ),
        reraise=True,
    )
    log.info("worker.started", threads=threads)
    released_in: datetime | None = None  # the month whose held referrals this loop has looked at
    try:
        while not stop.is_set():
            counts = riding_out(drain, rt, stop, threads=threads)
            if released_in != (month := periods.month_start(utcnow())):
                counts.update(riding_out(release_held_referrals, rt))
                released_in = month
            if counts:
                log.info("worker.drained", **counts)
            stop.wait(rt.settings.worker_poll_seconds)
    finally:
        log.info("worker.stopped")


def run_beside_the_api(rt: Runtime, stop: threading.Event) -> None:
    """`credits serve`'s own worker thread: `run` until shutdown. The API stays up through a database outage
    (answering 503 meanwhile), so this loop waits the outage out too, however long it lasts.

    No service manager restarts a thread, so an unexpected error is logged and the loop started again after a
    poll interval: otherwise the API would go on storing deliveries that no one processes."""
    while not stop.is_set():
        try:
            run(rt, stop, outage_seconds=float("inf"))
        except Exception:
            log.exception("worker.crashed")
            stop.wait(rt.settings.worker_poll_seconds)


def _error(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
