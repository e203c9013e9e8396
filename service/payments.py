"""Money received, keyed by its own id: what it paid for, what it was worth in credits, and what became of it.

Kept beside the ledger so that a refund or dispute (which names a charge, a payment intent or an invoice)
finds the credits it should reverse, and so that an unknown price is a stored, reportable outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.models import Account, Payment


def record(
    session: Session,
    payment_id: str,
    account: Account,
    *,
    kind: str,
    amount: int,
    paid_at: datetime,
    outcome: str,
    currency: str | None = None,
    payment_intent: str | None = None,
    charge: str | None = None,
    subscription_id: str | None = None,
    billing_reason: str | None = None,
    product: str | None = None,
    credits: int = 0,
    detail: str | None = None,
) -> Payment:
    """Create or update the payment row; later facts (a charge id, a fixed price) fill in, never erase."""
    payment = session.get(Payment, payment_id)
    if payment is None:
        payment = Payment(id=payment_id, account_id=account.id, kind=kind, amount=amount, paid_at=paid_at, outcome=outcome)
        session.add(payment)
    payment.account_id, payment.outcome, payment.detail = account.id, outcome, detail
    payment.amount = amount or payment.amount
    payment.credits = credits or payment.credits
    payment.currency = currency or payment.currency
    payment.payment_intent = payment_intent or payment.payment_intent
    payment.charge = charge or payment.charge
    payment.subscription_id = subscription_id or payment.subscription_id
    payment.billing_reason = billing_reason or payment.billing_reason
    payment.product = product or payment.product
    session.flush()
    return payment


def recorder(session: Session, payment_id: str, account: Account, **known: Any) -> Callable[..., Payment]:
    """`record` with the facts already known bound, so a handler only names the outcome (and extras)."""
    return lambda outcome, **extra: record(session, payment_id, account, outcome=outcome, **known, **extra)


def find(session: Session, *, charge: str | None, payment_intent: str | None, invoice: str | None) -> Payment | None:
    """The payment a charge, payment intent or invoice id belongs to, if it was recorded."""
    conditions = []
    if invoice:
        conditions.append(Payment.id == invoice)
    if payment_intent:
        conditions += [Payment.id == payment_intent, Payment.payment_intent == payment_intent]
    if charge:
        conditions.append(Payment.charge == charge)
    if not conditions:
        return None
    return session.scalars(select(Payment).where(or_(*conditions)).order_by(Payment.created_at)).first()
