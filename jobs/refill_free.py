"""The monthly free allowance (`[free]` in the catalogue) for every account without a paid plan.

Run by cron on the 1st, it must be safe twice and safe late: each account's grant for a month is keyed
`free:{account}:{YYYY-MM}`, and the free rollover policy is applied only when that month's grant is not there
yet, so a second run (or a run on the 20th) neither grants nor cuts again. Each account is its own
transaction: one failure never holds back the others, and a crash mid-run resumes where it stopped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import select

from service.domain import ledger, rollover
from service.infra.catalogue import Free
from service.infra.models import Account, LedgerEntry, utcnow
from service.infra.runtime import Runtime
from service.infra.uow import UnitOfWork

MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
Track = Callable[[Sequence[int]], Iterable[int]]


def month_of(when: datetime) -> str:
    """The YYYY-MM a run at `when` refills for."""
    return when.strftime("%Y-%m")


def run(rt: Runtime, month: str, *, now: datetime | None = None, track: Track = iter) -> Counter[str]:
    """Grant `month`'s allowance to every account without a paid plan; counts "granted" and "already granted".

    `track` wraps the account ids as they are worked through (a progress bar on a terminal).
    """
    free = rt.catalogue.free
    counts: Counter[str] = Counter()
    if free.credits == 0:
        return counts
    now = now or utcnow()
    with rt.uow() as uow:
        ids = list(uow.session.scalars(select(Account.id).where(Account.plan.is_(None)).order_by(Account.id)))
    for account_id in track(ids):
        with rt.uow() as uow:
            counts[_refill(uow, free, uow.session.get_one(Account, account_id), month, now)] += 1
            uow.commit()
    return counts


def _refill(uow: UnitOfWork, free: Free, account: Account, month: str, now: datetime) -> str:
    """One account's allowance for `month`: the free policy first, then the grant; what happened."""
    account = uow.lock_one(account)
    if account.plan is not None:  # subscribed since the listing
        return "skipped (paid plan)"
    if _granted(uow, account, month):
        return "already granted"
    month_start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    key = f"rollover:free:{account.public_id}:{month}"
    rollover.apply(uow, account, free, free.credits, period_start=month_start, key=key, now=now)
    ledger.grant(
        uow,
        account,
        free.credits,
        source="free",
        key=f"free:{account.public_id}:{month}",
        reason=f"free allowance for {month}",
        actor="refill-free",
        rollover=True,
        earned_at=month_start,
        meta={"month": month},
        now=now,
    )
    return "granted"


def _granted(uow: UnitOfWork, account: Account, month: str) -> bool:
    """Whether the account already has `month`'s allowance — by any public id it had, so an account re-keyed
    from its customer id since the last run is not granted twice."""
    found = uow.session.scalar(
        select(LedgerEntry.id).where(
            LedgerEntry.account_id == account.id,
            LedgerEntry.kind == "grant",
            LedgerEntry.idempotency_key.like(f"free:%:{month}"),
        )
    )
    return found is not None
