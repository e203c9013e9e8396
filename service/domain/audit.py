"""The audit trail of support actions: who did what to which account, why, under which ticket, what changed.

Ledger entries already say what moved; this says why a person moved it, so a later reader (another agent,
the on-call engineer, the customer's auditor) never has to reconstruct a hand repair from the ledger alone.
Rows are written in the same transaction as the action, so an action and its record commit together.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from service.infra.models import Account, AuditEntry, utcnow
from service.infra.uow import UnitOfWork


def record(
    uow: UnitOfWork,
    *,
    actor: str,
    action: str,
    reason: str,
    account: Account | None = None,
    ticket: str | None = None,
    details: dict[str, Any],
) -> AuditEntry:
    """Add one row to the trail (also for an action that changed nothing: that it was tried is worth knowing)."""
    entry = AuditEntry(
        at=utcnow(),
        actor=actor,
        action=action,
        account_id=account.id if account is not None else None,
        reason=reason,
        ticket=ticket,
        details=details,
    )
    uow.session.add(entry)
    uow.session.flush()
    return entry


def listing(uow: UnitOfWork, account: Account | None = None, limit: int = 50) -> list[AuditEntry]:
    """The trail newest first, at most `limit` rows, only the account's when one is given."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if account is not None:
        query = query.where(AuditEntry.account_id == account.id)
    return list(uow.session.scalars(query))


def view(uow: UnitOfWork, entry: AuditEntry) -> dict[str, Any]:
    """A row as `credits audit --json` shows it, naming the account by its public id."""
    account = uow.session.get(Account, entry.account_id) if entry.account_id is not None else None
    return {
        "id": entry.id,
        "at": entry.at.isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "account_id": account.public_id if account is not None else None,
        "reason": entry.reason,
        "ticket": entry.ticket,
        "details": entry.details,
    }
