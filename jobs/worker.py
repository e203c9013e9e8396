"""The inbox worker: processes every event that is due — never processed (the receiving process died
before it could), or failed and now past its backoff — and retries referral payouts left one-sided.

Several workers (and the API replicas, which process what they receive) share the inbox safely: each
event is claimed with FOR UPDATE SKIP LOCKED, and handlers are idempotent by key anyway.
"""

from __future__ import annotations

import threading
from collections import Counter

from service import logs, referrals
from service.db import transaction
from service.models import utcnow
from service.runtime import Runtime
from webhooks import dispatch, inbox

log = logs.get("worker")
BATCH = 100


def drain(rt: Runtime, stop: threading.Event | None = None) -> Counter[str]:
    """Process what is due now, batch after batch, until nothing is due; returns counts by new status."""
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    while stop is None or not stop.is_set():
        with transaction(rt.sessions) as session:
            ids = [i for i in inbox.due(session, utcnow(), BATCH) if i not in seen]
        if not ids:
            break
        for event_id in ids:
            if stop is not None and stop.is_set():
                break
            seen.add(event_id)  # a failure is rescheduled; it is not retried again within this drain
            counts[dispatch.process(rt, event_id) or "skipped"] += 1
    with transaction(rt.sessions) as session:
        retried = referrals.retry_unpaid(session, rt.catalogue)
    if retried:
        counts["referrals retried"] += retried
    return counts


def run(rt: Runtime, stop: threading.Event, poll_seconds: float = 1.0) -> None:
    """Drain, then wait for more, until `stop` is set (SIGTERM): the current event is always finished."""
    log.info("worker.started")
    while not stop.is_set():
        counts = drain(rt, stop)
        if counts:
            log.info("worker.drained", **counts)
        stop.wait(poll_seconds)
    log.info("worker.stopped")
