"""`credits backfill referral`: support repairs a missed referral by hand — a dry run first, then --apply,
through the live path's functions and keys, so nothing is ever paid twice."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from service.domain import accounts
from service.infra.models import Referral, StripeEvent
from tests import stripe_events as se
from tests.helpers import committed, state
from tests.test_referrals import NOW, THIS_MONTH, code_of, paid_invoice, refer, referral_rows

WHY = ("--reason", "client signed up with ana's link; neither got the credits", "--actor", "sam", "--ticket", "T-4711")
LAST_MONTH = (NOW - timedelta(days=40), NOW - timedelta(days=10))


def backfill(run, referrer: str, *extra: str, referee: str = "acct_bob"):
    return run("backfill", "referral", "--referee", referee, "--referrer", referrer, *WHY, *extra)


def applied(run, referrer: str, *extra: str, referee: str = "acct_bob") -> dict:
    status, out, _ = backfill(run, referrer, "--apply", "--json", *extra, referee=referee)
    assert status == 0
    return json.loads(out)


def audit_rows(run) -> list[dict]:
    return json.loads(run("audit", "--json")[1])["entries"]


def missed_attribution(client, deliver) -> str:
    """Ana's link was used and Bob paid $349, but the attribution never reached the service; Ana's code."""
    code = code_of(client, "acct_ana")
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    return code


def bob_known_only_by_his_customer(rt) -> None:
    """Bob's account is linked to his Stripe customer, but none of his invoices ever reached the service."""
    with committed(rt) as uow:
        accounts.get_or_create(uow, "acct_bob").stripe_customer_id = "cus_acct_bob"


def cap_reached(client, deliver) -> str:
    """Ana already got this month's 3 rewards (the test catalogue's cap); Bob's attribution was missed."""
    code = code_of(client, "acct_ana")
    for n in range(3):
        refer(client, code, f"acct_r{n}")
        deliver(se.event("invoice.paid", paid_invoice(f"acct_r{n}", f"in_{n}")))
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    return code


def test_a_dry_run_prints_the_plan_and_writes_nothing(client, deliver, run, rt) -> None:
    code = missed_attribution(client, deliver)
    before = state(rt, "acct_ana"), state(rt, "acct_bob")
    status, out, _ = backfill(run, code)
    assert status == 0
    assert "dry run — nothing written" in out
    assert "attribution: new" in out
    assert "qualifying invoice: in_349 (found in recorded payments)" in out
    assert "│ referrer │ acct_ana │ will pay 3000 │ 0              │ 3000          │" in out
    assert "│ referee  │ acct_bob │ will pay 3000 │ 2000           │ 5000          │" in out
    assert (state(rt, "acct_ana"), state(rt, "acct_bob")) == before
    assert client.get("/v1/accounts/acct_ana/referrals").json()["referrals"] == []
    assert audit_rows(run) == []


def test_apply_pays_both_sides_once_and_writes_the_audit_row(client, deliver, run, rt) -> None:
    code = missed_attribution(client, deliver)
    report = applied(run, code)
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:1:referee")]
    with rt.uow() as uow:
        assert [(r.source, r.status, r.qualifying_payment) for r in uow.session.scalars(select(Referral))] == [
            ("backfill", "paid", "in_349")
        ]
    [row] = audit_rows(run)
    assert row["id"] == report["audit_id"]
    assert (row["actor"], row["action"], row["account_id"], row["reason"], row["ticket"]) == (
        "sam",
        "backfill.referral",
        "acct_bob",
        "client signed up with ana's link; neither got the credits",
        "T-4711",
    )
    details = row["details"]
    assert (details["changed"], details["created"]) == (True, ["referral:1:referee", "referral:1:referrer"])
    assert details["referrer"] == {
        "account": "acct_ana",
        "credits": 3000,
        "outcome": "paid",
        "balance_before": 0,
        "balance_after": 3000,
    }
    assert details["referee"] == {
        "account": "acct_bob",
        "credits": 3000,
        "outcome": "paid",
        "balance_before": 2000,
        "balance_after": 5000,
    }


def test_a_second_apply_pays_nothing_says_so_and_is_audited(client, deliver, run, rt) -> None:
    code = missed_attribution(client, deliver)
    backfill(run, code, "--apply")
    status, out, _ = backfill(run, code, "--apply")
    assert status == 0
    assert "nothing changed: everything due was already paid" in out
    assert "│ referrer │ acct_ana │ already paid │ 3000           │ 3000          │" in out
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:1:referee")]
    newest, first = audit_rows(run)
    assert (first["details"]["changed"], newest["details"]["changed"], newest["details"]["created"]) == (
        True,
        False,
        [],
    )
    assert newest["details"]["attribution"] == "existing"


def test_an_invoice_only_stripe_knows_is_fed_through_the_inbox(client, run, rt, stripe_api) -> None:
    code = code_of(client, "acct_ana")
    bob_known_only_by_his_customer(rt)
    stripe_api.get("/v1/invoices/in_349").respond(json=paid_invoice("acct_bob"))
    report = applied(run, code, "--invoice", "in_349")
    assert (report["invoice_found_in"], report["fed_event"]) == ("Stripe (--invoice)", "evt_backfill_in_349")
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:1:referee")]
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]
    with rt.uow() as uow:
        event = uow.session.get_one(StripeEvent, "evt_backfill_in_349")
        assert (event.type, event.status, event.outcome) == (
            "invoice.paid",
            "processed",
            "granted 2000 credits (starter)",
        )
    assert report["created"] == ["invoice:in_349", "referral:1:referee", "referral:1:referrer"]


def test_without_invoice_the_first_qualifying_one_is_found_among_the_customers_paid_invoices(
    client, run, rt, stripe_api
) -> None:
    code = code_of(client, "acct_ana")
    bob_known_only_by_his_customer(rt)
    renewal = paid_invoice("acct_bob", "in_renewal", reason="subscription_cycle", period=THIS_MONTH)
    first = paid_invoice("acct_bob", "in_first", period=LAST_MONTH)
    trial = paid_invoice("acct_bob", "in_trial", amount=0, period=(LAST_MONTH[0] - timedelta(days=14), LAST_MONTH[0]))
    listing = {"object": "list", "url": "/v1/invoices", "has_more": False, "data": [renewal, first, trial]}
    route = stripe_api.get("/v1/invoices", params={"customer": "cus_acct_bob", "status": "paid"}).respond(json=listing)
    report = applied(run, code)
    assert route.call_count == 1
    assert (report["invoice"], report["fed_event"]) == ("in_first", "evt_backfill_in_first")
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_first"), ("grant", 3000, "referral:1:referee")]
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]


def test_a_referee_the_service_never_heard_of_is_named_by_its_stripe_customer(client, run, rt, stripe_api) -> None:
    code = code_of(client, "acct_ana")
    listing = {"object": "list", "url": "/v1/invoices", "has_more": False, "data": [paid_invoice("acct_bob")]}
    stripe_api.get("/v1/invoices", params={"customer": "cus_acct_bob", "status": "paid"}).respond(json=listing)
    report = applied(run, code, referee="cus_acct_bob")
    assert (report["referee"]["account"], report["fed_event"]) == (
        "acct_bob",
        "evt_backfill_in_349",
    )  # the invoice names the account
    assert state(rt, "cus_acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:1:referee")]
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]


def test_with_no_qualifying_invoice_yet_apply_attributes_and_the_first_invoice_pays_both(
    client, deliver, run, rt, stripe_api
) -> None:
    code = code_of(client, "acct_ana")
    bob_known_only_by_his_customer(rt)
    nothing = {"object": "list", "url": "/v1/invoices", "has_more": False, "data": []}
    stripe_api.get("/v1/invoices", params={"customer": "cus_acct_bob"}).respond(json=nothing)
    report = applied(run, code)
    assert (
        report["attribution"],
        report["status"],
        report["referee"]["outcome"],
        report["created"],
        report["changed"],
    ) == ("new", "attributed", "not due", [], True)
    deliver(se.event("invoice.paid", paid_invoice("acct_bob")))
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:1:referee")]


def test_an_invoice_of_another_customer_is_refused(client, run, rt, stripe_api) -> None:
    code = code_of(client, "acct_ana")
    bob_known_only_by_his_customer(rt)
    stripe_api.get("/v1/invoices/in_eve").respond(json=paid_invoice("acct_eve", "in_eve"))
    status, _, err = backfill(run, code, "--invoice", "in_eve", "--apply")
    assert status == 1
    assert "invoice in_eve does not qualify: it belongs to customer cus_acct_eve, not the referee's cus_acct_bob" in err
    assert state(rt, "acct_bob") == ([], [])


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        (("--actor", "sam"), "Missing option '--reason'"),
        (("--reason", "ticket says so"), "Missing option '--actor'"),
        (("--reason", "  ", "--actor", "sam"), "must not be blank"),
    ],
)
def test_without_a_reason_and_an_actor_it_is_a_usage_error(run, given: tuple[str, ...], complaint: str) -> None:
    status, _, err = run("backfill", "referral", "--referee", "acct_bob", "--referrer", "acct_ana", *given, "--apply")
    assert status == 2
    assert complaint in err


def test_a_self_referral_is_refused_and_writes_nothing(client, run, rt) -> None:
    code = code_of(client, "acct_ana")
    status, _, err = backfill(run, code, "--apply", referee="acct_ana")
    assert status == 1
    assert "refused: self-referral: same account" in err
    assert client.get("/v1/accounts/acct_ana/referrals").json()["referrals"] == []
    assert audit_rows(run) == []


def test_a_referee_attributed_to_another_referrer_is_refused(client, deliver, run, rt) -> None:
    refer(client, code_of(client, "acct_cy"), "acct_bob")
    code = missed_attribution(client, deliver)
    status, _, err = backfill(run, code, "--apply")
    assert status == 1
    assert (
        "refused: acct_bob is already attributed to acct_cy (referral 1, paid); the first attribution is locked" in err
    )
    assert state(rt, "acct_ana") == ([], [])
    assert audit_rows(run) == []


def test_a_referrer_over_the_monthly_cap_is_held(client, deliver, run, rt) -> None:
    report = applied(run, cap_reached(client, deliver))
    assert (report["status"], report["referrer"]["outcome"], report["referee"]["outcome"]) == ("held", "held", "paid")
    assert referral_rows(rt, "acct_ana") == [("grant", 3000, f"referral:{n}:referrer") for n in (1, 2, 3)]
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:4:referee")]


def test_override_cap_pays_the_held_referrer_and_the_audit_row_says_so(client, deliver, run, rt) -> None:
    code = cap_reached(client, deliver)
    applied(run, code)
    applied(run, code, "--override-cap")
    assert referral_rows(rt, "acct_ana") == [("grant", 3000, f"referral:{n}:referrer") for n in (1, 2, 3, 4)]
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:4:referee")]
    details = audit_rows(run)[0]["details"]
    assert (details["override_cap"], details["status"], details["created"]) == (True, "paid", ["referral:4:referrer"])
    assert details["referrer"]["outcome"] == "paid"
