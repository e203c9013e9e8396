"""Money received, keyed by its own id: what it paid for, what it was worth in credits, and what became of it.

Kept beside the ledger so that a refund or dispute (which names a charge, a payment intent or an invoice)
finds the credits it should reverse, and so that an unknown price is a stored, reportable outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select

from service.infra import db
from service.infra.models import Account, Payment, utcnow
from service.infra.uow import UnitOfWork


def record(
    uow: UnitOfWork,
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
    period_end: datetime | None = None,
    allowance: int | None = None,
) -> None:
    """Create or update the payment row: a new row as given; on an existing row the account, outcome and detail
    are replaced and every other fact only by a given one (not 0, not empty) — later facts (a charge id, a
    fixed price) fill in, never erase; kind and paid_at are kept."""
    uow.session.execute(
        UPSERT[uow.dialect],
        {
            "id": payment_id,
            "account_id": account.id,
            "kind": kind,
            "amount": amount,
            "paid_at": paid_at,
            "outcome": outcome,
            "detail": detail,
            "credits": credits,
            "currency": currency,
            "payment_intent": payment_intent,
            "charge": charge,
            "subscription_id": subscription_id,
            "billing_reason": billing_reason,
            "product": product,
            "period_end": period_end,
            "allowance": allowance,
            "created_at": utcnow(),
        },
    )
    held = uow.session.identity_map.get(uow.session.identity_key(Payment, payment_id))
    if held is not None:  # read earlier in this transaction: read it again when next used
        uow.session.expire(held)


def _upsert(dialect: str) -> db.Insert:
    statement = db.insert(dialect, Payment.__table__)
    new = statement.excluded
    facts = {
        name: func.coalesce(
            func.nullif(new[name], 0 if name in ("amount", "credits") else ""), Payment.__table__.c[name]
        )
        for name in (
            "amount",
            "credits",
            "currency",
            "payment_intent",
            "charge",
            "subscription_id",
            "billing_reason",
            "product",
        )
    }
    kept = {name: func.coalesce(new[name], Payment.__table__.c[name]) for name in ("period_end", "allowance")}
    return statement.on_conflict_do_update(
        index_elements=["id"],
        set_={"account_id": new.account_id, "outcome": new.outcome, "detail": new.detail, **facts, **kept},
    )


UPSERT = {dialect: _upsert(dialect) for dialect in db.DIALECTS}  # built once: every payment event records


def recorder(uow: UnitOfWork, payment_id: str, account: Account, **known: Any) -> Callable[..., None]:
    """`record` with the facts already known bound, so a handler only names the outcome (and extras)."""
    return lambda outcome, **extra: record(uow, payment_id, account, outcome=outcome, **known, **extra)


def find(uow: UnitOfWork, *, charge: str | None, payment_intent: str | None, invoice: str | None) -> Payment | None:
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
    return uow.session.scalars(select(Payment).where(or_(*conditions)).order_by(Payment.created_at)).first()
