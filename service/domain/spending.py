"""Spending the way the product does: priced actions, once-per-resource charges, and team members who share
the pool, spend only their allocation, or spend up to a limit per billing period.

Every spend is one `ledger.debit`, made under the account's row lock, so concurrent spends by several members
never exceed an allocation, a limit or the balance, and a resource is charged once however many colleagues
unlock it at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select

from service.domain import ledger, periods
from service.infra.catalogue import ActionPrice, Catalogue
from service.infra.models import Account, LedgerEntry, Member, ResourceCharge, utcnow
from service.infra.uow import UnitOfWork


class UnknownAction(ValueError):
    """The action is not in the catalogue's price list."""

    def __init__(self, action: str, known: list[str]) -> None:
        super().__init__(f"unknown action {action!r}; known actions: {', '.join(known) or 'none'}")
        self.known = known


class FieldRefused(ValueError):
    """A field the action's price needs is missing or not a positive integer, or one it does not take was
    given; `field` names it and `problem` says which, as a validation error would."""

    def __init__(self, name: str, problem: str, message: str) -> None:
        super().__init__(message)
        self.field, self.problem = name, problem


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
    """What a spend asks for: an amount, or an action (× quantity) from the price list, with the field its
    formula adds (`fields`, e.g. {"denomination": 25}) when it is priced by one."""

    amount: int | None = None
    action: str | None = None
    quantity: int = 1
    resource: str | None = None
    member_id: str | None = None
    reason: str | None = None
    fields: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Spent:
    """What a spend took (0 for a resource already charged) and the balance it left."""

    charged: int
    entry_id: int | None
    balance: int


def cost(catalogue: Catalogue, charge: Charge) -> int:
    """Credits the charge costs: its amount, or the action's price × quantity — a formula's price being its
    base plus the integer given in its field. Raises UnknownAction, or FieldRefused (see check_fields)."""
    check_fields(catalogue, charge.action, charge.fields)
    if charge.action is None:
        return charge.amount or 0
    if charge.action not in catalogue.actions:
        raise UnknownAction(charge.action, sorted(catalogue.actions))
    price = catalogue.actions[charge.action]
    if isinstance(price, ActionPrice):
        return (price.base + charge.fields[price.add]) * charge.quantity
    return price * charge.quantity


def check_fields(catalogue: Catalogue, action: str | None, fields: Mapping[str, int]) -> None:
    """Raise FieldRefused unless `fields` are exactly what the action's price takes: the positive integer its
    formula adds, or nothing for a flat price or a spend by amount. An unknown action is cost()'s to refuse."""
    price = catalogue.actions.get(action) if action is not None else None
    if action is not None and price is None:
        return
    taken = price.add if isinstance(price, ActionPrice) else None
    for name in fields:
        if name != taken:
            what = f"action {action!r}" if action is not None else "a spend by amount"
            raise FieldRefused(name, "Extra inputs are not permitted", f"{what} takes no field {name!r}")
    if taken is None:
        return
    given = fields.get(taken)
    if given is None:
        raise FieldRefused(taken, "Field required", f"action {action!r} needs {taken!r}, a positive integer")
    if type(given) is not int or given <= 0:
        raise FieldRefused(taken, "Input should be a positive integer", f"{taken!r} must be a positive integer")


def spend(
    uow: UnitOfWork, catalogue: Catalogue, account: Account, charge: Charge, *, key: str, now: datetime | None = None
) -> Spent:
    """Spend for `charge` once per `key`: nothing when the resource was already charged in this account; else
    from the member's allocation or within its period limit, and never more than the balance allows.

    Raises UnknownAction, UnknownMember, MemberLimitReached or ledger.InsufficientCredits, having spent nothing.
    """
    now = now or utcnow()
    price = cost(catalogue, charge)
    account = uow.lock_one(account)
    earlier = ledger.earlier(uow, key, account, "spend")
    if earlier is not None:  # the same spend again: its answer, whatever the checks below would say now
        return Spent(-earlier.amount, earlier.id, ledger.balance(uow, account, now))
    member = _member(uow, account, charge.member_id) if charge.member_id else None
    if charge.resource and charge.action and _charged_before(uow, account, charge.action, charge.resource):
        return Spent(0, None, ledger.balance(uow, account, now))
    if member is not None and member.limit_per_period is not None:
        used = member_usage(uow, account, member.member_id, now, periods.months_of(catalogue, account))
        if used + price > member.limit_per_period:
            raise MemberLimitReached(member.limit_per_period, used, price)
    own = member.allocation if member is not None else None  # a member with an allocation spends only that
    reserved = _reserved(uow, account) - (own or 0)
    meta = {
        name: value
        for name, value in {
            "action": charge.action,
            "quantity": charge.quantity if charge.action else None,
            **_formula(catalogue, charge),
            "resource": charge.resource,
            "member_id": charge.member_id,
        }.items()
        if value is not None
    }
    posted = ledger.debit(
        uow,
        account,
        price,
        kind="spend",
        key=key,
        reserved=reserved,
        limit=own,
        reason=charge.reason,
        actor=charge.member_id or "api",
        meta=meta,
        now=now,
    )
    if posted.created and member is not None and own is not None:
        member.allocation = own - price
    if posted.created and charge.resource and charge.action:
        uow.session.execute(
            uow.insert(ResourceCharge)
            .values(
                account_id=account.id,
                action=charge.action,
                resource=charge.resource,
                entry_id=posted.entry.id,
                member_id=charge.member_id,
                created_at=now,
            )
            .on_conflict_do_nothing()
        )
    return Spent(-posted.entry.amount, posted.entry.id, ledger.balance(uow, account, now))


def _formula(catalogue: Catalogue, charge: Charge) -> dict[str, int]:
    """A formula's inputs, for the ledger row to explain its charge: {"base": 8, "denomination": 25}."""
    price = catalogue.actions.get(charge.action) if charge.action else None
    if not isinstance(price, ActionPrice):
        return {}
    return {"base": price.base, price.add: charge.fields[price.add]}


def pool(uow: UnitOfWork, account: Account, now: datetime) -> int:
    """What the account's shared pool can spend: the balance less what members' allocations reserve."""
    return ledger.balance(uow, account, now) - _reserved(uow, account)


def set_member(
    uow: UnitOfWork,
    account: Account,
    member_id: str,
    *,
    allocation: int | None,
    limit_per_period: int | None,
    now: datetime | None = None,
) -> Member:
    """Create or update a member; a new allocation must fit in the pool (plus what the member held)."""
    now = now or utcnow()
    account = uow.lock_one(account)
    member = uow.session.scalar(MEMBER, {"account_id": account.id, "member_id": member_id})
    if member is None:
        member = Member(account_id=account.id, member_id=member_id, created_at=now)
        uow.session.add(member)
    held = member.allocation or 0
    available = pool(uow, account, now) + held
    if allocation is not None and allocation > available:
        raise AllocationTooLarge(f"allocation {allocation} is more than the pool's {available}")
    member.allocation, member.limit_per_period = allocation, limit_per_period
    uow.session.flush()
    return member


def remove_member(uow: UnitOfWork, account: Account, member_id: str) -> None:
    """Remove a member; its unspent allocation returns to the pool."""
    account = uow.lock_one(account)
    uow.session.delete(_member(uow, account, member_id))
    uow.session.flush()


def members(
    uow: UnitOfWork, catalogue: Catalogue, account: Account, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Each member with its allocation, limit and usage in the current billing period."""
    now = now or utcnow()
    months = periods.months_of(catalogue, account)
    rows = uow.session.scalars(select(Member).where(Member.account_id == account.id).order_by(Member.member_id))
    return [
        {
            "member_id": m.member_id,
            "allocation": m.allocation,
            "limit_per_period": m.limit_per_period,
            "spent_this_period": member_usage(uow, account, m.member_id, now, months),
        }
        for m in rows
    ]


def member_usage(uow: UnitOfWork, account: Account, member_id: str, now: datetime, months: int = 1) -> int:
    """Credits the member spent in the account's current billing period."""
    start, end = periods.bounds(account, "current", now, months)
    spent = uow.session.scalar(
        select(func.coalesce(func.sum(-LedgerEntry.amount), 0)).where(
            LedgerEntry.account_id == account.id,
            LedgerEntry.kind == "spend",
            LedgerEntry.meta["member_id"].as_string() == member_id,
            LedgerEntry.created_at >= start,
            LedgerEntry.created_at < end,
        )
    )
    return int(spent or 0)


def _reserved(uow: UnitOfWork, account: Account) -> int:
    """Credits that members' allocations hold back from the shared pool."""
    return int(uow.session.scalar(RESERVED, {"account_id": account.id}) or 0)


def _member(uow: UnitOfWork, account: Account, member_id: str) -> Member:
    member = uow.session.scalar(MEMBER, {"account_id": account.id, "member_id": member_id})
    if member is None:
        raise UnknownMember(member_id)
    return member


def _charged_before(uow: UnitOfWork, account: Account, action: str, resource: str) -> bool:
    found = uow.session.scalar(CHARGED, {"account_id": account.id, "action": action, "resource": resource})
    return found is not None


# Built once: every spend runs them, and building a statement anew costs nearly as much CPU as running it.
RESERVED = select(func.coalesce(func.sum(Member.allocation), 0)).where(Member.account_id == bindparam("account_id"))
MEMBER = select(Member).where(Member.account_id == bindparam("account_id"), Member.member_id == bindparam("member_id"))
CHARGED = select(ResourceCharge.id).where(
    ResourceCharge.account_id == bindparam("account_id"),
    ResourceCharge.action == bindparam("action"),
    ResourceCharge.resource == bindparam("resource"),
)
