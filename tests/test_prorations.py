"""Upgrades and downgrades: the plan an invoice grants is the one its period's line bills, in every API era's
line shape (`proration` and `type` on the line to 2025-03-31, `parent.subscription_item_details` after)."""

from __future__ import annotations

import pytest

from service.domain import accounts
from tests import stripe_events as se
from tests.helpers import T0, balance_of, state
from tests.stripe_events import Line

JAN = (T0, T0.replace(month=2))
FEB = (T0.replace(month=2), T0.replace(month=3))
MID_JAN = (T0.replace(day=16), T0.replace(month=2))
ERAS = ["2020", "2025"]  # the eras whose invoices carry prorations (2017's localstripe bills none)


def pay(deliver, era: str, invoice_id: str, lines: list[Line], reason: str) -> None:
    obj = se.invoice_of_lines(
        era,
        lines,
        invoice_id=invoice_id,
        customer="cus_1",
        amount_paid=max(1, sum(line.amount for line in lines)),
        billing_reason=reason,
        period=lines[-1].period,
        subscription_metadata={"account_id": "acct_1"},
    )
    assert deliver(se.event("invoice.paid", obj, era=era)).status_code == 200


def subscribe_to_starter(deliver, era: str) -> None:
    pay(deliver, era, "in_1", [Line("price_starter_monthly", 2000, JAN)], "subscription_create")


@pytest.mark.parametrize("era", ERAS)
def test_an_upgrade_billed_at_once_tops_the_period_up_to_the_new_plan(deliver, rt, era: str) -> None:
    subscribe_to_starter(deliver, era)
    unused, remaining = (
        Line("price_starter_monthly", -1000, MID_JAN, True),
        Line("price_pro_monthly", 2500, MID_JAN, True),
    )
    pay(deliver, era, "in_up", [unused, remaining], "subscription_update")
    assert state(rt, "acct_1") == (
        [("grant", 2000, "invoice:in_1"), ("grant", 3000, "invoice:in_up")],
        [("plan", 2000, 2000, 0, 0, 0), ("plan", 3000, 3000, 0, 0, 0)],
    )


@pytest.mark.parametrize("era", ERAS)
def test_an_upgrade_billed_at_once_tops_up_once(deliver, rt, era: str) -> None:
    subscribe_to_starter(deliver, era)
    lines = [Line("price_starter_monthly", -1000, MID_JAN, True), Line("price_pro_monthly", 2500, MID_JAN, True)]
    pay(deliver, era, "in_up", lines, "subscription_update")
    pay(deliver, era, "in_up", lines, "subscription_update")
    assert [key for _, _, key in state(rt, "acct_1")[0]] == ["invoice:in_1", "invoice:in_up"]


@pytest.mark.parametrize("era", ERAS)
def test_the_next_cycle_after_an_upgrade_grants_the_new_plan_not_the_unused_time(deliver, rt, era: str) -> None:
    """Stripe's default (`create_prorations`): the prorations ride on the next cycle's invoice, unused time
    first; the plan is the line for the new period."""
    subscribe_to_starter(deliver, era)
    lines = [
        Line("price_starter_monthly", -1000, MID_JAN, True),
        Line("price_pro_monthly", 2500, MID_JAN, True),
        Line("price_pro_monthly", 5000, FEB),
    ]
    pay(deliver, era, "in_2", lines, "subscription_cycle")
    assert state(rt, "acct_1") == (
        [("grant", 2000, "invoice:in_1"), ("grant", 5000, "invoice:in_2")],
        [("plan", 2000, 2000, 0, 0, 0), ("plan", 5000, 5000, 0, 0, 0)],
    )


@pytest.mark.parametrize("era", ERAS)
def test_a_downgrade_billed_at_once_takes_nothing_back_and_grants_nothing(deliver, rt, era: str) -> None:
    pay(deliver, era, "in_1", [Line("price_pro_monthly", 5000, JAN)], "subscription_create")
    lines = [Line("price_pro_monthly", -2500, MID_JAN, True), Line("price_starter_monthly", 1000, MID_JAN, True)]
    pay(deliver, era, "in_down", lines, "subscription_update")
    assert state(rt, "acct_1") == ([("grant", 5000, "invoice:in_1")], [("plan", 5000, 5000, 0, 0, 0)])


@pytest.mark.parametrize("era", ERAS)
def test_a_plan_priced_per_seat_grants_its_credits_for_each_seat(deliver, rt, era: str) -> None:
    pay(deliver, era, "in_team", [Line("price_team_seat", 3000, JAN, quantity=3)], "subscription_create")
    assert state(rt, "acct_1") == ([("grant", 1500, "invoice:in_team")], [("plan", 1500, 1500, 0, 0, 0)])


def test_an_upgrade_processed_before_its_periods_first_invoice_still_ends_the_period_with_the_new_plan(
    deliver, rt
) -> None:
    """Stripe promises no order: the upgrade billed on Jan 16 may be processed before January's own invoice.
    Each invoice grants what its own lines say — the upgrade pro's allowance less starter's — so the period
    ends with pro's either way, and the plan is pro."""
    lines = [Line("price_starter_monthly", -1000, MID_JAN, True), Line("price_pro_monthly", 2500, MID_JAN, True)]
    pay(deliver, "2025", "in_up", lines, "subscription_update")
    subscribe_to_starter(deliver, "2025")
    assert state(rt, "acct_1") == (
        [("grant", 3000, "invoice:in_up"), ("grant", 2000, "invoice:in_1")],
        [("plan", 3000, 3000, 0, 0, 0), ("plan", 2000, 2000, 0, 0, 0)],
    )
    with rt.uow() as uow:
        assert accounts.get(uow, "acct_1").plan == "pro"


@pytest.mark.parametrize("upgrade_first", [True, False])
def test_refunding_an_upgrade_takes_back_what_it_granted_whichever_was_processed_first(
    deliver, rt, upgrade_first: bool
) -> None:
    lines = [Line("price_starter_monthly", -1000, MID_JAN, True), Line("price_pro_monthly", 2500, MID_JAN, True)]
    upgrade = se.invoice_of_lines(
        "2025",
        lines,
        invoice_id="in_up",
        customer="cus_1",
        amount_paid=1500,
        billing_reason="subscription_update",
        period=MID_JAN,
        subscription_metadata={"account_id": "acct_1"},
        charge="ch_up",
    )
    upgrade["charge"] = "ch_up"
    if upgrade_first:
        deliver(se.event("invoice.paid", upgrade))
    subscribe_to_starter(deliver, "2025")
    if not upgrade_first:
        deliver(se.event("invoice.paid", upgrade))
    refund = se.charge(charge_id="ch_up", amount=1500, amount_refunded=1500, invoice="in_up", refunds=[("re_up", 1500)])
    deliver(se.event("charge.refunded", refund))
    assert balance_of(rt, "acct_1") == 2000
    assert ("reverse", -3000, "reverse:re_up") in state(rt, "acct_1")[0]


def test_more_seats_billed_at_once_add_the_new_seats_allowance(deliver, rt) -> None:
    pay(deliver, "2025", "in_1", [Line("price_team_seat", 1500, JAN, quantity=3)], "subscription_create")
    more = [
        Line("price_team_seat", -750, MID_JAN, True, quantity=3),
        Line("price_team_seat", 1250, MID_JAN, True, quantity=5),
    ]
    pay(deliver, "2025", "in_seats", more, "subscription_update")
    assert state(rt, "acct_1")[0] == [("grant", 1500, "invoice:in_1"), ("grant", 1000, "invoice:in_seats")]


def test_changing_plans_back_and_forth_within_a_period_never_passes_the_new_allowance(deliver, rt) -> None:
    subscribe_to_starter(deliver, "2025")
    up = [Line("price_starter_monthly", -1000, MID_JAN, True), Line("price_pro_monthly", 2500, MID_JAN, True)]
    down = [Line("price_pro_monthly", -2400, MID_JAN, True), Line("price_starter_monthly", 950, MID_JAN, True)]
    pay(deliver, "2025", "in_up", up, "subscription_update")
    pay(deliver, "2025", "in_down", down, "subscription_update")
    pay(deliver, "2025", "in_up_again", up, "subscription_update")
    assert [(amount, key) for _, amount, key in state(rt, "acct_1")[0]] == [
        (2000, "invoice:in_1"),
        (3000, "invoice:in_up"),
    ]
    with rt.uow() as uow:
        assert accounts.get(uow, "acct_1").plan == "pro"


@pytest.mark.parametrize("reason", ["manual", "subscription_threshold"])
def test_an_invoice_that_is_not_a_renewal_never_runs_the_rollover_policy(deliver, rt, reason: str) -> None:
    pay(deliver, "2025", "in_1", [Line("price_outreach_monthly", 1000, JAN)], "subscription_create")
    pay(deliver, "2025", "in_extra", [Line("price_outreach_monthly", 500, MID_JAN)], reason)
    assert [(kind, amount) for kind, amount, _ in state(rt, "acct_1")[0]] == [("grant", 1000), ("grant", 1000)]


UP = [Line("price_starter_monthly", -1000, MID_JAN, True), Line("price_pro_monthly", 2500, MID_JAN, True)]


@pytest.mark.parametrize("reason", ["manual", "automatic_pending_invoice_item_invoice", None])
def test_an_invoice_of_prorations_only_tops_up_whatever_its_billing_reason(deliver, rt, reason) -> None:
    subscribe_to_starter(deliver, "2025")
    pay(deliver, "2025", "in_up", UP, reason)
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1"), ("grant", 3000, "invoice:in_up")]


def test_changing_plans_back_and_forth_before_the_periods_own_invoice_still_ends_with_one_allowance(
    deliver, rt
) -> None:
    down = [Line("price_pro_monthly", -2400, MID_JAN, True), Line("price_starter_monthly", 950, MID_JAN, True)]
    pay(deliver, "2025", "in_up", UP, "subscription_update")
    pay(deliver, "2025", "in_down", down, "subscription_update")
    pay(deliver, "2025", "in_up_again", UP, "subscription_update")
    subscribe_to_starter(deliver, "2025")
    assert state(rt, "acct_1")[0] == [("grant", 3000, "invoice:in_up"), ("grant", 2000, "invoice:in_1")]
