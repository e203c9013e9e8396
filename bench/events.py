"""Stripe objects and signed webhook bodies, built here so the harness needs nothing from the service's packages.

The objects start from recorded 2025-03-31 payloads (bench/stripe_objects.json, copied from the fixtures in
tests/data/stripe, so that the old and the new checkout are sent byte for byte the same bodies), with only
the facts a benchmark cares about changed. Bodies are pretty-printed with two spaces, as Stripe sends them.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

TAG = "BENCHTAG"  # stamped with each event's own ids in a template body


@cache
def _recorded() -> dict[str, Any]:
    return json.loads(Path(__file__).with_name("stripe_objects.json").read_text())


def recorded(name: str, **fields: Any) -> dict[str, Any]:
    """A fresh copy of a recorded object (invoice, customer, checkout_session, subscription, payment_intent),
    `fields` set on it."""
    return copy.deepcopy(_recorded()[name]) | fields


def sign(body: bytes, secret: str, at: int) -> str:
    """The Stripe-Signature header: t=<ts>,v1=<hex HMAC-SHA256 of "<ts>." + body>."""
    return f"t={at},v1={hmac.new(secret.encode(), f'{at}.'.encode() + body, hashlib.sha256).hexdigest()}"


def body(evt: dict[str, Any]) -> bytes:
    return json.dumps(evt, indent=2).encode()


def event(kind: str, obj: dict[str, Any], event_id: str, created: datetime) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": int(created.timestamp()),
        "livemode": False,
        "type": kind,
        "data": {"object": obj},
    }


def invoice(
    *,
    invoice_id: str,
    customer: str,
    price: str,
    amount_paid: int,
    subscription: str,
    period: tuple[datetime, datetime],
    metadata: dict[str, str],
    billing_reason: str = "subscription_create",
    payment_intent: str | None = None,
) -> dict[str, Any]:
    """A paid invoice for one subscription line, in the 2025 shape (`parent.subscription_details`)."""
    start, end = (int(t.timestamp()) for t in period)
    obj = recorded("invoice")
    line = obj["lines"]["data"][0]
    line.pop("plan", None)
    line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": "prod_1"}}
    obj["parent"] = {
        "type": "subscription_details",
        "subscription_details": {"subscription": subscription, "metadata": metadata},
    }
    obj["subscription"] = None
    if payment_intent:
        obj["payments"] = {
            "object": "list",
            "data": [{"payment": {"type": "payment_intent", "payment_intent": payment_intent}}],
        }
    line["period"], line["amount"] = {"start": start, "end": end}, amount_paid
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


def checkout_session(
    *,
    session_id: str,
    customer: str,
    client_reference_id: str | None,
    payment_intent: str | None,
    amount_total: int,
    metadata: dict[str, str],
    mode: str = "payment",
    subscription: str | None = None,
) -> dict[str, Any]:
    return recorded(
        "checkout_session",
        id=session_id,
        customer=customer,
        client_reference_id=client_reference_id,
        mode=mode,
        payment_status="paid",
        status="complete",
        payment_intent=payment_intent,
        subscription=subscription,
        amount_total=amount_total,
        currency="usd",
        metadata=metadata,
    )


def subscription(
    *, subscription_id: str, customer: str, price: str, period_end: datetime, metadata: dict[str, str]
) -> dict[str, Any]:
    obj = recorded("subscription")
    item = obj["items"]["data"][0]
    item["price"]["id"] = price
    item.pop("plan", None)
    item["current_period_end"] = int(period_end.timestamp())
    return obj | {"id": subscription_id, "customer": customer, "status": "active", "metadata": metadata}


def ingest_bodies(prefix: str, n: int) -> list[bytes]:
    """ingest's events: n distinct `invoice.paid` bodies for a starter plan's first invoice, each for a customer
    and account of its own (ids `evt_<prefix><i:06d>` etc.), so processing one does a first invoice's whole
    work. Stamped into one template: the generator shares the cores it measures, so building must be cheap."""
    now = datetime.now(UTC).replace(microsecond=0)
    obj = invoice(
        invoice_id=f"in_{TAG}",
        customer=f"cus_{TAG}",
        price="price_starter_monthly",
        amount_paid=34900,
        subscription=f"sub_{TAG}",
        period=(now, now + timedelta(days=30)),
        metadata={"account_id": f"acct_{TAG}"},
    )
    template = body(event("invoice.paid", obj, f"evt_{TAG}", now)).decode()
    return [template.replace(TAG, f"{prefix}{i:06d}").encode() for i in range(n)]
