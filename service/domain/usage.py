"""Usage for a billing period — what each member sees: the organisation's credits, their own usage this
period, and on an annual plan a monthly goal (what is left ÷ members ÷ months left)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from service.domain import ledger, periods
from service.infra.catalogue import Catalogue
from service.infra.models import Account, LedgerEntry, Member, utcnow
from service.infra.uow import UnitOfWork


def report(
    uow: UnitOfWork, catalogue: Catalogue, account: Account, which: str = "current", now: datetime | None = None
) -> dict[str, Any]:
    """Granted (by source), spent (by action, by member and by team), expired, reversed and remaining in the
    period. A spend without a member counts under "pool" by member; by team, a spend counts for the team its
    member was in when it was made, and one outside any team for none."""
    now = now or utcnow()
    months = periods.months_of(catalogue, account)
    start, end = periods.bounds(account, which, now, months)
    granted: dict[str, int] = defaultdict(int)
    by_action: dict[str, int] = defaultdict(int)
    by_member: dict[str, int] = defaultdict(int)
    by_team: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    entries = uow.session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.account_id == account.id, LedgerEntry.created_at >= start, LedgerEntry.created_at < end
        )
    )
    for entry in entries:
        if entry.kind == "grant":
            granted[entry.meta.get("source", "unknown")] += entry.amount
        elif entry.kind == "spend":
            by_action[entry.meta.get("action", "amount")] -= entry.amount
            by_member[entry.meta.get("member_id", "pool")] -= entry.amount
            if "team_id" in entry.meta:
                by_team[entry.meta["team_id"]] -= entry.amount
        totals[entry.kind] -= entry.amount
    remaining = (
        ledger.balance(uow, account, now)
        if which == "current"
        else int(
            uow.session.scalar(
                select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                    LedgerEntry.account_id == account.id, LedgerEntry.created_at < end
                )
            )
            or 0
        )
    )
    result: dict[str, Any] = {
        "account_id": account.public_id,
        "period": {"which": which, "start": start.isoformat(), "end": end.isoformat()},
        "granted": dict(granted),
        "granted_total": sum(granted.values()),
        "spent": {
            "total": totals["spend"],
            "by_action": dict(by_action),
            "by_member": dict(by_member),
            "by_team": dict(by_team),
        },
        "expired": totals["expire"],
        "reversed": totals["reverse"],
        "remaining": remaining,
        "monthly_goal": None,
    }
    if months == 12 and which == "current":
        members = (
            uow.session.scalar(select(func.count()).select_from(Member).where(Member.account_id == account.id)) or 1
        )
        months_left = max(1, math.ceil((end - now).days / 30.44))
        result["monthly_goal"] = {
            "credits_per_member_per_month": remaining // members // months_left,
            "members": members,
            "months_left": months_left,
        }
    return result
