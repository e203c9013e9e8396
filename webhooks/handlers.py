"""One handler per Stripe event type, in one greppable registry (HANDLERS).

Handlers translate a Stripe object into domain calls and return a one-line outcome for the inbox. They
run inside the event's transaction and never commit. Raising means "try again later" (the worker retries
with backoff): a missing link between objects that arrive out of order is a retry, not an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from service.domain import accounts, payments, purchases, referrals, refills, reversals
from service.domain.accounts import CustomerRecord, Identity
from service.infra import stripe_objects as so
from service.infra import stripe_payloads
from service.infra.catalogue import Catalogue
from service.infra.models import Account, Payment
from service.infra.stripe_client import StripeGateway
from service.infra.uow import UnitOfWork
from webhooks.inbox import Claimed

PAYING = frozenset({"active", "trialing", "past_due"})


class PaymentNotFound(LookupError):
    """A refund or dispute names money the service has not recorded (yet): retried until it is."""


class UnreadableCustomer(ValueError):
    """The customer retrieved from Stripe does not fit what the service reads (an account id too long, say):
    retried, so that a customer fixed at Stripe is read on a later attempt."""


@dataclass
class Context:
    """What a handler may use: the event's transaction, the catalogue, Stripe, and the event's clock."""

    uow: UnitOfWork
    catalogue: Catalogue
    stripe: StripeGateway
    event: Claimed
    now: datetime
    looked_up: dict[str, CustomerRecord] = field(default_factory=dict)

    def account(self, who: Identity) -> Account:
        """Resolve (and link) the account, asking Stripe about a customer only when it is not linked yet."""
        return accounts.resolve(self.uow, who, self._customer_record)

    def refer(
        self, referee: Account, *codes: str | None, source: str, email: str | None = None, settle: bool = False
    ) -> str:
        """Attribute the referee to the first referral code carried by the objects (or by the customer looked up
        at Stripe); with `settle` (an event that records a payment, which can qualify the referral), settle
        whatever is due. A new attribution settles itself. Attribution problems are outcomes, not errors."""
        looked_up = [r.referral_code for r in self.looked_up.values()]
        code = next((c for c in (*codes, *looked_up) if c), None)
        note, settled_already = "", False
        if code:
            source = source if any(codes) else "customer"
            try:
                attribution = referrals.attribute(
                    self.uow, self.catalogue, referee, code, source=source, email=email, now=self.now
                )
                note = f"; referral {attribution.referral.status}"
                settled_already = attribution.created  # `attribute` settles a new attribution itself
            except referrals.UnknownCode:
                note = f"; unknown referral code {code!r}"
            except referrals.AlreadyAttributed as exc:
                note = f"; referral code {code!r} ignored: {exc}"
        if settled_already or not settle:
            return note
        settled = referrals.settle(self.uow, self.catalogue, referee, self.now)
        return note + (f"; referral {settled}" if settled is not None and not note else "")

    def _customer_record(self, customer_id: str) -> CustomerRecord:
        retrieved = self.stripe.retrieve_customer(customer_id)
        wrong = stripe_payloads.problem("customer", retrieved)
        if wrong is not None:
            raise UnreadableCustomer(f"customer {customer_id} at Stripe: {wrong}")
        customer = so.customer(retrieved)
        record = CustomerRecord(
            customer.metadata.get("account_id"), customer.email, customer.metadata.get("referral_code")
        )
        self.looked_up[customer_id] = record
        return record


Handler = Callable[[Context, so.Obj], str]


def invoice_paid(ctx: Context, obj: so.Obj) -> str:
    """invoice.paid / invoice.payment_succeeded: the plan refill, once per invoice."""
    invoice = so.invoice(obj)
    carried = invoice.metadata.get("account_id") or (invoice.subscription_metadata or {}).get("account_id")
    account = ctx.account(Identity(invoice.customer, carried, invoice.customer_email))
    refilled = refills.refill(ctx.uow, ctx.catalogue, account, invoice, ctx.now)
    code = (invoice.subscription_metadata or {}).get("referral_code") or invoice.metadata.get("referral_code")
    return refilled.outcome + ctx.refer(
        account, code, source="subscription", email=invoice.customer_email, settle=refilled.first
    )


def checkout_completed(ctx: Context, obj: so.Obj) -> str:
    """checkout.session.completed / .async_payment_succeeded: link the account; grant a paid pack."""
    checkout = so.checkout_session(obj)
    carried = checkout.client_reference_id or checkout.metadata.get("account_id")
    account = ctx.account(Identity(checkout.customer, carried, checkout.email))
    referral = ctx.refer(account, checkout.metadata.get("referral_code"), source="checkout", email=checkout.email)
    if checkout.mode != "payment":
        return f"linked {account.public_id} ({checkout.mode} checkout){referral}"
    if checkout.payment_status != "paid":
        return f"linked {account.public_id}; payment_status {checkout.payment_status}: no credits until it is paid"
    if not checkout.payment_intent:
        return f"linked {account.public_id}; paid session without a payment intent to key a grant on"
    purchase = purchases.Purchase(
        checkout.payment_intent, checkout.amount_total, checkout.currency, None, checkout.metadata.get("pack")
    )

    def prices() -> list[str]:
        items = ctx.stripe.list_checkout_session_line_items(checkout.id)
        return [p for p in (so.ref(item.get("price")) for item in items) if p]

    return purchases.grant_pack(ctx.uow, ctx.catalogue, account, purchase, prices, ctx.now) + referral


def payment_intent_succeeded(ctx: Context, obj: so.Obj) -> str:
    """payment_intent.succeeded with metadata.pack: the same grant, under the same key, as Checkout's."""
    intent = so.payment_intent(obj)
    pack = intent.metadata.get("pack")
    if not pack:
        return "not a pack purchase (no metadata.pack)"
    who = Identity(intent.customer, intent.metadata.get("account_id"))
    known = ctx.uow.session.get(Payment, intent.id) if who.customer is None and who.account_id is None else None
    account = (
        ctx.uow.lock_one(ctx.uow.session.get_one(Account, known.account_id)) if known is not None else ctx.account(who)
    )
    purchase = purchases.Purchase(intent.id, intent.amount_received, intent.currency, intent.charge, pack)
    return purchases.grant_pack(ctx.uow, ctx.catalogue, account, purchase, list, ctx.now)


def charge_refunded(ctx: Context, obj: so.Obj) -> str:
    """charge.refunded: reverse the refunded share of the payment's unspent credits."""
    charge = so.charge(obj)
    payment = _payment(ctx, charge=charge.id, payment_intent=charge.payment_intent, invoice=charge.invoice)
    key = f"reverse:{charge.latest_refund}" if charge.latest_refund else f"reverse:{charge.id}:{charge.amount_refunded}"
    total = charge.amount or payment.amount
    outcome = reversals.reverse_payment(
        ctx.uow, payment, charge.amount_refunded, total, key=key, reason=f"refund of {payment.id}", now=ctx.now
    )
    refunded_at = charge.refunded_at or ctx.event.created  # the refund's time, not when it was processed
    clawback = referrals.claw_back(
        ctx.uow, ctx.catalogue, payment, total - charge.amount_refunded, ctx.now, refunded_at=refunded_at
    )
    return outcome + (f"; {clawback}" if clawback else "")


def dispute_closed(ctx: Context, obj: so.Obj) -> str:
    """charge.dispute.closed: a lost dispute reverses like a refund of the disputed amount."""
    dispute = so.dispute(obj)
    if dispute.status != "lost":
        return f"dispute {dispute.status}: nothing to reverse"
    payment = _payment(ctx, charge=dispute.charge, payment_intent=dispute.payment_intent, invoice=None)
    outcome = reversals.reverse_payment(
        ctx.uow,
        payment,
        dispute.amount,
        payment.amount,
        key=f"reverse:{dispute.id}",
        reason=f"lost dispute {dispute.id} of {payment.id}",
        now=ctx.now,
    )
    clawback = referrals.claw_back(
        ctx.uow,
        ctx.catalogue,
        payment,
        payment.amount - dispute.amount,
        ctx.now,
        refunded_at=dispute.opened_at or ctx.event.created,  # a dispute closes weeks after it is opened
    )
    return outcome + (f"; {clawback}" if clawback else "")


def customer_changed(ctx: Context, obj: so.Obj) -> str:
    """customer.created / .updated: keep the customer ↔ account link (the object is at hand: no look-up)."""
    customer = so.customer(obj)
    if customer.deleted:
        return "customer deleted: link kept for history"
    record = CustomerRecord(customer.metadata.get("account_id"), customer.email)
    account = accounts.resolve(ctx.uow, Identity(customer.id, record.account_id, customer.email), lambda _: record)
    return f"linked {account.public_id}" + ctx.refer(
        account, customer.metadata.get("referral_code"), source="customer", email=customer.email
    )


def subscription_changed(ctx: Context, obj: so.Obj) -> str:
    """customer.subscription.*: the account's plan, status and period; an older event never wins."""
    sub = so.subscription(obj)
    account = ctx.account(Identity(sub.customer, sub.metadata.get("account_id")))
    if account.subscription_as_of and ctx.event.created < account.subscription_as_of:
        return f"older than the state applied at {account.subscription_as_of.isoformat()}: skipped"
    deleted = ctx.event.type == "customer.subscription.deleted"
    plan = next((hit[0] for hit in map(ctx.catalogue.plan_for_price, sub.price_ids) if hit), None)
    status = "canceled" if deleted else (sub.status or account.status)
    paying = not deleted and status in PAYING  # an `incomplete` first payment has not paid for anything
    account.status, account.plan = status, (plan or account.plan) if paying else None
    account.subscription_id, account.subscription_as_of = sub.id, ctx.event.created
    if sub.current_period_end and not deleted:
        account.period_end = sub.current_period_end
    referral = ctx.refer(account, sub.metadata.get("referral_code"), source="subscription")
    return f"{account.public_id}: plan {account.plan}, status {account.status}{referral}"


def _payment(ctx: Context, *, charge: str | None, payment_intent: str | None, invoice: str | None) -> Payment:
    """The recorded payment behind a charge, asking Stripe which invoice a payment intent paid if needed."""
    found = payments.find(ctx.uow, charge=charge, payment_intent=payment_intent, invoice=invoice)
    if found is None and payment_intent and not invoice:
        paid_invoice = ctx.stripe.invoice_for_payment_intent(payment_intent)
        found = payments.find(ctx.uow, charge=None, payment_intent=None, invoice=paid_invoice)
    if found is None:
        raise PaymentNotFound(
            f"no recorded payment for charge {charge}, payment intent {payment_intent}, invoice {invoice}"
        )
    return found


# event type → (the data.object.object it must carry, its handler). Any other type is stored and ignored.
HANDLERS: dict[str, tuple[str, Handler]] = {
    "invoice.paid": ("invoice", invoice_paid),
    "invoice.payment_succeeded": ("invoice", invoice_paid),
    "checkout.session.completed": ("checkout.session", checkout_completed),
    "checkout.session.async_payment_succeeded": ("checkout.session", checkout_completed),
    "payment_intent.succeeded": ("payment_intent", payment_intent_succeeded),
    "charge.refunded": ("charge", charge_refunded),
    "charge.dispute.closed": ("dispute", dispute_closed),
    "customer.created": ("customer", customer_changed),
    "customer.updated": ("customer", customer_changed),
    "customer.subscription.created": ("subscription", subscription_changed),
    "customer.subscription.updated": ("subscription", subscription_changed),
    "customer.subscription.deleted": ("subscription", subscription_changed),
}
