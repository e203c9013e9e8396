"""Reconciliation: what Stripe knows that the ledger does not — above all, missed referral payouts.

It streams Stripe's events and paid invoices for a window (page by page, retried, so memory stays flat),
compares them with the inbox, the payments and the ledger, adds what only the local state can tell (dead
events, one-sided payouts, shortfalls, drift), and reports findings of stable kinds. With `fix`, every
repairable finding is fed through the same code as the webhook — the inbox and its handlers, or the
referral settlement — with the same idempotency keys, so a repeated run, a late webhook and a backfill
can never pay twice.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Select, or_, select

from jobs.pages import prefetched
from jobs.referral_codes import ReferralCodes
from service.domain import accounts, findings, ledger, referrals, refills
from service.infra import db, logs
from service.infra import stripe_objects as so
from service.infra.models import Account, LedgerEntry, Payment, Referral, StripeEvent, utcnow
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork
from webhooks import dispatch, inbox
from webhooks.handlers import HANDLERS

log = logs.get("reconcile")
KINDS = (
    "missed_referral_payout",
    "one_sided_referral_payout",
    "missing_refill",
    "missing_purchase_grant",
    "unprocessed_event",
    "dead_event",
    "invalid_event",
    "unreversed_refund",
    "ledger_drift",
)
GRACE = timedelta(minutes=5)  # younger than this, an event may still be on its way: not a finding yet
PAGE = 100
INVOICE_EVENTS = ("invoice.paid", "invoice.payment_succeeded")
UNSETTLED = ("attributed", "qualified")  # a referral's live states before its payouts
Repair = Callable[[], bool]
A = TypeVar("A", Account, "AccountRef")


@dataclass
class Found:
    """A finding while the run is going: what, about whom, the credits at stake, what to do, and a repair."""

    kind: str
    subject: str
    detail: str
    action: str
    accounts: list[str] = field(default_factory=list)
    stripe_ids: list[str] = field(default_factory=list)
    credits: int = 0
    repair: Repair | None = field(default=None, repr=False)
    fixed: bool = False

    def seen(self) -> findings.Seen:
        return findings.Seen(
            self.kind,
            self.subject,
            self.detail,
            self.action,
            tuple(self.accounts),
            tuple(self.stripe_ids),
            self.credits,
            self.fixed,
        )

    def view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "accounts": self.accounts,
            "stripe_ids": self.stripe_ids,
            "credits": self.credits,
            "detail": self.detail,
            "action": self.action,
            "status": "fixed" if self.fixed else "open",
        }


@dataclass
class Report:
    """What a run found (and fixed), with the summary a cron wrapper alerts on."""

    since: datetime
    until: datetime
    fix: bool
    found: list[Found]
    run_id: int | None = None

    @property
    def remaining(self) -> list[Found]:
        return [f for f in self.found if not f.fixed]

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for f in self.remaining:
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        return {
            "run_id": self.run_id,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "fix": self.fix,
            "found": len(self.found),
            "fixed": len(self.found) - len(self.remaining),
            "remaining": len(self.remaining),
            "remaining_by_kind": by_kind,
            "credits_at_stake": sum(f.credits for f in self.remaining),
        }


def run(
    rt: Runtime, since: datetime, until: datetime, *, fix: bool, tick: Callable[[str], None] = lambda _: None
) -> Report:
    """One reconciliation run, stored with its findings; Stripe errors propagate (the CLI exits 2)."""
    with rt.uow() as uow:
        run_row = findings.start_run(uow, since, until, fix)
        uow.commit()
    report = Report(since, until, fix, [], run_row.id)
    try:
        scan = Scan(rt, since, until, tick)
        with _collector_on_new_objects_only():
            scan.events()
            scan.invoices()
        scan.local()
        report.found = list(scan.found.values())
        if fix:
            for finding in report.found:
                finding.fixed = finding.repair is not None and _attempt(finding)
    except Exception:
        with rt.uow() as uow:
            findings.finish_run(uow, run_row, [], "error", {"error": "see logs"})
            uow.commit()
        raise
    with rt.uow() as uow:
        status = "findings" if report.remaining else "clean"
        findings.finish_run(uow, run_row, [f.seen() for f in report.found], status, report.summary())
        uow.commit()
    log.info("reconcile.finished", **{k: v for k, v in report.summary().items() if k != "remaining_by_kind"})
    return report


@contextmanager
def _collector_on_new_objects_only() -> Iterator[None]:
    """Keep Python's cyclic collector off what exists already (the loaded modules, SQLAlchemy's and
    pydantic's machinery) while Stripe's pages are decoded: each page's thousands of new objects trigger
    collections, and a full one walks that whole heap again (bench/README.md, "What the mechanisms save")."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _attempt(finding: Found) -> bool:
    assert finding.repair is not None  # only findings with a repair are attempted
    try:
        return finding.repair()
    except Exception as exc:
        finding.detail += f" (repair failed: {type(exc).__name__}: {exc})"
        log.warning("reconcile.repair_failed", kind=finding.kind, subject=finding.subject, error=str(exc))
        return False


class Scan:
    """Collects findings from Stripe's side and the local side; repairs are closures run afterwards."""

    def __init__(self, rt: Runtime, since: datetime, until: datetime, tick: Callable[[str], None]) -> None:
        self.rt, self.since, self.until, self.tick = rt, since, until, tick
        self.cutoff = min(until, utcnow() - GRACE)
        self.found: dict[tuple[str, str], Found] = {}
        self.reported_events: set[str] = set()
        self.codes = ReferralCodes(rt.stripe, since, self.cutoff)

    def add(self, finding: Found) -> None:
        """Merge findings about the same subject (an invoice seen as an event and in the invoice list)."""
        known = self.found.setdefault((finding.kind, finding.subject), finding)
        if known is not finding:
            known.stripe_ids += [i for i in finding.stripe_ids if i not in known.stripe_ids]
            known.accounts += [a for a in finding.accounts if a not in known.accounts]
            known.repair = known.repair or finding.repair

    # -- Stripe's side ---------------------------------------------------------------------------------

    def events(self) -> None:
        """Every handled event Stripe has for the window that the inbox has not processed."""
        listed = self.rt.stripe.iterate_events(
            created_gte=_epoch(self.since), created_lte=_epoch(self.cutoff), types=sorted(HANDLERS)
        )
        for page in prefetched(listed, PAGE):
            with self.rt.uow() as uow:
                session = uow.session
                query = LOOKUPS[uow.dialect].statuses
                statuses: dict[str, str] = dict(session.execute(query, {"ids": [e["id"] for e in page]}).all())
                for event in page:
                    self.tick("events")
                    status = statuses.get(event["id"])
                    if status is None or status in inbox.DUE:
                        self._unprocessed(uow, event, session.get(StripeEvent, event["id"]) if status else None)
                    elif status in ("dead", "invalid"):
                        self._given_up(session.get_one(StripeEvent, event["id"]))

    def invoices(self) -> None:
        """Every paid invoice of the window: its refill recorded, and its referral paid if it qualifies."""
        listed = self.rt.stripe.iterate_invoices(
            "paid", created_gte=_epoch(self.since), created_lte=_epoch(self.cutoff)
        )
        min_amount = max(self.rt.catalogue.referrals.min_amount, 1)
        for page in prefetched(listed, PAGE):
            facts = [so.invoice(obj) for obj in page]
            with self.rt.uow() as uow:
                session = uow.session
                known = Known.fetch(uow, [invoice for invoice in facts if invoice.amount_paid > 0])
                for obj, invoice in zip(page, facts, strict=True):
                    self.tick("invoices")
                    if invoice.amount_paid <= 0:
                        continue
                    outcome = known.outcomes.get(invoice.id)
                    if outcome is None or outcome == "unknown_price":
                        payment = session.get_one(Payment, invoice.id) if outcome else None
                        self.add(self._missing_refill(invoice, payment, obj))
                    if invoice.amount_paid >= min_amount:
                        self._referral_of_invoice(uow, invoice, known)

    # -- the local side --------------------------------------------------------------------------------

    def local(self) -> None:
        """Dead and stuck events, unsettled referrals, unknown prices, shortfalls and ledger drift."""
        with self.rt.uow() as uow:
            session = uow.session
            stuck = ("dead", "invalid", *inbox.DUE)
            for row in session.scalars(select(StripeEvent).where(StripeEvent.status.in_(stuck))):
                self.tick("inbox")
                if row.id in self.reported_events:
                    continue
                if row.status in ("dead", "invalid"):
                    self._given_up(row)
                elif row.received_at < utcnow() - GRACE:
                    self._unprocessed(uow, row.payload, row)
            for referral in session.scalars(select(Referral).where(Referral.status.in_(UNSETTLED))):
                self.tick("referrals")
                self._unsettled(uow, referral)
            for payment in session.scalars(
                select(Payment).where(Payment.outcome.in_(("unknown_price", "unknown_pack")))
            ):
                self._unknown_product(uow, payment)
            self._shortfalls(uow)
            for drift in ledger.check(uow):
                self.add(
                    Found(
                        "ledger_drift",
                        f"{drift.account}:{drift.what}",
                        f"{drift.what}: the ledger says {drift.expected}, the stored value is {drift.actual}",
                        "investigate before any fix: `credits check` shows every drift",
                        [drift.account],
                        credits=abs(drift.expected - drift.actual),
                    )
                )

    # -- findings ----------------------------------------------------------------------------------------

    def _unprocessed(self, uow: UnitOfWork, event: dict[str, Any], row: StripeEvent | None) -> None:
        self.reported_events.add(event["id"])
        obj = (event.get("data") or {}).get("object") or {}
        kind, subject, credits = self._consequence(event["type"], obj)
        state = "never delivered to the webhook" if row is None else f"{row.status} after {row.attempts} attempt(s)"
        if row is not None and row.last_error:
            state += f": {row.last_error.splitlines()[-1]}"
        customer = so.ref(obj.get("customer")) if isinstance(obj, dict) else None
        self.add(
            Found(
                kind,
                subject,
                f"{event['type']} {event['id']} {state}",
                "reconcile --fix processes it through its webhook handler",
                _accounts(uow, customer),
                [event["id"], *[found for found in (so.ref(obj),) if found]],
                credits,
                lambda: self._process(event),
            )
        )

    def _given_up(self, row: StripeEvent) -> None:
        """A dead event, or an invalid one: nothing retries it, so a person has to look."""
        if row.status == "invalid":
            self._invalid(row)
        else:
            self._dead(row)

    def _invalid(self, row: StripeEvent) -> None:
        """An event refused at once: its object does not fit what the service reads, and nothing retries it."""
        self.reported_events.add(row.id)
        self.add(
            Found(
                "invalid_event",
                row.id,
                f"{row.type} refused at once: {row.outcome or 'no reason recorded'}",
                f"the object does not fit what the service reads: check its sender; `credits events replay {row.id}`"
                " once the service is changed to accept it",
                stripe_ids=[row.id, row.object_id or ""],
            )
        )

    def _dead(self, row: StripeEvent) -> None:
        self.reported_events.add(row.id)
        error = (row.last_error or "").splitlines()[-1:] or ["no error recorded"]
        self.add(
            Found(
                "dead_event",
                row.id,
                f"{row.type} gave up after {row.attempts} attempts: {error[0]}",
                f"fix the cause, then `credits events replay {row.id}`",
                stripe_ids=[row.id, row.object_id or ""],
            )
        )

    def _missing_refill(self, invoice: so.InvoiceFacts, payment: Payment | None, obj: dict[str, Any]) -> Found:
        plan = refills.plan_of(self.rt.catalogue, invoice.billed)
        detail = (
            f"paid invoice {invoice.id} was never credited"
            if payment is None
            else f"paid invoice {invoice.id} has a price the catalogue does not know ({payment.detail})"
        )
        synthetic = {
            "id": f"evt_reconcile_{invoice.id}",
            "object": "event",
            "type": "invoice.paid",
            "created": _epoch(invoice.paid_at or utcnow()),
            "livemode": bool(obj.get("livemode")),
            "data": {"object": obj},
        }
        return Found(
            "missing_refill",
            invoice.id,
            detail,
            "reconcile --fix grants it through the invoice handler"
            if plan
            else "add the price to the catalogue, then --fix",
            [invoice.customer or ""],
            [invoice.id],
            plan[2] if plan else 0,
            lambda: self._process(synthetic),
        )

    def _referral_of_invoice(self, uow: UnitOfWork, invoice: so.InvoiceFacts, known: Known) -> None:
        """A qualifying invoice: is its referee's referral settled, or does Stripe carry an attribution the
        service never saw? Stripe is asked only for a customer's first invoice, once per run."""
        referee = _referee(invoice, known.account)
        if referee is not None:
            attributions = known.referrals.get(referee.id, [])
            live = next((r for r in attributions if r.status != "rejected"), None)
            if live is not None:
                if live.status in UNSETTLED:
                    self._unsettled(uow, uow.session.get_one(Referral, live.id), qualifying_invoice=invoice.id)
                return
            if attributions:
                return  # only rejected attributions: nothing is owed
        if invoice.billing_reason not in (None, "subscription_create") or not invoice.customer:
            return
        found = self.codes.of(invoice)
        if found is None:
            return
        code, where = found
        terms = self.rt.catalogue.referrals
        name = referee.public_id if referee else invoice.customer
        self.add(
            Found(
                "missed_referral_payout",
                f"referee:{name}",
                f"{where} metadata carries referral code {code}, but {name} was never attributed; "
                f"first paid invoice {invoice.id}",
                "reconcile --fix attributes it and pays both sides (or: credits backfill referral)",
                [name],
                [invoice.id, invoice.customer],
                terms.referrer_credits + terms.referee_credits,
                lambda: self._attribute(invoice, code, where),
            )
        )

    def _unsettled(self, uow: UnitOfWork, referral: Referral, qualifying_invoice: str | None = None) -> None:
        """A live referral that qualifies (by state, or by a paid invoice just seen at Stripe) but whose
        payouts are missing on one or both sides."""
        if referral.status not in UNSETTLED:
            return
        terms = self.rt.catalogue.referrals
        session = uow.session
        referee = session.get_one(Account, referral.referee_id)
        qualifies = (
            qualifying_invoice
            or referral.qualified_at is not None
            or terms.qualify_on == "signup"
            or session.scalar(
                select(Payment.id).where(
                    Payment.account_id == referee.id,
                    Payment.kind == "invoice",
                    Payment.amount >= max(terms.min_amount, 1),
                )
            )
            is not None
        )
        if not qualifies:
            return
        amounts = {"referrer": terms.referrer_credits, "referee": terms.referee_credits}
        unpaid = [s for s in referrals.SIDES if amounts[s] > 0 and not referrals.side_paid(uow, referral, s)]
        if not unpaid:
            return
        kind = (
            "missed_referral_payout"
            if len(unpaid) == len([a for a in amounts.values() if a > 0])
            else "one_sided_referral_payout"
        )
        referrer = session.get_one(Account, referral.referrer_id)
        self.add(
            Found(
                kind,
                f"referral:{referral.id}",
                f"referral {referral.id} qualified; unpaid: {', '.join(unpaid)}",
                "reconcile --fix pays the missing side(s) with the same keys",
                [referrer.public_id, referee.public_id],
                [referral.qualifying_payment or qualifying_invoice or ""],
                sum(amounts[s] for s in unpaid),
                lambda: self._settle(referral.id),
            )
        )

    def _unknown_product(self, uow: UnitOfWork, payment: Payment) -> None:
        session = uow.session
        kind = "missing_refill" if payment.kind == "invoice" else "missing_purchase_grant"
        event_id = session.scalar(
            select(StripeEvent.id).where(StripeEvent.object_id == payment.id).order_by(StripeEvent.received_at)
        )
        owner = session.get_one(Account, payment.account_id).public_id
        self.add(
            Found(
                kind,
                payment.id,
                f"{payment.id} was paid but not credited: {payment.detail}",
                "add it to the catalogue, then reconcile --fix" + (f" (replays {event_id})" if event_id else ""),
                [owner],
                [payment.id],
                0,
                (lambda: self._replay(event_id)) if event_id else None,
            )
        )

    def _shortfalls(self, uow: UnitOfWork) -> None:
        session = uow.session
        reversals = session.scalars(
            select(LedgerEntry).where(
                LedgerEntry.kind == "reverse",
                LedgerEntry.created_at >= self.since,
                LedgerEntry.created_at <= self.until,
            )
        )
        for entry in reversals:
            shortfall = int(entry.meta.get("shortfall", 0))
            if shortfall:
                owner = session.get_one(Account, entry.account_id).public_id
                self.add(
                    Found(
                        "unreversed_refund",
                        entry.idempotency_key,
                        f"{entry.reason}: {shortfall} credits were already spent and could not be taken back",
                        "decide by hand: accept the loss or recover it from the customer",
                        [owner],
                        [str(entry.meta.get("payment", ""))],
                        shortfall,
                    )
                )

    # -- Stripe look-ups and repairs ---------------------------------------------------------------------

    def _consequence(self, type_: str, obj: dict[str, Any]) -> tuple[str, str, int]:
        """Name an unprocessed event by what it costs: a refill, a pack, a refund — or just an event."""
        if (
            type_ in INVOICE_EVENTS
            and so.ref(obj)
            and isinstance(obj.get("amount_paid"), int)
            and obj["amount_paid"] > 0
        ):
            plan = refills.plan_of(self.rt.catalogue, so.invoice(obj).billed)
            return "missing_refill", obj["id"], plan[2] if plan else 0
        pack = (obj.get("metadata") or {}).get("pack") if isinstance(obj.get("metadata"), dict) else None
        intent = so.ref(obj.get("payment_intent")) if type_.startswith("checkout.") else so.ref(obj)
        if pack and intent and (type_ == "payment_intent.succeeded" or obj.get("payment_status") == "paid"):
            return (
                "missing_purchase_grant",
                intent,
                self.rt.catalogue.packs[pack].credits if pack in self.rt.catalogue.packs else 0,
            )
        if type_ in ("charge.refunded", "charge.dispute.closed") and so.ref(obj):
            return "unreversed_refund", obj["id"], 0
        return "unprocessed_event", str(obj.get("id") or type_), 0

    def _process(self, event: dict[str, Any]) -> bool:
        """Store the event in the inbox if it is not there, then run it through its handler."""
        with self.rt.uow() as uow:
            inbox.store(uow, event, utcnow())
            uow.commit()
        return self._replay(event["id"])

    def _replay(self, event_id: str) -> bool:
        return dispatch.process(self.rt, event_id, replay=True) in ("processed", "ignored")

    def _attribute(self, invoice: so.InvoiceFacts, code: str, where: str) -> bool:
        with self.rt.uow() as uow:
            referee = _referee(invoice, lambda ref: accounts.find(uow, ref))
            if referee is None:
                return False  # its refill (and so its account) is not there yet: the next run retries
            source = "checkout" if where == "checkout session" else where
            referral = referrals.attribute(uow, self.rt.catalogue, referee, code, source=source).referral
            uow.commit()
            return referral.status == "paid"

    def _settle(self, referral_id: int) -> bool:
        with self.rt.uow() as uow:
            referral = uow.session.get_one(Referral, referral_id)
            referee = uow.session.get_one(Account, referral.referee_id)
            status = referrals.settle(uow, self.rt.catalogue, referee)
            uow.commit()
            return status == "paid"


def _referee(invoice: so.InvoiceFacts, find: Callable[[str], A | None]) -> A | None:
    """The local account an invoice belongs to, without creating one or asking Stripe."""
    for ref in _account_refs(invoice):
        if (account := find(ref)) is not None:
            return account
    return None


def _account_refs(invoice: so.InvoiceFacts) -> list[str]:
    """What may name the invoice's account, in the order `_referee` tries them: its customer, then the
    account id its subscription or itself carries."""
    carried = (invoice.subscription_metadata or {}).get("account_id") or invoice.metadata.get("account_id")
    return [ref for ref in (invoice.customer, carried) if ref]


class AccountRef(NamedTuple):
    """An account as the invoice checks need it: the columns, not an ORM object (one per invoice of a run)."""

    id: int
    public_id: str
    stripe_customer_id: str | None


class ReferralRef(NamedTuple):
    """A referral's id and status: enough to tell settled, rejected and live ones apart; only a live one is
    loaded whole, to be checked."""

    id: int
    referee_id: int
    status: str


@dataclass
class Known:
    """What the local side knows about one page of invoices, read with one Core query per table — the
    payments' outcomes, the accounts their refs name, those accounts' referrals — rather than several per
    invoice, and as rows of columns rather than ORM objects (identity map and instance construction for 100
    accounts a page cost more than the query)."""

    outcomes: dict[str, str]
    by_public_id: dict[str, AccountRef]
    by_customer: dict[str, AccountRef]
    referrals: dict[int, list[ReferralRef]]

    @classmethod
    def fetch(cls, uow: UnitOfWork, invoices: list[so.InvoiceFacts]) -> Known:
        session, queries = uow.session, LOOKUPS[uow.dialect]
        outcomes = dict(session.execute(queries.outcomes, {"ids": [i.id for i in invoices]}).all())
        refs = list({ref for invoice in invoices for ref in _account_refs(invoice)})
        found = [AccountRef(*row) for row in session.execute(queries.accounts, {"refs": refs})]
        referrals: dict[int, list[ReferralRef]] = {}
        for row in session.execute(queries.referrals, {"ids": [a.id for a in found]}):
            referrals.setdefault(row.referee_id, []).append(ReferralRef(*row))
        return cls(
            outcomes,
            {a.public_id: a for a in found},
            {a.stripe_customer_id: a for a in found if a.stripe_customer_id},
            referrals,
        )

    def account(self, ref: str) -> AccountRef | None:
        """As `accounts.find`: the account whose public id is `ref`, else the one whose customer id is."""
        return self.by_public_id.get(ref) or self.by_customer.get(ref)


class Lookups(NamedTuple):
    """The scan's queries for a page, each taking the page's ids as one list parameter (`db.among`)."""

    statuses: Select[str, str]
    outcomes: Select[str, str]
    accounts: Select[int, str, str | None]
    referrals: Select[int, int, str]


def _lookups(dialect: str) -> Lookups:
    return Lookups(
        statuses=select(StripeEvent.id, StripeEvent.status).where(db.among(dialect, StripeEvent.id, "ids")),
        outcomes=select(Payment.id, Payment.outcome).where(db.among(dialect, Payment.id, "ids")),
        accounts=select(Account.id, Account.public_id, Account.stripe_customer_id).where(
            or_(db.among(dialect, Account.public_id, "refs"), db.among(dialect, Account.stripe_customer_id, "refs"))
        ),
        referrals=select(Referral.id, Referral.referee_id, Referral.status).where(
            db.among(dialect, Referral.referee_id, "ids")
        ),
    )


LOOKUPS = {dialect: _lookups(dialect) for dialect in db.DIALECTS}  # built once, for each database


def _accounts(uow: UnitOfWork, customer: str | None) -> list[str]:
    account = accounts.find(uow, customer) if customer else None
    return [account.public_id] if account else ([customer] if customer else [])


def _epoch(when: datetime) -> int:
    return int(when.timestamp())
