"""Billing periods: the subscription's current period when the account has a paid plan with a known end,
else the calendar month. Member limits, usage reports and the spend order all use the same bounds."""

from __future__ import annotations

import calendar
from datetime import datetime

from service.infra.catalogue import Catalogue
from service.infra.models import Account


def months_of(catalogue: Catalogue, account: Account) -> int:
    """Length of the account's billing period in months: 12 on an annual plan, else 1."""
    plan = catalogue.plans.get(account.plan or "")
    return 12 if plan is not None and plan.interval == "year" else 1


def current_end(account: Account, now: datetime) -> datetime:
    """End of the current billing period."""
    return bounds(account, "current", now)[1]


def bounds(account: Account, which: str, now: datetime, months: int = 1) -> tuple[datetime, datetime]:
    """[start, end) of the current or previous billing period (`months` long on a subscription)."""
    if account.plan and account.period_end is not None and account.period_end > now:
        end, length = account.period_end, months
    else:
        end, length = add_months(month_start(now), 1), 1
    start = add_months(end, -length)
    return (add_months(start, -length), start) if which == "previous" else (start, end)


def month_start(when: datetime) -> datetime:
    """The first instant of `when`'s calendar month."""
    return when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def add_months(when: datetime, months: int) -> datetime:
    """`when` moved by whole months, the day clamped to the target month's length."""
    index = when.year * 12 + when.month - 1 + months
    year, month = divmod(index, 12)
    day = min(when.day, calendar.monthrange(year, month + 1)[1])
    return when.replace(year=year, month=month + 1, day=day)
