"""Plan refills from invoices, in every API era: once per invoice, with the rollover policy at renewal."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from jobs import refill_free
from service.domain import accounts
from service.infra.models import Payment, StripeEvent
from tests import stripe_events as se
from tests.helpers import T0, balance_of, committed, state

JAN, FEB, MAR = (
    (T0, T0.replace(month=2)),
    (T0.replace(month=2), T0.replace(month=3)),
    (T0.replace(month=3), T0.replace(month=4)),
)


def pay(
    deliver,
    era: str,
    invoice_id: str,
    price: str,
    amount: int = 2000,
    *,
    reason: str | None = "subscription_create",
    period=JAN,
    type_: str = "invoice.paid",
    customer: str = "cus_1",
) -> None:
    inv = se.invoice(
        era,
        invoice_id=invoice_id,
        customer=customer,
        price=price,
        amount_paid=amount,
        billing_reason=reason,
        period=period,
        subscription_metadata={"account_id": "acct_1"},
    )
    if era == "2017":
        inv["metadata"] = {"account_id": "acct_1"}  # 2017 invoices carry no subscription metadata
        type_ = "invoice.payment_succeeded"
    assert deliver(se.event(type_, inv, era=era)).status_code == 200


def outcome_of_last_event(rt) -> tuple[str, str | None]:
    with rt.uow() as uow:
        event = uow.session.scalars(select(StripeEvent).order_by(StripeEvent.received_at.desc())).first()
        assert event is not None
        return event.status, event.outcome


@pytest.mark.parametrize("era", se.ERAS)
def test_a_paid_invoice_grants_its_plans_credits_in_every_era(deliver, rt, era: str) -> None:
    price = "plan_starter" if era == "2017" else "price_starter_monthly"
    pay(deliver, era, "in_1", price)
    assert state(rt, "acct_1") == ([("grant", 2000, "invoice:in_1")], [("plan", 2000, 2000, 0, 0, 0)])


@pytest.mark.parametrize("era", se.ERAS)
def test_both_paid_events_for_one_invoice_grant_once_in_every_era(deliver, rt, era: str) -> None:
    pay(deliver, era, "in_1", "price_starter_monthly", type_="invoice.paid")
    pay(deliver, era, "in_1", "price_starter_monthly", type_="invoice.payment_succeeded")
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_a_zero_amount_trial_invoice_grants_nothing(deliver, rt) -> None:
    pay(deliver, "2025", "in_trial", "price_starter_monthly", amount=0)
    assert state(rt, "acct_1") == ([], [])
    assert outcome_of_last_event(rt) == ("processed", "no credits: amount_paid is 0")


def test_an_unknown_price_is_recorded_and_reported_not_crashed(deliver, rt) -> None:
    pay(deliver, "2020", "in_1", "price_mystery")
    assert outcome_of_last_event(rt) == ("processed", "unknown price: price_mystery")
    with rt.uow() as uow:
        payment = uow.session.get_one(Payment, "in_1")
        assert (payment.outcome, payment.credits, payment.detail) == (
            "unknown_price",
            0,
            "no plan in the catalogue for price(s) price_mystery",
        )
    assert state(rt, "acct_1") == ([], [])


def test_cap_rollover_expires_what_exceeds_twice_the_allowance_at_renewal(deliver, rt) -> None:
    pay(deliver, "2025", "in_1", "price_starter_monthly", period=JAN)
    pay(deliver, "2025", "in_2", "price_starter_monthly", reason="subscription_cycle", period=FEB)
    assert balance_of(rt, "acct_1") == 4000  # 2000 carried + 2000 new = the cap, nothing expires
    pay(deliver, "2025", "in_3", "price_starter_monthly", reason="subscription_cycle", period=MAR)
    entries, grants = state(rt, "acct_1")
    assert entries == [
        ("grant", 2000, "invoice:in_1"),
        ("grant", 2000, "invoice:in_2"),
        ("expire", -2000, "rollover:in_3:1"),
        ("grant", 2000, "invoice:in_3"),
    ]
    assert grants == [("plan", 2000, 0, 0, 2000, 0), ("plan", 2000, 2000, 0, 0, 0), ("plan", 2000, 2000, 0, 0, 0)]


def test_cap_rollover_carries_plus_expires_exactly_what_was_held(deliver, client, admin_headers, rt) -> None:
    """Invariant 6: held before = carried + expired; purchased/admin credits are not under the policy."""
    pay(deliver, "2025", "in_1", "price_starter_monthly", period=JAN)
    pay(deliver, "2025", "in_2", "price_starter_monthly", reason="subscription_cycle", period=FEB)
    client.post(
        "/v1/accounts/acct_1/grants",
        json={"amount": 700, "reason": "goodwill"},
        headers={**admin_headers, "Idempotency-Key": "g"},
    )
    client.post(
        "/v1/accounts/acct_1/spend", json={"amount": 500}, headers={"Idempotency-Key": "s"}
    )  # from plan credits
    pay(deliver, "2025", "in_3", "price_starter_monthly", reason="subscription_cycle", period=MAR)
    grants = state(rt, "acct_1")[1]
    assert grants == [
        ("plan", 2000, 0, 500, 1500, 0),
        ("plan", 2000, 2000, 0, 0, 0),
        ("admin", 700, 700, 0, 0, 0),
        ("plan", 2000, 2000, 0, 0, 0),
    ]
    held_before, carried, expired = 3500, 2000, 1500
    assert carried + expired == held_before
    assert balance_of(rt, "acct_1") == 4000 + 700


def test_none_rollover_expires_everything_held_under_the_policy(deliver, rt) -> None:
    pay(deliver, "2025", "in_1", "price_outreach_monthly", period=JAN)
    pay(deliver, "2025", "in_2", "price_outreach_monthly", reason="subscription_cycle", period=FEB)
    assert state(rt, "acct_1")[0] == [
        ("grant", 1000, "invoice:in_1"),
        ("expire", -1000, "rollover:in_2:1"),
        ("grant", 1000, "invoice:in_2"),
    ]
    assert balance_of(rt, "acct_1") == 1000


def test_all_rollover_expires_nothing(deliver, rt) -> None:
    for n, (period, reason) in enumerate(
        [(JAN, "subscription_create"), (FEB, "subscription_cycle"), (MAR, "subscription_cycle")]
    ):
        pay(deliver, "2025", f"in_{n}", "price_rollover_all", reason=reason, period=period)
    assert balance_of(rt, "acct_1") == 1500
    assert [kind for kind, _, _ in state(rt, "acct_1")[0]] == ["grant"] * 3


def test_a_redelivered_renewal_cuts_nothing_twice(deliver, rt) -> None:
    for invoice_id, period in (("in_1", JAN), ("in_2", FEB), ("in_3", MAR), ("in_3", MAR)):
        pay(deliver, "2025", invoice_id, "price_starter_monthly", reason="subscription_cycle", period=period)
    assert len(state(rt, "acct_1")[0]) == 4
    assert balance_of(rt, "acct_1") == 4000


def test_an_annual_plan_grants_the_years_credits_up_front(deliver, rt) -> None:
    pay(deliver, "2025", "in_year", "price_pro_annual", amount=99000, period=(T0, T0.replace(year=T0.year + 1)))
    assert state(rt, "acct_1")[0] == [("grant", 60000, "invoice:in_year")]


def test_a_renewal_that_arrives_before_the_first_invoice_still_grants_each_once(deliver, rt) -> None:
    pay(deliver, "2025", "in_2", "price_starter_monthly", reason="subscription_cycle", period=FEB)
    pay(deliver, "2025", "in_1", "price_starter_monthly", period=JAN)
    assert sorted(key for _, _, key in state(rt, "acct_1")[0]) == ["invoice:in_1", "invoice:in_2"]
    assert balance_of(rt, "acct_1") == 4000


def test_a_first_invoice_processed_after_the_free_refill_keeps_its_whole_allowance(deliver, rt) -> None:
    """The subscription began in January; its first invoice is processed after February's free allowance was
    granted. A plan's own grant is never cut for being late: only a renewal runs the policy."""
    with committed(rt) as uow:
        accounts.get_or_create(uow, "acct_1")
    refill_free.run(rt, "2026-02", now=FEB[0])
    pay(deliver, "2025", "in_1", "price_starter_monthly", period=JAN)
    assert state(rt, "acct_1")[0] == [("grant", 100, "free:acct_1:2026-02"), ("grant", 2000, "invoice:in_1")]
    assert balance_of(rt, "acct_1") == 2100
