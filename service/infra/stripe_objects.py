"""Reading facts out of Stripe objects in every API shape (2017 localstripe, 2020-2025, 2025-03-31+).

The same fact lives in different places across API versions (tests/data/stripe holds one of each); each function
here reads all of them, so handlers never branch on the API version. Expandable fields may be an id or an
expanded object; `ref()` reads either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]


def ref(value: Any) -> str | None:
    """The id of an expandable field, whether it came as an id string or an expanded object (None when
    what came is neither: a payload is never trusted to have the types its API version promises)."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


def timestamp(value: Any) -> datetime | None:
    """A Stripe epoch-seconds field as an aware UTC datetime (None when it is not a usable time)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def metadata(obj: Obj | None) -> dict[str, str]:
    """`metadata` as a dict of strings (Stripe sends {} or null when there is none)."""
    raw = (obj or {}).get("metadata")
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class Billed:
    """An invoice line that may bill a plan: its price and quantity (seats, for a plan priced per seat)."""

    price: str
    quantity: int


@dataclass(frozen=True)
class InvoiceFacts:
    """What a refill, a referral qualification and a refund need to know about an invoice."""

    id: str
    customer: str | None
    amount_paid: int
    currency: str | None
    billing_reason: str | None
    subscription_id: str | None
    subscription_metadata: dict[str, str] | None
    metadata: dict[str, str]
    price_ids: list[str]
    billed: list[Billed]
    replaced: list[Billed]  # the unused time on a plan changed mid-period: its negative proration lines
    prorations_only: bool  # billed by its prorations alone: a plan changed mid-period and billed at once
    period_start: datetime | None
    period_end: datetime | None
    payment_intent: str | None
    charge: str | None
    customer_email: str | None
    paid_at: datetime | None


def invoice(obj: Obj) -> InvoiceFacts:
    """Facts of an invoice in any shape."""
    parent = (obj.get("parent") or {}).get("subscription_details") or {}
    legacy_details = obj.get("subscription_details") or {}
    lines = [line for line in ((obj.get("lines") or {}).get("data") or []) if isinstance(line, dict)]
    billing = _billing_lines(lines)
    # The period is the billed lines': a cycle invoice's prorations of an earlier change start mid-period.
    periods = [line.get("period") or {} for line in billing or [line for line in lines if _line_price(line)] or lines]
    sub_metadata = parent.get("metadata") if "metadata" in parent else legacy_details.get("metadata")
    paid_at = timestamp((obj.get("status_transitions") or {}).get("paid_at")) or timestamp(obj.get("created"))
    return InvoiceFacts(
        id=obj["id"],
        customer=ref(obj.get("customer")),
        amount_paid=_int(obj.get("amount_paid")),
        currency=obj.get("currency"),
        billing_reason=obj.get("billing_reason"),
        subscription_id=ref(obj.get("subscription")) or ref(parent.get("subscription")),
        subscription_metadata=dict(sub_metadata) if isinstance(sub_metadata, dict) else None,
        metadata=metadata(obj),
        price_ids=[p for p in (_line_price(line) for line in lines) if p],
        billed=_as_billed(billing),
        replaced=_as_billed([line for line in lines if _proration(line) and _int(line.get("amount")) < 0]),
        prorations_only=bool(billing) and all(_proration(line) for line in billing),
        period_start=min((t for t in (timestamp(p.get("start")) for p in periods) if t), default=None),
        period_end=max((t for t in (timestamp(p.get("end")) for p in periods) if t), default=None),
        payment_intent=ref(obj.get("payment_intent")) or _invoice_payment_intent(obj),
        charge=ref(obj.get("charge")),
        customer_email=obj.get("customer_email"),
        paid_at=paid_at,
    )


def _as_billed(lines: list[Obj]) -> list[Billed]:
    """The priced lines as (price, quantity): a quantity below 1 (absent) counts as 1."""
    return [Billed(price, max(1, _int(line.get("quantity")))) for line in lines if (price := _line_price(line))]


def _billing_lines(lines: list[Obj]) -> list[Obj]:
    """The priced lines that may name the plan an invoice bills, in the order to try them: its lines for the
    period (not prorations); on an invoice of prorations only (an upgrade billed at once), its positive
    proration lines. A negative proration (the unused time on the old plan, which Stripe lists first) never
    names it."""
    priced = [line for line in lines if _line_price(line)]
    for_period = [line for line in priced if not _proration(line)]
    return for_period or [line for line in priced if _proration(line) and _int(line.get("amount")) > 0]


def _proration(line: Obj) -> bool:
    """Whether an invoice line is a proration: `proration` on the line (to 2025-03-31), or on the details its
    parent's `type` names (2025-03-31+: `subscription_item_details` or `invoice_item_details`)."""
    parent = line.get("parent")
    details = parent.get(str(parent.get("type"))) if isinstance(parent, dict) else None
    return line.get("proration") is True or (isinstance(details, dict) and details.get("proration") is True)


def _line_price(line: Obj) -> str | None:
    """The price (or legacy plan) id of an invoice line: `pricing.price_details.price` (2025-03-31+),
    `price.id` (2020-2025) or `plan.id` (2017)."""
    pricing = (line.get("pricing") or {}).get("price_details") or {}
    return ref(pricing.get("price")) or ref(line.get("price")) or ref(line.get("plan"))


def _invoice_payment_intent(obj: Obj) -> str | None:
    """The payment intent from the invoice's `payments` list (2025-03-31+, when included)."""
    for item in (obj.get("payments") or {}).get("data") or []:
        payment = (item or {}).get("payment") or {}
        if pi := ref(payment.get("payment_intent")):
            return pi
    return None


@dataclass(frozen=True)
class ChargeFacts:
    """What a reversal needs from a charge (refunded) or the charge behind a dispute."""

    id: str
    customer: str | None
    amount: int
    amount_refunded: int
    invoice: str | None
    payment_intent: str | None
    latest_refund: str | None
    refunded_at: datetime | None  # the latest refund's own time, when the charge lists its refunds


def charge(obj: Obj) -> ChargeFacts:
    """Facts of a charge; `invoice` is gone from charges in the newest API, so it may be None."""
    refunds = [r for r in ((obj.get("refunds") or {}).get("data") or []) if isinstance(r, dict)]
    latest = max(refunds, key=lambda r: (r.get("created") or 0, r.get("id") or ""), default=None)
    return ChargeFacts(
        id=obj["id"],
        customer=ref(obj.get("customer")),
        amount=_int(obj.get("amount")),
        amount_refunded=_int(obj.get("amount_refunded")),
        invoice=ref(obj.get("invoice")),
        payment_intent=ref(obj.get("payment_intent")),
        latest_refund=latest.get("id") if latest else None,
        refunded_at=timestamp(latest.get("created")) if latest else None,
    )


@dataclass(frozen=True)
class DisputeFacts:
    id: str
    charge: str | None
    payment_intent: str | None
    amount: int
    status: str | None
    opened_at: datetime | None  # the dispute's `created`: what a clawback window counts to


def dispute(obj: Obj) -> DisputeFacts:
    """Facts of a dispute."""
    return DisputeFacts(
        id=obj["id"],
        charge=ref(obj.get("charge")),
        payment_intent=ref(obj.get("payment_intent")),
        amount=_int(obj.get("amount")),
        status=obj.get("status"),
        opened_at=timestamp(obj.get("created")),
    )


@dataclass(frozen=True)
class CheckoutFacts:
    id: str
    mode: str | None
    payment_status: str | None
    customer: str | None
    client_reference_id: str | None
    payment_intent: str | None
    subscription_id: str | None
    amount_total: int
    currency: str | None
    metadata: dict[str, str]
    email: str | None


def checkout_session(obj: Obj) -> CheckoutFacts:
    """Facts of a Checkout session."""
    details = obj.get("customer_details") or {}
    return CheckoutFacts(
        id=obj["id"],
        mode=obj.get("mode"),
        payment_status=obj.get("payment_status"),
        customer=ref(obj.get("customer")),
        client_reference_id=obj.get("client_reference_id") or None,
        payment_intent=ref(obj.get("payment_intent")),
        subscription_id=ref(obj.get("subscription")),
        amount_total=_int(obj.get("amount_total")),
        currency=obj.get("currency"),
        metadata=metadata(obj),
        email=details.get("email") or obj.get("customer_email"),
    )


@dataclass(frozen=True)
class PaymentIntentFacts:
    id: str
    customer: str | None
    amount_received: int
    currency: str | None
    metadata: dict[str, str]
    charge: str | None


def payment_intent(obj: Obj) -> PaymentIntentFacts:
    """Facts of a payment intent; its charge is `latest_charge` (2022+) or `charges.data[0]` (older)."""
    charges = (obj.get("charges") or {}).get("data") or []
    return PaymentIntentFacts(
        id=obj["id"],
        customer=ref(obj.get("customer")),
        amount_received=_int(obj.get("amount_received", obj.get("amount"))),
        currency=obj.get("currency"),
        metadata=metadata(obj),
        charge=ref(obj.get("latest_charge")) or (ref(charges[0]) if charges else None),
    )


@dataclass(frozen=True)
class SubscriptionFacts:
    id: str
    customer: str | None
    status: str | None
    price_ids: list[str] = field(default_factory=list)
    current_period_end: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def subscription(obj: Obj) -> SubscriptionFacts:
    """Facts of a subscription; `current_period_end` moved from the subscription to its items in 2025."""
    items = [i for i in ((obj.get("items") or {}).get("data") or []) if isinstance(i, dict)]
    prices = [ref(i.get("price")) or ref(i.get("plan")) for i in items] or [ref(obj.get("plan"))]
    ends = [timestamp(i.get("current_period_end")) for i in items] + [timestamp(obj.get("current_period_end"))]
    return SubscriptionFacts(
        id=obj["id"],
        customer=ref(obj.get("customer")),
        status=obj.get("status"),
        price_ids=[p for p in prices if p],
        current_period_end=max((e for e in ends if e), default=None),
        metadata=metadata(obj),
    )


@dataclass(frozen=True)
class CustomerFacts:
    id: str
    email: str | None
    metadata: dict[str, str]
    deleted: bool


def customer(obj: Obj) -> CustomerFacts:
    """Facts of a customer (or of its `deleted: true` stub)."""
    return CustomerFacts(id=obj["id"], email=obj.get("email"), metadata=metadata(obj), deleted=bool(obj.get("deleted")))


def _int(value: Any) -> int:
    """An integer amount; anything else (null, a string, a bool) counts as 0 rather than crashing."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
