"""End to end against localstripe: real HTTP both ways, real signatures, real 2017-08-15 payloads.

The test drives localstripe with the `stripe` library (plan, card, customer, subscription, invoices);
localstripe charges the card and posts its signed events to the running service, which verifies, stores
and handles them; the test then reads the result through the service's HTTP API and its inbox.
Each case runs on SQLite and on PostgreSQL (the `engine` fixture of tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import httpx
import pytest
import stripe

from service.infra.models import Account
from tests.e2e.conftest import CreditsService, LocalStripe, wait_for
from webhooks import inbox

pytestmark = [
    # localstripe 1.15.10 registers sync route handlers (aiohttp 3.14 deprecates them), and stripe's
    # HTTPXClient posts its form body as bytes through `data=`; neither is this project's code.
    pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
]

ACCOUNT = "acct_e2e"
PLAN_CREDITS = 1500  # [plans.pro] in tests/e2e/conftest.py's catalogue
VISA = "4242424242424242"
VISA_CHARGE_DECLINED = "4000000000000341"  # attaches fine, every charge is declined


def subscribe(api: stripe.StripeClient, card: str = VISA) -> tuple[str, str, str]:
    """A `pro_monthly` plan ($20/month), a customer of ACCOUNT paying with `card`, and a subscription.

    Returns (customer id, subscription id, first invoice id)."""
    api.v1.plans.create(
        {"id": "pro_monthly", "amount": 2000, "currency": "usd", "interval": "month", "product": {"name": "Pro"}}
    )
    pm = api.v1.payment_methods.create(
        {"type": "card", "card": {"number": card, "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    customer = api.v1.customers.create(
        {
            "email": "owner@e2e.example",
            "metadata": {"account_id": ACCOUNT},
            "payment_method": pm.id,
            "invoice_settings": {"default_payment_method": pm.id},
        }
    )
    # 2017 API: the item names a plan, not a price.
    sub = api.v1.subscriptions.create({"customer": customer.id, "items": [{"plan": "pro_monthly"}]})
    assert isinstance(sub.latest_invoice, str)
    return customer.id, sub.id, sub.latest_invoice


def renew(api: stripe.StripeClient, customer: str, subscription: str) -> str:
    """Bill the subscription again (localstripe has no clock: create the next invoice and pay it)."""
    invoice = api.v1.invoices.create({"customer": customer, "subscription": subscription})
    assert invoice.id is not None
    paid = api.v1.invoices.pay(invoice.id)
    assert paid.status == "paid"
    return invoice.id


def balance(service: CreditsService, account: str = ACCOUNT) -> dict[str, Any] | None:
    response = service.http.get(f"/v1/accounts/{account}/balance")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


def balance_reaches(service: CreditsService, credits: int) -> dict[str, Any]:
    return wait_for(
        f"{ACCOUNT}'s balance to reach {credits}",
        lambda: (view := balance(service)) is not None and view["balance"] == credits and view,
    )


def ledger(service: CreditsService, account: str = ACCOUNT) -> list[dict[str, Any]]:
    response = service.http.get(f"/v1/accounts/{account}/ledger", params={"limit": 500})
    response.raise_for_status()
    return response.json()["entries"]


def stored_events(service: CreditsService) -> dict[str, dict[str, Any]]:
    with service.rt.uow() as uow:
        return {
            e.id: {"type": e.type, "status": e.status, "outcome": e.outcome, "error": e.last_error}
            for e in inbox.listing(uow, None, 500)
        }


def settled(
    localstripe: LocalStripe, service: CreditsService, types: set[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Every event localstripe created (of `types`, when the webhook was registered for those only) has been
    delivered, stored and handled; returns the inbox."""
    localstripe.drain()
    emitted = {i: t for i, t in localstripe.event_ids().items() if types is None or t in types}

    def probe() -> dict[str, dict[str, Any]] | None:
        events = stored_events(service)
        if set(emitted) - set(events) or any(e["status"] == "pending" for e in events.values()):
            return None
        return events

    events = wait_for("every localstripe event to be stored and handled", probe)
    assert {i: e["type"] for i, e in events.items()} == emitted, "the inbox holds exactly what localstripe sent"
    return events


def assert_all_handled(events: dict[str, dict[str, Any]]) -> None:
    unhandled = {i: e for i, e in events.items() if e["status"] not in ("processed", "ignored")}
    assert not unhandled, f"events not processed or ignored: {unhandled}"


def statuses_by_type(events: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for e in events.values():
        seen.setdefault(e["type"], set()).add(e["status"])
    return seen


def test_subscription_signup_grants_the_plan_credits_once(
    localstripe_server: LocalStripe, credits_service: CreditsService
) -> None:
    customer, subscription, invoice = subscribe(localstripe_server.api)

    view: dict[str, Any] | None = balance_reaches(credits_service, PLAN_CREDITS)
    events = settled(localstripe_server, credits_service)

    assert_all_handled(events)
    assert statuses_by_type(events) == {
        "plan.created": {"ignored"},
        "product.created": {"ignored"},
        "customer.created": {"processed"},
        "invoice.created": {"ignored"},
        "payment_intent.succeeded": {"processed"},  # no metadata.pack: not a pack purchase
        "invoice.payment_succeeded": {"processed"},
        "customer.subscription.created": {"processed"},
    }
    paid = next(e for e in events.values() if e["type"] == "invoice.payment_succeeded")
    assert paid["outcome"] == f"granted {PLAN_CREDITS} credits (pro)"

    # Everything settled: the balance did not move past the first grant (no double credit).
    view = balance(credits_service)
    assert view is not None
    assert view["account_id"] == ACCOUNT
    assert view["balance"] == PLAN_CREDITS
    assert [(g["source"], g["amount"], g["remaining"]) for g in view["grants"]] == [
        ("plan", PLAN_CREDITS, PLAN_CREDITS)
    ]
    # The Stripe customer id names the same account.
    assert balance(credits_service, customer) == view

    entries = ledger(credits_service)
    assert [(e["kind"], e["amount"], e["idempotency_key"]) for e in entries] == [
        ("grant", PLAN_CREDITS, f"invoice:{invoice}")
    ]
    assert entries[0]["metadata"]["plan"] == "pro"

    with credits_service.rt.uow() as uow:
        account = uow.session.query(Account).filter_by(public_id=ACCOUNT).one()
        assert (account.stripe_customer_id, account.plan, account.status, account.subscription_id) == (
            customer,
            "pro",
            "active",
            subscription,
        )


def test_every_invoice_of_a_subscription_grants_once_and_one_period_is_never_cut(
    localstripe_server: LocalStripe, credits_service: CreditsService
) -> None:
    """localstripe has no clock: each invoice it makes for a subscription bills the subscription's first
    period again. Each grants the plan once; none starts a later period, so the rollover policy — which cuts
    only credits earned before a renewal's period starts — cuts nothing (tests/test_refills.py renews across
    real periods)."""
    api = localstripe_server.api
    customer, subscription, first = subscribe(api)
    balance_reaches(credits_service, PLAN_CREDITS)
    second = renew(api, customer, subscription)
    third = renew(api, customer, subscription)
    events = settled(localstripe_server, credits_service)
    assert_all_handled(events)

    view = balance(credits_service)
    assert view is not None and view["balance"] == 3 * PLAN_CREDITS
    entries = ledger(credits_service)
    assert {e["idempotency_key"]: e["amount"] for e in entries} == {
        f"invoice:{first}": PLAN_CREDITS,
        f"invoice:{second}": PLAN_CREDITS,
        f"invoice:{third}": PLAN_CREDITS,
    }
    paid = sorted(e["outcome"] for e in events.values() if e["type"] == "invoice.payment_succeeded")
    assert paid == [f"granted {PLAN_CREDITS} credits (pro)"] * 3


def test_a_declined_card_grants_nothing(localstripe_server: LocalStripe, credits_service: CreditsService) -> None:
    subscribe(localstripe_server.api, card=VISA_CHARGE_DECLINED)

    # customer.created links the account; nothing pays, so it exists with no credits.
    wait_for("the account to be linked", lambda: balance(credits_service) is not None)
    events = settled(localstripe_server, credits_service)

    assert_all_handled(events)
    # localstripe's Invoice._api_pay_invoice swallows the decline (on_failure_now is a no-op): the invoice
    # stays open, the subscription incomplete, and no invoice.payment_* event is sent at all.
    assert statuses_by_type(events) == {
        "plan.created": {"ignored"},
        "product.created": {"ignored"},
        "customer.created": {"processed"},
        "invoice.created": {"ignored"},
        "customer.subscription.created": {"processed"},
    }
    assert balance(credits_service) == {"account_id": ACCOUNT, "balance": 0, "grants": []}
    assert ledger(credits_service) == []
    with credits_service.rt.uow() as uow:
        account = uow.session.query(Account).filter_by(public_id=ACCOUNT).one()
        assert account.status == "incomplete"


def test_an_invoice_for_a_customer_never_seen_is_resolved_through_the_stripe_api(
    localstripe_server: LocalStripe, credits_service: CreditsService
) -> None:
    """Deliver only invoice.payment_succeeded: the service has never heard of the customer, so it retrieves
    it from Stripe (here localstripe, through the service's StripeGateway) for metadata.account_id."""
    only = {"invoice.payment_succeeded"}
    localstripe_server.register_webhook(
        credits_service.webhook_name,
        f"{credits_service.url}/webhooks/stripe",
        credits_service.webhook_secret,
        sorted(only),
    )
    customer, _, invoice = subscribe(localstripe_server.api)

    balance_reaches(credits_service, PLAN_CREDITS)
    events = settled(localstripe_server, credits_service, only)

    assert [(e["type"], e["status"]) for e in events.values()] == [("invoice.payment_succeeded", "processed")]
    assert [e["idempotency_key"] for e in ledger(credits_service)] == [f"invoice:{invoice}"]
    assert balance(credits_service, customer) == balance(credits_service, ACCOUNT)


def test_a_forged_delivery_is_refused(localstripe_server: LocalStripe, credits_service: CreditsService) -> None:
    """The endpoint localstripe delivers to checks the signature: the same body signed with another
    secret is a 400 and stores nothing."""
    body = b'{"id": "evt_forged", "type": "invoice.payment_succeeded", "data": {"object": {}}}'
    at = int(time.time())
    digest = hmac.new(b"whsec_not_the_registered_one", f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    header = f"t={at},v1={digest}"
    response = httpx.post(f"{credits_service.url}/webhooks/stripe", content=body, headers={"Stripe-Signature": header})
    assert response.status_code == 400
    assert stored_events(credits_service) == {}


def test_a_canceled_subscription_keeps_the_credits_and_clears_the_plan(
    localstripe_server: LocalStripe, credits_service: CreditsService
) -> None:
    api = localstripe_server.api
    _, subscription, invoice = subscribe(api)
    balance_reaches(credits_service, PLAN_CREDITS)
    # Let customer.subscription.created be handled first: both events may carry the same `created` second,
    # and a tie is applied in arrival order.
    settled(localstripe_server, credits_service)

    canceled = api.v1.subscriptions.cancel(subscription)
    assert canceled.status == "canceled"

    def account_state() -> tuple[str | None, str] | None:
        with credits_service.rt.uow() as uow:
            account = uow.session.query(Account).filter_by(public_id=ACCOUNT).one()
            return (account.plan, account.status) if account.status == "canceled" else None

    assert wait_for("the cancellation to reach the account", account_state) == (None, "canceled")
    events = settled(localstripe_server, credits_service)
    assert_all_handled(events)
    assert statuses_by_type(events)["customer.subscription.deleted"] == {"processed"}
    view = balance(credits_service)
    assert view is not None and view["balance"] == PLAN_CREDITS
    assert [e["idempotency_key"] for e in ledger(credits_service)] == [f"invoice:{invoice}"]
