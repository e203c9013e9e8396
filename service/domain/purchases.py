"""One-time packs: a paid purchase grants its pack once per payment intent (`purchase:{pi}`), whichever
of Checkout's events and `payment_intent.succeeded` reports it first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.domain import ledger, payments
from service.infra import logs
from service.infra.catalogue import Catalogue, Pack
from service.infra.models import Account
from service.infra.uow import UnitOfWork

log = logs.get("purchases")


@dataclass(frozen=True)
class Purchase:
    """A paid one-time payment, as Checkout or a payment intent describes it."""

    payment_intent: str
    amount: int
    currency: str | None
    charge: str | None
    pack: str | None  # metadata.pack, when the purchase carries it


def grant_pack(
    uow: UnitOfWork,
    catalogue: Catalogue,
    account: Account,
    purchase: Purchase,
    prices: Callable[[], list[str]],
    now: datetime,
) -> str:
    """Grant the purchased pack once; `prices` (the line items' price ids, fetched from Stripe) is only
    called when the purchase names no pack and has not been granted yet."""
    account = uow.lock_one(account)
    key = f"purchase:{purchase.payment_intent}"

    record = payments.recorder(
        uow,
        purchase.payment_intent,
        account,
        kind="purchase",
        amount=purchase.amount,
        currency=purchase.currency,
        payment_intent=purchase.payment_intent,
        charge=purchase.charge,
        paid_at=now,
    )

    if ledger.granted(uow, key):
        record("granted")
        return f"already granted ({key})"
    if purchase.amount <= 0:  # nothing was paid: a pack is bought, never given by a payload
        record("no_credits", detail="amount is 0")
        return "no credits: amount is 0"
    found = _pack(catalogue, purchase.pack, prices)
    if isinstance(found, str):
        record("unknown_pack", detail=found)
        log.warning("purchase.unknown_pack", payment_intent=purchase.payment_intent, detail=found)
        return f"unknown pack: {found}"
    name, pack = found
    expires_at = now + timedelta(days=pack.expires_after_days) if pack.expires_after_days else None
    ledger.grant(
        uow,
        account,
        pack.credits,
        source="pack",
        key=key,
        reason=f"{name} pack, payment {purchase.payment_intent}",
        actor="stripe",
        expires_at=expires_at,
        meta={"payment_intent": purchase.payment_intent, "pack": name},
        now=now,
    )
    record("granted", product=name, credits=pack.credits)
    return f"granted {pack.credits} credits ({name} pack)"


def _pack(catalogue: Catalogue, named: str | None, prices: Callable[[], list[str]]) -> tuple[str, Pack] | str:
    """The pack by `metadata.pack`, else by the purchase's prices; a string says why none matched."""
    if named:
        return (named, catalogue.packs[named]) if named in catalogue.packs else f"metadata.pack {named!r}"
    price_ids = prices()
    found = next((hit for hit in map(catalogue.pack_for_price, price_ids) if hit), None)
    return found or f"no pack for price(s) {', '.join(price_ids) or 'none'}"
