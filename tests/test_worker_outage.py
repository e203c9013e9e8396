"""A worker process rides out a database it cannot reach for WORKER_OUTAGE_SECONDS, draining again with backoff,
then gives up so that its service manager restarts it and the outage is seen (tests/test_worker_process.py has
the real process giving up). `credits serve`'s worker thread, which nothing would restart, never gives up."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import cast

import psycopg
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from jobs import worker
from service.infra.config import Settings
from service.infra.runtime import Runtime

UNREACHABLE = OperationalError("SELECT …", {}, psycopg.OperationalError("connection refused"))


def drains(monkeypatch, outcomes: list[BaseException | None], stop: threading.Event) -> list[int]:
    """worker.drain replaced (and the monthly release of held referrals, which would use the database): each
    call takes the next outcome (raised, or None: a drain that went through,
    after which the worker is asked to stop); once stopped, a drain does nothing, as the real one; returns the
    list the calls are counted in."""
    calls: list[int] = []

    def drain(*_args, **_kwargs) -> Counter[str]:
        calls.append(1)
        outcome = None if stop.is_set() else outcomes.pop(0)
        if outcome is not None:
            raise outcome
        stop.set()
        return Counter()

    monkeypatch.setattr(worker, "drain", drain)
    monkeypatch.setattr(worker, "release_held_referrals", lambda *_args, **_kwargs: Counter())
    return calls


def runtime(outage_seconds: float) -> Runtime:
    """What `worker.run` reads of a runtime: its settings, and its database's kind (one thread on SQLite)."""
    settings = Settings(worker_outage_seconds=outage_seconds, worker_poll_seconds=0.01)
    stand_in = SimpleNamespace(settings=settings, engine=SimpleNamespace(dialect=SimpleNamespace(name="sqlite")))
    return cast(Runtime, stand_in)  # only what worker.run reads; drain, which would use the rest, is replaced


def test_a_worker_drains_again_after_the_database_was_unreachable_for_a_moment(monkeypatch) -> None:
    stop = threading.Event()
    calls = drains(monkeypatch, [UNREACHABLE, UNREACHABLE, None], stop)
    worker.run(runtime(30), stop)
    assert len(calls) == 3


def test_a_worker_gives_up_once_the_database_stays_unreachable_past_the_outage_window(monkeypatch) -> None:
    stop = threading.Event()
    calls = drains(monkeypatch, [UNREACHABLE] * 10, stop)
    with pytest.raises(OperationalError, match="connection refused"):
        worker.run(runtime(0.3), stop)
    assert 2 <= len(calls) < 10


def test_a_worker_does_not_wait_out_an_error_that_is_not_the_databases_reach(monkeypatch) -> None:
    """A bug is not an outage: it would fail the same way again."""
    stop = threading.Event()
    bug = IntegrityError("INSERT …", {}, psycopg.IntegrityError("duplicate key"))
    calls = drains(monkeypatch, [bug, None], stop)
    with pytest.raises(IntegrityError):
        worker.run(runtime(30), stop)
    assert len(calls) == 1


def test_a_stop_during_an_outage_ends_the_waiting_at_once_and_the_worker_stops_cleanly(monkeypatch) -> None:
    stop = threading.Event()
    calls = drains(monkeypatch, [UNREACHABLE] * 10, stop)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    worker.run(runtime(30), stop)
    assert time.monotonic() - started < 0.6  # the backoff's second wait was to end at 0.75 s
    assert len(calls) == 3  # the last, once stopped, has nothing to do


def test_serves_worker_thread_starts_its_loop_again_after_an_unexpected_error(monkeypatch) -> None:
    stop = threading.Event()
    bug = IntegrityError("INSERT …", {}, psycopg.IntegrityError("duplicate key"))
    calls = drains(monkeypatch, [bug, UNREACHABLE, None], stop)
    worker.run_beside_the_api(runtime(0), stop)
    assert len(calls) == 3  # the bug ended one loop, the next waited the outage out (past a window of 0 s)
