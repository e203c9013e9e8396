"""Realistic, distinct, signed Stripe events for the ingest benchmark.

Each event is an `invoice.paid` in the current (2025-03-31) shape, built with tests/stripe_events.py's
builders from the recorded payload in tests/data/stripe, for a customer and account of its own (so the
background processing does the real work of a first invoice: create and link the account, lock it,
record the payment, apply the rollover policy and post the plan grant). Bodies are pretty-printed with two
spaces, as Stripe sends them (about 6 KB each).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from service import demo
from tests import stripe_events

PRICE = "price_starter_monthly"  # in the shipped credits.toml (plan "starter")
AMOUNT_PAID = 34900


def event(prefix: str, i: int, now: datetime | None = None) -> dict[str, Any]:
    """The i-th event of a phase: unique event, invoice, customer, subscription and account ids."""
    now = now or datetime.now(UTC).replace(microsecond=0)
    tag = f"{prefix}{i:06d}"
    obj = stripe_events.invoice(
        "2025",
        invoice_id=f"in_{tag}",
        customer=f"cus_{tag}",
        price=PRICE,
        amount_paid=AMOUNT_PAID,
        subscription=f"sub_{tag}",
        period=(now, now + timedelta(days=30)),
        subscription_metadata={"account_id": f"acct_{tag}"},
    )
    return stripe_events.event("invoice.paid", obj, event_id=f"evt_{tag}", created=now)


def body(evt: dict[str, Any]) -> bytes:
    """The raw body as Stripe would deliver it."""
    return json.dumps(evt, indent=2).encode()


PLACEHOLDER = "BENCHTAG"


def bodies(prefix: str, n: int) -> list[bytes]:
    """n bodies, exactly as `body(event(prefix, i))` would make them, but built once and stamped with each
    event's tag (tens of thousands per second instead of a few thousand: the generator shares two cores)."""
    now = datetime.now(UTC).replace(microsecond=0)
    template = json.dumps(event("", 0, now), indent=2).replace("000000", PLACEHOLDER)
    if template.count(PLACEHOLDER) != 5:  # evt_, in_, cus_, sub_, acct_ — else the fixture changed shape
        return [body(event(prefix, i, now)) for i in range(n)]
    return [template.replace(PLACEHOLDER, f"{prefix}{i:06d}").encode() for i in range(n)]


def sign(raw: bytes, secret: str, at: int | None = None) -> str:
    """The Stripe-Signature header (t=…,v1=HMAC-SHA256) — the service's own demo signer."""
    return demo.sign(raw, secret, at)
