"""The inbox's life cycle: a failed handler is retried with backoff, dead after N attempts, replayable;
an event stored but never processed (the process died) is picked up by the worker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import event, select, text

from jobs import worker
from service.infra.config import Settings
from service.infra.models import StripeEvent, utcnow
from service.infra.runtime import Runtime
from tests import stripe_events as se
from tests.helpers import balance_of, committed, state
from webhooks import dispatch, inbox


def unlinked_invoice(invoice_id: str = "in_1") -> dict:
    """An invoice whose customer is not linked yet, so the handler must ask Stripe about the customer."""
    return se.invoice("2025", invoice_id=invoice_id, customer="cus_1", price="price_starter_monthly", amount_paid=2000)


def event_row(rt, event_id: str) -> StripeEvent:
    with rt.uow() as uow:
        return uow.session.scalars(select(StripeEvent).where(StripeEvent.id == event_id)).one()


def test_a_failing_handler_leaves_no_credits_and_schedules_a_retry(deliver, rt, stripe_api) -> None:
    stripe_api.get("/v1/customers/cus_1").respond(
        400, json={"error": {"type": "invalid_request_error", "message": "nope"}}
    )
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    row = event_row(rt, "evt_1")
    assert (row.status, row.attempts) == ("failed", 1)
    assert "InvalidRequestError" in (row.last_error or "")
    assert row.next_attempt_at > utcnow() + timedelta(seconds=25)
    with rt.uow() as uow:
        assert uow.session.scalars(select(StripeEvent.id)).all() == ["evt_1"]
    assert stripe_api.calls.call_count == 1


def test_the_worker_retries_a_failed_event_once_its_backoff_has_passed(deliver, rt: Runtime, stripe_api) -> None:
    route = stripe_api.get("/v1/customers/cus_1")
    route.respond(400, json={"error": {"type": "invalid_request_error", "message": "nope"}})
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    route.respond(json=se.customer("cus_1", metadata={"account_id": "acct_1"}))
    assert worker.drain(rt) == {}  # not due yet
    later = utcnow() + timedelta(minutes=1)
    assert dispatch.process(rt, "evt_1", now=later) == "processed"
    assert (event_row(rt, "evt_1").status, event_row(rt, "evt_1").attempts) == ("processed", 2)
    assert balance_of(rt, "acct_1") == 2000


def test_an_event_is_dead_after_the_configured_attempts(deliver, rt: Runtime, stripe_api) -> None:
    stripe_api.get("/v1/customers/cus_1").respond(400, json={"error": {"type": "invalid_request_error"}})
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    now = utcnow()
    for _ in range(rt.settings.worker_max_attempts - 1):
        now += timedelta(days=1)
        dispatch.process(rt, "evt_1", now=now)
    row = event_row(rt, "evt_1")
    assert (row.status, row.attempts) == ("dead", rt.settings.worker_max_attempts)
    assert dispatch.process(rt, "evt_1", now=now + timedelta(days=1)) is None  # dead events are not retried


def test_a_dead_event_can_be_replayed_by_hand(deliver, rt: Runtime, stripe_api) -> None:
    route = stripe_api.get("/v1/customers/cus_1")
    route.respond(400, json={"error": {"type": "invalid_request_error"}})
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    with committed(rt) as uow:
        uow.session.get_one(StripeEvent, "evt_1").status = "dead"
    route.respond(json=se.customer("cus_1", metadata={"account_id": "acct_1"}))
    assert dispatch.process(rt, "evt_1", replay=True) == "processed"
    assert balance_of(rt, "acct_1") == 2000


def test_replaying_a_processed_event_changes_nothing(deliver, rt: Runtime) -> None:
    deliver(se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_1"))
    assert dispatch.process(rt, "evt_1", replay=True) == "processed"
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_a_failure_recorded_after_another_process_handled_the_event_leaves_it_handled(deliver, rt: Runtime) -> None:
    """This process's attempt failed while another's went through (it waited for the event's row lock to
    record the failure): the event needs nothing more, and is not scheduled again."""
    deliver(se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_1"))
    with committed(rt) as uow:
        status = inbox.record_failure(
            uow, "evt_1", RuntimeError("lost"), max_attempts=8, backoff_seconds=30, now=utcnow()
        )
    row = event_row(rt, "evt_1")
    assert (status, row.status, row.attempts, row.last_error) == ("processed", "processed", 1, None)


def test_a_replay_that_fails_is_recorded_whatever_the_status_was(deliver, rt: Runtime) -> None:
    deliver(se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_1"))
    with committed(rt) as uow:
        status = inbox.record_failure(
            uow, "evt_1", RuntimeError("lost"), max_attempts=8, backoff_seconds=30, now=utcnow(), any_status=True
        )
    row = event_row(rt, "evt_1")
    assert (status, row.status, row.attempts, row.last_error) == ("failed", "failed", 2, "RuntimeError: lost")


def test_an_event_stored_but_never_processed_is_picked_up_by_the_worker(rt: Runtime) -> None:
    """The receiving process died between committing the event and processing it."""
    inv = se.invoice("2017", invoice_id="in_1", customer="cus_1", price="plan_starter", amount_paid=2000)
    inv["metadata"] = {"account_id": "acct_1"}
    with committed(rt) as uow:
        inbox.store(uow, se.event("invoice.payment_succeeded", inv, event_id="evt_1", era="2017"), utcnow())
    assert worker.drain(rt) == {"processed": 1}
    assert worker.drain(rt) == {}
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def paid_invoices(customers: int, each: int) -> list[dict]:
    """`each` paid invoices for each of `customers` customers (cus_0, acct_0…), stored customer after customer
    within each round, so every batch finds several customers' events interleaved."""
    return [
        se.event(
            "invoice.paid",
            se.invoice(
                "2025",
                invoice_id=f"in_{who}_{n}",
                customer=f"cus_{who}",
                price="price_starter_monthly",
                amount_paid=2000,
                subscription_metadata={"account_id": f"acct_{who}"},
            ),
            event_id=f"evt_{who}_{n}",
        )
        for n in range(each)
        for who in range(customers)
    ]


def test_the_worker_keeps_each_customers_events_in_order_while_it_processes_customers_side_by_side(rt) -> None:
    customers, each = 3 * dispatch.CUSTOMERS, 4  # full batches: the drain runs them side by side
    with committed(rt) as uow:
        for evt in paid_invoices(customers, each):
            inbox.store(uow, evt, utcnow())
    threads = 4 if rt.engine.dialect.name == "postgresql" else 1  # SQLite: one writer, one batch at a time
    assert worker.drain(rt, threads=threads) == {"processed": customers * each}
    for who in range(customers):
        grants = [key for _, _, key in state(rt, f"acct_{who}")[0] if key.startswith("invoice:")]
        assert grants == [f"invoice:in_{who}_{n}" for n in range(each)]


def test_a_batch_holds_the_lock_of_each_customer_it_takes_and_of_no_other(rt) -> None:
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's one write lock stands in for the customers' locks")
    with committed(rt) as uow:
        for evt in paid_invoices(3 * dispatch.CUSTOMERS, 2):
            inbox.store(uow, evt, utcnow())
    with rt.uow() as uow:
        claimed, taken = inbox.claim_due(uow, utcnow(), dispatch.CUSTOMERS, dispatch.MOST)
        held = uow.session.scalar(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        )
    assert taken == {f"cus_{who}" for who in range(dispatch.CUSTOMERS)}  # those whose events came first
    assert held == dispatch.CUSTOMERS
    assert sorted(evt.id for evt in claimed) == sorted(
        f"evt_{who}_{n}" for who in range(dispatch.CUSTOMERS) for n in range(2)
    )


def linked_invoice(invoice_id: str) -> dict:
    """An invoice of cus_1 that names its account (acct_1), so handling it needs no Stripe call."""
    return se.invoice(
        "2025",
        invoice_id=invoice_id,
        customer="cus_1",
        price="price_starter_monthly",
        amount_paid=2000,
        subscription_metadata={"account_id": "acct_1"},
    )


def commits_of_a_drain(rt: Runtime) -> int:
    counted = [0]

    def count(*_args: object) -> None:
        counted[0] += 1

    event.listen(rt.engine, "commit", count)
    try:
        worker.drain(rt)
    finally:
        event.remove(rt.engine, "commit", count)
    return counted[0]


def test_the_worker_commits_a_batch_of_due_events_together(rt) -> None:
    """A batch of due events shares one transaction: eight customers' events cost the commit one does."""
    with committed(rt) as uow:
        inbox.store(uow, se.event("invoice.paid", linked_invoice("in_0"), event_id="evt_0"), utcnow())
    one = commits_of_a_drain(rt)
    with committed(rt) as uow:
        for who in range(8):
            invoice = se.invoice(
                "2025",
                invoice_id=f"in_c{who}",
                customer=f"cus_c{who}",
                price="price_starter_monthly",
                amount_paid=2000,
                subscription_metadata={"account_id": f"acct_c{who}"},
            )
            inbox.store(uow, se.event("invoice.paid", invoice, event_id=f"evt_c{who}"), utcnow())
    assert commits_of_a_drain(rt) == one
    for who in range(8):
        assert [key for _, _, key in state(rt, f"acct_c{who}")[0]] == [f"invoice:in_c{who}"]


def test_a_failure_in_a_batch_is_recorded_on_its_event_and_the_others_are_processed_once(rt, stripe_api) -> None:
    """The batch's transaction rolls back and each of its events is done again alone: the failing one is
    recorded failed, the others are processed, each once."""
    stripe_api.get("/v1/checkout/sessions/cs_test_1/line_items").respond(
        400, json={"error": {"type": "invalid_request_error", "message": "nope"}}
    )
    unnamed_pack = se.checkout_session(customer="cus_1")  # no metadata.pack: its prices are asked of Stripe
    with committed(rt) as uow:
        for n, evt in enumerate(
            (
                se.event("invoice.paid", linked_invoice("in_0")),
                se.event("checkout.session.completed", unnamed_pack),
                se.event("invoice.paid", linked_invoice("in_2")),
            )
        ):
            evt["id"] = f"evt_{n}"
            inbox.store(uow, evt, utcnow())
    assert worker.drain(rt) == {"processed": 2, "failed": 1}
    assert [(row.status, row.attempts) for row in (event_row(rt, f"evt_{n}") for n in range(3))] == [
        ("processed", 1),
        ("failed", 1),
        ("processed", 1),
    ]
    assert [key for _, _, key in state(rt, "acct_1")[0]] == ["invoice:in_0", "invoice:in_2"]


def test_with_the_defaults_a_failing_event_is_retried_for_three_days_before_it_is_dead(rt: Runtime) -> None:
    defaults = Settings.model_construct()  # the declared defaults, whatever this environment sets
    first = utcnow()
    with committed(rt) as uow:
        inbox.store(uow, se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"), first)
    now, status = first, "failed"
    while status != "dead":
        with committed(rt) as uow:
            status = inbox.record_failure(
                uow,
                "evt_1",
                RuntimeError("the payment has not arrived yet"),
                max_attempts=defaults.worker_max_attempts,
                backoff_seconds=defaults.worker_backoff_seconds,
                now=now,
            )
        if status != "dead":
            now = event_row(rt, "evt_1").next_attempt_at
    assert now - first >= timedelta(days=3)
