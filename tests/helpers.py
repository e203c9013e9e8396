"""Readable views of ledger state for assertions: tests compare exact rows, not just totals."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain import accounts, ledger
from service.infra.models import Account, Grant, LedgerEntry

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def entries(session: Session, account: Account) -> list[tuple[str, int, str]]:
    """(kind, amount, idempotency key) of every entry, oldest first."""
    rows = session.scalars(select(LedgerEntry).where(LedgerEntry.account_id == account.id).order_by(LedgerEntry.id))
    return [(e.kind, e.amount, e.idempotency_key) for e in rows]


def grants(session: Session, account: Account) -> list[tuple[str, int, int, int, int, int]]:
    """(source, amount, remaining, spent, expired, reversed) of every grant, oldest first."""
    rows = session.scalars(select(Grant).where(Grant.account_id == account.id).order_by(Grant.id))
    return [(g.source, g.amount, g.remaining, g.spent, g.expired, g.reversed) for g in rows]


def state(sessions, ref: str) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, int, int, int, int]]]:  # type: ignore[no-untyped-def]
    """(entries, grants) of the account named `ref`, read in a fresh transaction."""
    with sessions() as session:
        account = accounts.get(session, ref)
        return entries(session, account), grants(session, account)


def balance_of(sessions, ref: str) -> int:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return ledger.balance(session, accounts.get(session, ref))
