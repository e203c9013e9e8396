"""The rollover policy at a renewal: what credits under the policy expire before the new grant lands.

`none`: everything held under the policy expires. `cap`: once the new grant lands, credits under the policy
come to at most `rollover_cap × credits`; the excess expires first from the soonest-expiring grants. `all`:
nothing expires. Purchased packs and admin grants are never under the policy.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import ledger
from service.catalogue import RolloverPolicy
from service.models import Account, Grant


def apply(
    session: Session, account: Account, policy: RolloverPolicy, incoming: int, *, key: str, now: datetime
) -> int:
    """Expire what the policy cuts before `incoming` credits land; returns the credits expired.

    Each cut is its own expire entry keyed `{key}:{grant id}`, so a retried renewal cuts nothing twice.
    """
    limit = policy.carry_limit()
    if limit is None:
        return 0
    held = _held(session, account, now)
    carry = max(0, limit - incoming)  # under "none" the limit is the new grant itself: nothing carries
    excess = sum(g.remaining for g in held) - carry
    expired = 0
    for grant in held:
        if excess <= 0:
            break
        cut = min(grant.remaining, excess)
        reason = f"rollover ({policy.rollover}) at renewal"
        ledger.expire(session, account, grant, cut, key=f"{key}:{grant.id}", reason=reason, now=now)
        excess -= cut
        expired += cut
    return expired


def _held(session: Session, account: Account, now: datetime) -> list[Grant]:
    grants = session.scalars(
        select(Grant).where(Grant.account_id == account.id, Grant.rollover.is_(True), Grant.remaining > 0)
    ).all()
    live = [g for g in grants if g.expires_at is None or g.expires_at > now]
    return sorted(live, key=lambda g: (ledger.spend_deadline(g, account, now), g.id))
