"""The inbox's life cycle: a failed handler is retried with backoff, dead after N attempts, replayable;
an event stored but never processed (the process died) is picked up by the worker."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sqlalchemy import event, select

from jobs import worker
from service.infra.db import transaction
from service.infra.models import StripeEvent, utcnow
from service.infra.runtime import Runtime
from tests import stripe_events as se
from tests.helpers import balance_of, state
from webhooks import dispatch, inbox


def unlinked_invoice(invoice_id: str = "in_1") -> dict:
    """An invoice whose customer is not linked yet, so the handler must ask Stripe about the customer."""
    return se.invoice("2025", invoice_id=invoice_id, customer="cus_1", price="price_starter_monthly", amount_paid=2000)


def event_row(sessions, event_id: str) -> StripeEvent:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return s.scalars(select(StripeEvent).where(StripeEvent.id == event_id)).one()


def test_a_failing_handler_leaves_no_credits_and_schedules_a_retry(deliver, sessions, stripe_api) -> None:  # type: ignore[no-untyped-def]
    stripe_api.get("/v1/customers/cus_1").respond(400, json={"error": {"type": "invalid_request_error", "message": "nope"}})
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    row = event_row(sessions, "evt_1")
    assert (row.status, row.attempts) == ("failed", 1)
    assert "InvalidRequestError" in (row.last_error or "")
    assert row.next_attempt_at > utcnow() + timedelta(seconds=25)
    with sessions() as s:
        assert s.scalars(select(StripeEvent.id)).all() == ["evt_1"]
    assert stripe_api.calls.call_count == 1


def test_the_worker_retries_a_failed_event_once_its_backoff_has_passed(deliver, rt: Runtime, sessions, stripe_api) -> None:  # type: ignore[no-untyped-def]
    route = stripe_api.get("/v1/customers/cus_1")
    route.respond(400, json={"error": {"type": "invalid_request_error", "message": "nope"}})
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    route.respond(json=se.customer("cus_1", metadata={"account_id": "acct_1"}))
    assert worker.drain(rt) == {}  # not due yet
    later = utcnow() + timedelta(minutes=1)
    assert dispatch.process(rt, "evt_1", now=later) == "processed"
    assert (event_row(sessions, "evt_1").status, event_row(sessions, "evt_1").attempts) == ("processed", 2)
    assert balance_of(sessions, "acct_1") == 2000


def test_an_event_is_dead_after_the_configured_attempts(deliver, rt: Runtime, sessions, stripe_api) -> None:  # type: ignore[no-untyped-def]
    stripe_api.get("/v1/customers/cus_1").respond(400, json={"error": {"type": "invalid_request_error"}})
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    now = utcnow()
    for _ in range(rt.settings.worker_max_attempts - 1):
        now += timedelta(days=1)
        dispatch.process(rt, "evt_1", now=now)
    row = event_row(sessions, "evt_1")
    assert (row.status, row.attempts) == ("dead", rt.settings.worker_max_attempts)
    assert dispatch.process(rt, "evt_1", now=now + timedelta(days=1)) is None  # dead events are not retried


def test_a_dead_event_can_be_replayed_by_hand(deliver, rt: Runtime, sessions, stripe_api) -> None:  # type: ignore[no-untyped-def]
    route = stripe_api.get("/v1/customers/cus_1")
    route.respond(400, json={"error": {"type": "invalid_request_error"}})
    deliver(se.event("invoice.paid", unlinked_invoice(), event_id="evt_1"))
    with transaction(sessions) as s:
        s.get_one(StripeEvent, "evt_1").status = "dead"
    route.respond(json=se.customer("cus_1", metadata={"account_id": "acct_1"}))
    assert dispatch.process(rt, "evt_1", replay=True) == "processed"
    assert balance_of(sessions, "acct_1") == 2000


def test_replaying_a_processed_event_changes_nothing(deliver, rt: Runtime, sessions) -> None:  # type: ignore[no-untyped-def]
    deliver(se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_1"))
    assert dispatch.process(rt, "evt_1", replay=True) == "processed"
    assert state(sessions, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_a_failure_recorded_after_another_process_handled_the_event_leaves_it_handled(deliver, rt: Runtime, sessions) -> None:  # type: ignore[no-untyped-def]
    """This process's attempt failed while another's went through (it waited for the event's row lock to
    record the failure): the event needs nothing more, and is not scheduled again."""
    deliver(se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_1"))
    status = inbox.record_failure(sessions, "evt_1", RuntimeError("lost"), max_attempts=8, backoff_seconds=30, now=utcnow())
    row = event_row(sessions, "evt_1")
    assert (status, row.status, row.attempts, row.last_error) == ("processed", "processed", 1, None)


def test_a_replay_that_fails_is_recorded_whatever_the_status_was(deliver, rt: Runtime, sessions) -> None:  # type: ignore[no-untyped-def]
    deliver(se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_1"))
    status = inbox.record_failure(sessions, "evt_1", RuntimeError("lost"), max_attempts=8, backoff_seconds=30,
                                  now=utcnow(), any_status=True)
    row = event_row(sessions, "evt_1")
    assert (status, row.status, row.attempts, row.last_error) == ("failed", "failed", 2, "RuntimeError: lost")


def test_an_event_stored_but_never_processed_is_picked_up_by_the_worker(rt: Runtime, sessions) -> None:  # type: ignore[no-untyped-def]
    """The receiving process died between committing the event and processing it."""
    inv = se.invoice("2017", invoice_id="in_1", customer="cus_1", price="plan_starter", amount_paid=2000)
    inv["metadata"] = {"account_id": "acct_1"}
    with transaction(sessions) as s:
        inbox.store(s, se.event("invoice.payment_succeeded", inv, event_id="evt_1", era="2017"), utcnow())
    assert worker.drain(rt) == {"processed": 1}
    assert worker.drain(rt) == {}
    assert state(sessions, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_the_worker_keeps_each_customers_events_in_order_while_it_processes_customers_side_by_side(rt, sessions) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as s:
        for n in range(4):
            for who in ("a", "b", "c"):
                invoice = se.invoice("2025", invoice_id=f"in_{who}{n}", customer=f"cus_{who}", price="price_starter_monthly",
                                     amount_paid=2000, subscription_metadata={"account_id": f"acct_{who}"})
                inbox.store(s, se.event("invoice.paid", invoice, event_id=f"evt_{who}{n}"), utcnow())
    assert worker.drain(rt) == {"processed": 12}
    for who in ("a", "b", "c"):
        grants = [key for _, _, key in state(sessions, f"acct_{who}")[0] if key.startswith("invoice:")]
        assert grants == [f"invoice:in_{who}{n}" for n in range(4)]


def store_two_events_of_a_customer_stripe_refuses(sessions, stripe_api) -> None:  # type: ignore[no-untyped-def]
    """evt_0 and evt_1, invoices of cus_1, whose look-up at Stripe fails: evt_0 fails, evt_1 must wait behind it."""
    stripe_api.get("/v1/customers/cus_1").respond(400, json={"error": {"type": "invalid_request_error", "message": "nope"}})
    with transaction(sessions) as s:
        for n in range(2):
            inbox.store(s, se.event("invoice.paid", unlinked_invoice(f"in_{n}"), event_id=f"evt_{n}"), utcnow())


@pytest.mark.parametrize("batch", [worker.BATCH, 1], ids=["in one batch", "in batches of one"])
def test_a_failed_event_holds_back_its_customers_later_events_until_the_next_drain(rt, sessions, stripe_api, monkeypatch, batch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(worker, "BATCH", batch)  # in batches of one, the later event comes in a later batch
    store_two_events_of_a_customer_stripe_refuses(sessions, stripe_api)
    assert worker.drain(rt) == {"failed": 1}
    assert [(e.id, e.status) for e in (event_row(sessions, "evt_0"), event_row(sessions, "evt_1"))] == [
        ("evt_0", "failed"), ("evt_1", "pending")]


def test_each_event_is_stored_with_its_lane_the_customer_its_object_names_else_the_object(sessions) -> None:  # type: ignore[no-untyped-def]
    expanded = se.invoice("2025", invoice_id="in_2", customer="cus_2", price="price_starter_monthly", amount_paid=2000)
    expanded["customer"] = se.customer("cus_2")
    with transaction(sessions) as s:
        inbox.store(s, se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_invoice"), utcnow())
        inbox.store(s, se.event("invoice.paid", expanded, event_id="evt_expanded"), utcnow())
        inbox.store(s, se.event("customer.created", se.customer("cus_3"), event_id="evt_customer"), utcnow())
        inbox.store(s, se.event("ping", {}, event_id="evt_ping"), utcnow())
    with transaction(sessions) as s:
        assert sorted(inbox.due(s, utcnow(), 10)) == [
            ("evt_customer", "cus_3"), ("evt_expanded", "cus_2"), ("evt_invoice", "cus_1"), ("evt_ping", "evt_ping")]
        assert {event_id: lane for event_id, lane in s.execute(select(StripeEvent.id, StripeEvent.lane))} == {
            "evt_customer": "cus_3", "evt_expanded": "cus_2", "evt_invoice": "cus_1", "evt_ping": "evt_ping"}


def test_an_event_stored_without_a_lane_by_older_code_gets_its_lane_from_its_payload(sessions) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as s:
        inbox.store(s, se.event("invoice.paid", linked_invoice("in_1"), event_id="evt_1"), utcnow())
        inbox.store(s, se.event("customer.created", se.customer("cus_3"), event_id="evt_2"), utcnow())
        s.execute(inbox.EVENTS.update().values(lane=None))
    with transaction(sessions) as s:
        assert sorted(inbox.due(s, utcnow(), 10)) == [("evt_1", "cus_1"), ("evt_2", "cus_3")]


def test_the_partitions_of_the_due_events_share_them_out_whole_lanes_each_to_one(engine, sessions) -> None:  # type: ignore[no-untyped-def]
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: its worker runs one process, on every lane")
    store_events_of_customers(sessions, customers=30, each=2)
    with transaction(sessions) as s:  # stored by older code: its lane from its payload, in the same partition
        s.execute(inbox.EVENTS.update().where(inbox.EVENTS.c.id.like("evt_%_0")).values(lane=None))
    with transaction(sessions) as s:
        everything = inbox.due(s, utcnow(), 100)
        shares = [inbox.due(s, utcnow(), 100, inbox.Partition(n, 3)) for n in range(3)]
    assert sorted(pair for share in shares for pair in share) == sorted(everything)  # each event in exactly one
    lanes = [{lane for _, lane in share} for share in shares]
    assert all(lanes) and not (lanes[0] & lanes[1] or lanes[0] & lanes[2] or lanes[1] & lanes[2])


def test_a_drain_of_one_partition_processes_its_own_lanes_and_leaves_the_others_due(engine, rt, sessions) -> None:  # type: ignore[no-untyped-def]
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: its worker runs one process, on every lane")
    store_events_of_customers(sessions, customers=10, each=1)
    with transaction(sessions) as s:
        others = inbox.due(s, utcnow(), 100, inbox.Partition(1, 2))
    assert worker.drain(rt, partition=inbox.Partition(0, 2)) == {"processed": 10 - len(others)}
    with transaction(sessions) as s:
        assert inbox.due(s, utcnow(), 100) == others


def test_lane_partitions_are_refused_on_sqlite_and_out_of_range(engine, sessions) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="partition 2 of 2"):
        inbox.Partition(2, 2)
    if engine.dialect.name == "sqlite":
        with transaction(sessions) as s, pytest.raises(ValueError, match="need PostgreSQL"):
            inbox.due(s, utcnow(), 10, inbox.Partition(0, 2))


def store_events_of_customers(sessions, *, customers: int, each: int) -> None:  # type: ignore[no-untyped-def]
    """`each` paid invoices for each of `customers` customers (cus_0 …), all naming their accounts."""
    with transaction(sessions) as s:
        for c in range(customers):
            for n in range(each):
                invoice = se.invoice("2025", invoice_id=f"in_{c}_{n}", customer=f"cus_{c}", price="price_starter_monthly",
                                     amount_paid=2000, subscription_metadata={"account_id": f"acct_{c}"})
                inbox.store(s, se.event("invoice.paid", invoice, event_id=f"evt_{c}_{n}"), utcnow())


def test_events_held_back_behind_a_lanes_failure_do_not_end_the_drain_before_other_customers_events(rt, sessions, stripe_api, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(worker, "BATCH", 1)  # the held-back event alone would fill a batch
    store_two_events_of_a_customer_stripe_refuses(sessions, stripe_api)
    with transaction(sessions) as s:
        other = se.invoice("2025", invoice_id="in_2", customer="cus_2", price="price_starter_monthly", amount_paid=2000,
                           subscription_metadata={"account_id": "acct_2"})
        inbox.store(s, se.event("invoice.paid", other, event_id="evt_2"), utcnow())
    assert worker.drain(rt) == {"failed": 1, "processed": 1}
    assert [event_row(sessions, f"evt_{n}").status for n in range(3)] == ["failed", "pending", "processed"]
    assert state(sessions, "acct_2")[0] == [("grant", 2000, "invoice:in_2")]


def linked_invoice(invoice_id: str) -> dict:
    """An invoice of cus_1 that names its account (acct_1), so handling it needs no Stripe call."""
    return se.invoice("2025", invoice_id=invoice_id, customer="cus_1", price="price_starter_monthly", amount_paid=2000,
                      subscription_metadata={"account_id": "acct_1"})


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


def test_the_worker_commits_a_customers_due_events_together(rt, sessions) -> None:  # type: ignore[no-untyped-def]
    """One transaction for the customer's lane, not one per event: three events cost what one does."""
    with transaction(sessions) as s:
        inbox.store(s, se.event("invoice.paid", linked_invoice("in_0"), event_id="evt_0"), utcnow())
    one = commits_of_a_drain(rt)
    with transaction(sessions) as s:
        for n in range(1, 4):
            inbox.store(s, se.event("invoice.paid", linked_invoice(f"in_{n}"), event_id=f"evt_{n}"), utcnow())
    assert commits_of_a_drain(rt) == one
    assert [key for _, _, key in state(sessions, "acct_1")[0] if key.startswith("invoice:")] == [
        f"invoice:in_{n}" for n in range(4)]


def test_the_worker_commits_several_customers_due_events_together(rt, sessions) -> None:  # type: ignore[no-untyped-def]
    """A thread's share of the lanes shares one transaction: twelve customers' events cost a commit a thread."""
    with transaction(sessions) as s:
        inbox.store(s, se.event("invoice.paid", linked_invoice("in_0"), event_id="evt_0"), utcnow())
    one = commits_of_a_drain(rt)
    with transaction(sessions) as s:
        for who in range(12):
            invoice = se.invoice("2025", invoice_id=f"in_c{who}", customer=f"cus_c{who}", price="price_starter_monthly",
                                 amount_paid=2000, subscription_metadata={"account_id": f"acct_c{who}"})
            inbox.store(s, se.event("invoice.paid", invoice, event_id=f"evt_c{who}"), utcnow())
    threads = rt.settings.worker_threads if rt.engine.dialect.name == "postgresql" else 1
    assert commits_of_a_drain(rt) <= one + threads - 1  # one a customer would be 12
    for who in range(12):
        assert [key for _, _, key in state(sessions, f"acct_c{who}")[0]] == [f"invoice:in_c{who}"]


def test_a_failure_inside_a_lane_keeps_the_events_before_it_and_holds_back_those_after(rt, sessions, stripe_api) -> None:  # type: ignore[no-untyped-def]
    """The lane's shared transaction rolls back, and the lane is redone one event at a time: the event before
    the failing one is processed once, the failing one is recorded failed, the one after waits."""
    stripe_api.get("/v1/checkout/sessions/cs_test_1/line_items").respond(
        400, json={"error": {"type": "invalid_request_error", "message": "nope"}})
    unnamed_pack = se.checkout_session(customer="cus_1")  # no metadata.pack: its prices are asked of Stripe
    with transaction(sessions) as s:
        for n, evt in enumerate((se.event("invoice.paid", linked_invoice("in_0")),
                                 se.event("checkout.session.completed", unnamed_pack),
                                 se.event("invoice.paid", linked_invoice("in_2")))):
            evt["id"] = f"evt_{n}"
            inbox.store(s, evt, utcnow())
    assert worker.drain(rt) == {"processed": 1, "failed": 1}
    assert [(row.status, row.attempts) for row in map(lambda n: event_row(sessions, f"evt_{n}"), range(3))] == [
        ("processed", 1), ("failed", 1), ("pending", 0)]
    assert [key for _, _, key in state(sessions, "acct_1")[0]] == ["invoice:in_0"]
