"""`credits serve` alone is a whole system: a burst of signed deliveries it accepts — more, and faster, than it
processes right after each answer — is all processed with no other process running, on SQLite (what `make run`
uses) and on PostgreSQL. Told it has a worker of its own elsewhere (`--no-worker`, SERVE_WORKER=false), it
leaves the burst's overflow pending for that worker.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from jobs import worker
from service.domain import ledger
from service.infra.db import make_engine
from service.infra.migrate import upgrade
from service.infra.models import Grant, StripeEvent
from service.infra.runtime import Runtime
from tests import stripe_events as se
from tests.reliability.support import post_signed, runtime_for, service_env, settings_for, start_servers, wait_for

EVENTS = 300
CLIENTS = 8
SECONDS = 30.0


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated database of the test's own: a SQLite file, or a PostgreSQL database."""
    if request.param == "postgresql":
        yield request.getfixturevalue("fresh_pg")
        return
    url = f"sqlite:///{tmp_path / 'credits.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url


def burst() -> list[bytes]:
    """EVENTS distinct paid invoices, each for an account of its own (named by the subscription: no Stripe call)."""
    bodies = []
    for n in range(EVENTS):
        invoice = se.invoice(
            "2025",
            invoice_id=f"in_{n}",
            customer=f"cus_{n}",
            price="price_starter_monthly",
            amount_paid=2000,
            subscription_metadata={"account_id": f"acct_{n}"},
        )
        bodies.append(json.dumps(se.event("invoice.paid", invoice, event_id=f"evt_{n}")).encode())
    return bodies


def deliver(url: str) -> Counter[int]:
    """The burst, posted by CLIENTS clients at once; the answers' status codes counted."""
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(CLIENTS) as clients:
        return Counter(clients.map(lambda body: post_signed(http, f"{url}/webhooks/stripe", body).status_code, burst()))


def statuses(rt: Runtime) -> dict[str, int]:
    with rt.uow() as uow:
        return dict(uow.session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status)).all())


def test_credits_serve_alone_processes_every_event_of_a_burst_from_8_clients(database: str, tmp_path: Path) -> None:
    [(server, url)] = start_servers(["api"], service_env(database), tmp_path)
    rt = runtime_for(settings_for(database))
    try:
        assert deliver(url) == {200: EVENTS}

        def processed() -> int | None:
            with rt.uow() as uow:
                done = uow.session.scalar(select(func.count()).where(StripeEvent.status == "processed"))
            return done if done == EVENTS else None

        wait_for(f"all {EVENTS} events to be processed by `credits serve`\n{server.tail()}", processed, SECONDS)
        assert server.alive(), server.exited()
        with rt.uow() as uow:
            grants = uow.session.scalars(select(Grant.remaining)).all()
            assert (len(grants), set(grants)) == (EVENTS, {2000})
            assert ledger.check(uow) == []
    finally:
        server.stop()
        rt.engine.dispose()


def test_credits_serve_without_its_worker_leaves_a_bursts_overflow_for_credits_worker(
    database: str, tmp_path: Path
) -> None:
    [(server, url)] = start_servers(["api"], service_env(database, SERVE_WORKER="false"), tmp_path)
    rt = runtime_for(settings_for(database))
    try:
        assert deliver(url) == {200: EVENTS}
        time.sleep(1.0)  # four of a worker's poll intervals: `credits serve`'s own would have drained the rest
        left = statuses(rt)
        assert left.get("pending", 0) > 0, left
        assert left.get("pending", 0) + left.get("processed", 0) == EVENTS, left

        worker.drain(rt)

        assert statuses(rt) == {"processed": EVENTS}
    finally:
        server.stop()
        rt.engine.dispose()
