"""Which account a Stripe event credits: carried account ids, the customer link, a look-up at Stripe for an
unlinked customer, the customer id as a last resort, and re-keying when the real account id turns up."""

from __future__ import annotations

from typing import Any, TypedDict, Unpack

from service.infra.models import StripeEvent
from tests import stripe_events as se
from tests.helpers import balance_of, state


class InvoiceOptions(TypedDict, total=False):
    billing_reason: str | None
    subscription_metadata: dict[str, str] | None


def invoice_for(customer: str, invoice_id: str = "in_1", **kwargs: Unpack[InvoiceOptions]) -> dict[str, Any]:
    return se.invoice(
        "2025", invoice_id=invoice_id, customer=customer, price="price_starter_monthly", amount_paid=2000, **kwargs
    )


def test_an_unlinked_customer_is_looked_up_at_stripe_for_its_account_id(deliver, rt, stripe_api) -> None:
    route = stripe_api.get("/v1/customers/cus_1").respond(json=se.customer("cus_1", metadata={"account_id": "acct_1"}))
    deliver(se.event("invoice.paid", invoice_for("cus_1")))
    deliver(se.event("invoice.paid", invoice_for("cus_1", invoice_id="in_2", billing_reason="subscription_cycle")))
    assert balance_of(rt, "acct_1") == 4000
    assert balance_of(rt, "cus_1") == 4000  # the customer id names the same account
    assert route.call_count == 1  # once linked, Stripe is not asked again


def test_a_customer_without_an_account_id_is_its_own_account(deliver, rt, stripe_api) -> None:
    stripe_api.get("/v1/customers/cus_1").respond(json=se.customer("cus_1"))
    deliver(se.event("invoice.paid", invoice_for("cus_1")))
    assert state(rt, "cus_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_customer_created_links_the_account_without_asking_stripe(deliver, rt, stripe_api) -> None:
    deliver(se.event("customer.created", se.customer("cus_1", metadata={"account_id": "acct_1"})))
    deliver(se.event("invoice.paid", invoice_for("cus_1")))
    assert balance_of(rt, "acct_1") == 2000
    assert stripe_api.calls.call_count == 0


def test_an_invoice_before_its_checkout_session_is_rekeyed_ledger_and_all(deliver, client, rt, stripe_api) -> None:
    """invoice.paid can arrive before checkout.session.completed; the account is keyed by the customer
    until Checkout's client_reference_id names it."""
    stripe_api.get("/v1/customers/cus_1").respond(json=se.customer("cus_1"))
    deliver(se.event("invoice.paid", invoice_for("cus_1")))
    assert balance_of(rt, "cus_1") == 2000
    session = se.checkout_session(
        customer="cus_1", client_reference_id="acct_1", mode="subscription", payment_intent=None, subscription="sub_1"
    )
    deliver(se.event("checkout.session.completed", session))
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]
    assert client.get("/v1/accounts/cus_1/balance").json()["account_id"] == "acct_1"


def test_an_account_created_first_by_the_api_takes_over_an_empty_customer_account(
    deliver, client, admin_headers, rt, stripe_api
) -> None:
    client.post(
        "/v1/accounts/acct_1/grants",
        json={"amount": 5, "reason": "welcome"},
        headers={**admin_headers, "Idempotency-Key": "w"},
    )
    stripe_api.get("/v1/customers/cus_1").respond(json=se.customer("cus_1"))
    deliver(se.event("customer.subscription.created", se.subscription(customer="cus_1")))
    deliver(
        se.event(
            "checkout.session.completed",
            se.checkout_session(
                customer="cus_1", client_reference_id="acct_1", mode="subscription", payment_intent=None
            ),
        )
    )
    deliver(se.event("invoice.paid", invoice_for("cus_1")))
    assert balance_of(rt, "acct_1") == 2005


def test_a_customer_claimed_by_two_accounts_fails_visibly_instead_of_guessing(deliver, rt) -> None:
    deliver(se.event("customer.created", se.customer("cus_1", metadata={"account_id": "acct_1"})))
    deliver(
        se.event(
            "invoice.paid",
            invoice_for("cus_1", subscription_metadata={"account_id": "acct_2"}),
            event_id="evt_conflict",
        )
    )
    with rt.uow() as uow:
        event = uow.session.get_one(StripeEvent, "evt_conflict")
        assert event.status == "failed"
        assert "AccountConflict" in (event.last_error or "")


def test_a_customer_at_stripe_whose_account_id_cannot_be_an_account_fails_clearly_and_is_retried(
    deliver, rt, stripe_api
) -> None:
    stripe_api.get("/v1/customers/cus_1").respond(json=se.customer("cus_1", metadata={"account_id": "a" * 300}))
    deliver(se.event("invoice.paid", invoice_for("cus_1"), event_id="evt_1"))
    with rt.uow() as uow:
        row = uow.session.get_one(StripeEvent, "evt_1")
        assert row.status == "failed"
        assert "UnreadableCustomer: customer cus_1 at Stripe: metadata: Value error, account_id is longer" in (
            row.last_error or ""
        )
