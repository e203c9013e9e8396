"""The worker as a real process: SIGKILL mid-batch loses and doubles nothing; SIGTERM finishes the batch in
hand and exits cleanly; on PostgreSQL, several worker processes share the inbox; an unreachable database is
waited out, then the worker exits 1 with one line saying why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from service.domain import ledger
from service.infra.config import Settings
from service.infra.models import LedgerEntry, StripeEvent, utcnow
from tests import stripe_events as se
from tests.conftest import DATA
from tests.helpers import committed
from webhooks import inbox

EVENTS = 600  # enough that the worker is still busy when the test kills it, even on a fast run
PROCESSED = select(func.count()).select_from(StripeEvent).where(StripeEvent.status == "processed")


def stored_invoices(rt) -> None:
    """EVENTS distinct paid invoices, stored but never processed (as if every API process had died)."""
    with committed(rt) as uow:
        for n in range(EVENTS):
            invoice = se.invoice(
                "2025",
                invoice_id=f"in_{n}",
                customer=f"cus_{n}",
                price="price_starter_monthly",
                amount_paid=2000,
                subscription_metadata={"account_id": f"acct_{n}"},
            )
            inbox.store(uow, se.event("invoice.paid", invoice, event_id=f"evt_{n}"), utcnow())


def start_worker(settings, log: Path, *args: str, **env_extra: str) -> subprocess.Popen[bytes]:
    """`credits worker` in its own process group (its processes with it), logging to `log` (a pipe would fill
    up and stall it)."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "CREDITS_CONFIG": str(settings.credits_config),
        "LOG_FORMAT": "json",
        "WORKER_BACKOFF_SECONDS": "0",
        **env_extra,
    }
    with log.open("ab") as sink:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "credits"), "worker", *args],
            env=env,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )


def logged(log: Path, name: str) -> list[dict]:
    """The worker's JSON log lines of event `name`."""
    lines = (json.loads(line) for line in log.read_text().splitlines() if line.startswith("{"))
    return [line for line in lines if line["event"] == name]


def alive(pid: int) -> bool:
    """Running, not a zombie left for a PID 1 that does not reap (a container's shell, say)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processed(rt) -> int:
    with rt.uow() as uow:
        return uow.session.scalar(PROCESSED) or 0


def watch(settings) -> Callable[[], int]:
    """A count of processed events that never waits on the worker: the service's SQLite sessions begin with the
    write lock, which a busy worker's threads can keep from a poller until they are done; a plain WAL reader
    takes no lock."""
    engine = create_engine(settings.database_url, poolclass=NullPool)  # no connection left open between polls

    def count() -> int:
        with engine.connect() as conn:
            return conn.scalar(PROCESSED) or 0

    return count


def wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_worker_killed_mid_batch_loses_and_doubles_nothing_after_a_restart(settings, rt, tmp_path) -> None:
    stored_invoices(rt)
    done = watch(settings)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        wait_until(lambda: done() >= 10)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # all its processes at once, as a container's stop that timed out
        worker.wait(10)
    assert processed(rt) < EVENTS, "the worker finished before it was killed: nothing was tested"
    restarted = start_worker(settings, tmp_path / "worker.log", "--once")
    assert restarted.wait(120) == 0
    with rt.uow() as uow:
        attempts = uow.session.scalars(select(StripeEvent.attempts)).all()
        grants = uow.session.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "grant"))
        assert ledger.check(uow) == []
    assert (processed(rt), grants, set(attempts)) == (EVENTS, EVENTS, {1})  # each handled exactly once


def test_sigterm_lets_the_worker_finish_its_event_and_exit_cleanly(settings, rt, tmp_path) -> None:
    stored_invoices(rt)
    log = tmp_path / "worker.log"
    done = watch(settings)
    worker = start_worker(settings, log)
    wait_until(lambda: done() >= 5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert '"event": "worker.stopped"' in log.read_text()
    with rt.uow() as uow:
        states = {tuple(row) for row in uow.session.execute(select(StripeEvent.status, StripeEvent.attempts))}
    assert states <= {("processed", 1), ("pending", 0)}


def test_on_postgresql_two_worker_processes_share_the_inbox_each_event_handled_once(
    engine, settings, rt, tmp_path
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: a second worker would only wait for the first")
    log = tmp_path / "worker.log"
    workers = [start_worker(settings, log) for _ in range(2)]
    wait_until(lambda: len(logged(log, "worker.started")) == 2)
    stored_invoices(rt)
    wait_until(lambda: processed(rt) == EVENTS, seconds=60)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    assert [worker.wait(20) for worker in workers] == [0, 0]
    assert len(logged(log, "event.handled")) == EVENTS
    with rt.uow() as uow:
        assert set(uow.session.scalars(select(StripeEvent.attempts))) == {1}
        assert uow.session.scalar(select(func.count()).select_from(LedgerEntry)) == EVENTS


def test_a_worker_that_cannot_reach_the_database_retries_then_exits_1_with_one_line(tmp_path) -> None:
    log = tmp_path / "worker.log"
    unreachable = Settings(database_url="postgresql://root@127.0.0.1:9/none", credits_config=DATA / "catalogue.toml")
    assert start_worker(unreachable, log, WORKER_OUTAGE_SECONDS="1").wait(60) == 1
    lines = log.read_text().splitlines()
    assert all(line.startswith("{") for line in lines[:-1])  # no raw traceback
    assert lines[-1].startswith("error: the database is unavailable: ")
    assert logged(log, "worker.drain_failed"), "tried again before giving up"
