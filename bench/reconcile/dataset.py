"""The benchmark's Stripe account: N paid invoices and their N `invoice.paid` events, derived from an index.

Item i (0 = newest, as Stripe lists) is a customer of its own (`cus_b0000042`, account `acct_b0000042`,
subscription `sub_b0000042`) paying the `starter` plan once in the window. A first invoice's customer signed up
through Checkout (session `cs_b0000042`, completed) ten minutes before paying, so both are created in the
window; a renewal's customer was created a period earlier, before it. Both the fake Stripe server and
the database seeding derive everything from the index, so neither holds the list: the JSON is a template
built once with tests/stripe_events.py's builders (2025-03-31 shape) and stamped with each item's ids and
times. Which items are special is fixed too, so every run finds the same things:

- every 10th invoice is a subscription's first (`subscription_create`): reconciliation looks for a referral
  code the webhooks may have missed on its customer and its Checkout session; the others are renewals;
- every 200th is a referred signup whose referral was attributed and paid (both payouts in the ledger);
- every 1000th (offset 500) never reached the service: no event, payment or account — a `missing_refill`;
- every 5000th (offset 10) belongs to a customer whose Stripe metadata carries a referral code the service
  never saw — a `missed_referral_payout`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from tests import stripe_events

PRICE = "price_starter_monthly"  # plan "starter" in the shipped credits.toml: 2,000 credits
PLAN, CREDITS, AMOUNT_PAID = "starter", 2000, 34900
REFERRAL_CREDITS = 3000  # each side, as credits.toml's [referrals] says
REFERRERS = 10           # referrer accounts whose codes the referred signups used
SPAN_SECONDS = 2 * 86400  # the invoices are spread over the last two days of the default 3-day window
PERIOD_SECONDS = 30 * 86400
TAG = "BENCHTAG"
# Stand-ins for the two times in a template; distinct from every number the recorded fixtures hold.
T_PAID, T_END = 1_111_111_111, 1_222_222_222
SIGNUP_SECONDS = 600  # from the Checkout session's creation (and the customer's) to the first invoice
ID_PATTERN = re.compile(r"^(?:in|evt|cus|sub|cs)_b(\d{7})$")


def referrer_code(k: int) -> str:
    return f"BREF{k:02d}"


@dataclass(frozen=True)
class Dataset:
    """N invoices, the newest paid at `newest` (epoch seconds), the oldest `SPAN_SECONDS` earlier."""

    count: int
    newest: int

    # -- which item is what ------------------------------------------------------------------------

    @staticmethod
    def tag(i: int) -> str:
        return f"b{i:07d}"

    @staticmethod
    def index(object_id: str) -> int | None:
        """The index behind an invoice, event, customer or subscription id; None for a foreign id."""
        found = ID_PATTERN.match(object_id)
        return int(found[1]) if found else None

    def created(self, i: int) -> int:
        return self.newest - (i * SPAN_SECONDS) // max(self.count, 1)

    def customer_created(self, i: int) -> int:
        return self.created(i) - (SIGNUP_SECONDS if self.first_invoice(i) else PERIOD_SECONDS)

    def checkout_created(self, i: int) -> int:
        """Only first invoices have a Checkout session; the others' subscriptions renew on their own."""
        return self.created(i) - SIGNUP_SECONDS

    @staticmethod
    def first_invoice(i: int) -> bool:
        return i % 10 == 0

    @staticmethod
    def referred(i: int) -> bool:
        return i % 200 == 0

    @staticmethod
    def missing(i: int) -> bool:
        return i % 1000 == 500

    @staticmethod
    def carries_code(i: int) -> bool:
        return i % 5000 == 10

    def expected(self) -> dict[str, int]:
        """The findings a correct run reports (unsettled kinds excluded: every seeded referral is paid)."""
        return {"missing_refill": sum(map(self.missing, range(self.count))),
                "missed_referral_payout": sum(map(self.carries_code, range(self.count)))}

    # -- JSON, stamped from templates ------------------------------------------------------------------

    def invoice_json(self, i: int) -> str:
        return self._stamp(self._invoice_templates[self.first_invoice(i)], i)

    def event_json(self, i: int) -> str:
        return self._stamp(self._event_templates[self.first_invoice(i)], i)

    def customer_json(self, i: int) -> str:
        metadata = {"account_id": f"acct_{self.tag(i)}"}
        if self.carries_code(i):
            metadata["referral_code"] = referrer_code(i % REFERRERS)
        obj = stripe_events.customer(f"cus_{self.tag(i)}", email=f"{self.tag(i)}@example.com", metadata=metadata)
        obj["created"] = self.customer_created(i)
        return json.dumps(obj, indent=2)

    def checkout_json(self, i: int) -> str:
        """The completed Checkout session that created a first invoice's subscription (no code: the
        dataset's codes live on customers)."""
        obj = stripe_events.checkout_session(session_id=f"cs_{self.tag(i)}", customer=f"cus_{self.tag(i)}",
                                             mode="subscription", payment_intent=None, subscription=f"sub_{self.tag(i)}",
                                             amount_total=AMOUNT_PAID)
        obj["created"] = self.checkout_created(i)
        return json.dumps(obj, indent=2)

    def _stamp(self, template: str, i: int) -> str:
        paid = self.created(i)
        return (template.replace(TAG, self.tag(i)).replace(str(T_PAID), str(paid))
                .replace(str(T_END), str(paid + PERIOD_SECONDS)))

    @cached_property
    def _invoice_templates(self) -> dict[bool, str]:
        """Pretty-printed with two spaces, as Stripe sends it; keyed by `first_invoice`."""
        return {first: json.dumps(_invoice(first), indent=2) for first in (False, True)}

    @cached_property
    def _event_templates(self) -> dict[bool, str]:
        return {first: json.dumps(_event(first), indent=2) for first in (False, True)}


def _invoice(first: bool) -> dict[str, Any]:
    obj = stripe_events.invoice(
        "2025", invoice_id=f"in_{TAG}", customer=f"cus_{TAG}", price=PRICE, amount_paid=AMOUNT_PAID,
        billing_reason="subscription_create" if first else "subscription_cycle", subscription=f"sub_{TAG}",
        period=(datetime.fromtimestamp(T_PAID, UTC), datetime.fromtimestamp(T_END, UTC)),
        subscription_metadata={"account_id": f"acct_{TAG}"},
    )
    obj["created"] = obj["effective_at"] = T_PAID
    obj["customer_email"] = f"{TAG}@example.com"
    return obj


def _event(first: bool) -> dict[str, Any]:
    return stripe_events.event("invoice.paid", _invoice(first), event_id=f"evt_{TAG}",
                               created=datetime.fromtimestamp(T_PAID, UTC))
