"""The credit ledger: one function credits (`grant`), one function debits (`debit`), each once per key.

Balances are never stored. An account's balance is the sum of its unexpired grants' `remaining`; every change
to a `remaining` is a ledger entry (positive for a grant, negative for a debit) and, for a debit, its
allocations — which grant gave how much — so `check` can rebuild every grant from the entries alone.

Every write locks the account row first, so a check ("is there enough?", "was this key used?") and the write
that depends on it never interleave with another transaction's. Every entry carries a UNIQUE idempotency key:
the same key again returns the first entry and writes nothing; the same key for something else is a conflict.

The statements every grant and debit runs are built once, below the functions: building a SQLAlchemy
statement anew, with its cache key, costs nearly as much CPU as running it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from service.domain import periods
from service.infra import db, logs
from service.infra.models import Account, Allocation, Grant, LedgerEntry, utcnow
from service.infra.uow import UnitOfWork

# The grant column each kind of debit moves credits into.
DEBIT_COLUMNS = {"spend": "spent", "expire": "expired", "reverse": "reversed"}
NEVER = datetime.max.replace(tzinfo=utcnow().tzinfo)
log = logs.get("ledger")


class LedgerError(Exception):
    """A ledger operation that cannot be done as asked."""


class InsufficientCredits(LedgerError):
    """The debit would take more than the account (or the bound it was given) allows; nothing was written."""

    def __init__(self, available: int, requested: int) -> None:
        super().__init__(f"{available} credits available, {requested} requested")
        self.available, self.requested = available, requested


class IdempotencyConflict(LedgerError):
    """The key was already used for a different operation."""


@dataclass(frozen=True)
class Entry:
    """A ledger entry as written, or as found under its key."""

    id: int
    account_id: int
    kind: str
    amount: int
    idempotency_key: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class Posted:
    """A ledger entry and whether this call wrote it (False: an earlier call with the same key did)."""

    entry: Entry
    created: bool


def grant(
    uow: UnitOfWork,
    account: Account,
    amount: int,
    *,
    source: str,
    key: str,
    reason: str | None = None,
    actor: str | None = None,
    expires_at: datetime | None = None,
    rollover: bool = False,
    earned_at: datetime | None = None,
    meta: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Posted:
    """Give `amount` credits to the account once per `key`: every way credits arrive comes through here.

    `rollover`: the grant is under its plan's rollover policy (a renewal may cut it); `earned_at`: when the
    credits were earned in billing time, `now` unless said (a renewal cuts only what was earned before its
    period starts); `expires_at`: when what is left of it stops being spendable."""
    if amount <= 0:
        raise LedgerError("a grant must be positive")
    now = now or utcnow()
    account = uow.lock_one(account)
    metadata = {"source": source, **(meta or {})}
    row = {
        "account_id": account.id,
        "kind": "grant",
        "amount": amount,
        "idempotency_key": key,
        "reason": reason,
        "actor": actor,
        "metadata": metadata,
        "created_at": now,
    }
    entry_id = uow.session.scalar(NEW_ENTRY_UNLESS_KEY_TAKEN[uow.dialect], row)
    if entry_id is None:
        earlier = _find(uow, key)
        assert earlier is not None  # the key is taken: its entry is there
        _same_operation(earlier, account, "grant", amount)
        return Posted(earlier, created=False)
    uow.session.execute(
        NEW_GRANT,
        {
            "account_id": account.id,
            "entry_id": entry_id,
            "source": source,
            "amount": amount,
            "remaining": amount,
            "expires_at": expires_at,
            "rollover": rollover,
            "earned_at": earned_at or now,
            "created_at": now,
        },
    )
    uow.moved("grant", source, amount)
    log.info("ledger.posted", kind="grant", amount=amount, idempotency_key=key, account_id=account.public_id)
    return Posted(Entry(entry_id, account.id, "grant", amount, key, metadata), created=True)


def debit(
    uow: UnitOfWork,
    account: Account,
    amount: int,
    *,
    kind: str,
    key: str,
    grants: Sequence[Grant] | None = None,
    reserved: int = 0,
    limit: int | None = None,
    partial: bool = False,
    reason: str | None = None,
    actor: str | None = None,
    meta: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Posted:
    """Take `amount` credits from the account once per `key`: every way credits leave comes through here — a
    spend, an expiry, a renewal's rollover cut, a refund's reversal.

    The credits come from `grants` in their order (an expiry's grant, a refund's grants), by default from the
    account's spendable grants, soonest-expiring first (grants past their expiry are expired first, so nothing
    is ever spent from them). Given grants are read again under the lock, and must be the account's. What may
    be taken is bounded by what those grants hold, less `reserved` (credits of the balance held back for others:
    teams' and members' allocations), and by `limit` (the reservation a member's spend draws on).

    All or nothing: InsufficientCredits, with nothing debited, when the bounds allow less than `amount` —
    unless `partial`, which takes what there is and records the rest as the entry's `shortfall` (a refund of
    credits already spent). The entry's amount is what was taken, so what an answer reports as charged is
    what the ledger took."""
    if amount <= 0:
        raise LedgerError(f"a debit ({kind}) must be positive")
    now = now or utcnow()
    account = uow.lock_one(account)
    same = None if partial else -amount
    if grants is None:
        held = _held(uow, account)
        if any(_due(g, now) for g in held):
            found = earlier(uow, key, account, kind, same)  # a replay writes nothing, not even an expiry
            if found is not None:
                return Posted(found, created=False)
            _expire_due(uow, account, held, now)
        sources = spending_order(held, account, now)
    else:
        sources = _under_lock(uow, account, grants)
    available = max(0, sum(g.remaining for g in sources) - reserved)
    if limit is not None:
        available = min(available, max(0, limit))
    if amount > available and not partial:
        found = earlier(uow, key, account, kind, same)  # made when there was enough: a replay, not a refusal
        if found is None:
            raise InsufficientCredits(available, amount)
        return Posted(found, created=False)
    taken = min(amount, available)
    shortfall = {"requested": amount, "shortfall": amount - taken} if partial else {}
    entry = Entry(0, account.id, kind, -taken, key, {**(meta or {}), **shortfall})
    entry_id = uow.session.scalar(
        NEW_ENTRY_UNLESS_KEY_TAKEN[uow.dialect],
        {
            "account_id": account.id,
            "kind": kind,
            "amount": -taken,
            "idempotency_key": key,
            "reason": reason,
            "actor": actor,
            "metadata": entry.meta,
            "created_at": now,
        },
    )
    if entry_id is None:  # the key is taken (the account's lock orders this after whoever took it)
        found = earlier(uow, key, account, kind, same)
        assert found is not None
        return Posted(found, created=False)
    parts = _split(sources, taken)
    if parts:
        uow.session.execute(
            NEW_ALLOCATION, [{"entry_id": entry_id, "grant_id": g.id, "amount": part} for g, part in parts]
        )
        # Relative to what the row holds, so that even a debit decided on a stale read could never write back an
        # older value: the CHECK constraints would refuse it instead.
        uow.session.execute(MOVE[kind], [{"grant_id": g.id, "part": part} for g, part in parts])
    for source, part in parts:
        uow.session.expire(source, ["remaining", DEBIT_COLUMNS[kind]])
        uow.moved(kind, source.source, part)
    log.info("ledger.posted", kind=kind, amount=-taken, idempotency_key=key, account_id=account.public_id)
    return Posted(Entry(entry_id, account.id, kind, -taken, key, entry.meta), created=True)


def _expire_due(uow: UnitOfWork, account: Account, held: Sequence[Grant], now: datetime) -> None:
    """Expire what is left of the grants whose expiry has passed, each once (`expire:grant:{id}`)."""
    for due in [g for g in held if _due(g, now)]:
        debit(
            uow,
            account,
            due.remaining,
            kind="expire",
            key=f"expire:grant:{due.id}",
            grants=[due],
            reason="expired",
            actor="system",
            now=now,
        )


def _due(grant_row: Grant, now: datetime) -> bool:
    return grant_row.remaining > 0 and grant_row.expires_at is not None and grant_row.expires_at <= now


def balance(uow: UnitOfWork, account: Account, now: datetime | None = None) -> int:
    """Credits the account can spend now: the remainder of its unexpired grants."""
    total = uow.session.scalar(BALANCE, {"account_id": account.id, "now": now or utcnow()})
    return int(total or 0)


def open_grants(uow: UnitOfWork, account: Account, now: datetime | None = None) -> list[Grant]:
    """Unexpired grants with credits left, in the order spends consume them (soonest-expiring first)."""
    return spending_order(_held(uow, account), account, now or utcnow())


def spending_order(grants: Sequence[Grant], account: Account, now: datetime) -> list[Grant]:
    """The unexpired grants with credits left, in the order spends consume them."""
    live = [g for g in grants if g.remaining > 0 and (g.expires_at is None or g.expires_at > now)]
    return sorted(live, key=lambda g: (spend_deadline(g, account, now), g.id))


def spend_deadline(grant_row: Grant, account: Account, now: datetime) -> datetime:
    """When a grant's credits stop being spendable, for ordering spends: credits under a rollover policy may be
    cut at the next renewal, so they count as expiring at the end of the current period even without an
    `expires_at`."""
    deadline = grant_row.expires_at or NEVER
    if grant_row.rollover:
        deadline = min(deadline, periods.current_end(account, now))
    return deadline


def granted(uow: UnitOfWork, key: str) -> bool:
    """Whether an entry holds `key` already."""
    return uow.session.scalar(KEY_TAKEN, {"key": key}) is not None


def earlier(uow: UnitOfWork, key: str, account: Account, kind: str, amount: int | None = None) -> Entry | None:
    """The entry that holds `key` already, if one does, checked to be the same operation (IdempotencyConflict
    when the key was used for another: another account, kind or amount)."""
    entry = _find(uow, key)
    if entry is not None:
        _same_operation(entry, account, kind, amount)
    return entry


def taken(uow: UnitOfWork, keys: list[str]) -> set[str]:
    """Those of `keys` that entries hold already."""
    return set(uow.session.scalars(KEYS_TAKEN, {"keys": keys}))


def grant_of(uow: UnitOfWork, key: str) -> Grant | None:
    """The grant made under `key`, if there is one."""
    return uow.session.scalar(GRANT_BY_KEY, {"key": key})


def history(uow: UnitOfWork, account: Account, limit: int, before_id: int | None = None) -> list[LedgerEntry]:
    """The account's entries, newest first, at most `limit`, older than entry `before_id` when given."""
    query = select(LedgerEntry).where(LedgerEntry.account_id == account.id)
    if before_id is not None:
        query = query.where(LedgerEntry.id < before_id)
    return list(uow.session.scalars(query.order_by(LedgerEntry.id.desc()).limit(limit)))


@dataclass(frozen=True)
class Drift:
    """A place where stored state disagrees with what the ledger says it should be."""

    account: str
    what: str
    expected: int
    actual: int


def check(uow: UnitOfWork) -> list[Drift]:
    """Recompute every balance and grant from the ledger; return every disagreement (empty: all good).

    Per account, the sum of entries equals the sum of grant remainders (grants whose expiry has passed but
    not yet been swept still count: the ledger has not said yet that they expired). Per grant, its amount
    equals its grant entry, and spent/expired/reversed equal its allocations by kind. The sums and comparisons
    run in the database, and only the rows that disagree come back, so memory does not grow with the ledger.
    """
    session = uow.session
    entries = (
        select(LedgerEntry.account_id, func.sum(LedgerEntry.amount).label("total"))
        .group_by(LedgerEntry.account_id)
        .subquery()
    )
    remaining = select(Grant.account_id, func.sum(Grant.remaining).label("total")).group_by(Grant.account_id).subquery()
    expected, actual = func.coalesce(entries.c.total, 0), func.coalesce(remaining.c.total, 0)
    balances = (
        select(Account.public_id, expected, actual)
        .outerjoin(entries, entries.c.account_id == Account.id)
        .outerjoin(remaining, remaining.c.account_id == Account.id)
        .where(expected != actual)
        .order_by(Account.id)
    )
    drifts = [Drift(name, "balance", int(e), int(a)) for name, e, a in session.execute(balances)]

    by_kind = [
        func.sum(case((LedgerEntry.kind == kind, Allocation.amount), else_=0)).label(kind) for kind in DEBIT_COLUMNS
    ]
    moved = (
        select(Allocation.grant_id, *by_kind)
        .join(LedgerEntry, LedgerEntry.id == Allocation.entry_id)
        .group_by(Allocation.grant_id)
        .subquery()
    )
    debits = {kind: func.coalesce(moved.c[kind], 0) for kind in DEBIT_COLUMNS}
    columns = {kind: getattr(Grant, column) for kind, column in DEBIT_COLUMNS.items()}
    granted_entry = aliased(LedgerEntry)
    rebuilt = Grant.amount - sum(debits.values())
    grants = (
        select(
            Account.public_id,
            Grant.id,
            Grant.amount,
            granted_entry.amount,
            Grant.remaining,
            rebuilt,
            *columns.values(),
            *debits.values(),
        )
        .join(granted_entry, granted_entry.id == Grant.entry_id)
        .join(Account, Account.id == Grant.account_id)
        .outerjoin(moved, moved.c.grant_id == Grant.id)
        .where(
            or_(
                Grant.amount != granted_entry.amount,
                Grant.remaining != rebuilt,
                *(columns[kind] != debits[kind] for kind in DEBIT_COLUMNS),
            )
        )
        .order_by(Grant.id)
    )
    kinds = len(DEBIT_COLUMNS)
    for owner, grant_id, amount, entry_amount, stored_remaining, rebuilt_remaining, *rest in session.execute(grants):
        if amount != entry_amount:
            drifts.append(Drift(owner, f"grant {grant_id} amount", int(entry_amount), int(amount)))
        for column, stored, from_ledger in zip(DEBIT_COLUMNS.values(), rest[:kinds], rest[kinds:], strict=True):
            if stored != from_ledger:
                drifts.append(Drift(owner, f"grant {grant_id} {column}", int(from_ledger), int(stored)))
        if stored_remaining != rebuilt_remaining:
            drifts.append(Drift(owner, f"grant {grant_id} remaining", int(rebuilt_remaining), int(stored_remaining)))
    return drifts


def _held(uow: UnitOfWork, account: Account) -> list[Grant]:
    """The account's grants with credits left, expired or not, oldest first."""
    return list(uow.session.scalars(HELD, {"account_id": account.id}))


def _under_lock(uow: UnitOfWork, account: Account, grants: Sequence[Grant]) -> list[Grant]:
    """The given grants with credits left, in their order, read again now that the account is locked (a caller
    may have read them before); each must be the account's."""
    ids = [g.id for g in grants]
    fresh = {g.id: g for g in uow.session.scalars(FRESH, {"ids": ids})}
    foreign = [g.id for g in fresh.values() if g.account_id != account.id]
    if foreign or len(fresh) != len(set(ids)):
        raise LedgerError(f"grants {foreign or ids} are not all {account.public_id}'s")
    return [fresh[i] for i in ids if fresh[i].remaining > 0]


def _split(grants: Sequence[Grant], amount: int) -> list[tuple[Grant, int]]:
    """`amount` split over `grants` in their order, each giving what it holds until the amount is made."""
    parts: list[tuple[Grant, int]] = []
    left = amount
    for source in grants:
        if left == 0:
            break
        part = min(source.remaining, left)
        parts.append((source, part))
        left -= part
    return parts


def _find(uow: UnitOfWork, key: str) -> Entry | None:
    found = uow.session.execute(BY_KEY, {"key": key}).first()
    if found is None:
        return None
    entry_id, account_id, kind, amount, idempotency_key, meta = found
    return Entry(entry_id, account_id, kind, amount, idempotency_key, meta)


def _same_operation(entry: Entry, account: Account, kind: str, amount: int | None) -> None:
    """Raise IdempotencyConflict unless `entry` is the same operation as the one asked for again."""
    if entry.account_id != account.id or entry.kind != kind or (amount is not None and entry.amount != amount):
        raise IdempotencyConflict(
            f"idempotency key {entry.idempotency_key!r} was already used for a {entry.kind} of {entry.amount}"
        )


_entries, _grants = LedgerEntry.__table__, Grant.__table__
NEW_ENTRY_UNLESS_KEY_TAKEN = {
    dialect: db.insert(dialect, _entries)
    .on_conflict_do_nothing(index_elements=["idempotency_key"])
    .returning(_entries.c.id)
    for dialect in db.DIALECTS
}
NEW_GRANT = insert(_grants).values(spent=0, expired=0, reversed=0)
NEW_ALLOCATION = insert(Allocation.__table__)
BY_KEY = select(
    _entries.c.id,
    _entries.c.account_id,
    _entries.c.kind,
    _entries.c.amount,
    _entries.c.idempotency_key,
    _entries.c.metadata,
).where(_entries.c.idempotency_key == bindparam("key"))
KEY_TAKEN = select(_entries.c.id).where(_entries.c.idempotency_key == bindparam("key"))
KEYS_TAKEN = select(_entries.c.idempotency_key).where(_entries.c.idempotency_key.in_(bindparam("keys", expanding=True)))
GRANT_BY_KEY = (
    select(Grant)
    .join(LedgerEntry, LedgerEntry.id == Grant.entry_id)
    .where(LedgerEntry.idempotency_key == bindparam("key"))
)
HELD = select(Grant).where(Grant.account_id == bindparam("account_id"), Grant.remaining > 0).order_by(Grant.id)
FRESH = select(Grant).where(Grant.id.in_(bindparam("ids", expanding=True))).execution_options(populate_existing=True)
MOVE = {
    kind: update(_grants)
    .where(_grants.c.id == bindparam("grant_id"))
    .values(
        {
            _grants.c.remaining: _grants.c.remaining - bindparam("part"),
            _grants.c[column]: _grants.c[column] + bindparam("part"),
        }
    )
    for kind, column in DEBIT_COLUMNS.items()
}
BALANCE = select(func.coalesce(func.sum(_grants.c.remaining), 0)).where(
    _grants.c.account_id == bindparam("account_id"),
    _grants.c.remaining > 0,
    or_(_grants.c.expires_at.is_(None), _grants.c.expires_at > bindparam("now")),
)
