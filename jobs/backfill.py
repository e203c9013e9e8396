"""Support's referral backfill: attribute a referee to a referrer after the fact and pay whichever side is
still unpaid — through the live path's own functions and idempotency keys (`referral:{id}:referrer|referee`),
so a backfill, a late webhook, a reconciliation fix and a second backfill never pay anything twice.

A dry run carries out the whole repair in a transaction that is never committed, so what it reports is what
`--apply` would do, balances included. When the qualifying invoice never reached the service, `--apply`
feeds it through the inbox as a synthetic `invoice.paid` event, exactly as the missed webhook would have
been (the dry run runs the same handler inside its uncommitted transaction). The guards are checked before
anything is fed, so a refusal writes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from service.domain import accounts, audit, ledger, referrals
from service.infra import stripe_objects as so
from service.infra.models import Account, LedgerEntry, Payment, Referral, StripeEvent, utcnow
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork
from webhooks import dispatch, handlers, inbox

ACTION = "backfill.referral"


class Refused(Exception):
    """The backfill cannot go ahead as asked; the message says why."""


@dataclass(frozen=True)
class Request:
    """What support asked for, and on whose authority."""

    referee: str
    referrer: str
    reason: str
    actor: str
    ticket: str | None = None
    invoice: str | None = None
    override_cap: bool = False


@dataclass(frozen=True)
class Invoice:
    """The referee's qualifying invoice and where it was found; `unrecorded` is the Stripe object when the
    service never recorded it, so it has to go through the inbox before the referral can qualify on it."""

    id: str
    found_in: str
    unrecorded: dict[str, Any] | None = None


@dataclass(frozen=True)
class Before:
    """Both parties before the backfill: what the report measures the change against."""

    attributed: bool
    balances: dict[str, int]
    keys: frozenset[str]
    invoice: Invoice | None


@dataclass(frozen=True)
class Party:
    """One side of the referral: whose it is, its payout and what became of it, its balance around the backfill.

    `outcome` is "already paid", "paid" (by this backfill), "held" (the referrer's monthly cap), "unpaid"
    (qualified, but the grant failed and is retried), "not due" (no qualifying invoice yet) or "no payout"
    (the catalogue pays this side nothing).
    """

    account: str
    credits: int
    outcome: str
    balance_before: int
    balance_after: int


@dataclass(frozen=True)
class Report:
    """What the backfill did (or, in a dry run, would do); also the audit row's details."""

    applied: bool
    attribution: str
    referral: int | None
    status: str
    status_reason: str | None
    qualifying_payment: str | None
    invoice: str | None
    invoice_found_in: str | None
    fed_event: str | None
    override_cap: bool
    referee: Party
    referrer: Party
    created: list[str]  # ledger keys written (a dry run: that it would write)
    changed: bool  # anything written: ledger entries, or a new attribution

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def referral(rt: Runtime, request: Request, *, apply: bool, now: datetime | None = None) -> tuple[Report, int | None]:
    """Plan the backfill (and, with `apply`, carry it out); returns the report and the audit row's id.

    Raises Refused when a live-path guard forbids it (self-referral, another referrer's attribution) or the
    named invoice does not qualify; stripe errors propagate.
    """
    now = now or utcnow()
    with rt.uow() as uow:  # closed without a commit: reading, or a dry run, leaves nothing behind
        before = _before(uow, rt, request, now)
        if not apply:
            if before.invoice is not None and before.invoice.unrecorded is not None:
                _handle_inline(uow, rt, before.invoice.unrecorded, now)
            return _repair(uow, rt, request, before, now, applied=False), None
    if before.invoice is not None and before.invoice.unrecorded is not None:
        _feed(rt, before.invoice.unrecorded, now)  # the inbox commits it in its own transaction, as for a webhook
    with rt.uow() as uow:
        report = _repair(uow, rt, request, before, now, applied=True)
        referee, _ = _parties(uow, request)
        entry = audit.record(
            uow,
            actor=request.actor,
            action=ACTION,
            reason=request.reason,
            account=referee,
            ticket=request.ticket,
            details=report.as_dict(),
        )
        uow.commit()
        return report, entry.id


def synthetic_event(invoice: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The `invoice.paid` event Stripe would have delivered for `invoice`, under an id of its own, so the
    inbox stores it once however often the backfill is applied."""
    return {
        "id": f"evt_backfill_{invoice['id']}",
        "object": "event",
        "type": "invoice.paid",
        "created": invoice.get("created") or int(now.timestamp()),
        "livemode": invoice.get("livemode") is True,
        "data": {"object": invoice},
    }


def _before(uow: UnitOfWork, rt: Runtime, request: Request, now: datetime) -> Before:
    """Check the guards, find the qualifying invoice and take both parties' state, changing nothing."""
    referee, referrer = _parties(uow, request)
    live = referrals.live_referral(uow, referee)
    if live is not None and live.referrer_id != referrer.id:
        raise _conflict(uow, referee, live)
    problem = referrals.self_referral(referrer, referee, None)
    if problem is not None:
        raise Refused(problem)
    return Before(
        attributed=live is not None,
        balances={"referee": ledger.balance(uow, referee, now), "referrer": ledger.balance(uow, referrer, now)},
        keys=_keys(uow, referee, referrer),
        invoice=_qualifying_invoice(uow, rt, referee, request.invoice),
    )


def _repair(uow: UnitOfWork, rt: Runtime, request: Request, before: Before, now: datetime, *, applied: bool) -> Report:
    """Attribute (first attribution wins, as live) and settle; with `override_cap` a held referrer is paid."""
    referee, referrer = _parties(uow, request)
    code = referrals.code_for(uow, referrer)
    try:
        referral = referrals.attribute(uow, rt.catalogue, referee, code, source="backfill", now=now).referral
    except referrals.AlreadyAttributed as exc:  # attributed elsewhere since the check (a webhook, a fed invoice)
        raise _conflict(uow, referee, exc.referral) from exc
    if referral.status == "rejected":
        raise Refused(referral.reason or "rejected")
    if request.override_cap and referral.status == "held":
        referrals.pay(uow, rt.catalogue, referral, now, override_cap=True)
    else:
        referrals.settle(uow, rt.catalogue, referee, now)
    created = sorted(_keys(uow, referee, referrer) - before.keys)
    terms = rt.catalogue.referrals

    def party(account: Account, side: str, credits: int) -> Party:
        return Party(
            account.public_id,
            credits,
            _outcome(uow, referral, side, credits, before.keys),
            before.balances[side],
            ledger.balance(uow, account, now),
        )

    invoice = before.invoice
    return Report(
        applied=applied,
        attribution="existing" if before.attributed else "new",
        referral=referral.id if applied or before.attributed else None,  # a dry run's new id is not the one apply gets
        status=referral.status,
        status_reason=referral.reason,
        qualifying_payment=referral.qualifying_payment,
        invoice=invoice.id if invoice else None,
        invoice_found_in=invoice.found_in if invoice else None,
        fed_event=synthetic_event(invoice.unrecorded, now)["id"] if invoice and invoice.unrecorded else None,
        override_cap=request.override_cap,
        referee=party(referee, "referee", terms.referee_credits),
        referrer=party(referrer, "referrer", terms.referrer_credits),
        created=created,
        changed=bool(created) or not before.attributed,
    )


def _parties(uow: UnitOfWork, request: Request) -> tuple[Account, Account]:
    """(referee, referrer). A referee named by a Stripe customer id the service never saw is that customer's
    account, as a webhook would have made it; the referrer is an account id, a customer id or a referral code."""
    if request.referee.startswith("cus_"):
        referee = accounts.get_or_create(uow, request.referee)
    else:
        referee = accounts.get(uow, request.referee)
    referrer = accounts.find(uow, request.referrer) or uow.session.scalar(
        select(Account).where(Account.referral_code == referrals.normalize_code(request.referrer))
    )
    if referrer is None:
        raise Refused(f"no account or referral code {request.referrer!r} for the referrer")
    return referee, referrer


def _conflict(uow: UnitOfWork, referee: Account, live: Referral) -> Refused:
    other = uow.session.get_one(Account, live.referrer_id)
    return Refused(
        f"{referee.public_id} is already attributed to {other.public_id} (referral {live.id}, {live.status}); "
        "the first attribution is locked"
    )


def _qualifying_invoice(uow: UnitOfWork, rt: Runtime, referee: Account, named: str | None) -> Invoice | None:
    """The invoice named with --invoice (checked at Stripe), else the referee's first qualifying invoice
    recorded locally, else the first among the customer's paid invoices at Stripe; None when there is none."""
    minimum = max(rt.catalogue.referrals.min_amount, 1)
    customer = referee.stripe_customer_id
    if named is not None:
        if customer is None:
            raise Refused(f"{referee.public_id} has no Stripe customer linked, so {named} cannot be checked as theirs")
        obj = rt.stripe.retrieve_invoice(named)
        problem = _disqualified(obj, customer, minimum, rt.settings.stripe_livemode)
        if problem is not None:
            raise Refused(f"invoice {named} does not qualify: {problem}")
        return _found(uow, obj, "Stripe (--invoice)")
    recorded = referrals.first_qualifying_invoice(uow, referee, minimum)
    if recorded is not None:
        return Invoice(recorded, "recorded payments")
    if customer is None:
        return None
    listed = [
        obj
        for obj in rt.stripe.iterate_customer_paid_invoices(customer)
        if _disqualified(obj, customer, minimum, rt.settings.stripe_livemode) is None
    ]
    if not listed:
        return None
    first = min(listed, key=lambda obj: (so.invoice(obj).paid_at or ledger.NEVER, obj["id"]))
    return _found(uow, first, "Stripe (the customer's paid invoices)")


def _found(uow: UnitOfWork, obj: dict[str, Any], where: str) -> Invoice:
    recorded = uow.session.get(Payment, obj["id"]) is not None
    return Invoice(obj["id"], where, None if recorded else obj)


def _disqualified(obj: dict[str, Any], customer: str, minimum: int, livemode: bool) -> str | None:
    """Why a Stripe invoice cannot qualify the referee's referral, or None when it can."""
    facts = so.invoice(obj)
    if obj.get("status") != "paid":
        return f"its status is {obj.get('status')!r}, not 'paid'"
    if facts.customer != customer:
        return f"it belongs to customer {facts.customer}, not the referee's {customer}"
    if facts.amount_paid < minimum:
        return f"amount_paid {facts.amount_paid} is below the qualifying minimum {minimum}"
    if (obj.get("livemode") is True) != livemode:
        return f"it is livemode={obj.get('livemode') is True}, this service runs livemode={livemode}"
    return None


def _handle_inline(uow: UnitOfWork, rt: Runtime, invoice: dict[str, Any], now: datetime) -> None:
    """For a dry run: what the inbox would do with the synthetic event, run in the uncommitted transaction."""
    payload = synthetic_event(invoice, now)
    event = inbox.Claimed(
        payload["id"], payload["type"], payload["livemode"], now, payload, so.ref(invoice.get("customer"))
    )
    _, handle = handlers.HANDLERS[payload["type"]]
    handle(handlers.Context(uow, rt.catalogue, rt.stripe, event, now), invoice)


def _feed(rt: Runtime, invoice: dict[str, Any], now: datetime) -> None:
    """Store the synthetic event in the inbox and process it there, exactly as a delivered webhook."""
    payload = synthetic_event(invoice, now)
    with rt.uow() as uow:
        inbox.store(uow, payload, now)
        uow.commit()
    if dispatch.process(rt, payload["id"], replay=True, now=now) == "processed":
        return
    with rt.uow() as uow:
        stored = uow.session.get_one(StripeEvent, payload["id"])
        raise Refused(
            f"{stored.id} is {stored.status}: {stored.last_error or stored.outcome or 'held by another process'}"
        )


def _keys(uow: UnitOfWork, *parties: Account) -> frozenset[str]:
    rows = uow.session.scalars(
        select(LedgerEntry.idempotency_key).where(LedgerEntry.account_id.in_([a.id for a in parties]))
    )
    return frozenset(rows)


def _outcome(uow: UnitOfWork, referral: Referral, side: str, credits: int, before: frozenset[str]) -> str:
    if credits <= 0:
        return "no payout"
    if f"referral:{referral.id}:{side}" in before:
        return "already paid"
    if referrals.side_paid(uow, referral, side):
        return "paid"
    if side == "referrer" and referral.status == "held":
        return "held"
    return "unpaid" if referral.qualified_at else "not due"
