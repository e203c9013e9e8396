"""`credits members …` and `credits teams …`: the account → team → member split of credits, as the API's
…/members and …/teams routes set and show it. Registered on the `credits` app by service/entry/cli.py.

Like the rest of the CLI these only translate. `set` sets a member or a team as given, as the API's POST does
(an option left out is none), so typing it twice changes nothing the second time; every `set` and `remove`
asks who (`--actor`) and why (`--reason`) and leaves an audit row with what was there before and after. A
refusal (an allocation that does not fit, an unknown team or member) is one line on stderr and exit code 1.
"""

from __future__ import annotations

from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from service.domain import accounts, audit, spending
from service.entry.schemas import members_view, teams_view
from service.entry.support_cli import Actor, AsJson, Reason, Ticket, print_json
from service.infra import runtime
from service.infra.models import Account
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork

members_app = typer.Typer(help="An account's members: allocations, limits, teams.", no_args_is_help=True)
teams_app = typer.Typer(
    help="An account's teams: allocations and limits shared by their members.", no_args_is_help=True
)
out = Console(markup=False)  # ids are printed as typed, never read as markup
err = Console(stderr=True, markup=False, soft_wrap=True)

AccountArg = Annotated[str, typer.Argument(help="Account id or Stripe customer id.")]
Allocation = Annotated[
    int | None, typer.Option(min=0, help="Credits reserved out of the pool (a member in a team: the team's).")
]
Limit = Annotated[int | None, typer.Option(min=0, help="The most it may spend per billing period.")]


@members_app.command("list")
def members_list(account: AccountArg, as_json: AsJson = False) -> None:
    """Show the account's members with their team, allocation, limit and spend this period, and the pool."""
    rt = runtime.load()
    with rt.uow() as uow:
        view = members_view(uow, rt.catalogue, accounts.get(uow, account))
    if as_json:
        print_json(view)
        return
    table = Table(
        "member",
        "team",
        "allocation",
        "limit per period",
        "spent this period",
        title=f"{view['account_id']}: pool {view['pool']}",
    )
    for m in view["members"]:
        table.add_row(
            m["member_id"],
            m["team_id"] or "-",
            _n(m["allocation"]),
            _n(m["limit_per_period"]),
            str(m["spent_this_period"]),
        )
    out.print(table)


@members_app.command("set")
def members_set(
    account: AccountArg,
    member: Annotated[str, typer.Argument(help="The member id, as the product names it.")],
    reason: Reason,
    actor: Actor,
    team: Annotated[
        str | None, typer.Option(help="The team it belongs to (which must exist); none if omitted.")
    ] = None,
    allocation: Allocation = None,
    limit_per_period: Limit = None,
    ticket: Ticket = None,
) -> None:
    """Add or set a member, as given: its team, allocation and limit (an option left out is none)."""
    rt = runtime.load()
    with rt.uow() as uow:
        acct = accounts.get(uow, account, lock=True)
        before = _member_row(uow, rt, acct, member)
        try:
            spending.set_member(
                uow, acct, member, allocation=allocation, limit_per_period=limit_per_period, team_id=team
            )
        except spending.UnknownTeam:
            _refuse(f"refused: no team {team!r} in {acct.public_id}")
        except spending.AllocationTooLarge as exc:
            _refuse(f"refused: {exc}")
        after = _member_row(uow, rt, acct, member)
        _audit(uow, acct, "member.set", reason, actor, ticket, {"member_id": member, "before": before, "after": after})
        uow.commit()
    out.print(f"{acct.public_id}: member {member} {_said(after)}" + ("" if before != after else " (unchanged)"))


@members_app.command("remove")
def members_remove(
    account: AccountArg,
    member: Annotated[str, typer.Argument(help="The member id.")],
    reason: Reason,
    actor: Actor,
    ticket: Ticket = None,
) -> None:
    """Remove a member; its unspent allocation returns to the pool (or to its team's allocation)."""
    rt = runtime.load()
    with rt.uow() as uow:
        acct = accounts.get(uow, account, lock=True)
        before = _member_row(uow, rt, acct, member)
        try:
            spending.remove_member(uow, acct, member)
        except spending.UnknownMember:
            _refuse(f"refused: no member {member!r} in {acct.public_id}")
        _audit(uow, acct, "member.remove", reason, actor, ticket, {"member_id": member, "before": before})
        uow.commit()
    out.print(f"{acct.public_id}: member {member} removed")


@teams_app.command("list")
def teams_list(account: AccountArg, as_json: AsJson = False) -> None:
    """Show the account's teams with their allocation, limit, spend this period and members, and the pool."""
    rt = runtime.load()
    with rt.uow() as uow:
        view = teams_view(uow, rt.catalogue, accounts.get(uow, account))
    if as_json:
        print_json(view)
        return
    table = Table(
        "team",
        "allocation",
        "unallocated",
        "limit per period",
        "spent this period",
        "members",
        title=f"{view['account_id']}: pool {view['pool']}",
    )
    for t in view["teams"]:
        table.add_row(
            t["team_id"],
            _n(t["allocation"]),
            _n(t["unallocated"]),
            _n(t["limit_per_period"]),
            str(t["spent_this_period"]),
            ", ".join(t["members"]) or "-",
        )
    out.print(table)


@teams_app.command("set")
def teams_set(
    account: AccountArg,
    team: Annotated[str, typer.Argument(help="The team id, as the product names it.")],
    reason: Reason,
    actor: Actor,
    allocation: Annotated[
        int | None, typer.Option(min=0, help="Credits reserved out of the pool for the team's members.")
    ] = None,
    limit_per_period: Annotated[
        int | None, typer.Option(min=0, help="The most its members may spend together per billing period.")
    ] = None,
    ticket: Ticket = None,
) -> None:
    """Add or set a team, as given: its allocation and limit (an option left out is none)."""
    rt = runtime.load()
    with rt.uow() as uow:
        acct = accounts.get(uow, account, lock=True)
        before = _team_row(uow, rt, acct, team)
        try:
            spending.set_team(uow, acct, team, allocation=allocation, limit_per_period=limit_per_period)
        except (spending.AllocationTooLarge, spending.AllocationTooSmall) as exc:
            _refuse(f"refused: {exc}")
        after = _team_row(uow, rt, acct, team)
        _audit(uow, acct, "team.set", reason, actor, ticket, {"team_id": team, "before": before, "after": after})
        uow.commit()
    out.print(f"{acct.public_id}: team {team} {_said(after)}" + ("" if before != after else " (unchanged)"))


def _member_row(uow: UnitOfWork, rt: Runtime, acct: Account, member: str) -> dict[str, Any] | None:
    """The member as set (its team, allocation and limit), or None when there is none."""
    found = next((m for m in spending.members(uow, rt.catalogue, acct) if m["member_id"] == member), None)
    return {k: found[k] for k in ("team_id", "allocation", "limit_per_period")} if found else None


def _team_row(uow: UnitOfWork, rt: Runtime, acct: Account, team: str) -> dict[str, Any] | None:
    """The team as set (its allocation and limit), or None when there is none."""
    found = next((t for t in spending.teams(uow, rt.catalogue, acct) if t["team_id"] == team), None)
    return {k: found[k] for k in ("allocation", "limit_per_period")} if found else None


def _audit(
    uow: UnitOfWork,
    acct: Account,
    action: str,
    reason: str,
    actor: str,
    ticket: str | None,
    details: dict[str, Any],
) -> None:
    """The audit row every change by hand leaves: who, why, under which ticket, what was there before and after."""
    changed = details["before"] != details.get("after")
    audit.record(
        uow,
        actor=actor,
        action=action,
        reason=reason,
        account=acct,
        ticket=ticket,
        details={**details, "changed": changed},
    )


def _said(row: dict[str, Any] | None) -> str:
    """A member's or team's row as one line: `allocation 30, limit per period -`."""
    assert row is not None  # just set
    return ", ".join(f"{k.removesuffix('_id').replace('_', ' ')} {_n(v)}" for k, v in row.items())


def _refuse(message: str) -> NoReturn:
    """A refusal: one line on stderr, exit code 1."""
    err.print(message)
    raise typer.Exit(1)


def _n(value: Any) -> str:
    """A value as shown, `-` for none."""
    return "-" if value is None else str(value)
