"""The door every Stripe object passes before a handler reads it: a typed model of each object the service
handles, tolerant of the three API eras' shapes and of every field it does not read, strict about those it
does — their types, ranges, lengths, signs and currency.

A signed event is Stripe's word, but a payload can still be wrong (a proxy, a test tool, an integrator's
hand-made event). An object that does not fit is refused at once, with the field and the reason: retrying
it would fail the same way for three days, and reading it loosely would turn a string amount into 0 or a
negative amount into a grant. Facts are then read from the checked object by `stripe_objects`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
)

# Amounts in a currency's minor unit; the bound keeps every sum and product of them inside a BIGINT.
MAX_AMOUNT = 10**12
EPOCH_MAX = 32503680000  # the year 3000: any real Stripe time is far below

Id = Annotated[str, StringConstraints(min_length=1, max_length=255)]
# An object's id, and the ids it refers to: ledger keys are built from them (`invoice:{id}`,
# `rollover:late:invoice:{id}:extension`), which must fit the ledger's 255 characters.
ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=255)]
Money = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT)]
SignedMoney = Annotated[StrictInt, Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
Epoch = Annotated[StrictInt, Field(ge=0, le=EPOCH_MAX)]
Quantity = Annotated[StrictInt, Field(ge=0, le=10**9)]  # metered lines count units in the millions
Currency = Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")]
Email = Annotated[str, StringConstraints(max_length=320)]


# Stripe's own limits: 50 keys, keys of 40 characters, values of 500. The service reads `account_id` (an
# account's public id, 255 at most) and `referral_code` and `pack` from them.
def _account_id_fits(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata.get("account_id", "")) > 255:
        raise ValueError("account_id is longer than an account id's 255 characters")
    return metadata


Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=40)], Annotated[str, StringConstraints(max_length=500)]],
    Field(max_length=50),
    AfterValidator(_account_id_fits),
]


class _Shape(BaseModel):
    """Any part of a Stripe object: fields it does not name are kept and never checked."""

    model_config = ConfigDict(extra="allow", frozen=True)


class _Expanded(_Shape):
    id: ObjectId


Ref = ObjectId | _Expanded | None  # an expandable field: an id, or the object expanded


class _Period(_Shape):
    start: Epoch | None = None
    end: Epoch | None = None


class _PriceDetails(_Shape):
    price: Ref = None


class _Pricing(_Shape):
    price_details: _PriceDetails | None = None


class _LineParent(_Shape):
    type: Text | None = None


class _Line(_Shape):
    amount: SignedMoney | None = None
    quantity: Quantity | None = None
    period: _Period | None = None
    proration: StrictBool | None = None
    price: Ref = None
    plan: Ref = None
    pricing: _Pricing | None = None
    parent: _LineParent | None = None


class _Lines(_Shape):
    data: list[_Line] = []


class _SubscriptionDetails(_Shape):
    subscription: Ref = None
    metadata: Metadata | None = None


class _InvoiceParent(_Shape):
    subscription_details: _SubscriptionDetails | None = None


class _PaidAt(_Shape):
    paid_at: Epoch | None = None


class _PaymentRef(_Shape):
    payment_intent: Ref = None


class _InvoicePayment(_Shape):
    payment: _PaymentRef | None = None


class _InvoicePayments(_Shape):
    data: list[_InvoicePayment] = []


class _Object(_Shape):
    id: ObjectId
    metadata: Metadata | None = None


class Invoice(_Object):
    customer: Ref = None
    amount_paid: Money
    currency: Currency | None = None
    billing_reason: Annotated[str, StringConstraints(max_length=64)] | None = None
    subscription: Ref = None
    subscription_details: _SubscriptionDetails | None = None
    parent: _InvoiceParent | None = None
    lines: _Lines | None = None
    status_transitions: _PaidAt | None = None
    created: Epoch | None = None
    payment_intent: Ref = None
    payments: _InvoicePayments | None = None
    charge: Ref = None
    customer_email: Email | None = None


class _Refund(_Shape):
    id: ObjectId
    amount: Money
    created: Epoch | None = None


class _Refunds(_Shape):
    data: list[_Refund] = []


class Charge(_Object):
    customer: Ref = None
    amount: Money
    amount_refunded: Money = 0
    invoice: Ref = None
    payment_intent: Ref = None
    refunds: _Refunds | None = None


class Dispute(_Object):
    charge: Ref = None
    payment_intent: Ref = None
    amount: Money
    status: Text | None = None
    created: Epoch | None = None


class _CustomerDetails(_Shape):
    email: Email | None = None


class CheckoutSession(_Object):
    mode: Text | None = None
    payment_status: Text | None = None
    customer: Ref = None
    client_reference_id: Id | None = None
    payment_intent: Ref = None
    subscription: Ref = None
    amount_total: Money | None = None
    currency: Currency | None = None
    customer_details: _CustomerDetails | None = None
    customer_email: Email | None = None


class _Charges(_Shape):
    data: list[_Expanded] = []


class PaymentIntent(_Object):
    customer: Ref = None
    amount: Money
    amount_received: Money | None = None
    currency: Currency | None = None
    latest_charge: Ref = None
    charges: _Charges | None = None


class _Item(_Shape):
    price: Ref = None
    plan: Ref = None
    current_period_end: Epoch | None = None


class _Items(_Shape):
    data: list[_Item] = []


class Subscription(_Object):
    customer: Ref = None
    status: Annotated[str, StringConstraints(max_length=32)] | None = None
    items: _Items | None = None
    plan: Ref = None
    current_period_end: Epoch | None = None


class Customer(_Object):
    email: Email | None = None
    deleted: StrictBool | None = None


class _Envelope(_Shape):
    """The event around the object: its time orders a customer's subscription changes."""

    created: Epoch


MODELS: dict[str, type[_Object]] = {
    "invoice": Invoice,
    "charge": Charge,
    "dispute": Dispute,
    "checkout.session": CheckoutSession,
    "payment_intent": PaymentIntent,
    "subscription": Subscription,
    "customer": Customer,
}


def envelope_problem(event: dict[str, Any]) -> str | None:
    """Why the event around a handled object cannot be read (its `created`), or None."""
    return _first(_Envelope, event)


def problem(object_type: str, obj: dict[str, Any]) -> str | None:
    """Why `obj`, a Stripe object of `object_type`, cannot be read — its first wrong field and what is wrong
    with it, and how many there are — or None when it fits."""
    return _first(MODELS[object_type], obj)


def _first(model: type[_Shape], value: dict[str, Any]) -> str | None:
    """The first field of `value` that `model` refuses, what is wrong with it and how many there are."""
    try:
        model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part)[:40] for part in first["loc"]) or "the object"
        return f"{where}: {first['msg']} ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''})"
    return None
