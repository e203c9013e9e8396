"""Property test: any sequence of what happens to an account — invoices paid, a referral qualifying, packs
bought, refunds (and the clawback they cause), teams and members given allocations and limits, spends, time
passing and replays — keeps every ledger invariant after every step: no spend takes a member or its team past its
limit, a team's allocation always holds its members', and the pool never spends what is reserved. Each step
goes through the functions production runs, in a transaction of its own: webhook events through the inbox and
their handlers, spends through `spending.spend` as the API calls it, with a fake clock.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.domain import accounts, ledger, periods, referrals, spending
from service.infra.models import Allocation, Grant, LedgerEntry, Member, Team
from service.infra.runtime import Runtime
from tests import stripe_events as se
from tests.helpers import T0, committed
from webhooks import dispatch, inbox

_worlds = itertools.count()


@dataclass(frozen=True)
class Invoice:
    """The subscription's next invoice is paid (the first one qualifies the referral)."""


@dataclass(frozen=True)
class Pack:
    """A 1,000-credit pack is bought."""


@dataclass(frozen=True)
class Refund:
    """Part of an invoice or a pack is refunded (an invoice's within the clawback window claws back)."""

    which: int
    percent: int


@dataclass(frozen=True)
class SetTeam:
    team: str
    allocation: int | None
    limit: int | None


@dataclass(frozen=True)
class SetMember:
    member: str
    allocation: int | None
    limit: int | None
    team: str | None = None


@dataclass(frozen=True)
class Spend:
    amount: int
    member: str | None


@dataclass(frozen=True)
class Advance:
    days: int


@dataclass(frozen=True)
class Replay:
    which: int


MEMBERS = st.sampled_from(["ana", "bob", "cy"])
TEAMS = st.sampled_from(["sales", "ops"])
SOME = st.one_of(st.none(), st.integers(0, 3000))
operations = st.lists(
    st.one_of(
        st.just(Invoice()),
        st.just(Pack()),
        st.builds(Refund, st.integers(0, 10), st.integers(1, 100)),
        st.builds(SetTeam, TEAMS, SOME, SOME),
        st.builds(SetMember, MEMBERS, SOME, SOME, st.one_of(st.none(), TEAMS)),
        st.builds(Spend, st.integers(1, 4000), st.one_of(st.none(), MEMBERS)),
        st.builds(Advance, st.integers(1, 40)),
        st.builds(Replay, st.integers(0, 100)),
    ),
    max_size=20,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_keeps_every_invariant(rt: Runtime, ops: list[object]) -> None:
    World(rt).run(ops)


class World:
    """One example's accounts (each example has its own), its clock and what it has done so far."""

    def __init__(self, rt: Runtime) -> None:
        self.rt, self.now = rt, T0
        n = next(_worlds)
        self.account, self.customer, self.referrer = f"acct_p{n}", f"cus_p{n}", f"acct_r{n}"
        self.events: list[str] = []
        self.spends: list[tuple[str, Spend]] = []
        self.payments: list[tuple[str, int]] = []  # (charge id, amount paid) of invoices and packs
        self.invoice_of_charge: dict[str, str] = {}
        self.prefix = f"w{n}"
        with committed(rt) as uow:
            code = referrals.code_for(uow, accounts.get_or_create(uow, self.referrer))
            referee = accounts.get_or_create(uow, self.account, customer=self.customer)
            self.referral = referrals.attribute(
                uow, rt.catalogue, referee, code, source="api", now=self.now
            ).referral.id

    def run(self, ops: list[object]) -> None:
        for step, op in enumerate(ops):
            getattr(self, type(op).__name__.lower())(step, op)
            self.assert_invariants()

    def invoice(self, step: int, _: Invoice) -> None:
        invoices = sum(1 for event_id in self.events if "_in" in event_id)
        invoice_id, charge_id = f"{self.prefix}_in{step}", f"{self.prefix}_ch{step}"
        obj = se.invoice(
            "2025",
            invoice_id=invoice_id,
            customer=self.customer,
            price="price_starter_monthly",
            amount_paid=34900,
            billing_reason="subscription_cycle" if invoices else "subscription_create",
            period=(self.now, self.now + timedelta(days=30)),
            subscription_metadata={"account_id": self.account},
        )
        self.deliver(se.event("invoice.paid", obj, event_id=f"evt_{invoice_id}", created=self.now))
        self.payments.append((charge_id, 34900))
        self.invoice_of_charge[charge_id] = invoice_id

    def pack(self, step: int, _: Pack) -> None:
        intent, charge_id = f"{self.prefix}_pi{step}", f"{self.prefix}_ch{step}"
        obj = se.payment_intent(
            intent_id=intent,
            customer=self.customer,
            charge=charge_id,
            metadata={"pack": "boost", "account_id": self.account},
        )
        self.deliver(se.event("payment_intent.succeeded", obj, event_id=f"evt_{intent}", created=self.now))
        self.payments.append((charge_id, 1000))

    def refund(self, step: int, op: Refund) -> None:
        if not self.payments:
            return
        charge_id, paid = self.payments[op.which % len(self.payments)]
        invoice = self.invoice_of_charge.get(charge_id)
        intent = None if invoice else charge_id.replace("_ch", "_pi")
        obj = se.charge(
            charge_id=charge_id,
            amount=paid,
            amount_refunded=paid * op.percent // 100 or 1,
            invoice=invoice,
            payment_intent=intent,
            refunds=[(f"{self.prefix}_re{step}", paid)],
        )
        obj["customer"] = self.customer
        self.deliver(se.event("charge.refunded", obj, event_id=f"evt_{self.prefix}_re{step}", created=self.now))

    def setteam(self, _: int, op: SetTeam) -> None:
        with committed(self.rt) as uow:
            try:
                spending.set_team(
                    uow,
                    accounts.get(uow, self.account),
                    op.team,
                    allocation=op.allocation,
                    limit_per_period=op.limit,
                    now=self.now,
                )
            except (spending.AllocationTooLarge, spending.AllocationTooSmall):
                return

    def setmember(self, _: int, op: SetMember) -> None:
        with committed(self.rt) as uow:
            try:
                spending.set_member(
                    uow,
                    accounts.get(uow, self.account),
                    op.member,
                    allocation=op.allocation,
                    limit_per_period=op.limit,
                    team_id=op.team,
                    now=self.now,
                )
            except (spending.AllocationTooLarge, spending.UnknownTeam):
                return

    def spend(self, step: int, op: Spend) -> None:
        key = f"spend:{self.account}:{step}"
        before, pool = self.balance(), self.pool()
        try:
            with committed(self.rt) as uow:
                spent = spending.spend(
                    uow,
                    self.rt.catalogue,
                    accounts.get(uow, self.account),
                    spending.Charge(amount=op.amount, member_id=op.member),
                    key=key,
                    now=self.now,
                )
        except (
            ledger.InsufficientCredits,
            spending.MemberLimitReached,
            spending.TeamLimitReached,
            spending.UnknownMember,
        ):
            assert self.balance() == before
            assert self.entry(key) is None
            return
        assert (spent.charged, spent.balance) == (op.amount, before - op.amount)
        assert self.balance() == before - op.amount
        if op.member is not None:
            assert self.within_limit(op.member)
        else:
            assert op.amount <= pool  # the pool spends only what no allocation reserves
        self.spends.append((key, op))

    def advance(self, _: int, op: Advance) -> None:
        self.now += timedelta(days=op.days)

    def replay(self, _: int, op: Replay) -> None:
        done = [("event", event_id) for event_id in self.events] + [("spend", key) for key, _ in self.spends]
        if not done:
            return
        kind, which = done[op.which % len(done)]
        count, before = self.entries(), self.balance()
        if kind == "event":
            assert dispatch.process(self.rt, which, replay=True, now=self.now) == "processed"
        else:
            first = dict(self.spends)[which]
            with committed(self.rt) as uow:
                again = spending.spend(
                    uow,
                    self.rt.catalogue,
                    accounts.get(uow, self.account),
                    spending.Charge(amount=first.amount, member_id=first.member),
                    key=which,
                    now=self.now,
                )
            assert again.charged == first.amount  # the first answer, whatever the balance and limits say now
        assert (self.entries(), self.balance()) == (count, before)

    def deliver(self, event: dict[str, object]) -> None:
        with committed(self.rt) as uow:
            inbox.store(uow, event, self.now)
        assert dispatch.process(self.rt, str(event["id"]), now=self.now) == "processed"
        self.events.append(str(event["id"]))

    def within_limit(self, member_id: str) -> bool:
        """The member has spent no more this period than its limit, if it has one."""
        with self.rt.uow() as uow:
            account = accounts.get(uow, self.account)
            member = uow.session.scalar(
                select(Member).where(Member.account_id == account.id, Member.member_id == member_id)
            )
            if member is None:
                return True
            months = periods.months_of(self.rt.catalogue, account)
            used = spending.member_usage(uow, account, member_id, self.now, months)
            if member.limit_per_period is not None and used > member.limit_per_period:
                return False
            team = uow.session.get(Team, member.team_id) if member.team_id is not None else None
            if team is not None and team.limit_per_period is not None:
                return spending.team_usage(uow, account, team.team_id, self.now, months) <= team.limit_per_period
            return True

    def balance(self) -> int:
        with self.rt.uow() as uow:
            return ledger.balance(uow, accounts.get(uow, self.account), self.now)

    def pool(self) -> int:
        with self.rt.uow() as uow:
            return spending.pool(uow, accounts.get(uow, self.account), self.now)

    def entries(self) -> int:
        with self.rt.uow() as uow:
            return uow.session.scalar(select(func.count()).select_from(LedgerEntry)) or 0

    def entry(self, key: str) -> LedgerEntry | None:
        with self.rt.uow() as uow:
            return uow.session.scalar(select(LedgerEntry).where(LedgerEntry.idempotency_key == key))

    def assert_invariants(self) -> None:
        with self.rt.uow() as uow:
            assert ledger.check(uow) == []  # every grant and balance rebuilt from the entries agrees
            for ref in (self.account, self.referrer):
                assert ledger.balance(uow, accounts.get(uow, ref), self.now) >= 0
            allocations = uow.session.scalars(select(Member.allocation).where(Member.allocation.is_not(None)))
            assert all(allocation is not None and allocation >= 0 for allocation in allocations)
            for team in uow.session.scalars(select(Team).where(Team.allocation.is_not(None))):
                held = uow.session.scalar(select(func.sum(Member.allocation)).where(Member.team_id == team.id))
                assert team.allocation is not None and team.allocation >= (held or 0) >= 0
            assert _spent_from_expired_grants(uow.session) == 0
            payouts = uow.session.scalars(
                select(LedgerEntry.idempotency_key).where(
                    LedgerEntry.idempotency_key.like(f"referral:{self.referral}:%")
                )
            ).all()
            assert len(payouts) in (0, 2)  # both sides or neither


def _spent_from_expired_grants(session: Session) -> int:
    """Credits a spend took from a grant that had expired when it was made: never any."""
    taken = (
        select(func.coalesce(func.sum(Allocation.amount), 0))
        .join(LedgerEntry, LedgerEntry.id == Allocation.entry_id)
        .join(Grant, Grant.id == Allocation.grant_id)
        .where(LedgerEntry.kind == "spend", Grant.expires_at.is_not(None), Grant.expires_at <= LedgerEntry.created_at)
    )
    return int(session.scalar(taken) or 0)
