"""The referral codes Stripe holds for a reconciliation window's new subscriptions, which the webhooks missed.

A code may sit in the subscription's metadata, the customer's or the Checkout session's that created the
subscription. Asking Stripe per first invoice — the customer, then its Checkout sessions — cost two requests
per new customer: 19,000 at 100k invoices, 30% of a run against a local fake (bench/reconcile.py) and, against
the real Stripe, that many round trips and rate-limit tokens. Instead, the first time a first invoice needs
it, the window's new customers and completed Checkout sessions are each listed once, 100 a page, keeping only
the codes found and the customers' ids (their number is the window's signups, not its invoices):

- a first invoice's customer was, as a rule, created in the window; one created earlier (a returning
  customer's new subscription, or one deleted since: lists leave deleted customers out) is asked for alone;
- a Checkout session expires at most 24 hours after it is created, and the session that created a
  subscription was completed before the subscription's first invoice, so listing the sessions created from a
  day before the window covers every first invoice in it: no per-subscription look-up is left.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, Final

from service.infra import stripe_objects as so
from service.infra.stripe_client import StripeGateway

CHECKOUT_LIFETIME: Final = timedelta(hours=24)  # Stripe's longest `expires_at` for a Checkout session
Found = tuple[str, str]  # the code, and where it was found


class ReferralCodes:
    """Answers, once per customer, whether Stripe carries a referral code for a first invoice's signup."""

    def __init__(self, stripe: StripeGateway, since: datetime, until: datetime) -> None:
        self.stripe, self.since, self.until = stripe, since, until
        self.by_customer: dict[str, Found | None] = {}
        self._window: _Window | None = None

    def of(self, invoice: so.InvoiceFacts) -> Found | None:
        """A code in the subscription's, the customer's or the Checkout session's metadata, in that order."""
        customer = invoice.customer or ""
        if customer not in self.by_customer:
            self.by_customer[customer] = self._look_up(invoice, customer)
        return self.by_customer[customer]

    def _look_up(self, invoice: so.InvoiceFacts, customer: str) -> Found | None:
        code = (invoice.subscription_metadata or {}).get("referral_code")
        if code:
            return code, "subscription"
        if invoice.subscription_metadata is None and invoice.subscription_id:
            sub = so.subscription(self.stripe.retrieve_subscription(invoice.subscription_id))
            if code := sub.metadata.get("referral_code"):
                return code, "subscription"
        if code := self._customer_code(customer):
            return code, "customer"
        if invoice.subscription_id and (code := self.window.checkout_codes.get(invoice.subscription_id)):
            return code, "checkout session"
        return None

    def _customer_code(self, customer: str) -> str | None:
        if customer in self.window.customers:
            return self.window.customer_codes.get(customer)
        return so.customer(self.stripe.retrieve_customer(customer)).metadata.get("referral_code")

    @property
    def window(self) -> _Window:
        """The window's listings, read on first use: a run without first invoices asks Stripe for nothing."""
        if self._window is None:
            until = int(self.until.timestamp())
            customers = self.stripe.iterate_customers(created_gte=int(self.since.timestamp()), created_lte=until)
            sessions = self.stripe.iterate_completed_checkout_sessions(
                created_gte=int((self.since - CHECKOUT_LIFETIME).timestamp()), created_lte=until
            )
            self._window = _Window.read(customers, sessions)
        return self._window


class _Window:
    """The ids of the customers created in the window, and the codes on them and on its Checkout sessions
    (by subscription id) — not the objects: memory in proportion to signups, a few bytes each."""

    def __init__(self) -> None:
        self.customers: set[str] = set()
        self.customer_codes: dict[str, str] = {}
        self.checkout_codes: dict[str, str] = {}

    @classmethod
    def read(cls, customers: Iterable[dict[str, Any]], sessions: Iterable[dict[str, Any]]) -> _Window:
        window = cls()
        for obj in customers:
            window.customers.add(obj["id"])
            if code := so.metadata(obj).get("referral_code"):
                window.customer_codes[obj["id"]] = code
        for obj in sessions:
            session = so.checkout_session(obj)
            if session.subscription_id and (code := session.metadata.get("referral_code")):
                window.checkout_codes.setdefault(session.subscription_id, code)
        return window
