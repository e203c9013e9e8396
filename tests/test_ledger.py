"""The ledger's rules (docs/architecture.md, Invariants), each on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from service.domain import accounts, ledger
from service.infra.models import Grant
from tests.helpers import T0, committed, entries, grants


@pytest.fixture
def acct(uow):
    return accounts.get_or_create(uow, "acct_1")


def test_grant_adds_a_grant_and_one_entry(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="admin", key="k1", reason="welcome", actor="ana", now=T0)
    assert entries(uow, acct) == [("grant", 100, "k1")]
    assert grants(uow, acct) == [("admin", 100, 100, 0, 0, 0)]
    assert ledger.balance(uow, acct, T0) == 100


def test_same_grant_key_twice_writes_once(uow, acct) -> None:
    first = ledger.grant(uow, acct, 100, source="admin", key="k1", now=T0)
    again = ledger.grant(uow, acct, 100, source="admin", key="k1", now=T0)
    assert (first.created, again.created, again.entry.id) == (True, False, first.entry.id)
    assert entries(uow, acct) == [("grant", 100, "k1")]
    assert grants(uow, acct) == [("admin", 100, 100, 0, 0, 0)]
    assert ledger.balance(uow, acct, T0) == 100


def test_same_key_for_a_different_amount_is_a_conflict(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="admin", key="k1", now=T0)
    with pytest.raises(ledger.IdempotencyConflict):
        ledger.grant(uow, acct, 50, source="admin", key="k1", now=T0)


def test_spend_consumes_soonest_expiring_first(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="pack", key="paid", now=T0)
    ledger.grant(uow, acct, 30, source="free", key="free", expires_at=T0 + timedelta(days=10), now=T0)
    ledger.debit(uow, acct, 20, kind="spend", key="s1", now=T0)
    assert grants(uow, acct) == [("pack", 100, 100, 0, 0, 0), ("free", 30, 10, 20, 0, 0)]
    assert entries(uow, acct) == [("grant", 100, "paid"), ("grant", 30, "free"), ("spend", -20, "s1")]


def test_expiry_removes_only_what_is_left_of_a_grant(uow, acct) -> None:
    """100 paid + 30 free; 20 spent from free; at expiry 10 expire, 100 remain."""
    ledger.grant(uow, acct, 100, source="pack", key="paid", now=T0)
    ledger.grant(uow, acct, 30, source="free", key="free", expires_at=T0 + timedelta(days=10), now=T0)
    ledger.debit(uow, acct, 20, kind="spend", key="s1", now=T0)
    later = T0 + timedelta(days=11)
    ledger.debit(uow, acct, 1, kind="spend", key="s2", now=later)  # every debit first expires what is due
    assert grants(uow, acct) == [("pack", 100, 99, 1, 0, 0), ("free", 30, 0, 20, 10, 0)]
    assert entries(uow, acct)[-2:] == [("expire", -10, "expire:grant:2"), ("spend", -1, "s2")]
    assert ledger.balance(uow, acct, later) == 99


def test_replayed_spend_after_a_grant_came_due_writes_nothing(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="pack", key="paid", now=T0)
    ledger.grant(uow, acct, 30, source="free", key="free", expires_at=T0 + timedelta(days=10), now=T0)
    first = ledger.debit(uow, acct, 20, kind="spend", key="s1", now=T0)
    again = ledger.debit(uow, acct, 20, kind="spend", key="s1", now=T0 + timedelta(days=11))
    assert (again.created, again.entry.id) == (False, first.entry.id)
    assert entries(uow, acct) == [("grant", 100, "paid"), ("grant", 30, "free"), ("spend", -20, "s1")]
    assert grants(uow, acct) == [("pack", 100, 100, 0, 0, 0), ("free", 30, 10, 20, 0, 0)]


def test_expired_credits_are_never_spent_even_before_the_sweep(uow, acct) -> None:
    ledger.grant(uow, acct, 30, source="free", key="free", expires_at=T0 + timedelta(days=1), now=T0)
    later = T0 + timedelta(days=2)
    assert ledger.balance(uow, acct, later) == 0
    with pytest.raises(ledger.InsufficientCredits) as refused:
        ledger.debit(uow, acct, 1, kind="spend", key="s1", now=later)
    assert refused.value.available == 0
    assert entries(uow, acct) == [("grant", 30, "free"), ("expire", -30, "expire:grant:1")]


def test_rollover_credits_count_as_expiring_at_period_end(uow, acct) -> None:
    acct.plan, acct.period_end = "starter", T0 + timedelta(days=5)
    ledger.grant(uow, acct, 50, source="pack", key="pack", expires_at=T0 + timedelta(days=30), now=T0)
    ledger.grant(uow, acct, 50, source="plan", key="plan", rollover=True, now=T0)
    ledger.debit(uow, acct, 60, kind="spend", key="s1", now=T0)
    assert grants(uow, acct) == [("pack", 50, 40, 10, 0, 0), ("plan", 50, 0, 50, 0, 0)]


def test_spend_beyond_the_balance_is_refused_and_writes_nothing(uow, acct) -> None:
    ledger.grant(uow, acct, 10, source="admin", key="k1", now=T0)
    with pytest.raises(ledger.InsufficientCredits) as refused:
        ledger.debit(uow, acct, 11, kind="spend", key="s1", now=T0)
    assert (refused.value.available, refused.value.requested) == (10, 11)
    assert entries(uow, acct) == [("grant", 10, "k1")]
    assert grants(uow, acct) == [("admin", 10, 10, 0, 0, 0)]


def test_replayed_spend_returns_the_first_entry_even_when_the_balance_is_gone(uow, acct) -> None:
    ledger.grant(uow, acct, 10, source="admin", key="k1", now=T0)
    first = ledger.debit(uow, acct, 10, kind="spend", key="s1", now=T0)
    again = ledger.debit(uow, acct, 10, kind="spend", key="s1", now=T0)
    assert (again.created, again.entry.id) == (False, first.entry.id)
    assert entries(uow, acct) == [("grant", 10, "k1"), ("spend", -10, "s1")]


def test_replayed_spend_with_credits_left_writes_nothing(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="admin", key="k1", now=T0)
    first = ledger.debit(uow, acct, 10, kind="spend", key="s1", now=T0)
    again = ledger.debit(uow, acct, 10, kind="spend", key="s1", now=T0)
    assert (again.created, again.entry.id) == (False, first.entry.id)
    assert entries(uow, acct) == [("grant", 100, "k1"), ("spend", -10, "s1")]
    assert grants(uow, acct) == [("admin", 100, 90, 10, 0, 0)]


def test_same_debit_key_for_a_different_amount_is_a_conflict(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="admin", key="k1", now=T0)
    ledger.debit(uow, acct, 10, kind="spend", key="s1", now=T0)
    with pytest.raises(ledger.IdempotencyConflict):
        ledger.debit(uow, acct, 20, kind="spend", key="s1", now=T0)
    assert grants(uow, acct) == [("admin", 100, 90, 10, 0, 0)]


def test_reverse_takes_back_unspent_credits_and_records_the_shortfall(uow, acct) -> None:
    posted = ledger.grant(uow, acct, 100, source="pack", key="pack", now=T0)
    ledger.debit(uow, acct, 70, kind="spend", key="s1", now=T0)
    pack = ledger.grant_of(uow, posted.entry.idempotency_key)
    assert pack is not None
    reversal = ledger.debit(
        uow, acct, 100, kind="reverse", grants=[pack], partial=True, key="reverse:re_1", reason="refund", now=T0
    )
    assert reversal.entry.meta == {"requested": 100, "shortfall": 70}
    assert entries(uow, acct)[-1] == ("reverse", -30, "reverse:re_1")
    assert grants(uow, acct) == [("pack", 100, 0, 70, 0, 30)]
    again = ledger.debit(
        uow, acct, 100, kind="reverse", grants=[pack], partial=True, key="reverse:re_1", reason="refund", now=T0
    )
    assert again.created is False
    assert len(entries(uow, acct)) == 3


def test_reverse_with_nothing_left_still_records_the_whole_shortfall(uow, acct) -> None:
    posted = ledger.grant(uow, acct, 10, source="pack", key="pack", now=T0)
    ledger.debit(uow, acct, 10, kind="spend", key="s1", now=T0)
    pack = ledger.grant_of(uow, posted.entry.idempotency_key)
    assert pack is not None
    reversal = ledger.debit(
        uow, acct, 10, kind="reverse", grants=[pack], partial=True, key="reverse:re_1", reason="refund", now=T0
    )
    assert (reversal.entry.amount, reversal.entry.meta["shortfall"]) == (0, 10)


def test_check_finds_nothing_on_a_consistent_ledger(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="admin", key="k1", now=T0)
    ledger.debit(uow, acct, 40, kind="spend", key="s1", now=T0)
    assert ledger.check(uow) == []


def test_check_reports_a_grant_whose_remaining_was_tampered_with(uow, acct) -> None:
    ledger.grant(uow, acct, 100, source="admin", key="k1", now=T0)
    ledger.debit(uow, acct, 40, kind="spend", key="s1", now=T0)
    uow.session.execute(text("UPDATE credit_grants SET remaining = 70, spent = 30"))
    drifts = {(d.what, d.expected, d.actual) for d in ledger.check(uow)}
    assert drifts == {("balance", 60, 70), ("grant 1 spent", 40, 30), ("grant 1 remaining", 60, 70)}


def test_check_names_only_the_account_and_grant_that_disagree(uow, acct) -> None:
    other = accounts.get_or_create(uow, "acct_2")
    for account, key in ((acct, "a"), (other, "b")):
        ledger.grant(uow, account, 100, source="admin", key=f"grant-{key}", now=T0)
        ledger.debit(uow, account, 40, kind="spend", key=f"spend-{key}", now=T0)
    uow.session.execute(
        text("UPDATE credit_grants SET amount = 110, remaining = 70 WHERE account_id = :id"), {"id": other.id}
    )
    drifts = [(d.account, d.what, d.expected, d.actual) for d in ledger.check(uow)]
    assert drifts == [("acct_2", "balance", 60, 70), ("acct_2", "grant 2 amount", 100, 110)]


@pytest.mark.parametrize("statement", ["UPDATE ledger_entries SET amount = 1", "DELETE FROM ledger_entries"])
def test_the_database_refuses_to_rewrite_the_ledger(rt, statement: str) -> None:
    with committed(rt) as uow:
        ledger.grant(uow, accounts.get_or_create(uow, "acct_1"), 5, source="admin", key="k1", now=T0)
    with pytest.raises(DBAPIError, match="append-only"), committed(rt) as uow:
        uow.session.execute(text(statement))


def test_a_grant_can_never_hold_more_than_it_was_given(uow, acct) -> None:
    ledger.grant(uow, acct, 5, source="admin", key="k1", now=T0)
    grant_row = uow.session.scalars(select(Grant)).one()
    grant_row.remaining = 6
    with pytest.raises(DBAPIError):
        uow.session.flush()


def test_accounts_answer_to_their_stripe_customer_id(uow) -> None:
    acct = accounts.get_or_create(uow, "cus_123")
    assert accounts.get(uow, "cus_123").id == acct.id
    assert acct.stripe_customer_id == "cus_123"
    with pytest.raises(accounts.AccountNotFound):
        accounts.get(uow, "cus_unknown")
