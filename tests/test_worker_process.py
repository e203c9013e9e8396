"""The worker as a real process: SIGKILL mid-batch loses and doubles nothing; SIGTERM finishes the event
in hand and exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from service import ledger
from service.db import transaction
from service.models import LedgerEntry, StripeEvent, utcnow
from tests import stripe_events as se
from webhooks import inbox

EVENTS = 600  # enough that the worker is still busy when the test kills it, even on a fast run
PROCESSED = select(func.count()).select_from(StripeEvent).where(StripeEvent.status == "processed")


def stored_invoices(sessions) -> None:  # type: ignore[no-untyped-def]
    """EVENTS distinct paid invoices, stored but never processed (as if every API process had died)."""
    with transaction(sessions) as s:
        for n in range(EVENTS):
            invoice = se.invoice("2025", invoice_id=f"in_{n}", customer=f"cus_{n}", price="price_starter_monthly",
                                 amount_paid=2000, subscription_metadata={"account_id": f"acct_{n}"})
            inbox.store(s, se.event("invoice.paid", invoice, event_id=f"evt_{n}"), utcnow())


def start_worker(settings, log: Path, *args: str) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    """`credits worker` in its own process, logging to `log` (a pipe would fill up and stall it)."""
    env = {**os.environ, "DATABASE_URL": settings.database_url, "CREDITS_CONFIG": str(settings.credits_config),
           "LOG_FORMAT": "json", "WORKER_BACKOFF_SECONDS": "0"}
    with log.open("ab") as sink:
        return subprocess.Popen([str(Path(sys.executable).parent / "credits"), "worker", *args], env=env,
                                stdout=sink, stderr=sink)


def processed(sessions) -> int:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return s.scalar(PROCESSED) or 0


def watch(settings) -> Callable[[], int]:  # type: ignore[no-untyped-def]
    """A count of processed events that never waits on the worker: the service's SQLite sessions begin with the
    write lock, which a busy worker's threads can keep from a poller until they are done; a plain WAL reader
    takes no lock."""
    engine = create_engine(settings.database_url, poolclass=NullPool)  # no connection left open between polls

    def count() -> int:
        with engine.connect() as conn:
            return conn.scalar(PROCESSED) or 0
    return count


def wait_until(condition, seconds: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_worker_killed_mid_batch_loses_and_doubles_nothing_after_a_restart(settings, sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stored_invoices(sessions)
    done = watch(settings)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        wait_until(lambda: done() >= 10)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    assert processed(sessions) < EVENTS, "the worker finished before it was killed: nothing was tested"
    restarted = start_worker(settings, tmp_path / "worker.log", "--once")
    assert restarted.wait(120) == 0
    with sessions() as s:
        attempts = s.scalars(select(StripeEvent.attempts)).all()
        grants = s.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "grant"))
        assert ledger.check(s) == []
    assert (processed(sessions), grants, set(attempts)) == (EVENTS, EVENTS, {1})  # each handled exactly once


def test_sigterm_lets_the_worker_finish_its_event_and_exit_cleanly(settings, sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stored_invoices(sessions)
    log = tmp_path / "worker.log"
    done = watch(settings)
    worker = start_worker(settings, log)
    wait_until(lambda: done() >= 5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert '"event": "worker.stopped"' in log.read_text()
    with sessions() as s:
        states = {tuple(row) for row in s.execute(select(StripeEvent.status, StripeEvent.attempts))}
    assert states <= {("processed", 1), ("pending", 0)}
