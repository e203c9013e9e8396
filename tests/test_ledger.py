"""The ledger's rules (DESIGN.md, Invariants), each on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from service.domain import accounts, ledger
from service.infra.db import transaction
from service.infra.models import Grant
from tests.helpers import T0, entries, grants


@pytest.fixture
def session(sessions):  # type: ignore[no-untyped-def]
    with transaction(sessions) as s:
        yield s


@pytest.fixture
def acct(session):  # type: ignore[no-untyped-def]
    return accounts.get_or_create(session, "acct_1")


def test_grant_adds_a_grant_and_one_entry(session, acct) -> None:
    ledger.grant(session, acct, 100, source="admin", key="k1", reason="welcome", actor="ana", now=T0)
    assert entries(session, acct) == [("grant", 100, "k1")]
    assert grants(session, acct) == [("admin", 100, 100, 0, 0, 0)]
    assert ledger.balance(session, acct, T0) == 100


def test_same_grant_key_twice_writes_once(session, acct) -> None:
    first = ledger.grant(session, acct, 100, source="admin", key="k1", now=T0)
    again = ledger.grant(session, acct, 100, source="admin", key="k1", now=T0)
    assert (first.created, again.created, again.entry.id) == (True, False, first.entry.id)
    assert entries(session, acct) == [("grant", 100, "k1")]
    assert grants(session, acct) == [("admin", 100, 100, 0, 0, 0)]
    assert ledger.balance(session, acct, T0) == 100


def test_same_key_for_a_different_amount_is_a_conflict(session, acct) -> None:
    ledger.grant(session, acct, 100, source="admin", key="k1", now=T0)
    with pytest.raises(ledger.IdempotencyConflict):
        ledger.grant(session, acct, 50, source="admin", key="k1", now=T0)


def test_spend_consumes_soonest_expiring_first(session, acct) -> None:
    ledger.grant(session, acct, 100, source="pack", key="paid", now=T0)
    ledger.grant(session, acct, 30, source="free", key="free", expires_at=T0 + timedelta(days=10), now=T0)
    ledger.spend(session, acct, 20, key="s1", now=T0)
    assert grants(session, acct) == [("pack", 100, 100, 0, 0, 0), ("free", 30, 10, 20, 0, 0)]
    assert entries(session, acct) == [("grant", 100, "paid"), ("grant", 30, "free"), ("spend", -20, "s1")]


def test_expiry_removes_only_what_is_left_of_a_grant(session, acct) -> None:
    """DESIGN.md invariant 7: 100 paid + 30 free; 20 spent from free; at expiry 10 expire, 100 remain."""
    ledger.grant(session, acct, 100, source="pack", key="paid", now=T0)
    ledger.grant(session, acct, 30, source="free", key="free", expires_at=T0 + timedelta(days=10), now=T0)
    ledger.spend(session, acct, 20, key="s1", now=T0)
    later = T0 + timedelta(days=11)
    ledger.expire_due(session, acct, later)
    assert grants(session, acct) == [("pack", 100, 100, 0, 0, 0), ("free", 30, 0, 20, 10, 0)]
    assert entries(session, acct)[-1] == ("expire", -10, "expire:grant:2")
    assert ledger.balance(session, acct, later) == 100


def test_expired_credits_are_never_spent_even_before_the_sweep(session, acct) -> None:
    ledger.grant(session, acct, 30, source="free", key="free", expires_at=T0 + timedelta(days=1), now=T0)
    later = T0 + timedelta(days=2)
    assert ledger.balance(session, acct, later) == 0
    with pytest.raises(ledger.InsufficientCredits) as refused:
        ledger.spend(session, acct, 1, key="s1", now=later)
    assert refused.value.balance == 0
    assert entries(session, acct) == [("grant", 30, "free"), ("expire", -30, "expire:grant:1")]


def test_rollover_credits_count_as_expiring_at_period_end(session, acct) -> None:
    acct.plan, acct.period_end = "starter", T0 + timedelta(days=5)
    ledger.grant(session, acct, 50, source="pack", key="pack", expires_at=T0 + timedelta(days=30), now=T0)
    ledger.grant(session, acct, 50, source="plan", key="plan", rollover=True, now=T0)
    ledger.spend(session, acct, 60, key="s1", now=T0)
    assert grants(session, acct) == [("pack", 50, 40, 10, 0, 0), ("plan", 50, 0, 50, 0, 0)]


def test_spend_beyond_the_balance_is_refused_and_writes_nothing(session, acct) -> None:
    ledger.grant(session, acct, 10, source="admin", key="k1", now=T0)
    with pytest.raises(ledger.InsufficientCredits) as refused:
        ledger.spend(session, acct, 11, key="s1", now=T0)
    assert (refused.value.balance, refused.value.requested) == (10, 11)
    assert entries(session, acct) == [("grant", 10, "k1")]
    assert grants(session, acct) == [("admin", 10, 10, 0, 0, 0)]


def test_replayed_spend_returns_the_first_entry_even_when_the_balance_is_gone(session, acct) -> None:
    ledger.grant(session, acct, 10, source="admin", key="k1", now=T0)
    first = ledger.spend(session, acct, 10, key="s1", now=T0)
    again = ledger.spend(session, acct, 10, key="s1", now=T0)
    assert (again.created, again.entry.id) == (False, first.entry.id)
    assert entries(session, acct) == [("grant", 10, "k1"), ("spend", -10, "s1")]


def test_reverse_takes_back_unspent_credits_and_records_the_shortfall(session, acct) -> None:
    posted = ledger.grant(session, acct, 100, source="pack", key="pack", now=T0)
    ledger.spend(session, acct, 70, key="s1", now=T0)
    pack = session.scalars(ledger.grant_of(posted.entry)).one()
    reversal = ledger.reverse(session, acct, [pack], 100, key="reverse:re_1", reason="refund", now=T0)
    assert reversal.entry.meta == {"requested": 100, "shortfall": 70}
    assert entries(session, acct)[-1] == ("reverse", -30, "reverse:re_1")
    assert grants(session, acct) == [("pack", 100, 0, 70, 0, 30)]
    again = ledger.reverse(session, acct, [pack], 100, key="reverse:re_1", reason="refund", now=T0)
    assert again.created is False
    assert len(entries(session, acct)) == 3


def test_reverse_with_nothing_left_still_records_the_whole_shortfall(session, acct) -> None:
    posted = ledger.grant(session, acct, 10, source="pack", key="pack", now=T0)
    ledger.spend(session, acct, 10, key="s1", now=T0)
    pack = session.scalars(ledger.grant_of(posted.entry)).one()
    reversal = ledger.reverse(session, acct, [pack], 10, key="reverse:re_1", reason="refund", now=T0)
    assert (reversal.entry.amount, reversal.entry.meta["shortfall"]) == (0, 10)


def test_check_finds_nothing_on_a_consistent_ledger(session, acct) -> None:
    ledger.grant(session, acct, 100, source="admin", key="k1", now=T0)
    ledger.spend(session, acct, 40, key="s1", now=T0)
    assert ledger.check(session) == []


def test_check_reports_a_grant_whose_remaining_was_tampered_with(session, acct) -> None:
    ledger.grant(session, acct, 100, source="admin", key="k1", now=T0)
    ledger.spend(session, acct, 40, key="s1", now=T0)
    session.execute(text("UPDATE credit_grants SET remaining = 70, spent = 30"))
    drifts = {(d.what, d.expected, d.actual) for d in ledger.check(session)}
    assert drifts == {("balance", 60, 70), ("grant 1 spent", 40, 30), ("grant 1 remaining", 60, 70)}


def test_check_names_only_the_account_and_grant_that_disagree(session, acct) -> None:
    other = accounts.get_or_create(session, "acct_2")
    for account, key in ((acct, "a"), (other, "b")):
        ledger.grant(session, account, 100, source="admin", key=f"grant-{key}", now=T0)
        ledger.spend(session, account, 40, key=f"spend-{key}", now=T0)
    session.execute(text("UPDATE credit_grants SET amount = 110, remaining = 70 WHERE account_id = :id"), {"id": other.id})
    drifts = [(d.account, d.what, d.expected, d.actual) for d in ledger.check(session)]
    assert drifts == [("acct_2", "balance", 60, 70), ("acct_2", "grant 2 amount", 100, 110)]


@pytest.mark.parametrize("statement", ["UPDATE ledger_entries SET amount = 1", "DELETE FROM ledger_entries"])
def test_the_database_refuses_to_rewrite_the_ledger(sessions, statement: str) -> None:
    with transaction(sessions) as s:
        ledger.grant(s, accounts.get_or_create(s, "acct_1"), 5, source="admin", key="k1", now=T0)
    with pytest.raises(DBAPIError, match="append-only"), transaction(sessions) as s:
        s.execute(text(statement))


def test_a_grant_can_never_hold_more_than_it_was_given(session, acct) -> None:
    ledger.grant(session, acct, 5, source="admin", key="k1", now=T0)
    grant_row = session.scalars(select(Grant)).one()
    grant_row.remaining = 6
    with pytest.raises(DBAPIError):
        session.flush()


def test_accounts_answer_to_their_stripe_customer_id(session) -> None:
    acct = accounts.get_or_create(session, "cus_123")
    assert accounts.get(session, "cus_123").id == acct.id
    assert acct.stripe_customer_id == "cus_123"
    with pytest.raises(accounts.AccountNotFound):
        accounts.get(session, "cus_unknown")
