"""Plan refills: a paid invoice grants its plan's credits once (`invoice:{id}`), after the rollover policy
has cut what the account carries over; an upgrade's invoice tops the period up to the new plan's allowance.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from service.domain import ledger, payments, rollover
from service.infra import logs
from service.infra.catalogue import Catalogue
from service.infra.models import Account, Grant, LedgerEntry, Payment
from service.infra.stripe_objects import InvoiceFacts
from service.infra.uow import UnitOfWork

log = logs.get("refills")


@dataclass(frozen=True)
class Refilled:
    """What a paid invoice did: the event's outcome, and whether this was the invoice's first handling (the
    payment is recorded now, so it may qualify a referral)."""

    outcome: str
    first: bool


def refill(uow: UnitOfWork, catalogue: Catalogue, account: Account, invoice: InvoiceFacts, now: datetime) -> Refilled:
    """Grant the plan's credits for `invoice` once."""
    account = uow.lock_one(account)
    key = f"invoice:{invoice.id}"
    if ledger.granted(uow, key):
        return Refilled(f"already granted ({key})", first=False)
    return Refilled(_refill(uow, catalogue, account, invoice, key, now), first=True)


def _refill(
    uow: UnitOfWork, catalogue: Catalogue, account: Account, invoice: InvoiceFacts, key: str, now: datetime
) -> str:
    record = payments.recorder(
        uow,
        invoice.id,
        account,
        kind="invoice",
        amount=invoice.amount_paid,
        currency=invoice.currency,
        payment_intent=invoice.payment_intent,
        charge=invoice.charge,
        subscription_id=invoice.subscription_id,
        billing_reason=invoice.billing_reason,
        paid_at=invoice.paid_at or now,
    )
    if invoice.amount_paid <= 0:
        record("no_credits", detail="amount_paid is 0 (trial or fully discounted)")
        return "no credits: amount_paid is 0"
    found, seats = next(
        ((hit, line.quantity) for line in invoice.billed if (hit := catalogue.plan_for_price(line.price))), (None, 1)
    )
    if found is None:
        prices = ", ".join(invoice.price_ids) or "none"
        record("unknown_price", detail=f"no plan in the catalogue for price(s) {prices}")
        log.warning("refill.unknown_price", invoice=invoice.id, prices=invoice.price_ids, account_id=account.public_id)
        return f"unknown price: {prices}"
    name, plan = found
    credits = allowance = plan.credits_for(seats)
    period_start = invoice.period_start or invoice.paid_at or now
    # A period is granted its plan's allowance once, topped up by an upgrade: whichever of a renewal and an
    # upgrade billed at once in its period is processed first, the period ends with the larger allowance.
    credits = max(0, allowance - _granted_for_period(uow, account, invoice.period_end))
    if invoice.billing_reason not in ("subscription_create", "subscription_update"):
        # a renewal: a first invoice has nothing to carry over, an upgrade's period has already begun
        rollover.apply(uow, account, plan, allowance, period_start=period_start, key=f"rollover:{invoice.id}", now=now)
    if credits > 0:
        posted = ledger.grant(
            uow,
            account,
            credits,
            source="plan",
            key=key,
            reason=f"{name} plan, invoice {invoice.id}",
            actor="stripe",
            rollover=True,
            earned_at=period_start,
            meta={
                "invoice": invoice.id,
                "plan": name,
                "billing_reason": invoice.billing_reason,
                "period_end": invoice.period_end.isoformat() if invoice.period_end else None,
            },
            now=now,
        )
        rollover.cut_late(uow, account, posted, earned_at=period_start, now=now)
    if _latest(uow, account, invoice, now):
        account.plan = name
    if invoice.period_end and (account.period_end is None or invoice.period_end > account.period_end):
        account.period_end = invoice.period_end
    record("granted", product=name, credits=credits)
    return f"granted {credits} credits ({name})"


def _latest(uow: UnitOfWork, account: Account, invoice: InvoiceFacts, now: datetime) -> bool:
    """Whether the invoice is the account's latest in billing time, and so names its plan: a late invoice of
    an earlier period, or a period's first invoice processed after its upgrade, does not."""
    if invoice.period_end is None or account.period_end is None or invoice.period_end != account.period_end:
        return invoice.period_end is None or account.period_end is None or invoice.period_end > account.period_end
    others = select(func.max(Payment.paid_at)).where(
        Payment.account_id == account.id, Payment.kind == "invoice", Payment.id != invoice.id
    )
    latest = uow.session.scalar(others)
    return latest is None or (invoice.paid_at or now) >= latest


def _granted_for_period(uow: UnitOfWork, account: Account, period_end: datetime | None) -> int:
    """Plan credits already granted for the billing period that ends at `period_end` (for upgrade top-ups)."""
    if period_end is None:
        return 0
    rows = uow.session.execute(
        select(Grant.amount, LedgerEntry.meta)
        .join(LedgerEntry, LedgerEntry.id == Grant.entry_id)
        .where(Grant.account_id == account.id, Grant.source == "plan")
    ).all()
    return sum(amount for amount, meta in rows if (meta or {}).get("period_end") == period_end.isoformat())
