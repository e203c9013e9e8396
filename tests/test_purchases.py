"""One-time packs: Checkout and payment_intent.succeeded describe the same money; it is granted once."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial

import pytest

from service.infra.models import Payment, StripeEvent, utcnow
from tests import stripe_events as se
from tests.helpers import balance_of, state

paid_session = partial(se.checkout_session, customer="cus_1", client_reference_id="acct_1")


def test_a_paid_checkout_with_metadata_pack_grants_the_pack_with_its_expiry(deliver, client, rt) -> None:
    deliver(se.event("checkout.session.completed", paid_session(metadata={"pack": "boost"})))
    assert state(rt, "acct_1") == ([("grant", 1000, "purchase:pi_1")], [("pack", 1000, 1000, 0, 0, 0)])
    expires = client.get("/v1/accounts/acct_1/balance").json()["grants"][0]["expires_at"]
    assert abs(datetime.fromisoformat(expires) - (utcnow() + timedelta(days=365))) < timedelta(minutes=1)


def test_without_metadata_pack_the_line_items_price_names_the_pack(deliver, rt, stripe_api) -> None:
    stripe_api.get("/v1/checkout/sessions/cs_test_1/line_items").respond(
        json={
            "object": "list",
            "has_more": False,
            "data": [{"id": "li_1", "object": "item", "price": {"id": "price_forever_500", "object": "price"}}],
        }
    )
    deliver(se.event("checkout.session.completed", paid_session()))
    assert state(rt, "acct_1")[1] == [("pack", 500, 500, 0, 0, 0)]


def test_an_unpaid_completed_checkout_grants_nothing_until_the_async_payment_succeeds(deliver, rt) -> None:
    deliver(se.event("checkout.session.completed", paid_session(payment_status="unpaid", metadata={"pack": "boost"})))
    assert balance_of(rt, "acct_1") == 0
    deliver(se.event("checkout.session.async_payment_succeeded", paid_session(metadata={"pack": "boost"})))
    assert balance_of(rt, "acct_1") == 1000


@pytest.mark.parametrize("first", ["checkout", "payment_intent"])
def test_checkout_and_payment_intent_for_one_purchase_grant_once_in_either_order(deliver, rt, first: str) -> None:
    checkout = se.event("checkout.session.completed", paid_session(metadata={"pack": "boost"}))
    intent = se.event(
        "payment_intent.succeeded", se.payment_intent(customer=None, metadata={"pack": "boost", "account_id": "acct_1"})
    )
    for evt in (checkout, intent) if first == "checkout" else (intent, checkout):
        deliver(evt)
    assert state(rt, "acct_1")[0] == [("grant", 1000, "purchase:pi_1")]


@pytest.mark.parametrize("era", ["2017", "2025"])
def test_a_payment_intent_with_metadata_pack_grants_it_in_both_eras(deliver, rt, stripe_api, era: str) -> None:
    stripe_api.get("/v1/customers/cus_1").respond(json=se.customer("cus_1", metadata={"account_id": "acct_1"}))
    deliver(se.event("payment_intent.succeeded", se.payment_intent(era, metadata={"pack": "forever"}), era=era))
    assert state(rt, "acct_1")[1] == [("pack", 500, 500, 0, 0, 0)]


def test_a_payment_intent_without_a_pack_is_not_a_purchase(deliver, rt) -> None:
    deliver(se.event("payment_intent.succeeded", se.payment_intent(), event_id="evt_pi"))
    with rt.uow() as uow:
        assert uow.session.get_one(StripeEvent, "evt_pi").outcome == "not a pack purchase (no metadata.pack)"


def test_an_unknown_pack_is_recorded_not_granted(deliver, rt) -> None:
    deliver(se.event("checkout.session.completed", paid_session(metadata={"pack": "mystery"})))
    with rt.uow() as uow:
        assert (uow.session.get_one(Payment, "pi_1").outcome, uow.session.get_one(Payment, "pi_1").credits) == (
            "unknown_pack",
            0,
        )
    assert balance_of(rt, "acct_1") == 0
