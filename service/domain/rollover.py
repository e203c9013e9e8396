"""The rollover policy at a renewal: what credits under the policy expire before the new grant lands.

A renewal looks only at credits earned before its period starts (`Grant.earned_at`): a referral bonus earned
later in the period is the new period's, whether its event was processed before the renewal's or after; one
earned before it but processed after is cut then (`cut_late`) as the renewal would have cut it.

`none`: everything held under the policy expires. `cap`: once the new grant lands, credits under the policy
come to at most `rollover_cap × credits`; the excess expires first from the soonest-expiring grants. `all`:
nothing expires. Purchased packs and admin grants are never under the policy.

Support may grant a one-time extension (`credits rollover extend`): the next renewal then keeps what it
would cut, as a grant outside the policy that expires at the extension's date.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, select

from service.domain import ledger
from service.infra.catalogue import RolloverPolicy
from service.infra.models import Account, Grant
from service.infra.uow import UnitOfWork


class ExtensionRefused(Exception):
    """The extension cannot be granted as asked (already used once, or a date that is not ahead)."""


def apply(
    uow: UnitOfWork,
    account: Account,
    policy: RolloverPolicy,
    incoming: int,
    *,
    period_start: datetime,
    key: str,
    now: datetime,
) -> int:
    """Cut what the policy cuts, of the credits earned before `period_start`, before `incoming` credits land;
    returns the credits cut.

    Each cut is its own expire entry keyed `{key}:{grant id}`. Under a support extension still ahead of `now`,
    the credits cut are given back at once as one grant keyed `{key}:extension`, outside the policy and
    expiring at the extension's date: the balance keeps them and the ledger says why. The extension is used up
    by this renewal, whatever it cuts.
    """
    kept_until = _take_extension(account, now)
    limit = policy.carry_limit(incoming)
    latest = account.rollover_from is None or period_start >= account.rollover_from
    if latest:
        account.rollover_from, account.rollover_room = period_start, None
        account.rollover_kept_until = kept_until
    if limit is None:
        return 0
    held = _held(uow, account, period_start, now)
    carry = max(0, limit - incoming)  # under "none" the limit is the new grant itself: nothing carries
    excess = sum(g.remaining for g in held) - carry
    if latest:
        account.rollover_room = max(0, -excess)
    if kept_until is None:
        reason = f"rollover ({policy.rollover}) at renewal"
    else:
        reason = f"kept under support extension until {kept_until:%Y-%m-%d %H:%M} UTC"
    cut = 0
    for grant in held:
        if excess <= 0:
            break
        part = min(grant.remaining, excess)
        _expire(uow, account, grant, part, key=f"{key}:{grant.id}", reason=reason, now=now)
        excess -= part
        cut += part
    _keep(uow, account, cut, kept_until, key=key, now=now)
    return cut


def cut_late(uow: UnitOfWork, account: Account, posted: ledger.Posted, *, earned_at: datetime, now: datetime) -> int:
    """Cut, of a grant under the policy just made, what the latest renewal would have cut had the grant been
    processed before it: it was earned before that renewal's period started. Returns the credits cut.

    The renewal left room for so many more credits earned before it; the grant fills that room first and the
    rest expires at once (`rollover:late:{grant key}`), as it would have at the renewal — and is kept, as it
    would have been, when that renewal ran under a support extension.
    """
    since, room = account.rollover_from, account.rollover_room
    if not posted.created or since is None or earned_at >= since or room is None:
        return 0
    account.rollover_room = max(0, room - posted.entry.amount)
    excess = posted.entry.amount - room
    if excess <= 0:
        return 0
    grant_row = ledger.grant_of(uow, posted.entry.idempotency_key)
    assert grant_row is not None  # just made
    key = f"rollover:late:{posted.entry.idempotency_key}"
    reason = f"rollover at the renewal of {since:%Y-%m-%d %H:%M} UTC: earned before it, processed after it"
    _expire(uow, account, grant_row, excess, key=key, reason=reason, now=now)
    _keep(uow, account, excess, account.rollover_kept_until, key=key, now=now)
    return excess


def _expire(
    uow: UnitOfWork, account: Account, grant: Grant, part: int, *, key: str, reason: str, now: datetime
) -> None:
    """Expire `part` of one grant under the policy, once per `key`."""
    ledger.debit(uow, account, part, kind="expire", key=key, grants=[grant], reason=reason, actor="system", now=now)


def _keep(uow: UnitOfWork, account: Account, cut: int, kept_until: datetime | None, *, key: str, now: datetime) -> None:
    """Give back, under a support extension still ahead, the credits a renewal cut: one grant keyed
    `{key}:extension`, outside the policy, expiring at the extension's date."""
    if kept_until is None or kept_until <= now or cut <= 0:
        return
    ledger.grant(
        uow,
        account,
        cut,
        source="extension",
        key=f"{key}:extension",
        reason=f"rollover extension: {cut} credits a renewal would cut, kept until {kept_until:%Y-%m-%d %H:%M} UTC",
        actor="rollover",
        expires_at=kept_until,
        meta={"renewal": key},
        now=now,
    )


def extend(uow: UnitOfWork, account: Account, until: datetime, *, force: bool, now: datetime) -> datetime | None:
    """Grant the one-time extension: the next renewal keeps what it would cut until `until`.

    Once per account (support's promise is one extension, and the count makes a second ask visible) unless
    `force`. Returns the extension it replaces, if one was still pending.
    """
    account = uow.lock_one(account)
    if until <= now:
        raise ExtensionRefused(f"--until {until.isoformat()} is not in the future")
    if account.rollover_extensions and not force:
        raise ExtensionRefused(
            f"{account.public_id} already had {account.rollover_extensions} rollover extension(s); "
            "use --force to grant another"
        )
    previous = account.rollover_extended_until
    account.rollover_extended_until = until
    account.rollover_extensions += 1
    uow.session.flush()
    return previous


def _take_extension(account: Account, now: datetime) -> datetime | None:
    """The pending extension's date, cleared because this renewal uses it up; None when there is none."""
    until = account.rollover_extended_until
    if until is None or until <= now:
        return None
    account.rollover_extended_until = None
    return until


def _held(uow: UnitOfWork, account: Account, period_start: datetime, now: datetime) -> list[Grant]:
    """The unexpired grants under the policy earned before `period_start` with credits left, soonest-expiring
    first: the order cuts take."""
    found = uow.session.scalars(HELD, {"account_id": account.id, "before": period_start})
    live = [g for g in found if g.expires_at is None or g.expires_at > now]
    return sorted(live, key=lambda g: (ledger.spend_deadline(g, account, now), g.id))


HELD = select(Grant).where(
    Grant.account_id == bindparam("account_id"),
    Grant.rollover.is_(True),
    Grant.remaining > 0,
    Grant.earned_at < bindparam("before"),
)
