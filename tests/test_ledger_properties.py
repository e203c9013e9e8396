"""Property tests: for any sequence of grants, spends, expiries and replays (with a fake clock), the
ledger's invariants hold after every step (DESIGN.md, Invariants 1-4 and 8)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from service.domain import accounts, ledger
from service.infra.models import LedgerEntry
from tests.helpers import T0


@dataclass(frozen=True)
class Grant:
    amount: int
    expires_in_days: int | None
    rollover: bool


@dataclass(frozen=True)
class Spend:
    amount: int


@dataclass(frozen=True)
class Advance:
    days: int


@dataclass(frozen=True)
class Replay:
    which: int


operations = st.lists(
    st.one_of(
        st.builds(Grant, st.integers(1, 50), st.one_of(st.none(), st.integers(1, 20)), st.booleans()),
        st.builds(Spend, st.integers(1, 60)),
        st.builds(Advance, st.integers(1, 10)),
        st.builds(Replay, st.integers(0, 100)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_keeps_every_invariant(sessions, ops: list[object]) -> None:  # type: ignore[no-untyped-def]
    with sessions() as session:
        try:
            _run(session, ops)
        finally:
            session.rollback()


def _run(session, ops: list[object]) -> None:  # type: ignore[no-untyped-def]
    acct = accounts.get_or_create(session, "acct_prop")
    now = T0
    done: list[tuple[str, object]] = []
    for step, op in enumerate(ops):
        before = ledger.balance(session, acct, now)
        if isinstance(op, Grant):
            key = f"g{step}"
            expires = now + timedelta(days=op.expires_in_days) if op.expires_in_days else None
            ledger.grant(session, acct, op.amount, source="admin", key=key, expires_at=expires, rollover=op.rollover, now=now)
            assert ledger.balance(session, acct, now) == before + op.amount
            done.append((key, op))
        elif isinstance(op, Spend):
            key = f"s{step}"
            try:
                ledger.spend(session, acct, op.amount, key=key, now=now)
            except ledger.InsufficientCredits as refused:
                assert refused.balance == before < op.amount
                assert ledger.balance(session, acct, now) == before
            else:
                assert before >= op.amount
                assert ledger.balance(session, acct, now) == before - op.amount
                done.append((key, op))
        elif isinstance(op, Advance):
            now += timedelta(days=op.days)
            ledger.expire_due(session, acct, now)
        elif isinstance(op, Replay) and done:
            key, original = done[op.which % len(done)]
            count = _entry_count(session)
            if isinstance(original, Grant):
                again = ledger.grant(session, acct, original.amount, source="admin", key=key, now=now)
            else:
                again = ledger.spend(session, acct, original.amount, key=key, now=now)  # type: ignore[attr-defined]
            assert again.created is False
            assert _entry_count(session) == count
            assert ledger.balance(session, acct, now) == before
        _assert_invariants(session, acct, now)


def _assert_invariants(session, acct, now) -> None:  # type: ignore[no-untyped-def]
    assert ledger.check(session) == []
    balance = ledger.balance(session, acct, now)
    assert balance >= 0
    ledger.expire_due(session, acct, now)
    ledger_sum = session.scalar(select(func.sum(LedgerEntry.amount)).where(LedgerEntry.account_id == acct.id)) or 0
    assert ledger_sum == balance  # once due expiries are swept, the balance is the ledger's sum


def _entry_count(session) -> int:  # type: ignore[no-untyped-def]
    return session.scalar(select(func.count()).select_from(LedgerEntry))
