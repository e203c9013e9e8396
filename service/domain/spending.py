"""Spending the way the product does: priced actions, once-per-resource charges, and team members who
share the pool, spend only their allocation, or spend up to a limit per billing period.

Every check happens under the account's row lock, so concurrent spends by several members never exceed
an allocation or a limit, and a resource is charged once however many colleagues unlock it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ScalarSelect, Select, and_, bindparam, func, select, type_coerce
from sqlalchemy.orm import Session

from service.domain import accounts, ledger, periods
from service.infra.catalogue import Catalogue
from service.infra.db import among, insert
from service.infra.models import Account, Grant, LedgerEntry, Member, ResourceCharge, utcnow


class UnknownAction(ValueError):
    """The action is not in the catalogue's price list."""

    def __init__(self, action: str, known: list[str]) -> None:
        super().__init__(f"unknown action {action!r}; known actions: {', '.join(known) or 'none'}")
        self.known = known


class UnknownMember(LookupError):
    """No such member in this account."""


class MemberLimitReached(Exception):
    """The member's spend this billing period would pass its limit; nothing was spent."""

    def __init__(self, limit: int, used: int, requested: int) -> None:
        super().__init__(f"member limit {limit} per period: {used} used, {requested} requested")
        self.limit, self.used, self.requested = limit, used, requested


class AllocationTooLarge(ValueError):
    """An allocation cannot reserve more than the pool holds."""


@dataclass(frozen=True)
class Charge:
    """What a spend asks for: an amount, or an action (× quantity) from the price list."""

    amount: int | None = None
    action: str | None = None
    quantity: int = 1
    resource: str | None = None
    member_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Spent:
    charged: int
    entry_id: int | None
    balance: int


def cost(catalogue: Catalogue, charge: Charge) -> int:
    """Credits the charge costs: its amount, or the action's price × quantity."""
    if charge.action is None:
        return charge.amount or 0
    if charge.action not in catalogue.actions:
        raise UnknownAction(charge.action, sorted(catalogue.actions))
    return catalogue.actions[charge.action] * charge.quantity


def _reserved_by(account_id: Any) -> Select[tuple[int]]:
    """The credits the members' allocations of account `account_id` hold back from the shared pool."""
    return select(func.coalesce(func.sum(Member.allocation), 0)).where(Member.account_id == account_id)


RESERVED = _reserved_by(bindparam("account_id"))


def _earlier(dialect: str) -> ScalarSelect[Any]:
    """The ledger entries that already hold any of the parameter `keys`, as one JSON array of [key, amount, id]
    (NULL when none): a subquery that names no outer column, which the database runs once per statement."""
    entries = LedgerEntry.__table__.c
    pack = func.jsonb_agg(func.jsonb_build_array(entries.idempotency_key, entries.amount, entries.id)) \
        if dialect == "postgresql" else func.json_group_array(func.json_array(entries.idempotency_key, entries.amount, entries.id))
    return select(pack).where(among(entries.idempotency_key, "keys", dialect)).scalar_subquery().label("earlier")


# What a batch of spends reads under its accounts' locks, in one round trip however many spends it holds (each
# round trip under the locks is one more wait for the next batch): each account's grants with credits left and
# the credits its members' allocations reserve (outer-joined, so an account without grants comes back too),
# and on every row the same list of the ledger entries that already hold any of the batch's keys.
_accounts = Account.__table__.c
STANDING = {dialect: select(_accounts.id, _reserved_by(_accounts.id).scalar_subquery().label("reserved"),
                            type_coerce(_earlier(dialect), JSON), Grant)
            .select_from(Account.__table__)
            .outerjoin(Grant, and_(Grant.account_id == _accounts.id, Grant.remaining > 0))
            .where(among(_accounts.id, "account_ids", dialect)).order_by(_accounts.id, Grant.id)
            for dialect in ("postgresql", "sqlite")}
Refused = ledger.InsufficientCredits | MemberLimitReached | UnknownMember | UnknownAction


@dataclass(frozen=True)
class Call:
    """One spend of a batch: its account (locked by the caller), what it asks for, and its ledger key."""

    account: Account
    charge: Charge
    key: str


def spend(session: Session, catalogue: Catalogue, account: Account, charge: Charge, *, key: str,
          now: datetime | None = None) -> Spent:
    """Spend for `charge` once per `key`: free when the resource was already charged in this account;
    from the member's allocation, within its period limit, or from the pool that allocations leave."""
    done = spend_many(session, catalogue, [Call(accounts.lock(session, account), charge, key)], now)[0]
    if isinstance(done, Exception):
        raise done
    return done


def spend_many(session: Session, catalogue: Catalogue, calls: list[Call], now: datetime | None = None) -> list[Spent | Refused]:
    """`spend` for each call, in order, for a caller that holds every call's account lock (the API's batches
    of spends lock all their accounts with one statement, `accounts.lock_refs`): what each spent, or why it
    was refused (nothing spent). The keys must be distinct.

    The accounts' standing is read once for all the calls, each spend is decided in memory against what the
    spends before it left, and the plain ones (no member, no resource) are written together at the end; a
    spend that reads or writes more first writes what is decided, so its reads see the spends before it."""
    return _Batch(session, catalogue, calls, now or utcnow()).spend_all(calls)


@dataclass(frozen=True)
class _Decided:
    """A spend decided in memory: its debit (its entry id known once the batch has written it), what it costs
    and the balance it leaves."""

    debit: ledger.Debit
    price: int
    balance: int


class _Batch:
    """The spends of one transaction: each account's grants and reserve as the spends so far left them,
    the debits decided and not yet written, and the results waiting for their entries' ids."""

    def __init__(self, session: Session, catalogue: Catalogue, calls: list[Call], now: datetime) -> None:
        self.session, self.catalogue, self.now = session, catalogue, now
        self.held: dict[int, list[Grant]] = {}
        self.reserved: dict[int, int] = {}
        self.swept: set[int] = set()
        ids, dialect = sorted({call.account.id for call in calls}), session.get_bind().dialect.name
        earlier: list[list[Any]] | None = None
        for account_id, reserved, earlier, grant in session.execute(
                STANDING[dialect], {"account_ids": ids, "keys": [call.key for call in calls]}):
            self.reserved[account_id] = int(reserved)
            self.held.setdefault(account_id, []).extend([grant] if grant is not None else [])
        self.earlier = {key: (amount, entry_id) for key, amount, entry_id in earlier or []}
        self.pending: list[ledger.Debit] = []

    def spend_all(self, calls: list[Call]) -> list[Spent | Refused]:
        done = [self._spend(call) for call in calls]
        self._write()
        return [Spent(d.price, d.debit.entry_id, d.balance) if isinstance(d, _Decided) else d for d in done]

    def _spend(self, call: Call) -> _Decided | Spent | Refused:
        """Decide one spend: its debit (written later), or its result now."""
        account, charge, session = call.account, call.charge, self.session
        try:
            price = cost(self.catalogue, charge)
        except UnknownAction as exc:
            return exc
        if call.key in self.earlier:
            amount, entry_id = self.earlier[call.key]
            return Spent(-amount, entry_id, self._balance(account))
        if charge.member_id or charge.resource or self._due(account):
            self._write()  # what follows reads or writes the database: it must see the spends before it
        try:
            member = _member(session, account, charge.member_id) if charge.member_id else None
        except UnknownMember as exc:
            return exc
        if charge.resource and charge.action and _charged_before(session, account, charge):
            return Spent(0, None, self._balance(account))
        grants = self._spendable(account)
        balance = sum(g.remaining for g in grants)
        if member is not None and member.limit_per_period is not None:
            used = member_usage(session, account, member.member_id, self.now, periods.months_of(self.catalogue, account))
            if used + price > member.limit_per_period:
                return MemberLimitReached(member.limit_per_period, used, price)
        own = member is not None and member.allocation is not None
        available = member.allocation if own else balance - self.reserved[account.id]  # type: ignore[union-attr]
        if price > available:  # type: ignore[operator]
            return ledger.InsufficientCredits(max(available, 0), price)  # type: ignore[call-overload]
        meta = {k: v for k, v in {"action": charge.action, "quantity": charge.quantity if charge.action else None,
                                  "resource": charge.resource, "member_id": charge.member_id}.items() if v is not None}
        debit = ledger.take(account, "spend", grants, price, key=call.key, reason=charge.reason,
                            actor=charge.member_id or "api", meta=meta, now=self.now)
        self.pending.append(debit)
        if own:  # from the member's own credits: the pool keeps what it had
            member.allocation -= price  # type: ignore[union-attr,operator]
            self.reserved[account.id] -= price
        if charge.resource and charge.action:
            self._write()
            session.execute(insert(session, ResourceCharge).values(
                account_id=account.id, action=charge.action, resource=charge.resource, entry_id=debit.entry_id,
                member_id=charge.member_id, created_at=self.now,
            ).on_conflict_do_nothing())
        return _Decided(debit, price, balance - price)

    def _due(self, account: Account) -> bool:
        """Whether the account has grants whose expiry has passed and that this batch has not expired yet."""
        return account.id not in self.swept and any(
            g.expires_at is not None and g.expires_at <= self.now for g in self.held[account.id])

    def _spendable(self, account: Account) -> list[Grant]:
        """The account's grants in spending order, expiring what is due first (once per account and batch)."""
        if account.id not in self.swept:
            self.swept.add(account.id)
            return ledger.spendable(self.session, account, self.now, held=self.held[account.id])
        return ledger.spending_order(self.held[account.id], account, self.now)

    def _balance(self, account: Account) -> int:
        return sum(g.remaining for g in ledger.spending_order(self.held[account.id], account, self.now))

    def _write(self) -> None:
        ledger.write_debits(self.session, self.pending)
        self.pending = []


def pool(session: Session, account: Account, now: datetime) -> int:
    """What the account's shared pool can spend: the balance less what members' allocations reserve."""
    return ledger.balance(session, account, now) - _reserved(session, account)


def _reserved(session: Session, account: Account) -> int:
    """Credits that members' allocations hold back from the shared pool."""
    reserved = session.scalar(RESERVED, {"account_id": account.id})
    return int(reserved or 0)


def set_member(session: Session, account: Account, member_id: str, *, allocation: int | None,
               limit_per_period: int | None, now: datetime | None = None) -> Member:
    """Create or update a member; a new allocation must fit in the pool (plus what the member held)."""
    now = now or utcnow()
    account = accounts.lock(session, account)
    member = session.scalar(select(Member).where(Member.account_id == account.id, Member.member_id == member_id))
    if member is None:
        member = Member(account_id=account.id, member_id=member_id, created_at=now)
        session.add(member)
    held = member.allocation or 0
    if allocation is not None and allocation - held > pool(session, account, now):
        raise AllocationTooLarge(f"allocation {allocation} is more than the pool's {pool(session, account, now) + held}")
    member.allocation, member.limit_per_period = allocation, limit_per_period
    session.flush()
    return member


def remove_member(session: Session, account: Account, member_id: str) -> None:
    """Remove a member; its unspent allocation returns to the pool."""
    accounts.lock(session, account)
    session.delete(_member(session, account, member_id))
    session.flush()


def members(session: Session, catalogue: Catalogue, account: Account, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each member with its allocation, limit and usage in the current billing period."""
    now = now or utcnow()
    months = periods.months_of(catalogue, account)
    rows = session.scalars(select(Member).where(Member.account_id == account.id).order_by(Member.member_id))
    return [{"member_id": m.member_id, "allocation": m.allocation, "limit_per_period": m.limit_per_period,
             "spent_this_period": member_usage(session, account, m.member_id, now, months)} for m in rows]


def member_usage(session: Session, account: Account, member_id: str, now: datetime, months: int = 1) -> int:
    """Credits the member spent in the account's current billing period."""
    start, end = periods.bounds(account, "current", now, months)
    spent = session.scalar(select(func.coalesce(func.sum(-LedgerEntry.amount), 0)).where(
        LedgerEntry.account_id == account.id, LedgerEntry.kind == "spend",
        LedgerEntry.meta["member_id"].as_string() == member_id,
        LedgerEntry.created_at >= start, LedgerEntry.created_at < end))
    return int(spent or 0)


def _member(session: Session, account: Account, member_id: str) -> Member:
    member = session.scalar(select(Member).where(Member.account_id == account.id, Member.member_id == member_id))
    if member is None:
        raise UnknownMember(member_id)
    return member


def _charged_before(session: Session, account: Account, charge: Charge) -> bool:
    return session.scalar(select(ResourceCharge.id).where(
        ResourceCharge.account_id == account.id, ResourceCharge.action == charge.action,
        ResourceCharge.resource == charge.resource)) is not None
