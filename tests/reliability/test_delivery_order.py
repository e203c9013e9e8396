"""The order Stripe delivers events in never changes a balance.

Stripe promises no order, and its retries reorder events within hours, not across billing periods. So the
same four billing months of a customer base — signups on several plans, renewals, upgrades billed at once,
referrals (some referrers on the free plan), pack purchases, refunds and a clawback — are delivered three
times, to three sets of accounts in one database: in order; each month's events newest first; and each
month's events shuffled across and within customers, 30 % of them delivered twice. The months are always in
order; between them every set spends the same amounts and gets the monthly free allowance. Every account ends
with the same balance, and the same credits granted, spent, expired and reversed, as its twin delivered in
order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from jobs import refill_free, worker
from service.domain import accounts, ledger, referrals
from service.infra.models import LedgerEntry, utcnow
from tests import stripe_events as se
from tests.helpers import committed
from webhooks import dispatch, inbox

MONTHS = [datetime(2026, month, 1, tzinfo=UTC) for month in (6, 7, 8, 9, 10)]  # four billing months and the end
PEOPLE = 24
PLANS = ["price_starter_monthly", "price_pro_monthly", "price_outreach_monthly"]
PRICES = {"price_starter_monthly": 34900, "price_pro_monthly": 99900, "price_outreach_monthly": 9900}


@dataclass(frozen=True)
class Delivery:
    """An event and when it happened: the month it belongs to is the month of `at`."""

    at: datetime
    event: dict[str, Any]


def account(side: str, n: int) -> str:
    return f"acct_{side}{n}"


def free(n: int) -> bool:
    """Every fourth person stays on the free plan (and refers others)."""
    return n % 4 == 3


def referrer_of(n: int) -> int | None:
    """Person n >= 4 is referred by person n // 4 unless n % 4 == 3: at most three referees each."""
    return n // 4 if n >= 4 and not free(n) else None


def add_months(when: datetime, months: int) -> datetime:
    year, month = divmod(when.month - 1 + months, 12)
    return when.replace(year=when.year + year, month=month + 1)


def history(side: str, codes: dict[int, str]) -> list[Delivery]:
    """Everything Stripe sends for the side's customers over the four months, in the order it happened."""
    out: list[Delivery] = []

    def send(at: datetime, type_: str, obj: dict[str, Any], name: str) -> None:
        out.append(Delivery(at, se.event(type_, obj, event_id=f"evt_{side}_{name}", created=at)))

    for n in range(PEOPLE):
        acct, customer = account(side, n), f"cus_{side}{n}"
        if not free(n):
            _subscription(side, n, codes, send)
        if n % 3 == 0:  # a pack on the 5th of the second month, half of it refunded on the 8th for some
            bought = MONTHS[1] + timedelta(days=4, hours=n)
            intent = se.payment_intent(
                intent_id=f"pi_{side}{n}",
                customer=None,
                amount=1000,
                metadata={"pack": "boost", "account_id": acct},
                charge=f"ch_{side}{n}",
            )
            send(bought, "payment_intent.succeeded", intent, f"pack{n}")
            if n % 6 == 0:
                refund = se.charge(
                    charge_id=f"ch_{side}{n}",
                    amount=1000,
                    amount_refunded=500,
                    payment_intent=f"pi_{side}{n}",
                    refunds=[(f"re_{side}{n}", 500)],
                )
                refund["customer"] = customer
                send(bought + timedelta(days=3), "charge.refunded", refund, f"refund{n}")
    out.sort(key=lambda d: d.at)
    return out


def start_of(n: int) -> datetime:
    """The first six people (the referrers) subscribe in the first month, the others in one of the next three;
    each on a day of its own, so a referee's payment falls before its referrer's renewal in that month for
    some pairs and after it for others."""
    month = 0 if n < 6 else 1 + n % 3
    return MONTHS[month] + timedelta(days=(n * 7) % 27, hours=n)


def _subscription(side: str, n: int, codes: dict[int, str], send: Any) -> None:
    """Person n subscribes, renews monthly to the end, and perhaps upgrades or is refunded."""
    acct, customer = account(side, n), f"cus_{side}{n}"
    start = start_of(n)
    price = PLANS[n % 3]
    referrer = referrer_of(n)
    metadata = {"account_id": acct, **({"referral_code": codes[referrer]} if referrer is not None else {})}
    months = 0
    while (begins := add_months(start, months)) < MONTHS[-1]:
        ends = add_months(start, months + 1)
        reason = "subscription_create" if months == 0 else "subscription_cycle"
        invoice = se.invoice(
            "2025",
            invoice_id=f"in_{side}{n}_{months}",
            customer=customer,
            price=price,
            amount_paid=PRICES[price],
            billing_reason=reason,
            subscription=f"sub_{side}{n}",
            period=(begins, ends),
            subscription_metadata=metadata,
            charge=f"ch_{side}{n}_{months}",
        )
        invoice["charge"] = f"ch_{side}{n}_{months}"
        send(begins, "invoice.paid", invoice, f"invoice{n}_{months}")
        if months == 0 and n % 7 == 4:  # refunded in full two days later: a referral clawed back
            refund = se.charge(
                charge_id=f"ch_{side}{n}_0",
                amount=PRICES[price],
                amount_refunded=PRICES[price],
                invoice=f"in_{side}{n}_0",
                refunds=[(f"re_{side}{n}_0", PRICES[price])],
            )
            refund["customer"] = customer
            refund["refunds"]["data"][0]["created"] = se.epoch(begins + timedelta(days=2))
            send(begins + timedelta(days=2), "charge.refunded", refund, f"clawback{n}")
        if months == 1 and n % 5 == 1 and price == "price_starter_monthly":  # upgraded to pro, billed at once
            changed = begins + timedelta(days=10)
            upgrade = se.invoice_of_lines(
                "2025",
                [
                    se.Line("price_starter_monthly", -20000, (changed, ends), proration=True),
                    se.Line("price_pro_monthly", 60000, (changed, ends), proration=True),
                ],
                invoice_id=f"in_{side}{n}_up",
                customer=customer,
                amount_paid=40000,
                billing_reason="subscription_update",
                subscription=f"sub_{side}{n}",
                period=(changed, ends),
                subscription_metadata=metadata,
            )
            send(changed, "invoice.paid", upgrade, f"upgrade{n}")
            price = "price_pro_monthly"
        months += 1


def deliver_month(deliver, rt, deliveries: list[Delivery], order: str, shuffle: random.Random) -> None:
    """Deliver one month's events in `order` — as they happened, newest first, or shuffled with 30 % of them
    twice — then process what waits: events the inline processor left pending, and failures (a refund before
    its payment) at their next attempt."""
    events = [d.event for d in deliveries]
    if order == "newest first":
        events.reverse()
    elif order == "shuffled":
        events += [e for e in events if shuffle.random() < 0.3]
        shuffle.shuffle(events)
    for event in events:
        assert deliver(event).status_code == 200
    for _ in range(5):
        worker.drain(rt)
        with rt.uow() as uow:
            failed = inbox.ids_in(uow, "failed")
        for event_id in failed:
            dispatch.process(rt, event_id, now=utcnow() + timedelta(hours=1))
    with rt.uow() as uow:
        assert inbox.ids_in(uow, "failed") == [] and inbox.ids_in(uow, "pending") == []


def spend_between_months(client, side: str, month: int) -> list[int]:
    """Every account spends the same amount on both sides; the answers are compared too."""
    codes = []
    for n in range(PEOPLE):
        answer = client.post(
            f"/v1/accounts/{account(side, n)}/spend",
            json={"amount": 700 + 100 * n},
            headers={"Idempotency-Key": f"spend-{side}{n}-{month}"},
        )
        codes.append(answer.status_code)
    return codes


def totals(rt, side: str) -> list[tuple[int, dict[str, int]]]:
    """Each account's balance and its credits by ledger kind."""
    with rt.uow() as uow:
        out = []
        for n in range(PEOPLE):
            acct = accounts.get(uow, account(side, n))
            by_kind = select(LedgerEntry.kind, func.sum(LedgerEntry.amount)).where(LedgerEntry.account_id == acct.id)
            kinds = {kind: int(total) for kind, total in uow.session.execute(by_kind.group_by(LedgerEntry.kind))}
            out.append((ledger.balance(uow, acct), kinds))
        return out


SIDES = {"o": "in order", "r": "newest first", "s": "shuffled"}


def test_shuffled_delivery_ends_with_every_balance_of_ordered_delivery(client, deliver, rt, stripe_api) -> None:
    stripe_api.get("/v1/invoice_payments").respond(json={"object": "list", "has_more": False, "data": []})
    codes: dict[str, dict[int, str]] = defaultdict(dict)
    with committed(rt) as uow:
        for side in SIDES:
            for n in range(PEOPLE):
                made = accounts.get_or_create(uow, account(side, n))
                codes[side][n] = referrals.code_for(uow, made)
    months: dict[str, list[list[Delivery]]] = {}
    for side in SIDES:
        happened = history(side, codes[side])
        months[side] = [[d for d in happened if MONTHS[m] <= d.at < MONTHS[m + 1]] for m in range(4)]
        assert sum(map(len, months[side])) == len(happened)
    shuffle = random.Random(20261207)
    spent: dict[str, list[list[int]]] = defaultdict(list)
    for m in range(4):
        refill_free.run(rt, MONTHS[m].strftime("%Y-%m"), now=MONTHS[m])
        for side, order in SIDES.items():
            deliver_month(deliver, rt, months[side][m], order, shuffle)
            spent[side].append(spend_between_months(client, side, m))
    assert spent["o"] == spent["r"] == spent["s"]
    ordered = totals(rt, "o")
    for side in ("r", "s"):
        other = totals(rt, side)
        assert [(n, ordered[n], other[n]) for n in range(PEOPLE) if ordered[n] != other[n]] == []
    with rt.uow() as uow:
        assert ledger.check(uow) == []
        late = uow.session.scalars(
            select(LedgerEntry.idempotency_key).where(LedgerEntry.idempotency_key.like("rollover:late:%"))
        )
        assert list(late) != []  # some credits were processed after the renewal that had to cut them
    kinds = {kind for _, by_kind in ordered for kind in by_kind}
    assert kinds == {"grant", "spend", "expire", "reverse"}  # the story exercised every way credits move
