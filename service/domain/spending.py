"""Spending the way the product does: priced actions, once-per-resource charges, and members who share the
pool, spend only their allocation, or spend up to a limit per billing period — alone or in a team, which may have
an allocation and a limit of its own.

Credits are reserved account → team → member: a team's allocation is held back from the account's pool, and the
allocations of its members come out of the team's (never reserved twice); an allocation outside a team is held
back from the pool. Every spend is one `ledger.debit`, made under the account's row lock, so concurrent spends by
several members never exceed an allocation, a limit (the member's or its team's) or the balance, and a resource is
charged once however many colleagues unlock it at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select

from service.domain import ledger, periods
from service.infra import echo
from service.infra.catalogue import ActionPrice, Catalogue
from service.infra.models import Account, LedgerEntry, Member, ResourceCharge, Team, utcnow
from service.infra.uow import UnitOfWork


class UnknownAction(ValueError):
    """The action is not in the catalogue's price list."""

    def __init__(self, action: str, known: list[str]) -> None:
        super().__init__(f"unknown action {echo.quoted(action)}; known actions: {', '.join(known) or 'none'}")
        self.known = known


class FieldRefused(ValueError):
    """A field the action's price needs is missing or not a positive integer, or one it does not take was
    given; `field` names it and `problem` says which, as a validation error would."""

    def __init__(self, name: str, problem: str, message: str) -> None:
        super().__init__(message)
        self.field, self.problem = name, problem


class UnknownMember(LookupError):
    """No such member in this account."""


class UnknownTeam(LookupError):
    """No such team in this account."""


class MemberLimitReached(Exception):
    """The member's spend this billing period would pass its limit; nothing was spent."""

    def __init__(self, limit: int, used: int, requested: int) -> None:
        super().__init__(f"member limit {limit} per period: {used} used, {requested} requested")
        self.limit, self.used, self.requested = limit, used, requested


class TeamLimitReached(Exception):
    """The member's team would spend more this billing period than its limit; nothing was spent."""

    def __init__(self, team_id: str, limit: int, used: int, requested: int) -> None:
        super().__init__(f"team {team_id!r} limit {limit} per period: {used} used, {requested} requested")
        self.team_id, self.limit, self.used, self.requested = team_id, limit, used, requested


class AllocationTooLarge(ValueError):
    """An allocation cannot reserve more than the pool holds (a member's in a team: than the team's holds)."""


class AllocationTooSmall(ValueError):
    """A team's allocation cannot hold less than the allocations of its members, which come out of it."""


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
            raise FieldRefused(name, "Extra inputs are not permitted", f"{what} takes no field {echo.quoted(name)}")
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
    from the member's allocation (or, for a member without one in a team with one, the team's unallocated
    credits), within the member's and its team's period limits, and never more than the balance allows.

    Raises UnknownAction, UnknownMember, MemberLimitReached, TeamLimitReached or ledger.InsufficientCredits,
    having spent nothing.
    """
    now = now or utcnow()
    price = cost(catalogue, charge)
    account = uow.lock_one(account)
    earlier = ledger.earlier(uow, key, account, "spend")
    if earlier is not None:  # the same spend again: its answer, whatever the checks below would say now
        return Spent(-earlier.amount, earlier.id, ledger.balance(uow, account, now))
    member = _member(uow, account, charge.member_id) if charge.member_id else None
    team = uow.session.get(Team, member.team_id) if member is not None and member.team_id is not None else None
    if charge.resource and charge.action and _charged_before(uow, account, charge.action, charge.resource):
        return Spent(0, None, ledger.balance(uow, account, now))
    if member is not None and member.limit_per_period is not None:
        used = member_usage(uow, account, member.member_id, now, periods.months_of(catalogue, account))
        if used + price > member.limit_per_period:
            raise MemberLimitReached(member.limit_per_period, used, price)
    if team is not None and team.limit_per_period is not None:
        used = team_usage(uow, account, team.team_id, now, periods.months_of(catalogue, account))
        if used + price > team.limit_per_period:
            raise TeamLimitReached(team.team_id, team.limit_per_period, used, price)
    # A spend out of a reservation is bounded by it and by the balance; a spend out of the pool, by the balance
    # less every reservation. While the balance covers the reservations, no one reaches into another's; when it
    # no longer does (a refund took credits back), what is there is spent first come, first served by those who
    # hold reservations, rather than left stranded.
    own = _own_credits(uow, member, team)
    reserved = _reserved(uow, account) if own is None else 0
    meta = {
        name: value
        for name, value in {
            "action": charge.action,
            "quantity": charge.quantity if charge.action else None,
            **_formula(catalogue, charge),
            "resource": charge.resource,
            "member_id": charge.member_id,
            "team_id": team.team_id if team is not None else None,
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
    if posted.created and member is not None and member.allocation is not None:
        member.allocation -= price
    if posted.created and team is not None and team.allocation is not None:
        team.allocation -= price  # a team member's allocation is part of the team's: both shrink
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


def _own_credits(uow: UnitOfWork, member: Member | None, team: Team | None) -> int | None:
    """The reservation a spend comes out of, if any: the member's allocation; else, in a team with an allocation,
    the team's credits no member holds; else none (the spend comes out of the pool)."""
    if member is None:
        return None
    if member.allocation is not None:  # a member with an allocation spends only that
        return member.allocation
    if team is not None and team.allocation is not None:
        return team.allocation - _assigned(uow, team)
    return None


def pool(uow: UnitOfWork, account: Account, now: datetime) -> int:
    """What the account's shared pool can spend: the balance less what teams' and members' allocations reserve
    (negative when the balance fell below them, e.g. after a refund)."""
    return ledger.balance(uow, account, now) - _reserved(uow, account)


def set_member(
    uow: UnitOfWork,
    account: Account,
    member_id: str,
    *,
    allocation: int | None,
    limit_per_period: int | None,
    team_id: str | None = None,
    now: datetime | None = None,
) -> Member:
    """Create or set a member, as given: its allocation, limit and team (None: none). A new allocation must fit
    in what it comes out of — in a team with an allocation, the team's unallocated credits, else the pool —
    plus what the member held there; keeping or shrinking an allocation is always allowed.

    Raises UnknownTeam or AllocationTooLarge, having changed nothing."""
    now = now or utcnow()
    account = uow.lock_one(account)
    team = _team(uow, account, team_id) if team_id is not None else None
    member = uow.session.scalar(MEMBER, {"account_id": account.id, "member_id": member_id})
    if member is None:
        member = Member(account_id=account.id, member_id=member_id, created_at=now)
    old_team = uow.session.get(Team, member.team_id) if member.team_id is not None else None
    held = member.allocation or 0
    if allocation is not None:
        if team is not None and team.allocation is not None:  # out of the team's reservation
            kept = held if old_team is team else 0
            free = team.allocation - _assigned(uow, team) + kept
            where = f"team {team.team_id!r}'s unallocated"
        else:  # out of the pool
            kept = held if old_team is None or old_team.allocation is None else 0
            free = pool(uow, account, now) + kept
            where = "the pool's"
        if allocation > max(free, kept):
            raise AllocationTooLarge(f"allocation {allocation} is more than {where} {free}")
    if member.id is None:
        uow.session.add(member)
    member.allocation, member.limit_per_period = allocation, limit_per_period
    member.team_id = team.id if team is not None else None
    uow.session.flush()
    return member


def set_team(
    uow: UnitOfWork,
    account: Account,
    team_id: str,
    *,
    allocation: int | None,
    limit_per_period: int | None,
    now: datetime | None = None,
) -> Team:
    """Create or set a team, as given: its allocation and limit (None: none). The allocation holds its members'
    allocations, so it may not be less than they hold; what it reserves beyond what the team held must fit in
    the pool; keeping or shrinking it is always allowed. Without an allocation the team reserves nothing, and its
    members' allocations come out of the pool.

    Raises AllocationTooSmall or AllocationTooLarge, having changed nothing."""
    now = now or utcnow()
    account = uow.lock_one(account)
    team = uow.session.scalar(TEAM, {"account_id": account.id, "team_id": team_id})
    if team is None:
        team = Team(account_id=account.id, team_id=team_id, created_at=now)
    assigned = _assigned(uow, team) if team.id is not None else 0
    if allocation is not None:
        if allocation < assigned:
            raise AllocationTooSmall(
                f"team allocation {allocation} is less than its members' allocations, {assigned}; shrink those first"
            )
        held = team.allocation if team.allocation is not None else assigned  # what the team holds of the pool now
        available = pool(uow, account, now) + held
        if allocation > max(available, held):
            raise AllocationTooLarge(f"allocation {allocation} is more than the pool's {available}")
    if team.id is None:
        uow.session.add(team)
    team.allocation, team.limit_per_period = allocation, limit_per_period
    uow.session.flush()
    return team


def remove_member(uow: UnitOfWork, account: Account, member_id: str) -> None:
    """Remove a member; its unspent allocation returns to the pool (or, in a team with an allocation, to the team's
    unallocated credits)."""
    account = uow.lock_one(account)
    uow.session.delete(_member(uow, account, member_id))
    uow.session.flush()


def members(
    uow: UnitOfWork, catalogue: Catalogue, account: Account, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Each member with its team, allocation, limit and usage in the current billing period."""
    now = now or utcnow()
    months = periods.months_of(catalogue, account)
    rows = uow.session.execute(
        select(Member, Team.team_id)
        .outerjoin(Team, Team.id == Member.team_id)
        .where(Member.account_id == account.id)
        .order_by(Member.member_id)
    )
    return [
        {
            "member_id": m.member_id,
            "team_id": team_id,
            "allocation": m.allocation,
            "limit_per_period": m.limit_per_period,
            "spent_this_period": member_usage(uow, account, m.member_id, now, months),
        }
        for m, team_id in rows
    ]


def teams(uow: UnitOfWork, catalogue: Catalogue, account: Account, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each team with its allocation (and the part of it no member holds), limit, usage in the current billing
    period and members."""
    now = now or utcnow()
    months = periods.months_of(catalogue, account)
    rows = list(uow.session.scalars(select(Team).where(Team.account_id == account.id).order_by(Team.team_id)))
    in_team: dict[int, list[Member]] = {t.id: [] for t in rows}
    for m in uow.session.scalars(
        select(Member).where(Member.account_id == account.id, Member.team_id.is_not(None)).order_by(Member.member_id)
    ):
        in_team[m.team_id or 0].append(m)
    return [
        {
            "team_id": t.team_id,
            "allocation": t.allocation,
            "unallocated": (
                t.allocation - sum(m.allocation or 0 for m in in_team[t.id]) if t.allocation is not None else None
            ),
            "limit_per_period": t.limit_per_period,
            "spent_this_period": team_usage(uow, account, t.team_id, now, months),
            "members": [m.member_id for m in in_team[t.id]],
        }
        for t in rows
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


def team_usage(uow: UnitOfWork, account: Account, team_id: str, now: datetime, months: int = 1) -> int:
    """Credits the team's members spent for the team in the account's current billing period (a spend counts
    for the team its member was in when it was made)."""
    start, end = periods.bounds(account, "current", now, months)
    spent = uow.session.scalar(
        select(func.coalesce(func.sum(-LedgerEntry.amount), 0)).where(
            LedgerEntry.account_id == account.id,
            LedgerEntry.kind == "spend",
            LedgerEntry.meta["team_id"].as_string() == team_id,
            LedgerEntry.created_at >= start,
            LedgerEntry.created_at < end,
        )
    )
    return int(spent or 0)


def _reserved(uow: UnitOfWork, account: Account) -> int:
    """Credits held back from the shared pool: teams' allocations, and members' allocations outside them."""
    return int(uow.session.scalar(RESERVED, {"account_id": account.id}) or 0)


def _assigned(uow: UnitOfWork, team: Team) -> int:
    """Credits of the team's allocation that its members' own allocations hold."""
    return int(uow.session.scalar(ASSIGNED, {"team": team.id}) or 0)


def _member(uow: UnitOfWork, account: Account, member_id: str) -> Member:
    """The account's member, or UnknownMember."""
    member = uow.session.scalar(MEMBER, {"account_id": account.id, "member_id": member_id})
    if member is None:
        raise UnknownMember(member_id)
    return member


def _team(uow: UnitOfWork, account: Account, team_id: str) -> Team:
    """The account's team, or UnknownTeam."""
    team = uow.session.scalar(TEAM, {"account_id": account.id, "team_id": team_id})
    if team is None:
        raise UnknownTeam(team_id)
    return team


def _charged_before(uow: UnitOfWork, account: Account, action: str, resource: str) -> bool:
    """Whether the account was already charged for this action on this resource."""
    found = uow.session.scalar(CHARGED, {"account_id": account.id, "action": action, "resource": resource})
    return found is not None


# Built once: every spend runs them, and building a statement anew costs nearly as much CPU as running it.
_OUTSIDE_TEAMS = (  # members' allocations that no team's allocation holds
    select(func.coalesce(func.sum(Member.allocation), 0))
    .select_from(Member)
    .outerjoin(Team, Team.id == Member.team_id)
    .where(Member.account_id == bindparam("account_id"), Team.allocation.is_(None))
    .scalar_subquery()
)
_TEAMS = select(func.coalesce(func.sum(Team.allocation), 0)).where(Team.account_id == bindparam("account_id"))
RESERVED = select(_OUTSIDE_TEAMS + _TEAMS.scalar_subquery())
ASSIGNED = select(func.coalesce(func.sum(Member.allocation), 0)).where(Member.team_id == bindparam("team"))
MEMBER = select(Member).where(Member.account_id == bindparam("account_id"), Member.member_id == bindparam("member_id"))
TEAM = select(Team).where(Team.account_id == bindparam("account_id"), Team.team_id == bindparam("team_id"))
CHARGED = select(ResourceCharge.id).where(
    ResourceCharge.account_id == bindparam("account_id"),
    ResourceCharge.action == bindparam("action"),
    ResourceCharge.resource == bindparam("resource"),
)
