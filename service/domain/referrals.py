"""Referrals: stable codes, first-wins attribution, qualification on the referee's first paid invoice (or
at signup), two independent payouts, guards (self-referral, the referrer's monthly cap) and clawback.

Qualification is a function of state, not of which event arrives first: `settle()` looks at the referee's
attribution and recorded payments and pays whatever is due, so an invoice before its attribution, an
attribution before its invoice, redeliveries and replays all end in the same two grants.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import bindparam, func, select

from service.domain import audit, ledger, periods, rollover
from service.infra import logs
from service.infra.catalogue import Catalogue, Referrals
from service.infra.models import Account, LedgerEntry, Payment, Referral, utcnow
from service.infra.uow import UnitOfWork

log = logs.get("referrals")
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, no 1/I: read aloud or typed, nothing is ambiguous
CODE_LENGTH = 8
SIDES = ("referee", "referrer")
GMAIL = {"gmail.com", "googlemail.com"}


class UnknownCode(LookupError):
    """No account has this referral code."""


class AlreadyAttributed(Exception):
    """The referee is attributed to another referrer already; the first attribution is locked."""

    def __init__(self, referral: Referral) -> None:
        super().__init__(f"already attributed to another referrer (referral {referral.id})")
        self.referral = referral


@dataclass(frozen=True)
class Attribution:
    referral: Referral
    created: bool


def code_for(uow: UnitOfWork, account: Account) -> str:
    """The account's referral code, made on first use; unguessable, so codes cannot be enumerated."""
    account = uow.lock_one(account)  # two first requests at once must not hand out two codes
    while account.referral_code is None:
        candidate = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
        if uow.session.scalar(select(Account.id).where(Account.referral_code == candidate)) is None:
            account.referral_code = candidate
            uow.session.flush()
    return account.referral_code


def normalize_code(code: str) -> str:
    """Codes are case-insensitive and forgive stray spaces and dashes."""
    return code.strip().replace("-", "").replace(" ", "").upper()


def normalize_email(email: str | None) -> str | None:
    """The mailbox an address reaches: lowercased, `+tag` removed, and dots removed for Gmail."""
    if not email or "@" not in email:
        return None
    local, _, domain = email.strip().lower().rpartition("@")
    local = local.split("+", 1)[0]
    if domain in GMAIL:
        local, domain = local.replace(".", ""), "gmail.com"
    return f"{local}@{domain}"


def attribute(
    uow: UnitOfWork,
    catalogue: Catalogue,
    referee: Account,
    code: str,
    *,
    source: str,
    email: str | None = None,
    now: datetime | None = None,
) -> Attribution:
    """Attribute `referee` to the owner of `code` (the first attribution wins and is locked) and settle what is
    due. A self-referral is stored as `rejected` with its reason, and is not the referee's one attribution.
    The code carried again by a later event of the referee is answered by the attribution it made."""
    now = now or utcnow()
    normalized = normalize_code(code)
    live = live_referral(uow, referee)
    if live is not None and live.code == normalized:
        return Attribution(live, created=False)
    referrer = uow.session.scalar(select(Account).where(Account.referral_code == normalized))
    if referrer is None:
        raise UnknownCode(code)
    uow.lock(referrer, referee)
    live = live_referral(uow, referee)  # again, under the referee's lock
    if email and not referee.email:
        referee.email = email
    if live is not None:
        if live.referrer_id != referrer.id:
            raise AlreadyAttributed(live)
        return Attribution(live, created=False)
    reason = self_referral(referrer, referee, email)
    referral = Referral(
        referrer_id=referrer.id,
        referee_id=referee.id,
        code=normalized,
        source=source,
        email=normalize_email(email or referee.email),
        status="rejected" if reason else "attributed",
        reason=reason,
        attributed_at=now,
    )
    uow.session.add(referral)
    uow.session.flush()
    _log_status(referral, None, referrer, referee)
    if reason is None:
        settle(uow, catalogue, referee, now)
    return Attribution(referral, created=True)


SETTLED = ("paid", "reversed", "held")  # nothing left for `settle` to do (a held one waits for support)


def live_referral(uow: UnitOfWork, referee: Account) -> Referral | None:
    """The referee's attribution that counts (not a rejected one), if any, as stored now."""
    return uow.session.scalar(LIVE, {"referee": referee.id})


# Built once: `settle` runs for nearly every event.
LIVE = (
    select(Referral)
    .where(Referral.referee_id == bindparam("referee"), Referral.status != "rejected")
    .execution_options(populate_existing=True)
)


def settle(uow: UnitOfWork, catalogue: Catalogue, referee: Account, now: datetime | None = None) -> str | None:
    """Qualify the referee's attribution if it now can, and pay whatever side is due; idempotent. Returns the
    status of the referee's live attribution (None: it has none)."""
    now = now or utcnow()
    referral = live_referral(uow, referee)
    if referral is None or referral.status in SETTLED:
        return referral.status if referral is not None else None
    terms = catalogue.referrals
    if referral.qualified_at is None:
        if terms.qualify_on == "signup":
            _qualify(referral, "signup", now)
        else:
            invoice = first_qualifying_invoice(uow, referee, terms.min_amount)
            if invoice is None:
                return referral.status
            _qualify(referral, invoice, now)
    pay(uow, catalogue, referral, now)
    return referral.status


def pay(
    uow: UnitOfWork, catalogue: Catalogue, referral: Referral, now: datetime, *, override_cap: bool = False
) -> None:
    """Pay each unpaid side as its own grant, each in its own savepoint: one side failing never stops the
    other, and the failed side is retried on its own later (worker, reconciliation, backfill)."""
    terms = catalogue.referrals
    owners = _lock_parties(uow, referral)  # before what a concurrent payout could change: the keys, the cap
    amounts = {"referrer": terms.referrer_credits, "referee": terms.referee_credits}
    before = referral.status
    # A payout the cap held back is earned when it is released, not when its referral qualified: a renewal
    # of the referrer's since then must not cut what support (or a new month) has just paid.
    earned_at = now if override_cap or before == "held" else _earned_at(uow, referral, now)
    held = None
    unpaid = []
    paid = ledger.taken(uow, [_side_key(referral, side) for side in SIDES])
    for side in SIDES:
        if amounts[side] <= 0 or _side_key(referral, side) in paid:
            continue
        cap = terms.max_rewards_per_referrer_per_month
        if side == "referrer" and not override_cap and _over_cap(uow, referral, cap, now):
            held = f"referrer reached {cap} rewards this month"
        elif _pay_side(uow, terms, referral, side, owners[side], amounts[side], earned_at, now):
            continue
        unpaid.append(side)
    if not unpaid:
        referral.status, referral.reason, referral.paid_at = "paid", None, referral.paid_at or now
    elif held:
        referral.status, referral.reason = "held", held
    else:
        referral.status, referral.reason = "qualified", f"unpaid: {', '.join(unpaid)} (will be retried)"
    if referral.status != before:
        _log_status(referral, before, owners["referrer"], owners["referee"])


def _pay_side(
    uow: UnitOfWork,
    terms: Referrals,
    referral: Referral,
    side: str,
    owner: Account,
    credits: int,
    earned_at: datetime,
    now: datetime,
) -> bool:
    """Grant one side in a savepoint of its own; False (logged) when it failed and so remains unpaid.

    The payout is earned at `earned_at`, however late its event is processed: under `rollover = "policy"` a
    renewal whose period starts after it does not cut it, and one whose period started before it does. Its
    expiry, if the terms set one, counts from when it is paid."""
    days = terms.expires_after_days
    try:
        with uow.savepoint():
            posted = ledger.grant(
                uow,
                owner,
                credits,
                source="referral",
                key=_side_key(referral, side),
                reason=f"referral {referral.id} ({side})",
                actor="referrals",
                rollover=terms.rollover == "policy",
                earned_at=earned_at,
                expires_at=now + timedelta(days=days) if days else None,
                meta={"referral": referral.id, "side": side, "rollover": terms.rollover},
                now=now,
            )
            if terms.rollover == "policy":
                rollover.cut_late(uow, owner, posted, earned_at=earned_at, now=now)
    except Exception as exc:
        log.warning("referral.side_failed", referral=referral.id, side=side, error=f"{type(exc).__name__}: {exc}")
        return False
    return True


def _earned_at(uow: UnitOfWork, referral: Referral, now: datetime) -> datetime:
    """When the referral's payouts were earned: its qualifying payment's time (else its attribution's)."""
    payment = uow.session.get(Payment, referral.qualifying_payment) if referral.qualifying_payment else None
    if payment is not None:
        return payment.paid_at
    return referral.qualified_at or referral.attributed_at or now


def side_paid(uow: UnitOfWork, referral: Referral, side: str) -> bool:
    """Whether this side's grant exists (the ledger, not a flag, is the truth)."""
    return ledger.granted(uow, _side_key(referral, side))


def _lock_parties(uow: UnitOfWork, referral: Referral) -> dict[str, Account]:
    """Both parties' accounts, locked (in id order), by side."""
    referrer = uow.session.get_one(Account, referral.referrer_id)
    referee = uow.session.get_one(Account, referral.referee_id)
    uow.lock(referrer, referee)
    return {"referrer": referrer, "referee": referee}


def _side_key(referral: Referral, side: str) -> str:
    return f"referral:{referral.id}:{side}"


def claw_back(
    uow: UnitOfWork,
    catalogue: Catalogue,
    payment: Payment,
    refunded_to: int,
    now: datetime,
    *,
    refunded_at: datetime | None = None,
) -> str | None:
    """If `payment` qualified a referral and, refunded down to `refunded_to`, no longer qualifies — refunded
    (at `refunded_at`, the refund's own time; else `now`) within `clawback_days` of being paid — reverse both
    payouts' unspent credits. However late the refund is processed, its own time decides."""
    referral = uow.session.scalar(select(Referral).where(Referral.qualifying_payment == payment.id))
    terms = catalogue.referrals
    if referral is None or referral.status == "reversed" or refunded_to >= max(terms.min_amount, 1):
        return None
    if (refunded_at or now) - payment.paid_at > timedelta(days=terms.clawback_days):
        return f"referral {referral.id} kept: refunded after the {terms.clawback_days}-day clawback window"
    before = referral.status
    shortfall = 0
    _lock_parties(uow, referral)
    for side in SIDES:
        grant_row = ledger.grant_of(uow, _side_key(referral, side))
        if grant_row is None:
            continue
        owner = uow.session.get_one(Account, grant_row.account_id)
        posted = ledger.debit(
            uow,
            owner,
            grant_row.amount,
            kind="reverse",
            key=f"clawback:{referral.id}:{side}",
            grants=[grant_row],
            partial=True,
            reason=f"clawback of referral {referral.id} ({side}): {payment.id} refunded",
            actor="referrals",
            meta={"referral": referral.id, "side": side, "payment": payment.id},
            now=now,
        )
        shortfall += int(posted.entry.meta.get("shortfall", 0))
    referral.status = "reversed"
    referral.reason = f"{payment.id} refunded" + (f"; shortfall {shortfall}" if shortfall else "")
    _log_status(referral, before, None, None)
    return f"referral {referral.id} clawed back" + (f" (shortfall {shortfall})" if shortfall else "")


Status = Literal["attributed", "qualified", "paid", "held", "rejected", "reversed"]


class ReleaseRefused(Exception):
    """Only a held referral can be released."""


@dataclass(frozen=True)
class Released:
    """What a release did: the referral as it is now, and the audit row written when it was paid."""

    referral: Referral
    audit_id: int | None


def release(
    uow: UnitOfWork,
    catalogue: Catalogue,
    referral_id: int,
    now: datetime,
    *,
    actor: str,
    reason: str,
    ticket: str | None = None,
    past_cap: bool = True,
) -> Released:
    """Pay a held referral's unpaid side, once (the side's usual key), and audit it when paid: support's
    release passes the referrer's monthly cap (`past_cap`); a new month's release (actor `system`) pays only a
    referrer back under it, and leaves the others held. ReleaseRefused for a referral that is not held."""
    referral = _locked(uow, referral_id)
    if referral is None:
        raise ReleaseRefused(f"no referral {referral_id}")
    if referral.status != "held":
        raise ReleaseRefused(f"referral {referral_id} is {referral.status}, not held")
    pay(uow, catalogue, referral, now, override_cap=past_cap)
    if referral.status != "paid":
        return Released(referral, None)
    row = audit.record(
        uow,
        actor=actor,
        action="referral.release",
        reason=reason,
        account=uow.session.get_one(Account, referral.referrer_id),
        ticket=ticket,
        details={"referral": referral.id, "past_cap": past_cap},
    )
    return Released(referral, row.id)


def held_before(uow: UnitOfWork, month_start: datetime) -> list[int]:
    """The referrals held in an earlier month, oldest first: their referrer's cap counts afresh this month."""
    query = select(Referral.id).where(Referral.status == "held", Referral.qualified_at < month_start)
    return list(uow.session.scalars(query.order_by(Referral.id)))


def _locked(uow: UnitOfWork, referral_id: int) -> Referral | None:
    """The referral with both parties' accounts locked, read again under them: another process may have paid
    it meanwhile."""
    referral = uow.session.get(Referral, referral_id)
    if referral is not None:
        _lock_parties(uow, referral)
        uow.session.refresh(referral)
    return referral


def listing(uow: UnitOfWork, status: Status | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Referrals for support, oldest first, only those in `status` when given."""
    query = select(Referral).order_by(Referral.id).limit(limit)
    if status is not None:
        query = query.where(Referral.status == status)
    return [describe(uow, r) for r in uow.session.scalars(query)]


def describe(uow: UnitOfWork, referral: Referral) -> dict[str, Any]:
    """One referral as support sees it: both parties by public id, its state, and which sides are paid."""
    paid = ledger.taken(uow, [_side_key(referral, side) for side in SIDES])
    return {
        "id": referral.id,
        "status": referral.status,
        "reason": referral.reason,
        "referrer_account_id": uow.session.get_one(Account, referral.referrer_id).public_id,
        "referee_account_id": uow.session.get_one(Account, referral.referee_id).public_id,
        "code": referral.code,
        "source": referral.source,
        "qualifying_payment": referral.qualifying_payment,
        "paid_sides": [side for side in SIDES if _side_key(referral, side) in paid],
        "attributed_at": referral.attributed_at.isoformat(),
        "qualified_at": referral.qualified_at.isoformat() if referral.qualified_at else None,
        "paid_at": referral.paid_at.isoformat() if referral.paid_at else None,
    }


def unpaid(uow: UnitOfWork) -> list[int]:
    """The qualified referrals with a side still unpaid (not held ones: those wait for support), oldest first."""
    return list(uow.session.scalars(select(Referral.id).where(Referral.status == "qualified").order_by(Referral.id)))


def retry(uow: UnitOfWork, catalogue: Catalogue, referral_id: int, now: datetime | None = None) -> None:
    """Pay whatever side of one qualified referral is still unpaid."""
    referral = _locked(uow, referral_id)
    if referral is not None and referral.status == "qualified":
        pay(uow, catalogue, referral, now or utcnow())


def view(uow: UnitOfWork, account: Account, link_base: str) -> dict[str, Any]:
    """What Settings → Referrals shows: the code and link (None until `code_for` makes one: a read writes
    nothing), credits earned, and each referral's state."""
    code = account.referral_code
    rows = uow.session.scalars(select(Referral).where(Referral.referrer_id == account.id).order_by(Referral.id)).all()
    referrals = []
    for r in rows:
        grant_row = ledger.grant_of(uow, _side_key(r, "referrer"))
        earned = grant_row.amount - grant_row.reversed if grant_row else 0
        referrals.append(
            {
                "referee_account_id": uow.session.get_one(Account, r.referee_id).public_id,
                "status": r.status,
                "reason": r.reason,
                "credits_earned": earned,
                "attributed_at": r.attributed_at.isoformat(),
                "paid_at": r.paid_at.isoformat() if r.paid_at else None,
            }
        )
    return {
        "code": code,
        "link": link(code, link_base) if code else None,
        "credits_earned": sum(r["credits_earned"] for r in referrals),
        "referrals": referrals,
    }


def link(code: str, base: str) -> str:
    """The shareable link for a code."""
    return f"{base}{code}"


def _qualify(referral: Referral, payment_id: str, now: datetime) -> None:
    referral.qualifying_payment, referral.qualified_at = payment_id, now
    before, referral.status = referral.status, "qualified"
    _log_status(referral, before, None, None)


def first_qualifying_invoice(uow: UnitOfWork, referee: Account, min_amount: int) -> str | None:
    """The id of the referee's first recorded paid invoice worth at least `min_amount` (never a $0 trial
    invoice); public because a support backfill looks here before it asks Stripe."""
    query = (
        select(Payment.id)
        .where(Payment.account_id == referee.id, Payment.kind == "invoice", Payment.amount >= max(min_amount, 1))
        .order_by(Payment.paid_at, Payment.id)
        .limit(1)
    )
    return uow.session.scalar(query)


def self_referral(referrer: Account, referee: Account, email: str | None) -> str | None:
    """Why this would be a self-referral, or None: attribution stores it rejected, and a support backfill
    refuses it before it feeds anything through the inbox."""
    if referrer.id == referee.id:
        return "self-referral: same account"
    mine, theirs = normalize_email(referrer.email), normalize_email(email or referee.email)
    if mine and mine == theirs:
        return "self-referral: same email"
    return None


def _over_cap(uow: UnitOfWork, referral: Referral, cap: int, now: datetime) -> bool:
    """Whether the referrer already got `cap` referral rewards this calendar month."""
    month_start = periods.month_start(now)
    rewards = uow.session.scalar(
        select(func.count()).where(
            LedgerEntry.account_id == referral.referrer_id,
            LedgerEntry.kind == "grant",
            LedgerEntry.idempotency_key.like("referral:%:referrer"),
            LedgerEntry.created_at >= month_start,
        )
    )
    return (rewards or 0) >= cap


def _log_status(referral: Referral, before: str | None, referrer: Account | None, referee: Account | None) -> None:
    """Every status change is logged as a `referral.status` event."""
    log.info(
        "referral.status",
        referral=referral.id,
        status=referral.status,
        previous=before,
        reason=referral.reason,
        **({"referrer": referrer.public_id} if referrer else {}),
        **({"referee": referee.public_id} if referee else {}),
    )
