"""A shuffled, duplicated stream of signed events, posted concurrently by 8 clients to 2 API processes with
2 workers alongside, all on one PostgreSQL database, ends with exactly the ledger one ordered delivery gives.

Everything runs as it does in production: `credits serve` twice and `credits worker` twice, each its own
process on 127.0.0.1, configured by environment, logging JSON (LOG_LEVEL=warning, to keep quiet) to a file under the
test's tmp_path. What one ordered delivery gives is computed from the event list itself, grant by grant
(tests/reliability/scenario.py; it also says why the chosen events' ledger does not depend on their order):
per account, every entry (kind, amount, idempotency key) and the balance; plus `ledger.check()` clean, and
every event `processed` or, for the ones that must be, `ignored`.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from service.domain import accounts, ledger, referrals
from service.infra.models import StripeEvent
from service.infra.runtime import Runtime
from tests.helpers import committed
from tests.reliability import scenario
from tests.reliability.support import (
    Process,
    balances,
    event_statuses,
    ledgers,
    runtime_for,
    service_env,
    settings_for,
    start_servers,
    start_worker,
    wait_for,
)
from tests.stripe_events import sign

DELIVERIES = 2000
UNIQUE = 1400  # so 600 deliveries (30 %) are redeliveries of an event id already in the stream
CLIENTS = 8
REFERRERS = 40
SEED = 20260101
SETTLE_TIMEOUT = 30.0


def _referral_codes(rt) -> dict[str, str]:
    """Referrer accounts with their codes, made before any event arrives (as the product's signup does)."""
    with committed(rt) as uow:
        return {
            f"acct_r{i:03d}": referrals.code_for(uow, accounts.get_or_create(uow, f"acct_r{i:03d}"))
            for i in range(REFERRERS)
        }


def _deliver(ports: list[int], stream: list[bytes]) -> list[tuple[int, int | str]]:
    """Post `stream` with CLIENTS threads, delivery i to the server on ports[i % len(ports)], each thread on
    its own keep-alive connections (http.client: the lightest client, as the clients share the 2 cores with
    the servers); returns (i, HTTP status or the error)."""
    results: list[tuple[int, int | str]] = []
    lock = threading.Lock()
    cursor = iter(range(len(stream)))

    def client() -> None:
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=20) for port in ports]
        try:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                conn, body = conns[i % len(ports)], stream[i]
                try:
                    conn.request(
                        "POST",
                        "/webhooks/stripe",
                        body=body,
                        headers={"Stripe-Signature": sign(body), "Content-Type": "application/json"},
                    )
                    response = conn.getresponse()
                    response.read()
                    status: int | str = response.status
                except (OSError, http.client.HTTPException) as exc:
                    status = f"{type(exc).__name__}: {exc}"
                    conn.close()
                with lock:
                    results.append((i, status))
        finally:
            for conn in conns:
                conn.close()

    threads = [threading.Thread(target=client, name=f"stream-client-{n}") for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread is still posting after 120 s"
    return results


def test_a_shuffled_duplicated_concurrent_stream_ends_with_the_ledger_of_one_ordered_delivery(
    fresh_pg: str, tmp_path: Path
) -> None:
    started = time.monotonic(), time.process_time()
    rt = runtime_for(settings_for(fresh_pg))
    try:
        _stream_and_check(fresh_pg, rt, tmp_path, started)
    finally:
        rt.engine.dispose()


def _stream_and_check(database_url: str, rt: Runtime, tmp_path: Path, started: tuple[float, float]) -> None:
    events = scenario.build(_referral_codes(rt), UNIQUE, SEED)
    unique = [json.dumps(evt).encode() for evt in events.ordered]
    rnd = random.Random(SEED)
    stream = unique + rnd.choices(unique, k=DELIVERIES - len(unique))
    rnd.shuffle(stream)
    assert 0.28 <= 1 - len(unique) / len(stream) <= 0.32, "about 30 % of the deliveries are redeliveries"

    env = service_env(database_url, WORKER_BACKOFF_SECONDS="0.2")  # a transient failure is retried within the test
    running: list[Process] = []
    try:
        running += [start_worker(f"worker{n}", env, tmp_path) for n in range(2)]
        servers = start_servers(["api0", "api1"], env, tmp_path)
        running += [server for server, _ in servers]
        ports = [int(url.rsplit(":", 1)[1]) for _, url in servers]
        ready = time.monotonic()

        results = _deliver(ports, stream)
        posted = time.monotonic()
        answers = Counter(status for _, status in results)
        assert answers == {200: len(stream)}, f"every delivery is answered 200: {answers}"

        def settled() -> dict[str, int] | None:
            with rt.uow() as uow:
                statuses = event_statuses(uow.session)
            stored = sum(statuses.values())
            return statuses if stored == len(unique) and not (statuses.keys() & {"pending", "failed", "dead"}) else None

        try:
            statuses = wait_for("every event to be handled", settled, SETTLE_TIMEOUT, every=0.25)
        except AssertionError:
            with rt.uow() as uow:
                stuck = uow.session.execute(
                    select(StripeEvent.id, StripeEvent.status, StripeEvent.attempts, StripeEvent.last_error)
                    .where(StripeEvent.status.in_(("pending", "failed", "dead")))
                    .limit(10)
                ).all()
                now = event_statuses(uow.session)
            logs = "\n".join(p.tail(15) for p in running)
            raise AssertionError(f"inbox did not settle: {now}; e.g. {stuck}\n{logs}") from None
        handled = time.monotonic()
        dead = [p.exited() for p in running if not p.alive()]
        assert not dead, "a service process died:\n" + "\n".join(dead)
        cpu = {p.name: p.cpu_seconds() for p in running}
    finally:
        for process in running:
            process.stop()

    with rt.uow() as uow:
        final_ledgers, final_balances, drift = ledgers(uow.session), balances(uow.session), ledger.check(uow)
        rows = uow.session.execute(select(StripeEvent.id, StripeEvent.status, StripeEvent.attempts)).all()
        retried = sum(1 for _, _, attempts in rows if attempts > 1)
    print(
        f"\nstream: {len(stream)} deliveries ({len(unique)} unique) to 2 API processes + 2 workers; "
        f"start {ready - started[0]:.1f} s, post {posted - ready:.1f} s ({len(stream) / (posted - ready):.0f}/s), "
        f"settle {handled - posted:.1f} s; CPU s {cpu}, this test's process {time.process_time() - started[1]:.1f}; "
        f"statuses {statuses}; {retried} events needed more than one attempt"
    )

    assert statuses == {"processed": len(unique) - len(events.ignored), "ignored": len(events.ignored)}
    assert {event_id for event_id, status, _ in rows if status == "ignored"} == events.ignored
    assert drift == []
    expected = events.expected_ledgers()
    assert sorted(final_ledgers) == sorted(expected), "the same accounts hold entries"
    wrong = {a: (final_ledgers[a], expected[a]) for a in expected if final_ledgers[a] != expected[a]}
    assert not wrong, f"{len(wrong)} accounts differ (actual, expected), e.g. {list(wrong.items())[:3]}"
    assert final_balances == events.expected_balances()
