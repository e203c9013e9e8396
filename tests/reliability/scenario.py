"""The event stream of test_stream.py and the ledger that one ordered delivery of it gives.

The events are chosen so that the final ledger does not depend on the order they are processed in (which
is what a concurrent, shuffled, duplicated delivery to several processes is allowed to change):

- every plan invoice is a signup or, for `starter` only, one renewal: starter grants 2000 under a cap of
  4000, so the second invoice carries the first grant whole and cuts nothing, whichever comes first;
- referrers are on `unlimited_rollover` (policy `all`: a renewal never cuts), so their referral payouts can
  land before or after their own invoice; each has two referees, under the monthly cap of three;
- referees get one invoice, which carries the attribution (`referral_code` in the subscription metadata);
- the same money reported twice (invoice.paid + invoice.payment_succeeded, payment_intent.succeeded +
  checkout.session.completed) is granted once, under the money's key, whichever event comes first;
- events that change nothing: an unhandled type and a livemode event (both `ignored`).

Every event names its account (metadata.account_id, client_reference_id), so no Stripe look-up is needed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tests import stripe_events as se
from tests.helpers import T0

PLANS = {"price_starter_monthly": 2000, "price_pro_monthly": 5000, "price_outreach_monthly": 1000}
REFERRER_PLAN = ("price_rollover_all", 500)
PACKS = {"boost": 1000, "forever": 500}
REFERRAL_CREDITS = 3000  # referrer_credits and referee_credits in tests/data/catalogue.toml


@dataclass
class Stream:
    """Unique events (each delivered once in `ordered`) and what the ledger must say once all are in."""

    ordered: list[dict[str, Any]] = field(default_factory=list)
    expected: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)  # event ids that must end `ignored`

    def add(self, evt: dict[str, Any], *, ignored: bool = False) -> None:
        self.ordered.append(evt)
        if ignored:
            self.ignored.add(evt["id"])

    def expect(self, account: str, kind: str, amount: int, key: str) -> None:
        self.expected.setdefault(account, []).append((kind, amount, key))

    def expected_ledgers(self) -> dict[str, list[tuple[str, int, str]]]:
        return {a: sorted(rows, key=lambda r: r[2]) for a, rows in self.expected.items()}

    def expected_balances(self) -> dict[str, int]:
        return {a: sum(amount for _, amount, _ in rows) for a, rows in self.expected.items()}


def _invoice(
    era: str, tag: str, account: str, price: str, amount: int, *, renewal: bool = False, code: str | None = None
) -> dict[str, Any]:
    period = (T0.replace(month=2), T0.replace(month=3)) if renewal else (T0, T0.replace(month=2))
    metadata = {"account_id": account} | ({"referral_code": code} if code else {})
    obj = se.invoice(
        era,
        invoice_id=f"in_{tag}",
        customer=f"cus_{account}",
        price=price,
        amount_paid=amount,
        billing_reason="subscription_cycle" if renewal else "subscription_create",
        subscription=f"sub_{account}",
        period=period,
        subscription_metadata=metadata,
    )
    obj["customer_email"] = f"{account}@example.com"
    return obj


def build(referral_codes: dict[str, str], unique_events: int, seed: int) -> Stream:
    """`referral_codes`: referrer account id → its code (created beforehand). Plain accounts are added
    until there are `unique_events` events or more."""
    rnd = random.Random(seed)
    stream = Stream()
    n = 0

    def event(type_: str, obj: dict[str, Any], *, livemode: bool = False) -> dict[str, Any]:
        nonlocal n
        n += 1
        era = "2020" if n % 2 else "2025"
        return se.event(
            type_, obj, era=era, event_id=f"evt_stream_{n:05d}", created=T0 + timedelta(seconds=n), livemode=livemode
        )

    for r, (referrer, code) in enumerate(sorted(referral_codes.items())):
        price, credits = REFERRER_PLAN
        stream.add(event("invoice.paid", _invoice("2025" if r % 2 else "2020", referrer, referrer, price, credits)))
        stream.expect(referrer, "grant", credits, f"invoice:in_{referrer}")
        for j in range(2):
            referee = f"{referrer}_ee{j}"
            given = code.lower() if j else code  # codes are case-insensitive
            stream.add(
                event(
                    "invoice.paid",
                    _invoice("2020" if j else "2025", referee, referee, "price_starter_monthly", 2000, code=given),
                )
            )
            stream.expect(referee, "grant", 2000, f"invoice:in_{referee}")
            stream.expect(referee, "grant", REFERRAL_CREDITS, f"referral:{referee}:referee")
            stream.expect(referrer, "grant", REFERRAL_CREDITS, f"referral:{referee}:referrer")

    p = 0
    while len(stream.ordered) < unique_events:
        account = f"acct_p{p:04d}"
        p += 1
        era = rnd.choice(["2020", "2025"])
        price = rnd.choice(list(PLANS))
        signup = _invoice(era, account, account, price, PLANS[price])
        stream.add(event("invoice.paid", signup))
        stream.expect(account, "grant", PLANS[price], f"invoice:in_{account}")
        if rnd.random() < 0.2:  # Stripe sends both for the same invoice: one grant
            stream.add(event("invoice.payment_succeeded", json.loads(json.dumps(signup))))
        if price == "price_starter_monthly" and rnd.random() < 0.4:
            renewal = _invoice(era, f"{account}_r1", account, price, PLANS[price], renewal=True)
            stream.add(event("invoice.paid", renewal))
            stream.expect(account, "grant", PLANS[price], f"invoice:in_{account}_r1")
        if rnd.random() < 0.5:
            pack = rnd.choice(list(PACKS))
            intent = f"pi_{account}"
            stream.add(
                event(
                    "payment_intent.succeeded",
                    se.payment_intent(
                        rnd.choice(["2020", "2025"]),
                        intent_id=intent,
                        customer=f"cus_{account}",
                        amount=900,
                        metadata={"pack": pack, "account_id": account},
                        charge=f"ch_{account}",
                    ),
                )
            )
            if rnd.random() < 0.3:  # the same purchase through Checkout: still one grant
                stream.add(
                    event(
                        "checkout.session.completed",
                        se.checkout_session(
                            session_id=f"cs_{account}",
                            customer=f"cus_{account}",
                            client_reference_id=account,
                            payment_intent=intent,
                            amount_total=900,
                            metadata={"pack": pack},
                        ),
                    )
                )
            stream.expect(account, "grant", PACKS[pack], f"purchase:{intent}")
        if rnd.random() < 0.05:  # a type without a handler
            stream.add(event("invoice.finalized", _invoice(era, f"{account}_x", account, price, 0)), ignored=True)
        if rnd.random() < 0.05:  # a live-mode event at a test-mode service
            live = _invoice(era, f"{account}_live", account, price, PLANS[price])
            stream.add(event("invoice.paid", live, livemode=True), ignored=True)
    return stream
