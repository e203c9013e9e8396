"""Spending the way the product does: priced actions, once-per-resource charges, and team members who
share the pool, spend only their allocation, or spend up to a limit per billing period.

Every check happens under the account's row lock, so concurrent spends by several members never exceed
an allocation or a limit, and a resource is charged once however many colleagues unlock it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from service import accounts, ledger, periods
from service.catalogue import Catalogue
from service.db import insert
from service.models import Account, Grant, LedgerEntry, Member, ResourceCharge, utcnow


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


RESERVED = select(func.coalesce(func.sum(Member.allocation), 0)).where(Member.account_id == bindparam("account_id"))
# Everything a spend reads under the account's lock, in one round trip where three statements would take
# three (each round trip under the lock is one more wait for the next spend on the account): the entry that
# already holds the key, if any, the credits members' allocations reserve, and the grants with credits left
# (outer-joined, so the first two come back when there are none).
_standing = select(
    select(LedgerEntry.id).where(LedgerEntry.idempotency_key == bindparam("key")).scalar_subquery().label("earlier"),
    RESERVED.scalar_subquery().label("reserved"),
).subquery("standing")
STANDING = (select(_standing.c.earlier, _standing.c.reserved, Grant).select_from(_standing)
            .outerjoin(Grant, ledger.HELD_WHERE).order_by(Grant.id))


def spend(session: Session, catalogue: Catalogue, account: Account, charge: Charge, *, key: str,
          now: datetime | None = None) -> Spent:
    """Spend for `charge` once per `key`: free when the resource was already charged in this account;
    from the member's allocation, within its period limit, or from the pool that allocations leave."""
    return spend_locked(session, catalogue, accounts.lock(session, account), charge, key=key, now=now)


def spend_locked(session: Session, catalogue: Catalogue, account: Account, charge: Charge, *, key: str,
                 now: datetime | None = None) -> Spent:
    """`spend`, for a caller that already holds the account's lock (the API locks by public id in one
    statement, `accounts.lock_ref`, where `get` then `lock` would take two)."""
    now = now or utcnow()
    price = cost(catalogue, charge)
    rows = session.execute(STANDING, {"key": key, "account_id": account.id}).all()
    earlier_id, reserved = rows[0].earlier, rows[0].reserved
    if earlier_id is not None:
        earlier = session.get_one(LedgerEntry, earlier_id)
        return Spent(-earlier.amount, earlier.id, ledger.balance(session, account, now))
    member = _member(session, account, charge.member_id) if charge.member_id else None
    if charge.resource and charge.action and _charged_before(session, account, charge):
        return Spent(0, None, ledger.balance(session, account, now))
    # read once: the checks, the spend and the new balance
    grants = ledger.spendable(session, account, now, held=[row.Grant for row in rows if row.Grant is not None])
    balance = sum(g.remaining for g in grants)
    if member is not None and member.limit_per_period is not None:
        used = member_usage(session, account, member.member_id, now, periods.months_of(catalogue, account))
        if used + price > member.limit_per_period:
            raise MemberLimitReached(member.limit_per_period, used, price)
    available = member.allocation if member is not None and member.allocation is not None else balance - int(reserved)
    if price > available:
        raise ledger.InsufficientCredits(max(available, 0), price)
    meta = {k: v for k, v in {"action": charge.action, "quantity": charge.quantity if charge.action else None,
                              "resource": charge.resource, "member_id": charge.member_id}.items() if v is not None}
    posted = ledger.consume(session, account, grants, price, key=key, reason=charge.reason,
                            actor=charge.member_id or "api", meta=meta, now=now)
    if member is not None and member.allocation is not None:
        member.allocation -= price
    if charge.resource and charge.action:
        session.execute(insert(session, ResourceCharge).values(
            account_id=account.id, action=charge.action, resource=charge.resource, entry_id=posted.entry.id,
            member_id=charge.member_id, created_at=now,
        ).on_conflict_do_nothing())
    return Spent(price, posted.entry.id, balance - price)


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
