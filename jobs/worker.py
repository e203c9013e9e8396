"""The inbox worker: processes every event that is due — never processed (the receiving process died
before it could), or failed and now past its backoff — and retries referral payouts left one-sided.

Several workers (and the API replicas, which process what they receive) share the inbox safely: each
event is claimed with FOR UPDATE SKIP LOCKED, and handlers are idempotent by key anyway. Within one
worker, WORKER_THREADS threads take a batch's lanes side by side — one customer's events stay in order on
one thread, and a lane stops at an event that fails — because processing an event mostly waits on database
round trips (PostgreSQL only: SQLite has one writer at a time). Each thread's share of the lanes is claimed,
handled and marked in one transaction: a batch of due events costs a COMMIT a thread, not one a customer. Across processes (other
workers, the API's inline threads) the order of one customer's events is best effort; the account lock and
the idempotency keys keep every credit exact either way.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, stop_when_event_set, wait_exponential

from service.domain import referrals

from service.infra import logs
from service.infra.db import transaction
from service.infra.models import utcnow
from service.infra.runtime import Runtime
from webhooks import dispatch, inbox

log = logs.get("worker")
BATCH = 100
UNREACHABLE = (OperationalError, InterfaceError, PoolTimeout)  # the database, not the work, is the problem
GONE_THROUGH = ("processed", "ignored")


def drain(rt: Runtime, stop: threading.Event | None = None, partition: inbox.Partition = inbox.WHOLE) -> Counter[str]:
    """Process what is due now in `partition`'s lanes, batch after batch, until nothing is due; returns counts
    by new status. The first partition's drain also retries the referral payouts left one-sided: one process
    is enough, and two would only race for the same grants."""
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    stopped: set[str] = set()  # lanes that stopped at an event: their later events wait for the next drain

    def process_lanes(share: dict[str, list[str]]) -> tuple[Counter[str], set[str]]:
        """Each lane's events in order, a lane stopping at one that did not go through (failed, or held by
        another process): the rest of it waits for the next drain rather than overtake it. All the lanes in
        one transaction when they all go through; one event at a time, each in its own, when one fails
        (dispatch.process_together). Returns the counts by status and the lanes that stopped."""
        together = dispatch.process_together(rt, list(share.values()), stop)
        if together is not None:
            done = Counter(status or "skipped" for statuses in together for status in statuses)
            return done, {lane for lane, statuses in zip(share, together) if not _went_through(statuses, share[lane])}
        done, halted = Counter[str](), set[str]()
        for lane, event_ids in share.items():
            for event_id in event_ids:
                if stop is not None and stop.is_set():
                    return done, halted
                status = dispatch.process(rt, event_id) or "skipped"
                done[status] += 1
                if status not in GONE_THROUGH:
                    halted.add(lane)
                    break
        return done, halted

    # SQLite has one writer at a time (BEGIN IMMEDIATE): more threads would only queue for its lock.
    threads = rt.settings.worker_threads if rt.engine.dialect.name == "postgresql" else 1
    with ThreadPoolExecutor(threads, thread_name_prefix="worker") as pool:
        while stop is None or not stop.is_set():
            # The events seen in this drain that are still due (held elsewhere, or behind a lane's stop) come
            # first in `due`'s order: fetch past them, or enough of them would end the drain with others due.
            still_due = len(seen) - (counts.total() - counts["skipped"])
            with transaction(rt.sessions) as session:
                batch = [(i, lane) for i, lane in inbox.due(session, utcnow(), BATCH + still_due, partition) if i not in seen]
            if not batch:
                break
            lanes: defaultdict[str, list[str]] = defaultdict(list)
            for event_id, lane in batch:
                seen.add(event_id)  # a failure is rescheduled; it is not retried again within this drain
                if lane not in stopped:  # nor does a later event of its lane overtake it, from a later batch
                    lanes[lane].append(event_id)
            for done, lanes_stopped in pool.map(process_lanes, _shares(lanes, threads)):
                counts.update(done)
                stopped |= lanes_stopped
    if partition.index == 0 and not (stop is not None and stop.is_set()):
        counts.update(retry_referrals(rt))
    return counts


def retry_referrals(rt: Runtime) -> Counter[str]:
    """Retry the referral payouts left one-sided, each referral in a transaction of its own. One that fails —
    most often a deadlock lost to a handler paying the same accounts, a normal outcome between concurrent
    transactions — is logged and left for the next drain, the others paid: before, every retry shared one
    transaction, and its failure ended the worker's process (and its supervisor with it)."""
    counts: Counter[str] = Counter()
    with transaction(rt.sessions) as session:
        due = referrals.unpaid(session)
    for referral_id in due:
        try:
            with transaction(rt.sessions) as session:
                referrals.retry(session, rt.catalogue, referral_id)
        except Exception as exc:  # noqa: BLE001 - one referral's failure must not hold up the others
            log.warning("referral.retry_failed", referral=referral_id, error=f"{type(exc).__name__}: {exc}")
            counts["referral retries failed"] += 1
            continue
        counts["referrals retried"] += 1
    return counts


def _went_through(statuses: list[str | None], event_ids: list[str]) -> bool:
    return len(statuses) == len(event_ids) and all(status in GONE_THROUGH for status in statuses)


def _shares(lanes: dict[str, list[str]], threads: int) -> list[dict[str, list[str]]]:
    """The batch's lanes dealt out to the threads, each thread's share done in one transaction: under a
    trickle of deliveries a lane is one event, and one COMMIT (with its BEGIN, claim, mark and pool checkout)
    per lane was most of the worker's cost per event beyond the handlers (bench/e2e)."""
    keys = list(lanes)
    return [{lane: lanes[lane] for lane in keys[n::threads]} for n in range(threads) if keys[n::threads]]


def run(rt: Runtime, stop: threading.Event, poll_seconds: float, partition: inbox.Partition = inbox.WHOLE) -> None:
    """Drain, then wait for more, until `stop` is set (SIGTERM): the events in hand are always finished.

    A drain that cannot reach the database (a connection broken, refused or timed out) is tried again with
    backoff for up to WORKER_OUTAGE_SECONDS, so a database restart or a dropped connection does not stop the
    process; an outage that lasts longer raises, and the process exits 1 for its service manager to restart
    it and the outage to be seen. The handlers' own failures never get here: each is recorded on its event."""
    log.info("worker.started", partition=str(partition))
    riding_out = Retrying(
        retry=retry_if_exception_type(UNREACHABLE),
        stop=stop_after_delay(rt.settings.worker_outage_seconds) | stop_when_event_set(stop),
        wait=wait_exponential(multiplier=0.25, max=5),
        sleep=stop.wait,
        before_sleep=lambda state: log.warning("worker.drain_failed", attempt=state.attempt_number,
                                               error=_error(state.outcome.exception())),  # type: ignore[union-attr]
        reraise=True,
    )
    while not stop.is_set():
        counts = riding_out(drain, rt, stop, partition)
        if counts:
            log.info("worker.drained", **counts)
        stop.wait(poll_seconds)
    log.info("worker.stopped")


def _error(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
