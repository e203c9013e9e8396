"""Referral payouts to both parties — the feature this service exists for."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from jobs import refill_free, worker
from service.domain import accounts, audit, ledger, referrals, rollover
from service.infra.catalogue import Referrals
from service.infra.models import utcnow
from tests import stripe_events as se
from tests.helpers import balance_of, committed, state

NOW = utcnow().replace(microsecond=0)
THIS_MONTH = (NOW - timedelta(days=1), NOW + timedelta(days=29))


def post(client, path: str, body: dict | None = None, key: str | None = None):
    return client.post(
        path, json=body or {}, headers={"Idempotency-Key": key or f"{path}:{sorted((body or {}).items())}"}
    )


def code_of(client, account: str) -> str:
    return post(client, f"/v1/accounts/{account}/referral-code").json()["code"]


def refer(client, code: str, referee: str, email: str | None = None, key: str | None = None):
    body = {"code": code, "referee_account_id": referee, **({"email": email} if email else {})}
    return post(client, "/v1/referrals", body, key)


def paid_invoice(
    referee: str,
    invoice_id: str = "in_349",
    amount: int = 34900,
    era: str = "2025",
    *,
    reason: str = "subscription_create",
    period=THIS_MONTH,
    sub_metadata: dict | None = None,
) -> dict:
    return se.invoice(
        era,
        invoice_id=invoice_id,
        customer=f"cus_{referee}",
        price="price_starter_monthly",
        amount_paid=amount,
        billing_reason=reason,
        period=period,
        subscription_metadata={"account_id": referee, **(sub_metadata or {})},
    )


def referral_rows(rt, account: str):
    """(kind, amount, key) of the referral-related entries only."""
    return [e for e in state(rt, account)[0] if "referral" in e[2] or "clawback" in e[2]]


def test_codes_are_stable_short_unambiguous_and_case_insensitive(client) -> None:
    first = post(client, "/v1/accounts/acct_ana/referral-code", key="k1").json()
    again = post(client, "/v1/accounts/acct_ana/referral-code", key="k2").json()
    assert first == again
    assert re.fullmatch(r"[A-HJ-NP-Z2-9]{8}", first["code"])
    assert first["link"] == f"https://example.com/r/{first['code']}"
    assert refer(client, first["code"].lower(), "acct_bob").status_code == 201


def test_the_349_dollar_story_pays_both_sides_once_whatever_arrives(client, deliver, rt) -> None:
    """A referrer sends the link; the client buys a $349 plan; both get 3,000 credits, once — whichever of
    invoice.paid / invoice.payment_succeeded / redeliveries arrive, in any order."""
    code = code_of(client, "acct_ana")
    assert refer(client, code, "acct_bob", "bob@client.example").status_code == 201
    paid = se.event("invoice.paid", paid_invoice("acct_bob"), event_id="evt_paid")
    succeeded = se.event("invoice.payment_succeeded", paid_invoice("acct_bob"), event_id="evt_succeeded")
    for evt in (succeeded, paid, succeeded, paid):
        assert deliver(evt).status_code == 200
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:1:referee")]
    view = client.get("/v1/accounts/acct_ana/referrals").json()
    assert view["credits_earned"] == 3000
    assert [(r["referee_account_id"], r["status"], r["credits_earned"]) for r in view["referrals"]] == [
        ("acct_bob", "paid", 3000)
    ]
    assert view["referrals"][0]["paid_at"] is not None


def test_an_invoice_before_its_attribution_still_pays_both_when_the_attribution_arrives(client, deliver, rt) -> None:
    code = code_of(client, "acct_ana")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    assert referral_rows(rt, "acct_bob") == []
    refer(client, code, "acct_bob")
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]
    assert balance_of(rt, "acct_ana") == 3000


def test_a_trial_invoice_does_not_qualify_the_first_paid_one_does_and_renewals_never_pay_again(
    client, deliver, rt
) -> None:
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", "in_trial", amount=0)))
    assert balance_of(rt, "acct_ana") == 0
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", "in_first", reason="subscription_cycle")))
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", "in_renewal", reason="subscription_cycle")))
    assert referral_rows(rt, "acct_ana") == [("grant", 3000, "referral:1:referrer")]
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]


@pytest.mark.parametrize("era", ["2020", "2025"])
def test_subscription_metadata_on_the_invoice_attributes_in_both_shapes(client, deliver, rt, era: str) -> None:
    code = code_of(client, "acct_ana")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", era=era, sub_metadata={"referral_code": code}), era=era))
    assert balance_of(rt, "acct_ana") == 3000
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]


def test_checkout_session_metadata_attributes(client, deliver, rt) -> None:
    code = code_of(client, "acct_ana")
    session = se.checkout_session(
        customer="cus_acct_bob",
        client_reference_id="acct_bob",
        mode="subscription",
        payment_intent=None,
        metadata={"referral_code": code},
    )
    deliver(se.event("checkout.session.completed", session))
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    assert balance_of(rt, "acct_ana") == 3000


def test_subscription_event_metadata_attributes(client, deliver, rt) -> None:
    code = code_of(client, "acct_ana")
    sub = se.subscription(
        "2017",
        customer="cus_acct_bob",
        price="plan_starter",
        metadata={"account_id": "acct_bob", "referral_code": code},
    )
    deliver(se.event("customer.subscription.created", sub, era="2017"))
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    assert balance_of(rt, "acct_ana") == 3000


def test_customer_metadata_attributes_from_a_customer_event(client, deliver, rt) -> None:
    code = code_of(client, "acct_ana")
    deliver(
        se.event(
            "customer.created", se.customer("cus_acct_bob", metadata={"account_id": "acct_bob", "referral_code": code})
        )
    )
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    assert balance_of(rt, "acct_ana") == 3000


def test_customer_metadata_attributes_from_the_customer_looked_up_at_stripe(client, deliver, rt, stripe_api) -> None:
    code = code_of(client, "acct_ana")
    stripe_api.get("/v1/customers/cus_new").respond(
        json=se.customer("cus_new", metadata={"account_id": "acct_bob", "referral_code": code})
    )
    inv = se.invoice(
        "2017", invoice_id="in_1", customer="cus_new", price="plan_starter", amount_paid=34900, period=THIS_MONTH
    )
    deliver(se.event("invoice.payment_succeeded", inv, era="2017"))
    assert balance_of(rt, "acct_ana") == 3000
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]


def test_the_first_attribution_wins_and_is_locked(client) -> None:
    ana, cy = code_of(client, "acct_ana"), code_of(client, "acct_cy")
    assert refer(client, ana, "acct_bob").status_code == 201
    assert refer(client, ana, "acct_bob", key="again").status_code == 200  # the same attribution, a new request
    conflict = refer(client, cy, "acct_bob")
    assert (conflict.status_code, conflict.json()["error"]) == (409, "already_attributed")


def test_an_unknown_code_is_404(client) -> None:
    response = refer(client, "NOPE2345", "acct_bob")
    assert (response.status_code, response.json()["error"]) == (404, "unknown_code")


@pytest.mark.parametrize(
    ("referee", "email", "reason"),
    [
        ("acct_ana", None, "self-referral: same account"),
        ("cus_ana", None, "self-referral: same account"),  # the same Stripe customer names the same account
        ("acct_alias", "Ana.Smith+promo@GoogleMail.com", "self-referral: same email"),
    ],
)
def test_self_referral_is_rejected_with_a_reason(
    client, admin_headers, rt, referee: str, email: str | None, reason: str
) -> None:
    code = code_of(client, "acct_ana")
    with committed(rt) as uow:
        ana = accounts.get(uow, "acct_ana")
        ana.stripe_customer_id, ana.email = "cus_ana", "anasmith@gmail.com"
    response = refer(client, code, referee, email)
    assert (response.status_code, response.json()["status"], response.json()["reason"]) == (422, "rejected", reason)
    view = client.get("/v1/accounts/acct_ana/referrals").json()["referrals"]
    assert [(r["status"], r["reason"]) for r in view] == [("rejected", reason)]


def test_a_rejected_self_referral_does_not_lock_the_referee(client) -> None:
    refer(client, code_of(client, "acct_bob"), "acct_bob")
    assert refer(client, code_of(client, "acct_ana"), "acct_bob").status_code == 201


def test_a_referrer_over_the_monthly_cap_is_held_while_the_referee_is_paid(client, deliver, rt) -> None:
    code = code_of(client, "acct_ana")  # the test catalogue caps at 3 rewards a month
    for n in range(4):
        refer(client, code, f"acct_r{n}")
        deliver(se.event("invoice.paid", paid_invoice(f"acct_r{n}", f"in_{n}")))
    assert balance_of(rt, "acct_ana") == 9000
    assert referral_rows(rt, "acct_r3") == [("grant", 3000, "referral:4:referee")]
    view = client.get("/v1/accounts/acct_ana/referrals").json()["referrals"]
    assert [r["status"] for r in view] == ["paid", "paid", "paid", "held"]
    assert view[3]["reason"] == "referrer reached 3 rewards this month"


def test_signup_mode_pays_the_referrer_at_attribution(client, rt) -> None:
    signup_terms = Referrals(qualify_on="signup", referrer_credits=20, referee_credits=0)
    object.__setattr__(rt, "catalogue", rt.catalogue.model_copy(update={"referrals": signup_terms}))
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    assert state(rt, "acct_ana")[0] == [("grant", 20, "referral:1:referrer")]
    assert state(rt, "acct_bob")[0] == []
    assert client.get("/v1/accounts/acct_ana/referrals").json()["referrals"][0]["status"] == "paid"


def test_a_refund_inside_the_window_claws_back_both_payouts(client, deliver, rt) -> None:
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    assert post(client, "/v1/accounts/acct_ana/spend", {"amount": 1000}).status_code == 200
    deliver(
        se.event("charge.refunded", se.charge(charge_id="ch_9", amount=34900, amount_refunded=34900, invoice="in_349"))
    )
    assert referral_rows(rt, "acct_ana") == [
        ("grant", 3000, "referral:1:referrer"),
        ("reverse", -2000, "clawback:1:referrer"),
    ]
    assert referral_rows(rt, "acct_bob") == [
        ("grant", 3000, "referral:1:referee"),
        ("reverse", -3000, "clawback:1:referee"),
    ]
    view = client.get("/v1/accounts/acct_ana/referrals").json()["referrals"][0]
    # the 1,000 already spent could not be taken back: it stays earned, and the shortfall says so
    assert (view["status"], view["reason"], view["credits_earned"]) == (
        "reversed",
        "in_349 refunded; shortfall 1000",
        1000,
    )


def test_a_refund_after_the_window_keeps_the_payouts(client, deliver, rt) -> None:
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    long_ago = (NOW - timedelta(days=45), NOW - timedelta(days=15))
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", period=long_ago)))
    refunded = se.charge(charge_id="ch_9", amount=34900, amount_refunded=34900, invoice="in_349")
    deliver(se.event("charge.refunded", refunded, created=NOW))  # no refunds listed: the event's time counts
    assert balance_of(rt, "acct_ana") == 3000
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]


def paid_45_days_ago_then_refunded(client, deliver, *, refunded_days_ago: int) -> None:
    """acct_ana refers acct_bob, whose qualifying invoice was paid 45 days ago; the refund of all of it,
    made `refunded_days_ago`, is processed now."""
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    long_ago = (NOW - timedelta(days=45), NOW - timedelta(days=15))
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", period=long_ago)))
    refunded = se.charge(
        charge_id="ch_9", amount=34900, amount_refunded=34900, invoice="in_349", refunds=[("re_1", 34900)]
    )
    refunded["refunds"]["data"][0]["created"] = int((NOW - timedelta(days=refunded_days_ago)).timestamp())
    deliver(se.event("charge.refunded", refunded))


def test_the_clawback_window_counts_from_the_refunds_own_time_not_from_its_processing(client, deliver, rt) -> None:
    """Paid 45 days ago and refunded 5 days after, the refund processed only now (a retried event): inside
    the 30-day window by the refund's `created`, so both payouts are clawed back."""
    paid_45_days_ago_then_refunded(client, deliver, refunded_days_ago=40)
    assert referral_rows(rt, "acct_ana") == [
        ("grant", 3000, "referral:1:referrer"),
        ("reverse", -3000, "clawback:1:referrer"),
    ]
    assert referral_rows(rt, "acct_bob") == [
        ("grant", 3000, "referral:1:referee"),
        ("reverse", -3000, "clawback:1:referee"),
    ]


def test_a_refund_made_after_the_window_keeps_the_payouts_whenever_it_is_processed(client, deliver, rt) -> None:
    paid_45_days_ago_then_refunded(client, deliver, refunded_days_ago=10)
    assert referral_rows(rt, "acct_ana") == [("grant", 3000, "referral:1:referrer")]


def test_a_partial_refund_that_still_qualifies_keeps_the_payouts(client, deliver, rt) -> None:
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    deliver(
        se.event("charge.refunded", se.charge(charge_id="ch_9", amount=34900, amount_refunded=1000, invoice="in_349"))
    )
    assert balance_of(rt, "acct_ana") == 3000


def test_a_partial_refund_after_a_clawback_still_reverses_its_own_share(client, deliver, rt) -> None:
    """The clawback names the refunded payment too, but it is not an earlier refund of it: the second refund
    reverses its share of the invoice's credits in full."""
    terms = rt.catalogue.referrals.model_copy(update={"min_amount": 20000})
    object.__setattr__(rt, "catalogue", rt.catalogue.model_copy(update={"referrals": terms}))
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    half = [("re_1", 17450)]  # 17,450 of 34,900 paid is left: under min_amount, so the referral is clawed back
    deliver(
        se.event(
            "charge.refunded",
            se.charge(charge_id="ch_9", amount=34900, amount_refunded=17450, invoice="in_349", refunds=half),
        )
    )
    three_quarters = [*half, ("re_2", 8725)]
    deliver(
        se.event(
            "charge.refunded",
            se.charge(charge_id="ch_9", amount=34900, amount_refunded=26175, invoice="in_349", refunds=three_quarters),
        )
    )
    assert state(rt, "acct_bob")[0] == [
        ("grant", 2000, "invoice:in_349"),
        ("grant", 3000, "referral:1:referee"),
        ("reverse", -1000, "reverse:re_1"),
        ("reverse", -3000, "clawback:1:referee"),
        ("reverse", -500, "reverse:re_2"),
    ]
    assert balance_of(rt, "acct_bob") == 500


def a_referral_paid_on_one_side(
    client, deliver, monkeypatch, referrer: str = "acct_ana", referee: str = "acct_bob"
) -> None:
    """The referee's first invoice qualifies the referrer's referral of them, and the referrer's grant fails."""
    real_grant = ledger.grant

    def flaky(session, account, amount, **kwargs):
        if kwargs["key"].endswith(":referrer"):
            raise RuntimeError("referrer's grant failed")
        return real_grant(session, account, amount, **kwargs)

    refer(client, code_of(client, referrer), referee)
    with monkeypatch.context() as patched:
        patched.setattr(ledger, "grant", flaky)
        deliver(se.event("invoice.paid", paid_invoice(referee, invoice_id=f"in_{referee}")))


def test_one_side_failing_still_lands_the_other_and_is_retried_on_its_own(client, deliver, rt, monkeypatch) -> None:
    a_referral_paid_on_one_side(client, deliver, monkeypatch)
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]
    assert balance_of(rt, "acct_ana") == 0
    assert client.get("/v1/accounts/acct_ana/referrals").json()["referrals"][0]["status"] == "qualified"
    assert worker.drain(rt)["referrals retried"] == 1
    assert referral_rows(rt, "acct_ana") == [("grant", 3000, "referral:1:referrer")]
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]
    assert client.get("/v1/accounts/acct_ana/referrals").json()["referrals"][0]["status"] == "paid"


def test_a_retry_that_fails_waits_for_the_next_drain_and_the_others_are_paid(client, deliver, rt, monkeypatch) -> None:
    a_referral_paid_on_one_side(client, deliver, monkeypatch, "acct_ana", "acct_bob")
    a_referral_paid_on_one_side(client, deliver, monkeypatch, "acct_cat", "acct_dan")
    real_retry = referrals.retry
    lost: list[int] = []

    def deadlocked_once(session, catalogue, referral_id, now=None):
        if not lost:
            lost.append(referral_id)
            raise OperationalError("UPDATE referrals …", {}, psycopg.errors.DeadlockDetected("deadlock detected"))
        return real_retry(session, catalogue, referral_id, now)

    monkeypatch.setattr(referrals, "retry", deadlocked_once)
    assert worker.drain(rt) == {"referral retries failed": 1, "referrals retried": 1}
    assert balance_of(rt, "acct_ana") == 0
    assert referral_rows(rt, "acct_cat") == [("grant", 3000, "referral:2:referrer")]
    assert worker.drain(rt) == {"referrals retried": 1}
    assert referral_rows(rt, "acct_ana") == [("grant", 3000, "referral:1:referrer")]
    assert worker.drain(rt) == {}


def test_a_retry_in_a_real_deadlock_with_a_handler_leaves_the_worker_draining(
    engine, client, deliver, rt, monkeypatch
) -> None:
    """A handler holds the referee and wants the referrer while the retry holds the referrer and wants the
    referee: PostgreSQL aborts the retry, which waited first, and the drain goes on without it."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no row locks: one writer at a time, no deadlock")
    a_referral_paid_on_one_side(client, deliver, monkeypatch)
    with rt.uow() as uow:
        referrer, referee = (accounts.get(uow, ref).id for ref in ("acct_ana", "acct_bob"))
    assert referrer < referee, "the retry locks in ascending id order: the referrer first"
    lock = text("SELECT id FROM accounts WHERE id = :id FOR UPDATE")
    drained: list[object] = []
    with engine.connect() as handler:
        handler.execute(text("SET deadlock_timeout = '2s'"))  # the retry, waiting first, detects the cycle first
        handler.execute(lock, {"id": referee})
        retrying = threading.Thread(target=lambda: drained.append(worker.drain(rt)))
        retrying.start()
        time.sleep(0.5)  # the retry has locked the referrer and waits for the referee
        handler.execute(lock, {"id": referrer})
        handler.rollback()
    retrying.join(10)
    assert drained == [{"referral retries failed": 1}]
    assert worker.drain(rt) == {"referrals retried": 1}
    assert referral_rows(rt, "acct_ana") == [("grant", 3000, "referral:1:referrer")]


def test_a_referrers_first_invoice_keeps_the_referral_credits_it_already_earned(client, deliver, rt) -> None:
    """The rollover policy runs at renewals only: a first invoice has nothing to carry over, so it cuts
    nothing — here the referrer's 3,000 earned before it subscribed to a plan that carries nothing over."""
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    assert balance_of(rt, "acct_ana") == 3000
    first = se.invoice(
        "2025",
        invoice_id="in_ana_1",
        customer="cus_acct_ana",
        price="price_outreach_monthly",
        amount_paid=9900,
        billing_reason="subscription_create",
        period=THIS_MONTH,
        subscription_metadata={"account_id": "acct_ana"},
    )
    deliver(se.event("invoice.paid", first))
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer"), ("grant", 1000, "invoice:in_ana_1")]
    assert balance_of(rt, "acct_ana") == 4000


def test_reading_the_referrals_view_writes_nothing(client, rt) -> None:
    with committed(rt) as uow:
        accounts.get_or_create(uow, "acct_ana")
    view = client.get("/v1/accounts/acct_ana/referrals").json()
    assert (view["code"], view["link"], view["referrals"]) == (None, None, [])
    with rt.uow() as uow:
        assert accounts.get(uow, "acct_ana").referral_code is None
    code = code_of(client, "acct_ana")
    assert client.get("/v1/accounts/acct_ana/referrals").json()["code"] == code


def with_terms(rt, **changes) -> None:
    terms = rt.catalogue.referrals.model_copy(update=changes)
    object.__setattr__(rt, "catalogue", rt.catalogue.model_copy(update={"referrals": terms}))


BEFORE = (NOW - timedelta(days=40), NOW - timedelta(days=10))
RENEWED = (NOW - timedelta(days=10), NOW + timedelta(days=20))


def renewal(account: str, invoice_id: str, period=RENEWED) -> dict:
    return se.event(
        "invoice.paid",
        se.invoice(
            "2025",
            invoice_id=invoice_id,
            customer=f"cus_{account}",
            price="price_starter_monthly",
            amount_paid=34900,
            billing_reason="subscription_cycle",
            period=period,
            subscription_metadata={"account_id": account},
        ),
    )


def test_under_the_rollover_policy_a_referees_bonus_counts_under_the_cap_at_renewal(client, deliver, rt) -> None:
    """The default (`rollover = "policy"`): starter's cap is 2 x 2,000, so the renewal keeps 2,000 of the
    2,000 plan + 3,000 bonus and adds 2,000."""
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", "in_first", period=BEFORE)))
    deliver(renewal("acct_bob", "in_renewal"))
    entries, grants = state(rt, "acct_bob")
    assert entries == [
        ("grant", 2000, "invoice:in_first"),
        ("grant", 3000, "referral:1:referee"),
        ("expire", -2000, "rollover:in_renewal:1"),
        ("expire", -1000, "rollover:in_renewal:2"),
        ("grant", 2000, "invoice:in_renewal"),
    ]
    assert grants == [
        ("plan", 2000, 0, 0, 2000, 0),
        ("referral", 3000, 2000, 0, 1000, 0),
        ("plan", 2000, 2000, 0, 0, 0),
    ]
    assert balance_of(rt, "acct_bob") == 4000


def test_with_rollover_never_a_bonus_outlives_every_renewal(client, deliver, rt) -> None:
    with_terms(rt, rollover="never")
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", "in_first", period=BEFORE)))
    deliver(renewal("acct_bob", "in_renewal"))
    deliver(renewal("acct_bob", "in_next", period=(NOW + timedelta(days=20), NOW + timedelta(days=50))))
    entries, grants = state(rt, "acct_bob")
    assert entries == [
        ("grant", 2000, "invoice:in_first"),
        ("grant", 3000, "referral:1:referee"),
        ("grant", 2000, "invoice:in_renewal"),
        ("expire", -2000, "rollover:in_next:1"),
        ("grant", 2000, "invoice:in_next"),
    ]
    assert grants[1] == ("referral", 3000, 3000, 0, 0, 0)
    assert balance_of(rt, "acct_bob") == 3000 + 4000


def test_with_rollover_never_a_free_referrers_bonus_outlives_the_free_refills(client, deliver, rt) -> None:
    with_terms(rt, rollover="never")
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    for month in ("2027-01", "2027-02"):
        refill_free.run(rt, month, now=datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC))
    assert state(rt, "acct_ana")[0] == [
        ("grant", 3000, "referral:1:referrer"),
        ("grant", 100, "free:acct_ana:2027-01"),
        ("grant", 100, "free:acct_ana:2027-02"),
    ]
    assert balance_of(rt, "acct_ana") == 3200


def test_under_the_rollover_policy_a_free_referrers_bonus_is_cut_to_the_free_cap(client, deliver, rt) -> None:
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    refill_free.run(rt, "2027-01", now=datetime(2027, 1, 1, tzinfo=UTC))
    assert state(rt, "acct_ana")[0] == [
        ("grant", 3000, "referral:1:referrer"),
        ("expire", -2900, "rollover:free:acct_ana:2027-01:3"),
        ("grant", 100, "free:acct_ana:2027-01"),
    ]
    assert balance_of(rt, "acct_ana") == 200


def test_with_expires_after_days_a_never_rolling_bonus_expires_that_long_after_it_is_paid(client, deliver, rt) -> None:
    with_terms(rt, rollover="never", expires_after_days=90)
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    before = utcnow()
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    with rt.uow() as uow:
        payout = ledger.grant_of(uow, "referral:1:referrer")
        assert payout is not None and payout.expires_at is not None
        assert before + timedelta(days=90) <= payout.expires_at <= utcnow() + timedelta(days=90)
        assert ledger.balance(uow, accounts.get(uow, "acct_ana"), payout.expires_at - timedelta(seconds=1)) == 3000
        assert ledger.balance(uow, accounts.get(uow, "acct_ana"), payout.expires_at) == 0


def test_the_choice_is_kept_on_each_payout_so_changing_it_never_rewrites_past_ones(client, deliver, rt) -> None:
    with_terms(rt, rollover="never")
    refer(client, code_of(client, "acct_ana"), "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", "in_first", period=BEFORE)))
    with_terms(rt, rollover="policy")
    deliver(renewal("acct_bob", "in_renewal"))
    assert referral_rows(rt, "acct_bob") == [("grant", 3000, "referral:1:referee")]
    assert balance_of(rt, "acct_bob") == 2000 + 3000 + 2000
    with rt.uow() as uow:
        payout = ledger.earlier(uow, "referral:1:referee", accounts.get(uow, "acct_bob"), "grant")
        assert payout is not None and payout.meta["rollover"] == "never"


@pytest.mark.parametrize("first", ["payout", "renewal"])
def test_a_bonus_earned_after_a_renewal_is_never_cut_by_it_whichever_is_processed_first(
    client, deliver, rt, first: str
) -> None:
    """ana renews on day -10; bob's payment on day -5 earns her 3,000 in the renewed period."""
    code = code_of(client, "acct_ana")
    deliver(se.event("invoice.paid", paid_invoice("acct_ana", "in_ana_1", period=BEFORE)))
    refer(client, code, "acct_bob")
    bob_paid = se.event("invoice.paid", paid_invoice("acct_bob", period=(NOW - timedelta(days=5), NOW + timedelta(25))))
    for evt in (
        (bob_paid, renewal("acct_ana", "in_ana_2"))
        if first == "payout"
        else (renewal("acct_ana", "in_ana_2"), bob_paid)
    ):
        deliver(evt)
    assert sorted(state(rt, "acct_ana")[0]) == [
        ("grant", 2000, "invoice:in_ana_1"),
        ("grant", 2000, "invoice:in_ana_2"),
        ("grant", 3000, "referral:1:referrer"),
    ]
    assert balance_of(rt, "acct_ana") == 7000


@pytest.mark.parametrize("first", ["payout", "renewal"])
def test_a_bonus_earned_before_a_renewal_is_cut_by_it_whichever_is_processed_first(
    client, deliver, rt, first: str
) -> None:
    """bob's payment on day -15 earns ana 3,000 in the period her day -10 renewal ends: with her 2,000 that is
    5,000 where starter carries 2,000, so 3,000 expire, whether the payout or the renewal is processed first."""
    code = code_of(client, "acct_ana")
    deliver(se.event("invoice.paid", paid_invoice("acct_ana", "in_ana_1", period=BEFORE)))
    refer(client, code, "acct_bob")
    bob_paid = se.event(
        "invoice.paid", paid_invoice("acct_bob", period=(NOW - timedelta(days=15), NOW + timedelta(15)))
    )
    for evt in (
        (bob_paid, renewal("acct_ana", "in_ana_2"))
        if first == "payout"
        else (renewal("acct_ana", "in_ana_2"), bob_paid)
    ):
        deliver(evt)
    expired = sum(amount for kind, amount, _ in state(rt, "acct_ana")[0] if kind == "expire")
    assert (expired, balance_of(rt, "acct_ana")) == (-3000, 4000)
    if first == "renewal":
        assert state(rt, "acct_ana")[0] == [
            ("grant", 2000, "invoice:in_ana_1"),
            ("grant", 2000, "invoice:in_ana_2"),
            ("grant", 3000, "referral:1:referrer"),
            ("expire", -3000, "rollover:late:referral:1:referrer"),
        ]


def four_referees_one_held(client, deliver) -> None:
    """ana refers four referees who all pay this month; the test catalogue caps her at 3 rewards a month."""
    code = code_of(client, "acct_ana")
    for n in range(4):
        refer(client, code, f"acct_r{n}")
        deliver(se.event("invoice.paid", paid_invoice(f"acct_r{n}", f"in_{n}")))


def test_support_lists_referrals_by_status_in_the_cli_and_the_admin_api(client, deliver, run, admin_headers) -> None:
    four_referees_one_held(client, deliver)
    status, out, _ = run("referrals", "list", "--status", "held", "--json")
    held = json.loads(out)["referrals"]
    assert status == 0
    assert [(r["id"], r["referrer_account_id"], r["referee_account_id"], r["paid_sides"]) for r in held] == [
        (4, "acct_ana", "acct_r3", ["referee"])
    ]
    assert held[0]["reason"] == "referrer reached 3 rewards this month"
    answer = client.get("/v1/admin/referrals", params={"status": "held"}, headers=admin_headers)
    assert answer.json() == {"referrals": held}
    every = client.get("/v1/admin/referrals", headers=admin_headers).json()["referrals"]
    assert [r["status"] for r in every] == ["paid", "paid", "paid", "held"]


def test_the_referrals_list_is_admin_only_and_refuses_an_unknown_status(client, admin_headers) -> None:
    assert client.get("/v1/admin/referrals").status_code == 403
    refused = client.get("/v1/admin/referrals", params={"status": "stuck"}, headers=admin_headers)
    assert (refused.status_code, refused.json()["error"]) == (422, "invalid_request")


def test_releasing_a_held_referral_pays_its_referrer_once_and_is_audited(client, deliver, run, rt) -> None:
    four_referees_one_held(client, deliver)
    status, out, _ = run(
        "referrals", "release", "4", "--reason", "goodwill: cap hit by a launch", "--actor", "sam", "--ticket", "T-9"
    )
    assert (status, out) == (0, "referral 4: paid; paid: referee, referrer (audit 1)\n")
    assert referral_rows(rt, "acct_ana")[-1] == ("grant", 3000, "referral:4:referrer")
    assert balance_of(rt, "acct_ana") == 12000
    status, _, err = run("referrals", "release", "4", "--reason", "again", "--actor", "sam")
    assert (status, err) == (1, "refused: referral 4 is paid, not held\n")
    assert balance_of(rt, "acct_ana") == 12000
    _, out, _ = run("audit", "acct_ana", "--json")
    [entry] = json.loads(out)["entries"]
    assert (entry["actor"], entry["action"], entry["reason"], entry["ticket"]) == (
        "sam",
        "referral.release",
        "goodwill: cap hit by a launch",
        "T-9",
    )
    assert entry["details"] == {"referral": 4, "past_cap": True}


def test_release_needs_a_reason_and_an_actor_and_refuses_an_unknown_referral(run) -> None:
    assert run("referrals", "release", "4", "--actor", "sam")[0] == 2
    assert run("referrals", "release", "99", "--reason", "x", "--actor", "sam")[1:] == ("", "refused: no referral 99\n")


def test_a_new_month_pays_a_held_referrer_back_under_the_cap_audited_as_system(client, deliver, rt) -> None:
    four_referees_one_held(client, deliver)
    assert worker.release_held_referrals(rt) == Counter()  # held this month: nothing to look at before the next
    next_month = (NOW.replace(day=1) + timedelta(days=32)).replace(day=1, hour=0, minute=5)
    assert worker.release_held_referrals(rt, now=next_month) == Counter({"held referrals released": 1})
    assert worker.release_held_referrals(rt, now=next_month) == Counter()
    assert referral_rows(rt, "acct_ana")[-1] == ("grant", 3000, "referral:4:referrer")
    assert balance_of(rt, "acct_ana") == 12000
    with rt.uow() as uow:
        [entry] = audit.listing(uow, accounts.get(uow, "acct_ana"))
        assert (entry.actor, entry.action, entry.details) == (
            "system",
            "referral.release",
            {"referral": 4, "past_cap": False},
        )


def test_a_referrer_still_over_the_cap_in_the_new_month_stays_held(client, deliver, rt) -> None:
    four_referees_one_held(client, deliver)
    with_terms(rt, max_rewards_per_referrer_per_month=0)
    next_month = (NOW.replace(day=1) + timedelta(days=32)).replace(day=1, hour=0, minute=5)
    assert worker.release_held_referrals(rt, now=next_month) == Counter()
    assert client.get("/v1/accounts/acct_ana/referrals").json()["referrals"][3]["status"] == "held"
    assert balance_of(rt, "acct_ana") == 9000


def outreach(invoice_id: str, reason: str, period) -> dict:
    """ana's invoice for the outreach plan, which carries nothing over."""
    return se.invoice(
        "2025",
        invoice_id=invoice_id,
        customer="cus_acct_ana",
        price="price_outreach_monthly",
        amount_paid=9900,
        billing_reason=reason,
        period=period,
        subscription_metadata={"account_id": "acct_ana"},
    )


def test_a_released_payout_is_earned_when_released_so_an_earlier_renewal_never_cuts_it(
    client, deliver, rt, run
) -> None:
    """ana's plan carries nothing over. Her referees paid 40 days ago, her renewal 10 days ago cut the three
    payouts then paid; the fourth, held by the cap and released now, is hers to keep."""
    code = code_of(client, "acct_ana")
    deliver(se.event("invoice.paid", outreach("in_ana_1", "subscription_create", BEFORE)))
    for n in range(4):
        refer(client, code, f"acct_r{n}")
        deliver(se.event("invoice.paid", paid_invoice(f"acct_r{n}", f"in_{n}", period=BEFORE)))
    deliver(se.event("invoice.paid", outreach("in_ana_2", "subscription_cycle", RENEWED)))
    assert balance_of(rt, "acct_ana") == 1000
    assert run("referrals", "release", "4", "--reason", "cap hit by a launch", "--actor", "sam")[0] == 0
    assert state(rt, "acct_ana")[0][-1] == ("grant", 3000, "referral:4:referrer")
    assert balance_of(rt, "acct_ana") == 4000


def test_a_bonus_cut_late_is_kept_when_the_renewal_that_cuts_it_ran_under_a_support_extension(
    client, deliver, rt
) -> None:
    """Delivered in order, ana's day -10 renewal would have cut bob's day -15 bonus and kept it under the
    extension; processed after the renewal, the bonus is cut and kept the same way."""
    until = NOW + timedelta(days=60)
    code = code_of(client, "acct_ana")
    deliver(se.event("invoice.paid", paid_invoice("acct_ana", "in_ana_1", period=BEFORE)))
    with committed(rt) as uow:
        rollover.extend(uow, accounts.get(uow, "acct_ana"), until, force=False, now=utcnow())
    deliver(renewal("acct_ana", "in_ana_2"))
    refer(client, code, "acct_bob")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob", period=(NOW - timedelta(days=15), NOW + timedelta(15)))))
    assert state(rt, "acct_ana")[0] == [
        ("grant", 2000, "invoice:in_ana_1"),
        ("grant", 2000, "invoice:in_ana_2"),
        ("grant", 3000, "referral:1:referrer"),
        ("expire", -3000, "rollover:late:referral:1:referrer"),
        ("grant", 3000, "rollover:late:referral:1:referrer:extension"),
    ]
    assert balance_of(rt, "acct_ana") == 7000
