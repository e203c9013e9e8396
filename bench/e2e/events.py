"""The Stripe events of the end-to-end mix (bench/e2e/mix.py), built with tests/stripe_events.py's builders
from the recorded payloads (2025-03-31 shapes), as Stripe delivers them (bench/ingest/events.py's `body`).

Every object carries what the service needs to settle it without asking Stripe (STRIPE_API_BASE points
where nothing answers): the customer's `metadata.account_id`, Checkout's `client_reference_id`, the
subscription's (and so the invoice's `parent.subscription_details`) `metadata.account_id`, the payment
intent's `metadata.account_id` and `metadata.pack`, and the pack's name in the session's `metadata.pack`
(so its line items are never fetched). A referee's code travels on one of the customer, the Checkout
session or the subscription, as DESIGN.md allows. Each customer has an address of its own, so no two
accounts look like a self-referral.

Billing time: month m's invoices cover [base + 30(m-1) days, base + 30m days), with the last month's period
starting now; events are `created` at their period's start. The signatures are made by the load generator
just before each month is sent, so they are always fresh.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.e2e.mix import PACK, PACK_AMOUNT, PURCHASE, Account, Chain
from bench.ingest.events import body
from tests import stripe_events as se

MONTH = timedelta(days=30)


@dataclass(frozen=True)
class Names:
    """The Stripe and service ids of one account of one run (`prefix` keeps runs apart)."""

    prefix: str
    account: Account

    @property
    def tag(self) -> str:
        return f"{self.prefix}{self.account.key}"

    @property
    def account_id(self) -> str:
        return f"acct_{self.tag}"

    @property
    def customer(self) -> str:
        return f"cus_{self.tag}"

    @property
    def subscription(self) -> str:
        return f"sub_{self.tag}"

    @property
    def email(self) -> str:
        return f"{self.tag}@customers.example"


TAG, CODE = "BENCHTAG", "BENCHCODE"  # placeholders stamped into cached bodies


class Builder:
    """Builds the events of the mix's chains for one run: `prefix`, the referrers' codes (account key →
    code, made through the API before the clock starts) and the number of months (for the calendar).

    Bodies are made from templates: one per event shape (type, plan, month, place in the chain, where the
    referral code travels), built once with placeholders for the account and the code and then stamped —
    some thousands of bodies a second instead of a few hundred (the generator shares two cores)."""

    def __init__(self, prefix: str, codes: dict[str, str], months: int, now: datetime | None = None) -> None:
        self.prefix, self.codes = prefix, codes
        self.base = (now or datetime.now(UTC)).replace(microsecond=0) - (months - 1) * MONTH
        self.templates: dict[tuple[Any, ...], list[str]] = {}

    def bodies(self, chain: Chain) -> list[bytes]:
        account = chain.account
        shape = (account.offer, account.month, account.carrier if account.referrer else None, chain.month,
                 chain.month in account.packs)
        if shape not in self.templates:
            stand_in = Chain(replace(account, key=TAG, referrer=CODE if account.referrer else None), chain.month)
            self.templates[shape] = [body(evt).decode() for evt in self.events(stand_in, {CODE: CODE}, prefix="")]
        tag, code = f"{self.prefix}{account.key}", self.codes.get(account.referrer or "", "")
        return [t.replace(TAG, tag).replace(CODE, code).encode() for t in self.templates[shape]]

    def events(self, chain: Chain, codes: dict[str, str], prefix: str) -> list[dict[str, Any]]:
        """The chain's events in order, ids `evt_<prefix><account key>_<month>_<n>`."""
        names = Names(prefix, chain.account)
        start = self.base + (chain.month - 1) * MONTH
        code = codes[chain.account.referrer] if chain.account.referrer else None
        pack_from = len(chain.kinds) - (len(PURCHASE) if chain.pack else 0)  # the purchase's events come last
        return [
            se.event(kind, self._object(kind, chain, names, start, code, n >= pack_from),
                     event_id=f"evt_{names.tag}_{chain.month}_{n}", created=start + timedelta(seconds=n))
            for n, kind in enumerate(chain.kinds)
        ]

    @staticmethod
    def _object(kind: str, chain: Chain, names: Names, start: datetime, code: str | None, pack: bool) -> dict[str, Any]:
        offer, month, carried = chain.account.offer, chain.month, {"account_id": names.account_id}
        period = (start, start + (timedelta(days=365) if not offer.monthly else MONTH))
        on = lambda carrier: {"referral_code": code} if code and chain.account.carrier == carrier else {}  # noqa: E731
        pack_intent = f"pi_{names.tag}_{month}p"
        if kind == "customer.created":
            return se.customer(names.customer, email=names.email, metadata={**carried, **on("customer")})
        if kind == "checkout.session.completed" and not pack:
            session = se.checkout_session(
                session_id=f"cs_{names.tag}_{month}", customer=names.customer, client_reference_id=names.account_id,
                mode="subscription", payment_intent=None, subscription=names.subscription, amount_total=offer.amount,
                metadata=on("checkout"),
            )
        elif kind == "checkout.session.completed":
            session = se.checkout_session(
                session_id=f"cs_{names.tag}_{month}p", customer=names.customer, client_reference_id=names.account_id,
                payment_intent=pack_intent, amount_total=PACK_AMOUNT, metadata={"pack": PACK, **carried},
            )
        elif kind.startswith("customer.subscription."):
            return se.subscription(subscription_id=names.subscription, customer=names.customer, price=offer.price,
                                   period_end=period[1], metadata={**carried, **on("subscription")})
        elif kind.startswith("invoice."):
            invoice = se.invoice(
                "2025", invoice_id=f"in_{names.tag}_{month}", customer=names.customer, price=offer.price,
                amount_paid=offer.amount, billing_reason="subscription_create" if chain.signup else "subscription_cycle",
                subscription=names.subscription, period=period, subscription_metadata={**carried, **on("subscription")},
                payment_intent=f"pi_{names.tag}_{month}i",
            )
            invoice["customer_email"] = names.email
            return invoice
        elif kind == "payment_intent.succeeded":
            return se.payment_intent(intent_id=pack_intent, customer=names.customer, amount=PACK_AMOUNT,
                                     metadata={"pack": PACK, **carried}, charge=f"ch_{names.tag}_{month}p")
        else:
            raise ValueError(f"no builder for {kind}")
        session["customer_details"] = {**(session.get("customer_details") or {}), "email": names.email}
        return session
