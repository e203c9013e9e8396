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
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from service.domain import accounts, ledger

from service.infra import logs
from service.infra.catalogue import Catalogue
from service.infra.models import Account, Grant, LedgerEntry, Payment, Referral, utcnow

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


def code_for(session: Session, account: Account) -> str:
    """The account's referral code, made on first use; unguessable, so codes cannot be enumerated."""
    account = accounts.lock(session, account)  # two first requests at once must not hand out two codes
    while account.referral_code is None:
        candidate = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
        if session.scalar(select(Account.id).where(Account.referral_code == candidate)) is None:
            account.referral_code = candidate
            session.flush()
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
    session: Session,
    catalogue: Catalogue,
    referee: Account,
    code: str,
    *,
    source: str,
    email: str | None = None,
    now: datetime | None = None,
) -> Attribution:
    """Attribute `referee` to the owner of `code` (first attribution wins) and settle what is due.

    A self-referral is stored as `rejected` with its reason (and is not the referee's one attribution).
    A referee this transaction holds locked already (a webhook's, resolved) and attributed before with this
    very code — the code carried again by each of its later events — is answered without reading or locking
    the referrer: a code is one referrer's for good.
    """
    now = now or utcnow()
    normalized = normalize_code(code)
    live = live_referral(session, referee) if accounts.facts(session, referee.id) is not None else None
    if live is None or live.code != normalized:
        referrer = session.scalar(BY_CODE, {"code": normalized})
        if referrer is None:
            raise UnknownCode(code)
        accounts.lock_many(session, [referrer, referee])
        live = live_referral(session, referee)
    if email and not referee.email:
        accounts.update(session, referee, email=email)
    if live is not None:
        if live.code != normalized and live.referrer_id != referrer.id:
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
    session.add(referral)
    session.flush()
    _changed(session, referral, None, referrer, referee)
    if reason is None:
        settle(session, catalogue, referee, now)
    return Attribution(referral, created=True)


BY_CODE = select(Account).where(Account.referral_code == bindparam("code"))  # built once: every event carrying a code
# Built once (settle runs for nearly every event): the referee's live attribution, read afresh, and its status alone.
LIVE = (select(Referral).where(Referral.referee_id == bindparam("referee"), Referral.status != "rejected")
        .execution_options(populate_existing=True))
_referrals = Referral.__table__.c
LIVE_STATUS = select(_referrals.status).where(_referrals.referee_id == bindparam("referee"), _referrals.status != "rejected")
_payments, _entries = Payment.__table__.c, LedgerEntry.__table__.c
FIRST_QUALIFYING = (select(_payments.id).where(_payments.account_id == bindparam("account_id"), _payments.kind == "invoice",
                                               _payments.amount >= bindparam("min_amount"))
                    .order_by(_payments.paid_at, _payments.id).limit(1))
REWARDS_SINCE = select(func.count()).where(  # the referrer's referral rewards since the start of the month
    _entries.account_id == bindparam("account_id"), _entries.kind == "grant",
    _entries.idempotency_key.like("referral:%:referrer"), _entries.created_at >= bindparam("since"))
SETTLED = ("paid", "reversed", "held")  # nothing left for `settle` to do (a held one waits for support)
STATUS = "referral"  # accounts.facts: the status of the account's live attribution as a referee (None: none)


def live_referral(session: Session, referee: Account) -> Referral | None:
    """The referee's attribution that counts (not a rejected one), if any."""
    return session.scalar(LIVE, {"referee": referee.id})


def live_status(session: Session, referee: Account) -> str | None:
    """The status of the referee's live attribution (None: it has none), without loading it — and without
    reading anything when this transaction holds the referee locked and has looked already (a worker lane's
    later events). The noted status stays right while the lock is held: a new attribution needs the
    referee's lock, and what others may do meanwhile (a retried payout) only takes a referral out of `settle`'s
    reach, never back into it; this transaction's own changes are noted as they are made (`_changed`)."""
    known = accounts.facts(session, referee.id)
    if known is not None and STATUS in known:
        return known[STATUS]
    if known is not None and known.get(accounts.INSERTED):  # a new account: no attribution but one made since (noted)
        return None
    status = session.execute(LIVE_STATUS, {"referee": referee.id}).scalar()
    if known is not None:
        known[STATUS] = status
    return status


def settle(session: Session, catalogue: Catalogue, referee: Account, now: datetime | None = None) -> str | None:
    """Qualify the referee's attribution if it now can, and pay whatever side is due; idempotent. Returns the
    status of the referee's live attribution (None: it has none). Most calls find nothing to do from the status
    alone; only an attribution still to be qualified or paid is loaded."""
    now = now or utcnow()
    status = live_status(session, referee)
    if status is None or status in SETTLED:
        return status
    referral = session.scalars(LIVE, {"referee": referee.id}).one()
    if referral.status in SETTLED:  # settled meanwhile by another transaction (a retried payout)
        return _note(session, referral)
    terms = catalogue.referrals
    if referral.qualified_at is None:
        if terms.qualify_on == "signup":
            _qualify(session, referral, "signup", now)
        else:
            invoice = first_qualifying_invoice(session, referee, terms.min_amount)
            if invoice is None:
                return referral.status
            _qualify(session, referral, invoice, now)
    pay(session, catalogue, referral, now)
    return referral.status


def pay(session: Session, catalogue: Catalogue, referral: Referral, now: datetime, *, override_cap: bool = False) -> None:
    """Pay each unpaid side as its own grant, each in its own savepoint: one side failing never stops
    the other, and the failed side is retried on its own later (worker, reconciliation, backfill)."""
    terms = catalogue.referrals
    owners = {"referrer": session.get_one(Account, referral.referrer_id), "referee": session.get_one(Account, referral.referee_id)}
    amounts = {"referrer": terms.referrer_credits, "referee": terms.referee_credits}
    before = referral.status
    held = None
    unpaid = []
    for side in SIDES:
        if amounts[side] <= 0 or side_paid(session, referral, side):
            continue
        if side == "referrer" and not override_cap and _over_cap(session, referral, terms.max_rewards_per_referrer_per_month, now):
            held = f"referrer reached {terms.max_rewards_per_referrer_per_month} rewards this month"
        elif _pay_side(session, referral, side, owners[side], amounts[side], now):
            continue
        unpaid.append(side)
    if not unpaid:
        referral.status, referral.reason, referral.paid_at = "paid", None, referral.paid_at or now
    elif held:
        referral.status, referral.reason = "held", held
    else:
        referral.status, referral.reason = "qualified", f"unpaid: {', '.join(unpaid)} (will be retried)"
    if referral.status != before:
        _changed(session, referral, before, owners["referrer"], owners["referee"])


def _pay_side(session: Session, referral: Referral, side: str, owner: Account, credits: int, now: datetime) -> bool:
    """Grant one side in a savepoint of its own; False (logged) when it failed and so remains unpaid."""
    try:
        with session.begin_nested():
            ledger.grant(
                session,
                owner,
                credits,
                source="referral",
                key=_side_key(referral, side),
                reason=f"referral {referral.id} ({side})",
                actor="referrals",
                rollover=True,
                meta={"referral": referral.id, "side": side},
                now=now,
            )
    except Exception as exc:  # noqa: BLE001 - the other side must still land; this one is retried
        log.warning("referral.side_failed", referral=referral.id, side=side, error=f"{type(exc).__name__}: {exc}")
        return False
    return True


def side_paid(session: Session, referral: Referral, side: str) -> bool:
    """Whether this side's grant exists (the ledger, not a flag, is the truth)."""
    owner = session.get_one(Account, referral.referrer_id if side == "referrer" else referral.referee_id)
    return ledger.granted(session, owner, _side_key(referral, side))


def _side_key(referral: Referral, side: str) -> str:
    return f"referral:{referral.id}:{side}"


def claw_back(session: Session, catalogue: Catalogue, payment: Payment, refunded_to: int, now: datetime) -> str | None:
    """If `payment` qualified a referral and, refunded down to `refunded_to`, no longer qualifies — within
    `clawback_days` of being paid — reverse both payouts' unspent credits."""
    referral = session.scalar(select(Referral).where(Referral.qualifying_payment == payment.id))
    terms = catalogue.referrals
    if referral is None or referral.status == "reversed" or refunded_to >= max(terms.min_amount, 1):
        return None
    if now - payment.paid_at > timedelta(days=terms.clawback_days):
        return f"referral {referral.id} kept: refunded after the {terms.clawback_days}-day clawback window"
    before = referral.status
    shortfall = 0
    for side in SIDES:
        grant_row = _side_grant(session, referral, side)
        if grant_row is None:
            continue
        owner = session.get_one(Account, grant_row.account_id)
        posted = ledger.reverse(
            session, owner, [grant_row], grant_row.amount, key=f"clawback:{referral.id}:{side}",
            reason=f"clawback of referral {referral.id} ({side}): {payment.id} refunded", actor="referrals",
            meta={"referral": referral.id, "side": side, "payment": payment.id}, now=now,
        )
        shortfall += int(posted.entry.meta.get("shortfall", 0))
    referral.status, referral.reason = "reversed", f"{payment.id} refunded" + (f"; shortfall {shortfall}" if shortfall else "")
    _changed(session, referral, before, None, None)
    return f"referral {referral.id} clawed back" + (f" (shortfall {shortfall})" if shortfall else "")


def unpaid(session: Session) -> list[int]:
    """The qualified referrals with a side still unpaid (not held ones: those wait for support), oldest first."""
    return list(session.scalars(select(Referral.id).where(Referral.status == "qualified").order_by(Referral.id)))


def retry(session: Session, catalogue: Catalogue, referral_id: int, now: datetime | None = None) -> None:
    """Pay whatever side of one qualified referral is still unpaid. Both accounts are
    locked first, in the one order (`lock_many`), then the referral is read again under them: another process
    may have paid it meanwhile. The caller gives each referral a transaction of its own, so one that loses a
    deadlock against a handler (which locks the referee, then the referrer) leaves the others paid."""
    referral = session.get_one(Referral, referral_id)
    accounts.lock_many(session, [session.get_one(Account, referral.referrer_id), session.get_one(Account, referral.referee_id)])
    session.refresh(referral)
    if referral.status == "qualified":
        pay(session, catalogue, referral, now or utcnow())


def view(session: Session, account: Account, link_base: str) -> dict[str, Any]:
    """What Settings → Referrals shows: the code and link, credits earned, and each referral's state."""
    code = code_for(session, account)
    rows = session.scalars(select(Referral).where(Referral.referrer_id == account.id).order_by(Referral.id)).all()
    referrals = []
    for r in rows:
        grant_row = _side_grant(session, r, "referrer")
        earned = grant_row.amount - grant_row.reversed if grant_row else 0
        referrals.append({
            "referee_account_id": session.get_one(Account, r.referee_id).public_id,
            "status": r.status,
            "reason": r.reason,
            "credits_earned": earned,
            "attributed_at": r.attributed_at.isoformat(),
            "paid_at": r.paid_at.isoformat() if r.paid_at else None,
        })
    return {
        "code": code,
        "link": link(code, link_base),
        "credits_earned": sum(r["credits_earned"] for r in referrals),
        "referrals": referrals,
    }


def link(code: str, base: str) -> str:
    """The shareable link for a code."""
    return f"{base}{code}"


def _qualify(session: Session, referral: Referral, payment_id: str, now: datetime) -> None:
    referral.qualifying_payment, referral.qualified_at = payment_id, now
    before, referral.status = referral.status, "qualified"
    _changed(session, referral, before, None, None)


def first_qualifying_invoice(session: Session, referee: Account, min_amount: int) -> str | None:
    """The id of the referee's first recorded paid invoice worth at least `min_amount` (never a $0 trial
    invoice); public because a support backfill looks here before it asks Stripe."""
    return session.execute(FIRST_QUALIFYING, {"account_id": referee.id, "min_amount": max(min_amount, 1)}).scalar()


def self_referral(referrer: Account, referee: Account, email: str | None) -> str | None:
    """Why this would be a self-referral, or None: attribution stores it rejected, and a support backfill
    refuses it before it feeds anything through the inbox."""
    if referrer.id == referee.id:
        return "self-referral: same account"
    mine, theirs = normalize_email(referrer.email), normalize_email(email or referee.email)
    if mine and mine == theirs:
        return "self-referral: same email"
    return None


def _over_cap(session: Session, referral: Referral, cap: int, now: datetime) -> bool:
    """Whether the referrer already got `cap` referral rewards this calendar month."""
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return session.execute(REWARDS_SINCE, {"account_id": referral.referrer_id, "since": month_start}).scalar_one() >= cap


def _side_grant(session: Session, referral: Referral, side: str) -> Grant | None:
    key = _side_key(referral, side)
    return session.scalar(select(Grant).join(LedgerEntry, LedgerEntry.id == Grant.entry_id).where(LedgerEntry.idempotency_key == key))


def _note(session: Session, referral: Referral) -> str:
    """Note a live referral's status for its referee's lock (see live_status), and return it."""
    known = accounts.facts(session, referral.referee_id)
    if known is not None and referral.status != "rejected":  # a rejected one is no attribution at all
        known[STATUS] = referral.status
    return referral.status


def _changed(session: Session, referral: Referral, before: str | None, referrer: Account | None,
             referee: Account | None) -> None:
    """Every status change: noted for the referee's lock, and logged as a `referral.status` event."""
    _note(session, referral)
    log.info(
        "referral.status",
        referral=referral.id,
        status=referral.status,
        previous=before,
        reason=referral.reason,
        **({"referrer": referrer.public_id} if referrer else {}),
        **({"referee": referee.public_id} if referee else {}),
    )
