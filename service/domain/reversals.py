"""Refunds and lost disputes take back the unspent credits of the payment, in proportion to the money.

The target is cumulative — credits × refunded ÷ paid, less what earlier reversals of the same payment
already asked for — so partial refunds arriving in any order, or twice, never reverse more than once.
What was already spent cannot come back: the ledger records it as the reversal's shortfall.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from service.domain import ledger
from service.infra.models import Account, Grant, LedgerEntry, Payment
from service.infra.uow import UnitOfWork


def reverse_payment(
    uow: UnitOfWork, payment: Payment, money_back: int, money_total: int, *, key: str, reason: str, now: datetime
) -> str:
    """Reverse the share of `payment`'s credits that `money_back` of `money_total` represents (cumulative,
    minor units: a charge's `amount_refunded` of its `amount`, or a dispute's amount of the payment)."""
    account = uow.lock_one(uow.session.get_one(Account, payment.account_id))
    grants = _grants_of(uow, payment)
    credits = sum(g.amount for g in grants)
    if credits == 0 or money_total <= 0:
        return f"nothing to reverse for {payment.id}"
    target = credits if money_back >= money_total else credits * money_back // money_total
    delta = target - _already_requested(uow, account, payment)
    if delta <= 0:
        return f"already reversed ({payment.id})"
    posted = ledger.debit(
        uow,
        account,
        delta,
        kind="reverse",
        key=key,
        grants=sorted(grants, key=lambda g: g.id),
        partial=True,
        reason=reason,
        actor="stripe",
        meta={"payment": payment.id},
        now=now,
    )
    shortfall = posted.entry.meta.get("shortfall", 0)
    return f"reversed {-posted.entry.amount} of {delta} credits for {payment.id}" + (
        f"; shortfall {shortfall} already spent" if shortfall else ""
    )


def _grants_of(uow: UnitOfWork, payment: Payment) -> list[Grant]:
    keys = [f"invoice:{payment.id}", f"purchase:{payment.id}"]
    return list(
        uow.session.scalars(
            select(Grant)
            .join(LedgerEntry, LedgerEntry.id == Grant.entry_id)
            .where(LedgerEntry.idempotency_key.in_(keys))
        )
    )


def _already_requested(uow: UnitOfWork, account: Account, payment: Payment) -> int:
    """Credits earlier refunds and lost disputes of `payment` asked back — their own reversals only (keyed
    `reverse:…`), not a referral clawback the refund caused, which names the payment too."""
    entries = uow.session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.account_id == account.id,
            LedgerEntry.kind == "reverse",
            LedgerEntry.idempotency_key.like("reverse:%"),
        )
    ).all()
    return sum(int(e.meta.get("requested", 0)) for e in entries if e.meta.get("payment") == payment.id)
