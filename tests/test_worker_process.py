"""The worker as a real process: SIGKILL mid-batch loses and doubles nothing; SIGTERM finishes the event
in hand and exits cleanly; on PostgreSQL, its processes (WORKER_PROCESSES) live and die together."""

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
from service.infra.db import transaction
from service.infra.models import LedgerEntry, StripeEvent, utcnow
from tests import stripe_events as se
from tests.conftest import DATA
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


def start_worker(settings, log: Path, *args: str, **env_extra: str) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    """`credits worker` in its own process group (its processes with it), logging to `log` (a pipe would fill
    up and stall it)."""
    env = {**os.environ, "DATABASE_URL": settings.database_url, "CREDITS_CONFIG": str(settings.credits_config),
           "LOG_FORMAT": "json", "WORKER_BACKOFF_SECONDS": "0", **env_extra}
    with log.open("ab") as sink:
        return subprocess.Popen([str(Path(sys.executable).parent / "credits"), "worker", *args], env=env,
                                stdout=sink, stderr=sink, start_new_session=True)


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
        os.killpg(worker.pid, signal.SIGKILL)  # all its processes at once, as a container's stop that timed out
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


def test_on_postgresql_the_worker_runs_a_process_for_each_partition_of_the_lanes(engine, settings, sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "worker.log"
    worker, _ = started_in_two_processes(engine, settings, log)
    stored_invoices(sessions)
    wait_until(lambda: processed(sessions) == EVENTS, seconds=60)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert sorted(line["partition"] for line in logged(log, "worker.started")) == ["1 of 2", "2 of 2"]
    with sessions() as s:
        assert set(s.scalars(select(StripeEvent.attempts))) == {1}
        assert s.scalar(select(func.count()).select_from(LedgerEntry)) == EVENTS
    assert logged(log, "supervisor.stopped")[0]["failed"] == []


def test_a_worker_process_that_dies_stops_the_others_and_the_worker_exits_with_an_error(engine, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "worker.log"
    worker, (first, second) = started_in_two_processes(engine, settings, log)
    os.kill(first, signal.SIGKILL)
    assert worker.wait(20) == 1  # the service manager restarts the whole worker, and the failure is seen
    assert not alive(second)
    assert logged(log, "supervisor.worker_exited")[0] | {"timestamp": None} == {
        "process": "worker-1", "pid": first, "exit_code": -9, "event": "supervisor.worker_exited", "level": "error",
        "timestamp": None}


def test_the_worker_processes_stop_on_their_own_when_their_supervisor_is_killed(engine, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "worker.log"
    worker, processes = started_in_two_processes(engine, settings, log)
    worker.send_signal(signal.SIGKILL)  # the supervisor alone: left running, its workers would go on unseen
    worker.wait(10)
    wait_until(lambda: not any(map(alive, processes)))
    assert len(logged(log, "worker.stopped")) == 2


def test_a_sigterm_as_the_worker_processes_start_still_stops_them_cleanly(engine, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: its worker is one process")
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    wait_until(lambda: logged(log, "supervisor.started"))  # spawned: their handlers are not installed yet
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert logged(log, "supervisor.stopped")[0]["failed"] == []


def test_ctrl_c_stops_every_worker_process_and_the_worker_exits_cleanly(engine, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "worker.log"
    worker, _ = started_in_two_processes(engine, settings, log)
    os.killpg(worker.pid, signal.SIGINT)  # as a terminal sends it: to the whole process group
    assert worker.wait(20) == 0
    assert logged(log, "supervisor.worker_exited") == []
    assert logged(log, "supervisor.stopped")[0]["failed"] == []


def test_worker_processes_that_cannot_reach_the_database_retry_then_each_end_in_one_line_and_the_worker_exits_1(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The first process to give up stops the other, which gives up too or, stopped while it waits to try again
    # (or before it had connected), stops cleanly.
    log = tmp_path / "worker.log"
    unreachable = Settings(database_url="postgresql://root@127.0.0.1:9/none", credits_config=DATA / "catalogue.toml")
    assert start_worker(unreachable, log, WORKER_OUTAGE_SECONDS="1").wait(60) == 1
    assert all(line.startswith("{") for line in log.read_text().splitlines())  # no raw traceback
    assert logged(log, "worker.drain_failed"), "tried again before giving up"
    failed, stopped = logged(log, "worker.failed"), logged(log, "worker.stopped")
    assert sorted(line["partition"] for line in failed + stopped) == ["1 of 2", "2 of 2"]
    assert failed and all("OperationalError" in line["exception"] for line in failed)
    assert logged(log, "supervisor.stopped")[0]["failed"] == sorted(f"worker-{line['partition'][0]}" for line in failed)


def started_in_two_processes(engine, settings, log: Path) -> tuple[subprocess.Popen[bytes], list[int]]:  # type: ignore[no-untyped-def]
    """`credits worker` with its default two processes, both started; and their pids."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: its worker is one process")
    worker = start_worker(settings, log)
    wait_until(lambda: len(logged(log, "worker.started")) == 2)
    return worker, logged(log, "supervisor.started")[0]["processes"]
