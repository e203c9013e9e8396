"""The database goes away in the middle of a delivery burst and comes back: every request is answered 2xx
(and its event is stored) or 503 (and Stripe will redeliver it) — never a 4xx, another 5xx or a hang; after
the redeliveries and a worker drain, every event is stored once and the ledger is exact.

The service is `credits serve` in a process of its own on 127.0.0.1, on PostgreSQL through
tests/reliability/proxy.py (also a process of its own), which the test cuts — every connection broken, new
ones dropped — and restores: the machine's cluster is never touched.

The other way a database goes away — it stops answering: connections break and new ones are accepted but
never answered (a partition, a frozen server) — must be a 503 within seconds too, not a request that hangs
until the kernel gives up on the connection (psycopg waits for ever without a connect_timeout).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.engine import make_url

from jobs import worker
from service.domain import ledger
from service.infra.models import StripeEvent
from tests import stripe_events as se
from tests.helpers import T0
from tests.reliability.proxy import ProxyProcess
from tests.reliability.support import (
    balances,
    event_statuses,
    ledgers,
    post_signed,
    runtime_for,
    service_env,
    settings_for,
    start_servers,
    wait_for,
)

EVENTS = 300
CLIENTS = 8
CUT_AT = 100  # the database goes away once this many requests are answered,
RESTORE_AT = 200  # and comes back once this many are (a few tenths of a second: 503s are quick)
HANG = 15.0  # a request unanswered for this long counts as a hang


def _event(i: int) -> bytes:
    account = f"acct_o{i:04d}"
    obj = se.invoice(
        "2025" if i % 2 else "2020",
        invoice_id=f"in_{account}",
        customer=f"cus_{account}",
        price="price_starter_monthly",
        amount_paid=2000,
        subscription=f"sub_{account}",
        subscription_metadata={"account_id": account},
    )
    return se.encode(se.event("invoice.paid", obj, event_id=f"evt_outage_{i:04d}", created=T0))


def _deliver_with_outage(url: str, bodies: dict[str, bytes], proxy: ProxyProcess) -> tuple[dict[str, int | str], int]:
    """Post every body from CLIENTS threads, the database cut from the CUT_AT-th answer to the RESTORE_AT-th;
    returns the answers and how many database connections the cut broke."""
    answers: dict[str, int | str] = {}
    lock = threading.Lock()
    local = threading.local()
    cut, restore = threading.Event(), threading.Event()

    def post(event_id: str) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=HANG)
        try:
            status: int | str = post_signed(local.http, f"{url}/webhooks/stripe", bodies[event_id]).status_code
        except httpx.TimeoutException:
            status = "hang"
        except httpx.HTTPError as exc:
            status = f"{type(exc).__name__}: {exc}"
        with lock:
            answers[event_id] = status
            if len(answers) == CUT_AT:
                cut.set()
            if len(answers) == RESTORE_AT:
                restore.set()

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(post, event_id) for event_id in bodies]
        assert cut.wait(60), "the first deliveries never came back"
        broken = proxy.cut()
        assert restore.wait(HANG + 30), "requests stopped coming back during the outage"
        proxy.restore()
        for future in futures:
            future.result(HANG + 30)
    return answers, broken


def test_a_database_outage_during_delivery_loses_and_doubles_nothing(fresh_pg: str, tmp_path: Path) -> None:
    bodies = {f"evt_outage_{i:04d}": _event(i) for i in range(EVENTS)}
    db = make_url(fresh_pg)
    direct = runtime_for(settings_for(fresh_pg, worker_backoff_seconds=0.0))  # the worker, not via the proxy
    try:
        with ProxyProcess(db.host or "127.0.0.1", db.port or 5432) as proxy:
            through = db.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
            # A failure recorded once the database is back is due again at once, for the drain below.
            [(server, url)] = start_servers(["api"], service_env(through, WORKER_BACKOFF_SECONDS="0"), tmp_path)
            try:
                started = time.monotonic()
                answers, broken = _deliver_with_outage(url, bodies, proxy)
                first_pass = time.monotonic() - started
                counts = Counter(answers.values())
                assert set(counts) <= {200, 503}, (
                    f"every answer is 200 or 503 (never a 4xx, another 5xx or a hang): {counts}\n{server.tail()}"
                )
                assert counts[503] > 0 and counts[200] > 0, f"the outage was felt, and only for a while: {counts}"

                with direct.uow() as uow:
                    stored = set(uow.session.scalars(select(StripeEvent.id)))
                accepted = {event_id for event_id, status in answers.items() if status == 200}
                assert accepted <= stored, f"answered 200 but not stored: {sorted(accepted - stored)[:5]}"

                # Stripe redelivers what got a 5xx; the database is back, so each is accepted now.
                with httpx.Client(timeout=HANG) as http:
                    for _ in range(3):
                        for event_id in [e for e, status in answers.items() if status != 200]:
                            answers[event_id] = post_signed(
                                http, f"{url}/webhooks/stripe", bodies[event_id]
                            ).status_code
                assert Counter(answers.values()) == {200: EVENTS}, "every redelivery after the outage is accepted"
                connections = proxy.stats()
            finally:
                server.stop()

        # What the outage interrupted (left pending, or failed once its failure could be recorded) is the worker's.
        drains: Counter[str] = Counter()

        def drained() -> dict[str, int] | None:
            drains.update(worker.drain(direct))
            with direct.uow() as uow:
                statuses = event_statuses(uow.session)
            return statuses if statuses == {"processed": EVENTS} else None

        try:
            wait_for("the worker to process every event", drained, 20, every=0.2)
        except AssertionError:
            with direct.uow() as uow:
                left = uow.session.execute(
                    select(StripeEvent.id, StripeEvent.status, StripeEvent.last_error)
                    .where(StripeEvent.status != "processed")
                    .limit(5)
                ).all()
            raise AssertionError(f"events not processed after the outage: {left}") from None

        with direct.uow() as uow:
            events = uow.session.execute(select(StripeEvent.id, StripeEvent.attempts, StripeEvent.last_error)).all()
            final_ledgers, final_balances, drift = ledgers(uow.session), balances(uow.session), ledger.check(uow)
    finally:
        direct.engine.dispose()

    retried = [e for e in events if e.attempts > 1]
    print(
        f"\noutage: {EVENTS} events in {first_pass:.1f} s, the database cut from answer {CUT_AT} to {RESTORE_AT} "
        f"({broken} connections broken; {connections[0]} let through, {connections[1]} dropped); first answers "
        f"{dict(counts)}; the worker then handled {dict(drains)}, {len(retried)} of them after a recorded failure"
    )
    assert sorted(e.id for e in events) == sorted(bodies), "every event is stored exactly once"
    assert drift == []
    accounts = [f"acct_o{i:04d}" for i in range(EVENTS)]
    assert final_ledgers == {a: [("grant", 2000, f"invoice:in_{a}")] for a in accounts}, "one grant per invoice"
    assert final_balances == dict.fromkeys(accounts, 2000)


def test_a_database_that_stops_answering_gets_a_503_not_a_hang(fresh_pg: str, tmp_path: Path) -> None:
    db = make_url(fresh_pg)
    with ProxyProcess(db.host or "127.0.0.1", db.port or 5432) as proxy:
        through = db.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        [(server, url)] = start_servers(["api"], service_env(through), tmp_path)
        try:
            with httpx.Client(timeout=HANG) as http:
                assert post_signed(http, f"{url}/webhooks/stripe", _event(0)).status_code == 200
                proxy.blackhole()
                started = time.monotonic()
                try:
                    status: int | str = post_signed(http, f"{url}/webhooks/stripe", _event(1)).status_code
                except httpx.TimeoutException:
                    status = f"no answer after {time.monotonic() - started:.0f} s"
                proxy.restore()
                assert status == 503, "a partitioned database is a quick 503, so Stripe retries"
                assert post_signed(http, f"{url}/webhooks/stripe", _event(1)).status_code == 200
        finally:
            server.stop()
