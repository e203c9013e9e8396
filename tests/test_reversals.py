"""Refunds and lost disputes reverse the unspent credits of what they refund, in proportion; what was
already spent is recorded as a shortfall. Payments are found by charge, payment intent or invoice."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from service.infra.models import LedgerEntry, StripeEvent, utcnow
from tests import stripe_events as se
from tests.helpers import balance_of, state
from webhooks import dispatch


def buy_boost(deliver) -> None:
    """A 1000-credit pack paid with pi_1 / ch_1 for $10.00."""
    intent = se.payment_intent(
        customer=None, metadata={"pack": "boost", "account_id": "acct_1"}, amount=1000, charge="ch_1"
    )
    deliver(se.event("payment_intent.succeeded", intent))


def spend(client, amount: int) -> None:
    assert (
        client.post(
            "/v1/accounts/acct_1/spend", json={"amount": amount}, headers={"Idempotency-Key": f"s{amount}"}
        ).status_code
        == 200
    )


def reversal_entries(rt) -> list[tuple[int, str, dict]]:
    with rt.uow() as uow:
        rows = uow.session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "reverse").order_by(LedgerEntry.id))
        return [(e.amount, e.idempotency_key, e.meta) for e in rows]


def test_a_full_refund_reverses_the_whole_pack(deliver, rt) -> None:
    buy_boost(deliver)
    deliver(
        se.event("charge.refunded", se.charge(amount_refunded=1000, payment_intent="pi_1", refunds=[("re_1", 1000)]))
    )
    assert state(rt, "acct_1")[1] == [("pack", 1000, 0, 0, 0, 1000)]
    assert reversal_entries(rt) == [(-1000, "reverse:re_1", {"requested": 1000, "shortfall": 0, "payment": "pi_1"})]


def test_a_partial_refund_reverses_in_proportion(deliver, rt) -> None:
    buy_boost(deliver)
    deliver(se.event("charge.refunded", se.charge(amount_refunded=250, payment_intent="pi_1", refunds=[("re_1", 250)])))
    assert balance_of(rt, "acct_1") == 750


def test_credits_already_spent_are_recorded_as_a_shortfall(deliver, client, rt) -> None:
    buy_boost(deliver)
    spend(client, 800)
    deliver(
        se.event("charge.refunded", se.charge(amount_refunded=1000, payment_intent="pi_1", refunds=[("re_1", 1000)]))
    )
    assert reversal_entries(rt) == [(-200, "reverse:re_1", {"requested": 1000, "shortfall": 800, "payment": "pi_1"})]
    assert balance_of(rt, "acct_1") == 0


def test_two_partial_refunds_in_any_order_reverse_the_total_once(deliver, rt) -> None:
    buy_boost(deliver)
    second = se.event(
        "charge.refunded",
        se.charge(amount_refunded=1000, payment_intent="pi_1", refunds=[("re_1", 300), ("re_2", 700)]),
    )
    first = se.event("charge.refunded", se.charge(amount_refunded=300, payment_intent="pi_1", refunds=[("re_1", 300)]))
    deliver(second)
    deliver(first)
    deliver(second)
    assert balance_of(rt, "acct_1") == 0
    assert [(amount, key) for amount, key, _ in reversal_entries(rt)] == [(-1000, "reverse:re_2")]


def test_a_refund_without_a_refund_list_is_keyed_by_charge_and_amount(deliver, rt) -> None:
    buy_boost(deliver)
    refunded = se.charge(amount_refunded=500, payment_intent="pi_1")
    refunded.pop("refunds")  # newer API versions do not include a charge's refunds
    deliver(se.event("charge.refunded", refunded))
    assert [(amount, key) for amount, key, _ in reversal_entries(rt)] == [(-500, "reverse:ch_1:500")]


def test_an_invoice_refund_is_found_through_charge_invoice(deliver, rt) -> None:
    inv = se.invoice(
        "2020",
        invoice_id="in_1",
        customer="cus_1",
        price="price_starter_monthly",
        amount_paid=2000,
        subscription_metadata={"account_id": "acct_1"},
        charge="ch_9",
    )
    deliver(se.event("invoice.paid", inv, era="2020"))
    deliver(
        se.event("charge.refunded", se.charge(charge_id="ch_other", amount=2000, amount_refunded=1000, invoice="in_1"))
    )
    assert balance_of(rt, "acct_1") == 1000


def test_a_2025_invoice_refund_is_found_through_the_invoice_payments_at_stripe(deliver, rt, stripe_api) -> None:
    inv = se.invoice(
        "2025",
        invoice_id="in_1",
        customer="cus_1",
        price="price_starter_monthly",
        amount_paid=2000,
        subscription_metadata={"account_id": "acct_1"},
    )
    deliver(se.event("invoice.paid", inv))
    stripe_api.get("/v1/invoice_payments").respond(
        json={
            "object": "list",
            "has_more": False,
            "data": [{"id": "inpay_1", "object": "invoice_payment", "invoice": "in_1"}],
        }
    )
    deliver(
        se.event(
            "charge.refunded", se.charge(charge_id="ch_7", amount=2000, amount_refunded=2000, payment_intent="pi_7")
        )
    )
    assert balance_of(rt, "acct_1") == 0
    assert stripe_api.calls.last.request.url.params["payment[payment_intent]"] == "pi_7"


def test_a_refund_two_days_before_its_payment_is_still_being_retried_and_lands_once_the_payment_does(
    deliver, rt, stripe_api
) -> None:
    """With the default schedule the refund is retried at each backoff for two days without dying; the pack's
    payment then arrives, and the next retry reverses it."""
    stripe_api.get("/v1/invoice_payments").respond(json={"object": "list", "has_more": False, "data": []})
    refund = se.charge(amount_refunded=1000, payment_intent="pi_1", invoice=None, refunds=[("re_1", 1000)])
    deliver(se.event("charge.refunded", refund, event_id="evt_refund"))
    first = utcnow()
    while (due := event_row(rt).next_attempt_at) < first + timedelta(days=2):
        assert dispatch.process(rt, "evt_refund", now=due) == "failed"
    assert "PaymentNotFound: no recorded payment for charge ch_1" in (event_row(rt).last_error or "")
    buy_boost(deliver)
    assert dispatch.process(rt, "evt_refund", now=event_row(rt).next_attempt_at) == "processed"
    assert state(rt, "acct_1") == (
        [("grant", 1000, "purchase:pi_1"), ("reverse", -1000, "reverse:re_1")],
        [("pack", 1000, 0, 0, 0, 1000)],
    )


def event_row(rt) -> StripeEvent:
    with rt.uow() as uow:
        return uow.session.get_one(StripeEvent, "evt_refund")


def test_a_lost_dispute_reverses_the_disputed_share(deliver, rt) -> None:
    buy_boost(deliver)
    deliver(se.event("charge.dispute.closed", se.dispute(charge="ch_1", amount=1000, status="lost")))
    assert state(rt, "acct_1")[0][-1] == ("reverse", -1000, "reverse:dp_1")


def test_a_won_dispute_reverses_nothing(deliver, rt) -> None:
    buy_boost(deliver)
    deliver(se.event("charge.dispute.closed", se.dispute(charge="ch_1", status="won")))
    assert balance_of(rt, "acct_1") == 1000
