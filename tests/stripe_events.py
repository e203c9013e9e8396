"""Stripe events for tests, built from the recorded payloads in tests/data/stripe (Stripe's published examples
and localstripe's events) in each API era, with only the facts a test cares about changed, and signed the way
Stripe signs them.

Eras: "2017" — localstripe's 2017-08-15 shapes (`plan.id`, `invoice.subscription`); "2020" — 2020 to early
2025 (`price.id`, `invoice.subscription`, `subscription_details.metadata`); "2025" — 2025-03-31 and later
(`pricing.price_details.price`, `parent.subscription_details`).
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from service.entry import demo
from tests.helpers import T0

DATA = Path(__file__).parent / "data" / "stripe"
ERAS = ("2017", "2020", "2025")
API_VERSIONS = {"2017": "2017-08-15", "2020": "2024-06-20", "2025": "2025-03-31.basil"}
SECRET = "whsec_test_current"
_ids = itertools.count(1)


@cache
def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def fixture(name: str) -> dict[str, Any]:
    """A fresh copy of a recorded payload."""
    return copy.deepcopy(_load(name))


def epoch(when: datetime) -> int:
    return int(when.timestamp())


def event(
    type_: str,
    obj: dict[str, Any],
    *,
    era: str = "2025",
    event_id: str | None = None,
    created: datetime = T0,
    livemode: bool = False,
) -> dict[str, Any]:
    """A Stripe event envelope around `obj`."""
    return {
        "id": event_id or f"evt_test_{next(_ids)}",
        "object": "event",
        "api_version": API_VERSIONS[era],
        "created": epoch(created),
        "livemode": livemode,
        "type": type_,
        "data": {"object": obj},
    }


def invoice(
    era: str,
    *,
    invoice_id: str,
    customer: str,
    price: str,
    amount_paid: int,
    billing_reason: str | None = "subscription_create",
    subscription: str = "sub_1",
    period: tuple[datetime, datetime] = (T0, T0.replace(month=2)),
    subscription_metadata: dict[str, str] | None = None,
    payment_intent: str | None = None,
    charge: str | None = None,
) -> dict[str, Any]:
    """A paid invoice for one subscription line, in the shape of `era`."""
    start, end = epoch(period[0]), epoch(period[1])
    if era == "2017":
        obj = fixture("localstripe.invoice.payment_succeeded.json")["data"]["object"]
        obj.pop("parent", None)
        line = obj["lines"]["data"][0]
        line["plan"]["id"] = price
        obj["charge"]["id"] = charge or obj["charge"]["id"]  # 2017 delivers the charge expanded
        obj.update(subscription=subscription, payment_intent=payment_intent)
    else:
        obj = fixture("current.invoice.json")
        line = obj["lines"]["data"][0]
        line.pop("plan", None)
        if era == "2020":
            obj.pop("parent", None)
            line.pop("parent", None)  # lines have no parent before 2025-03-31
            line.pop("pricing", None)
            line["price"] = {"id": price, "object": "price"}
            obj["subscription"] = subscription
            obj["subscription_details"] = {"metadata": subscription_metadata or {}}
            obj.update(payment_intent=payment_intent, charge=charge)
        else:
            line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": "prod_1"}}
            line["parent"] = {  # the subscription's line for the period, not a proration
                "type": "subscription_item_details",
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": None,
                    "proration": False,
                    "proration_details": {"credited_items": None},
                    "subscription": subscription,
                    "subscription_item": "si_1",
                },
            }
            obj["parent"] = {
                "type": "subscription_details",
                "subscription_details": {"subscription": subscription, "metadata": subscription_metadata or {}},
            }
            obj["subscription"] = None
            if payment_intent:
                obj["payments"] = {
                    "object": "list",
                    "data": [{"payment": {"type": "payment_intent", "payment_intent": payment_intent}}],
                }
    line["period"] = {"start": start, "end": end}
    line["amount"] = amount_paid
    obj.update(
        id=invoice_id,
        customer=customer,
        amount_paid=amount_paid,
        amount_due=amount_paid,
        billing_reason=billing_reason,
        status="paid",
        status_transitions={"paid_at": start, "finalized_at": start},
        period_start=start,
        period_end=end,
    )
    return obj


@dataclass(frozen=True)
class Line:
    """An invoice line: its price, amount (negative for unused time), period, whether it prorates, and its
    quantity (seats)."""

    price: str
    amount: int
    period: tuple[datetime, datetime]
    proration: bool = False
    quantity: int = 1


def invoice_of_lines(era: str, lines: list[Line], **fields: Any) -> dict[str, Any]:
    """A paid invoice with these lines, in the order given (Stripe lists the unused time first), each in the
    shape of `era`: `proration` and `type` on the line to 2025-03-31, `parent.subscription_item_details`
    after. `fields` are `invoice`'s."""
    obj = invoice(era, price=lines[0].price, **fields)
    template = obj["lines"]["data"][0]
    subscription = fields.get("subscription", "sub_1")
    built = []
    for n, line in enumerate(lines):
        data = copy.deepcopy(template)
        data.update(
            id=f"il_{n}",
            amount=line.amount,
            quantity=line.quantity,
            period={"start": epoch(line.period[0]), "end": epoch(line.period[1])},
        )
        if era == "2017":
            data["plan"]["id"] = line.price
            data["proration"] = line.proration
        elif era == "2020":
            data["price"] = {"id": line.price, "object": "price"}
            data.update(proration=line.proration, type="invoiceitem" if line.proration else "subscription")
        else:
            data["pricing"] = {"type": "price_details", "price_details": {"price": line.price, "product": "prod_1"}}
            data["parent"] = {
                "type": "subscription_item_details",
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": f"ii_{n}" if line.proration else None,
                    "proration": line.proration,
                    "proration_details": {"credited_items": None},
                    "subscription": subscription,
                    "subscription_item": "si_1",
                },
            }
        built.append(data)
    obj["lines"]["data"] = built
    return obj


def customer(
    customer_id: str, *, email: str = "bob@example.com", metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    obj = fixture("current.customer.json")
    obj.update(id=customer_id, email=email, metadata=metadata or {})
    return obj


def checkout_session(
    *,
    session_id: str = "cs_test_1",
    customer: str | None = "cus_1",
    client_reference_id: str | None = None,
    mode: str = "payment",
    payment_status: str = "paid",
    payment_intent: str | None = "pi_1",
    subscription: str | None = None,
    amount_total: int = 1000,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    obj = fixture("current.checkout.session.json")
    obj.update(
        id=session_id,
        customer=customer,
        client_reference_id=client_reference_id,
        mode=mode,
        payment_status=payment_status,
        status="complete",
        payment_intent=payment_intent,
        subscription=subscription,
        amount_total=amount_total,
        currency="usd",
        metadata=metadata or {},
    )
    return obj


def payment_intent(
    era: str = "2025",
    *,
    intent_id: str = "pi_1",
    customer: str | None = "cus_1",
    amount: int = 1000,
    metadata: dict[str, str] | None = None,
    charge: str = "ch_1",
) -> dict[str, Any]:
    if era == "2017":
        obj = fixture("localstripe.payment_intent.succeeded.json")["data"]["object"]
        obj["charges"]["data"][0]["id"] = charge
        obj.pop("latest_charge", None)
    else:
        obj = fixture("current.payment_intent.json")
        obj["latest_charge"] = charge
    obj.update(
        id=intent_id,
        customer=customer,
        amount=amount,
        amount_received=amount,
        status="succeeded",
        metadata=metadata or {},
        currency="usd",
    )
    return obj


def charge(
    *,
    charge_id: str = "ch_1",
    amount: int = 1000,
    amount_refunded: int = 0,
    invoice: str | None = None,
    payment_intent: str | None = None,
    refunds: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    obj = fixture("current.charge.json")
    obj.update(
        id=charge_id,
        amount=amount,
        amount_captured=amount,
        amount_refunded=amount_refunded,
        refunded=amount_refunded >= amount,
        invoice=invoice,
        payment_intent=payment_intent,
        customer="cus_1",
    )
    obj["refunds"] = {
        "object": "list",
        "data": [
            {"id": rid, "object": "refund", "amount": amt, "created": epoch(T0) + n}
            for n, (rid, amt) in enumerate(refunds)
        ],
    }
    if invoice is None:
        obj.pop("invoice", None)
    return obj


def dispute(
    *,
    dispute_id: str = "dp_1",
    charge: str = "ch_1",
    payment_intent: str | None = None,
    amount: int = 1000,
    status: str = "lost",
) -> dict[str, Any]:
    obj = fixture("current.dispute.json")
    obj.update(id=dispute_id, charge=charge, payment_intent=payment_intent, amount=amount, status=status)
    return obj


def subscription(
    era: str = "2025",
    *,
    subscription_id: str = "sub_1",
    customer: str = "cus_1",
    price: str = "price_starter_monthly",
    status: str = "active",
    period_end: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    end = epoch(period_end or T0.replace(month=2))
    if era == "2017":
        obj = fixture("localstripe.customer.subscription.created.json")["data"]["object"]
        obj["items"]["data"][0]["plan"]["id"] = price
        obj["plan"]["id"] = price
        obj["current_period_end"] = end
    else:
        obj = fixture("current.subscription.json")
        item = obj["items"]["data"][0]
        item["price"]["id"] = price
        item.pop("plan", None)
        item["current_period_end"] = end
    obj.update(id=subscription_id, customer=customer, status=status, metadata=metadata or {})
    return obj


def sign(body: bytes, secret: str = SECRET, at: int | None = None) -> str:
    """A Stripe-Signature header for `body`, signed with the test secret unless told otherwise."""
    return demo.sign(body, secret, at)


def encode(evt: dict[str, Any]) -> bytes:
    return json.dumps(evt).encode()
