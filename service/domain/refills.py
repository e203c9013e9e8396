"""Plan refills: a paid invoice grants its plan's credits once (`invoice:{id}`); a renewal first lets the
rollover policy cut what the account carries over; an upgrade billed at once tops the period up to the new
plan's allowance.

Each invoice grants what its own lines say — a period's invoice its plan's allowance, a plan changed
mid-period and billed at once the step up from the allowance it replaces — so a renewal and an upgrade of one
period end the same whichever is processed first, and a refund of either reverses what that invoice granted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from service.domain import ledger, payments, rollover
from service.infra import logs
from service.infra.catalogue import Catalogue, Plan
from service.infra.models import Account, Payment
from service.infra.stripe_objects import Billed, InvoiceFacts
from service.infra.uow import UnitOfWork

log = logs.get("refills")
UPGRADE = "subscription_update"


@dataclass(frozen=True)
class Refilled:
    """What a paid invoice did: the event's outcome, and whether this was the invoice's first handling (the
    payment is recorded now, so it may qualify a referral)."""

    outcome: str
    first: bool


def refill(uow: UnitOfWork, catalogue: Catalogue, account: Account, invoice: InvoiceFacts, now: datetime) -> Refilled:
    """Grant the plan's credits for `invoice` once (an invoice that granted 0 — a downgrade — is handled too)."""
    account = uow.lock_one(account)
    key = f"invoice:{invoice.id}"
    handled = uow.session.get(Payment, invoice.id)
    if ledger.granted(uow, key) or (handled is not None and handled.outcome == "granted"):
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
        period_end=invoice.period_end,
        paid_at=invoice.paid_at or now,
    )
    if invoice.amount_paid <= 0:
        record("no_credits", detail="amount_paid is 0 (trial or fully discounted)")
        return "no credits: amount_paid is 0"
    found = plan_of(catalogue, invoice.billed)
    if found is None:
        prices = ", ".join(invoice.price_ids) or "none"
        record("unknown_price", detail=f"no plan in the catalogue for price(s) {prices}")
        log.warning("refill.unknown_price", invoice=invoice.id, prices=invoice.price_ids, account_id=account.public_id)
        return f"unknown price: {prices}"
    name, plan, allowance = found
    period_start = invoice.period_start or invoice.paid_at or now
    if invoice.prorations_only:
        credits = _top_up(uow, catalogue, invoice, allowance)
    else:
        credits = allowance
        if _renewal(uow, invoice):
            key_of_cut = f"rollover:{invoice.id}"
            rollover.apply(uow, account, plan, allowance, period_start=period_start, key=key_of_cut, now=now)
    if credits > 0:
        ledger.grant(
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
                "subscription": invoice.subscription_id,
                "period_end": invoice.period_end.isoformat() if invoice.period_end else None,
            },
            now=now,
        )
    if _names_the_plan(uow, account, invoice, now):
        account.plan = name
    if invoice.period_end and (account.period_end is None or invoice.period_end > account.period_end):
        account.period_end = invoice.period_end
    record("granted", product=name, credits=credits, allowance=allowance)
    return f"granted {credits} credits ({name})"


def plan_of(catalogue: Catalogue, lines: list[Billed]) -> tuple[str, Plan, int] | None:
    """The first of `lines` whose price the catalogue knows: its plan's name, the plan, and the allowance for
    the line's quantity."""
    for line in lines:
        if hit := catalogue.plan_for_price(line.price):
            return hit[0], hit[1], hit[1].credits_for(line.quantity)
    return None


def _top_up(uow: UnitOfWork, catalogue: Catalogue, invoice: InvoiceFacts, allowance: int) -> int:
    """A plan changed mid-period and billed at once: the new allowance less the higher of the one its
    unused-time line replaces and the highest this period already reached (its own invoice, earlier changes).
    So changing plans back and forth adds nothing, and a downgrade grants nothing and takes nothing back."""
    replaced = plan_of(catalogue, invoice.replaced)
    reached = _reached(uow, invoice)
    floor = max(replaced[2] if replaced is not None else 0, reached or 0)
    return max(0, allowance - floor)


def _renewal(uow: UnitOfWork, invoice: InvoiceFacts) -> bool:
    """Whether the invoice renews its subscription, the moment the rollover policy runs: Stripe's
    `subscription_cycle`; where `billing_reason` is empty (the oldest shapes), an invoice of a subscription
    whose earlier period's invoice is recorded. A first invoice, a manual or a threshold invoice is not."""
    if invoice.billing_reason is not None:
        return invoice.billing_reason == "subscription_cycle"
    if invoice.subscription_id is None or invoice.period_start is None:
        return False
    earlier = select(Payment.id).where(
        Payment.kind == "invoice",
        Payment.subscription_id == invoice.subscription_id,
        Payment.period_end <= invoice.period_start,
    )
    return uow.session.scalar(earlier.limit(1)) is not None


def _names_the_plan(uow: UnitOfWork, account: Account, invoice: InvoiceFacts, now: datetime) -> bool:
    """Whether the invoice names the account's plan: it is of the latest period; within one period a plan
    change billed at once outranks the period's own invoice, and the latest change wins."""
    if invoice.period_end is None or account.period_end is None:
        return True
    if invoice.period_end != account.period_end:
        return invoice.period_end > account.period_end
    changes = select(func.max(Payment.paid_at)).where(
        Payment.account_id == account.id,
        Payment.kind == "invoice",
        Payment.billing_reason == UPGRADE,
        Payment.id != invoice.id,
        Payment.paid_at >= (invoice.period_start or invoice.paid_at or now),
    )
    latest_change = uow.session.scalar(changes)
    if not invoice.prorations_only:
        return latest_change is None
    return latest_change is None or (invoice.paid_at or now) >= latest_change


def _reached(uow: UnitOfWork, invoice: InvoiceFacts) -> int | None:
    """The highest allowance another invoice of the subscription's same billing period already reached."""
    if invoice.period_end is None:
        return None
    query = select(func.max(Payment.allowance)).where(
        Payment.kind == "invoice",
        Payment.subscription_id == invoice.subscription_id,
        Payment.period_end == invoice.period_end,
        Payment.id != invoice.id,
    )
    return uow.session.scalar(query)
