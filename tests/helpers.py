"""Readable views of ledger state for assertions: tests compare exact rows, not just totals."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from service.domain import accounts, ledger
from service.infra.models import Account, Grant, LedgerEntry
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork

T0 = datetime(2026, 1, 1, tzinfo=UTC)
Entry = tuple[str, int, str]
GrantRow = tuple[str, int, int, int, int, int]


def entries(uow: UnitOfWork, account: Account) -> list[Entry]:
    """(kind, amount, idempotency key) of every entry, oldest first."""
    rows = uow.session.scalars(select(LedgerEntry).where(LedgerEntry.account_id == account.id).order_by(LedgerEntry.id))
    return [(e.kind, e.amount, e.idempotency_key) for e in rows]


def grants(uow: UnitOfWork, account: Account) -> list[GrantRow]:
    """(source, amount, remaining, spent, expired, reversed) of every grant, oldest first."""
    rows = uow.session.scalars(select(Grant).where(Grant.account_id == account.id).order_by(Grant.id))
    return [(g.source, g.amount, g.remaining, g.spent, g.expired, g.reversed) for g in rows]


def state(rt: Runtime, ref: str) -> tuple[list[Entry], list[GrantRow]]:
    """(entries, grants) of the account named `ref`, read in a fresh transaction."""
    with rt.uow() as uow:
        account = accounts.get(uow, ref)
        return entries(uow, account), grants(uow, account)


def balance_of(rt: Runtime, ref: str) -> int:
    """The account's balance, read in a fresh transaction."""
    with rt.uow() as uow:
        return ledger.balance(uow, accounts.get(uow, ref))


@contextmanager
def committed(rt: Runtime) -> Iterator[UnitOfWork]:
    """A unit of work committed when the block ends without an error: a test's setup, or a step it takes as
    an entry point would."""
    with rt.uow() as uow:
        yield uow
        uow.commit()


def spend_rows(rt: Runtime) -> list[tuple[int, dict[str, Any]]]:
    """(amount, metadata) of every spend entry, oldest first."""
    with rt.uow() as uow:
        rows = uow.session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "spend").order_by(LedgerEntry.id))
        return [(e.amount, e.meta) for e in rows]
