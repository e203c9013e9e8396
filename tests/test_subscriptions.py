"""customer.subscription.* keep the account's plan, status and period — and an older event never wins."""

from __future__ import annotations

from datetime import timedelta

import pytest

from service.domain import accounts
from tests import stripe_events as se
from tests.helpers import T0


def account_state(rt) -> tuple[str | None, str, str | None]:
    with rt.uow() as uow:
        acct = accounts.get(uow, "acct_1")
        return acct.plan, acct.status, acct.period_end.date().isoformat() if acct.period_end else None


@pytest.mark.parametrize("era", ["2017", "2025"])
def test_a_new_subscription_sets_plan_status_and_period_in_both_eras(deliver, rt, era: str) -> None:
    sub = se.subscription(era, price="plan_starter", metadata={"account_id": "acct_1"}, period_end=T0.replace(month=2))
    deliver(se.event("customer.subscription.created", sub, era=era))
    assert account_state(rt) == ("starter", "active", "2026-02-01")


def test_an_older_subscription_event_does_not_overwrite_newer_state(deliver, rt) -> None:
    newer = se.subscription(price="price_pro_monthly", status="active", metadata={"account_id": "acct_1"})
    older = se.subscription(price="price_starter_monthly", status="past_due", metadata={"account_id": "acct_1"})
    deliver(se.event("customer.subscription.updated", newer, created=T0 + timedelta(minutes=5)))
    deliver(se.event("customer.subscription.updated", older, created=T0))
    assert account_state(rt)[:2] == ("pro", "active")


def test_a_deleted_subscription_leaves_the_account_without_a_paid_plan(deliver, rt) -> None:
    sub = se.subscription(metadata={"account_id": "acct_1"})
    deliver(se.event("customer.subscription.created", sub, created=T0))
    deliver(se.event("customer.subscription.deleted", {**sub, "status": "canceled"}, created=T0 + timedelta(days=3)))
    assert account_state(rt)[:2] == (None, "canceled")
