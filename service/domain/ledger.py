"""The credit ledger: grant, spend, expire, reverse and balance, each idempotent by key.

Every write locks the account row first, so the check ("is there enough?") and the write that depends on
it can never interleave with another transaction's. Every entry carries a UNIQUE idempotency key: the
same key again returns the first entry and writes nothing; the same key for something else is a conflict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Select, and_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from service.domain import accounts, periods

from service.infra import logs, metrics
from service.infra.db import Bulk, adopt, dialect_insert, is_postgresql, json_rows, listed, recordset, table_columns
from service.infra.models import Account, Allocation, Grant, LedgerEntry, utcnow

# The grant column each kind of debit moves credits into.
DEBIT_COLUMNS = {"spend": "spent", "expire": "expired", "reverse": "reversed"}
log = logs.get("ledger")
NEVER = datetime.max.replace(tzinfo=utcnow().tzinfo)
KEYS = "ledger keys"  # accounts.facts: the idempotency keys this transaction has posted or found for the account

# The spend path's statements, built once: building a statement and its cache key costs more than running it.
HELD_WHERE = and_(Grant.account_id == bindparam("account_id"), Grant.remaining > 0)  # oldest first
HELD = select(Grant).where(HELD_WHERE).order_by(Grant.id)
BY_KEY = select(LedgerEntry).where(LedgerEntry.idempotency_key == bindparam("key"))
_allocations, _grants = Allocation.__table__, Grant.__table__.c
_ALLOCATION_COLUMNS = ("entry_id", "grant_id", "amount")
ALLOCATE = Bulk(insert(_allocations).from_select(
    _ALLOCATION_COLUMNS, select(*recordset(**table_columns(_allocations, *_ALLOCATION_COLUMNS)).c)), _allocations.insert())


def _move(into: str) -> Bulk:
    """Move parts of grants' remainders into their column `into` (spent, expired, reversed): rows of
    (grant_id, part)."""
    rows = recordset(grant_id=BigInteger(), part=BigInteger())
    target = _grants[into]
    return Bulk(
        update(Grant.__table__).where(_grants.id == rows.c.grant_id, listed(_grants.id, "grant_id"))
        .values({_grants.remaining: _grants.remaining - rows.c.part, target: target + rows.c.part}),
        update(Grant.__table__).where(_grants.id == bindparam("grant_id"))
        .values({_grants.remaining: _grants.remaining - bindparam("part"), target: target + bindparam("part")}))


MOVE = {kind: _move(into) for kind, into in DEBIT_COLUMNS.items()}


class LedgerError(Exception):
    """A ledger operation that cannot be done as asked."""


class InsufficientCredits(LedgerError):
    """The spend would take the balance below zero; nothing was written."""

    def __init__(self, balance: int, requested: int) -> None:
        super().__init__(f"balance {balance} is less than {requested}")
        self.balance = balance
        self.requested = requested


class IdempotencyConflict(LedgerError):
    """The key was already used for a different operation."""


@dataclass
class Debit:
    """A debit decided in memory under its account's lock — the grants it takes from already show it — and
    written with the others of its batch by `write_debits`, which fills in `entry_id`."""

    account: Account
    kind: str
    parts: list[tuple[Grant, int]]
    key: str
    reason: str | None
    actor: str | None
    meta: dict[str, Any]
    now: datetime
    entry_id: int | None = None


@dataclass(frozen=True)
class Posted:
    """A ledger entry and whether this call wrote it (False: an earlier call with the same key did)."""

    entry: LedgerEntry
    created: bool


def balance(session: Session, account: Account, now: datetime | None = None) -> int:
    """Credits the account can spend now: the unexpired remainder of its grants."""
    return sum(g.remaining for g in open_grants(session, account, now))


def open_grants(session: Session, account: Account, now: datetime | None = None) -> list[Grant]:
    """Unexpired grants with credits left, in the order spends consume them (soonest-expiring first)."""
    now = now or utcnow()
    return spending_order(_held(session, account), account, now)


def spendable(session: Session, account: Account, now: datetime, held: Sequence[Grant] | None = None) -> list[Grant]:
    """Expire what is due, then the open grants in spending order, from one read of the account's grants
    (expire_due then open_grants would read them twice). For a caller that holds the account's lock, and
    may pass what it read of HELD_WHERE's grants itself (spending.spend reads them with its own checks)."""
    held = _held(session, account) if held is None else held
    _expire(session, account, held, now)
    return spending_order(held, account, now)


def _held(session: Session, account: Account) -> Sequence[Grant]:
    """The account's grants with credits left, expired or not, oldest first."""
    return session.scalars(HELD, {"account_id": account.id}).all()


def spending_order(grants: Iterable[Grant], account: Account, now: datetime) -> list[Grant]:
    """The unexpired grants with credits left, in the order spends consume them."""
    live = [g for g in grants if g.remaining > 0 and (g.expires_at is None or g.expires_at > now)]
    return sorted(live, key=lambda g: (spend_deadline(g, account, now), g.id))


def spend_deadline(grant: Grant, account: Account, now: datetime) -> datetime:
    """When a grant's credits stop being spendable, for ordering spends.

    Credits under a rollover policy may be cut at the next renewal, so they count as expiring at the end
    of the current period (the subscription's, else the calendar month) even without an `expires_at`.
    """
    deadline = grant.expires_at or NEVER
    if grant.rollover:
        deadline = min(deadline, periods.current_end(account, now))
    return deadline


def grant(
    session: Session,
    account: Account,
    amount: int,
    *,
    source: str,
    key: str,
    reason: str | None = None,
    actor: str | None = None,
    expires_at: datetime | None = None,
    rollover: bool = False,
    meta: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Posted:
    """Give `amount` credits to the account, once per `key`."""
    if amount <= 0:
        raise LedgerError("a grant must be positive")
    now = now or utcnow()
    accounts.lock(session, account)
    posted = _post(session, account, "grant", amount, key, reason, actor, {"source": source, **(meta or {})}, now,
                   grant={"source": source, "expires_at": expires_at, "rollover": rollover})
    _known_keys(session, account).add(key)
    if posted.created:
        metrics.count_credits(session, "grant", source, amount)
    return posted


def granted(session: Session, account: Account, key: str) -> bool:
    """Whether an entry holds `key` already. Without a read when this transaction, holding the account's lock,
    has posted or found the key before: an entry is never removed, so it is there until the transaction ends
    (a worker lane's duplicates: `invoice.payment_succeeded` after `invoice.paid`, `payment_intent.succeeded`
    after the pack's Checkout)."""
    known = _known_keys(session, account)
    if key not in known and session.execute(KEY_TAKEN, {"key": key}).first() is not None:
        known.add(key)
    return key in known


def holds_no_grant(session: Session, account: Account) -> bool:
    """True when the account is known, without a read, to hold no grant at all: this transaction inserted it
    and has granted it nothing (every grant is made by `grant`, which notes its key)."""
    facts = accounts.facts(session, account.id)
    return facts is not None and facts.get(accounts.INSERTED, False) and not facts.get(KEYS)


def _known_keys(session: Session, account: Account) -> set[str]:
    """The keys `granted` knows to be taken, noted with the account's lock (a throwaway set without it)."""
    facts = accounts.facts(session, account.id)
    return facts.setdefault(KEYS, set()) if facts is not None else set()


def spend(
    session: Session,
    account: Account,
    amount: int,
    *,
    key: str,
    reason: str | None = None,
    actor: str | None = None,
    meta: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Posted:
    """Consume `amount` credits, soonest-expiring first, once per `key`; never below zero."""
    if amount <= 0:
        raise LedgerError("a spend must be positive")
    now = now or utcnow()
    account = accounts.lock(session, account)
    earlier = _find(session, key, account, "spend", -amount)
    if earlier is not None:
        return Posted(earlier, created=False)
    return consume(session, account, spendable(session, account, now), amount, key=key, reason=reason, actor=actor,
                   meta=meta, now=now)


def consume(
    session: Session,
    account: Account,
    grants: list[Grant],
    amount: int,
    *,
    key: str,
    reason: str | None = None,
    actor: str | None = None,
    meta: dict[str, Any] | None = None,
    now: datetime,
) -> Posted:
    """The write half of `spend`: take `amount` from `grants` (what `spendable` returned), never below zero.
    For a caller that already holds the account's lock and has looked for `key` — spending.spend, which
    reads the grants once for its own checks too (the key's UNIQUE constraint still holds either way)."""
    if amount <= 0:
        raise LedgerError("a spend must be positive")
    available = sum(g.remaining for g in grants)
    if available < amount:
        raise InsufficientCredits(available, amount)
    return _debit(session, account, "spend", _take(grants, amount), key, reason, actor, meta or {}, now)


def expire_due(session: Session, account: Account, now: datetime | None = None) -> list[LedgerEntry]:
    """Expire what is left of every grant whose `expires_at` has passed (one entry per grant)."""
    now = now or utcnow()
    return _expire(session, account, _held(session, account), now)


def _expire(session: Session, account: Account, grants: Iterable[Grant], now: datetime) -> list[LedgerEntry]:
    """Expire the remainder of each of `grants` whose `expires_at` has passed."""
    return [
        expire(session, account, g, g.remaining, key=f"expire:grant:{g.id}", reason="expired", now=now).entry
        for g in grants
        if g.expires_at is not None and g.expires_at <= now
    ]


def expire(
    session: Session,
    account: Account,
    grant_row: Grant,
    amount: int,
    *,
    key: str,
    reason: str,
    meta: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Posted:
    """Expire `amount` of one grant's remainder (whole expiry, or the part a rollover cap cuts)."""
    accounts.lock(session, account)
    earlier = _find(session, key, account, "expire", -amount)
    if earlier is not None:
        return Posted(earlier, created=False)
    if not 0 < amount <= grant_row.remaining:
        raise LedgerError(f"cannot expire {amount} of grant {grant_row.id} holding {grant_row.remaining}")
    return _debit(session, account, "expire", [(grant_row, amount)], key, reason, "system", meta or {}, now or utcnow())


def reverse(
    session: Session,
    account: Account,
    grants: Iterable[Grant],
    amount: int,
    *,
    key: str,
    reason: str,
    actor: str | None = None,
    meta: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Posted:
    """Take back up to `amount` unspent credits from `grants` (a refund, a lost dispute, a clawback).

    Credits already spent cannot be taken back: the part that could not be reversed is recorded in the
    entry's metadata as `shortfall`, so reconciliation can report it. The entry is written even when
    nothing could be taken, so the shortfall is on record and a retry changes nothing.
    """
    if amount <= 0:
        raise LedgerError("a reversal must be positive")
    account = accounts.lock(session, account)
    earlier = session.scalar(select(LedgerEntry).where(LedgerEntry.idempotency_key == key))
    if earlier is not None:
        _same_operation(earlier, account, "reverse", None)
        return Posted(earlier, created=False)
    ordered = sorted((g for g in grants if g.remaining > 0), key=lambda g: g.id)
    take = _take(ordered, min(amount, sum(g.remaining for g in ordered)))
    taken = sum(part for _, part in take)
    info = {"requested": amount, "shortfall": amount - taken, **(meta or {})}
    return _debit(session, account, "reverse", take, key, reason, actor, info, now or utcnow())


def take(account: Account, kind: str, grants: list[Grant], amount: int, *, key: str, reason: str | None,
         actor: str | None, meta: dict[str, Any], now: datetime) -> Debit:
    """Take `amount` from `grants` in their order, in memory (the caller checked there is enough and holds
    the account's lock): a Debit for `write_debits`. A batch of spends decides each spend this way against
    what the ones before it left, and writes them all at once."""
    parts = _take(grants, amount)
    _moved(kind, parts)
    return Debit(account, kind, parts, key, reason, actor, meta, now)


def write_debits(session: Session, debits: list[Debit]) -> None:
    """Write decided debits: their entries (their keys are new: each was looked for under its account's lock,
    and the UNIQUE constraint still holds), their allocations and the grants' updates. On PostgreSQL that is
    one statement (DEBITS), which a batch of spends sends once; on SQLite, in-process, three."""
    if not debits:
        return
    rows = [{"account_id": d.account.id, "kind": d.kind, "amount": -sum(part for _, part in d.parts),
             "idempotency_key": d.key, "reason": d.reason, "actor": d.actor, "metadata": d.meta, "created_at": d.now}
            for d in debits]
    together = is_postgresql(session)
    ids = _debits_at_once(session, debits, rows) if together else dict(session.execute(NEW_ENTRIES, rows).all())
    for debit, row in zip(debits, rows):
        debit.entry_id = ids[debit.key]
        log.info("ledger.posted", kind=debit.kind, amount=row["amount"], idempotency_key=debit.key,
                 account_id=debit.account.public_id)
    if not together:
        _write_moves(session, [(d.entry_id, d.kind, d.parts) for d in debits])  # type: ignore[misc]


def _debits_at_once(session: Session, debits: list[Debit], rows: list[dict[str, Any]]) -> dict[str, int]:
    """PostgreSQL: the debits' entries (`rows`), allocations and grant updates as one DEBITS statement; each new
    entry's id by its key."""
    parts = [{"key": d.key, "grant_id": g.id, "amount": part} for d in debits for g, part in d.parts]
    moved: dict[int, dict[str, int]] = {}
    for (kind, grant_id), part in _totals(session, [(d.key, d.kind, d.parts) for d in debits]).items():
        moved.setdefault(grant_id, dict.fromkeys(DEBIT_COLUMNS.values(), 0))[DEBIT_COLUMNS[kind]] += part
    moves = [{"grant_id": grant_id, **columns} for grant_id, columns in moved.items()]
    return dict(session.execute(DEBITS, {"entries": json_rows(rows), "parts": json_rows(parts),
                                         "moves": json_rows(moves)}).all())


def _take(grants: list[Grant], amount: int) -> list[tuple[Grant, int]]:
    """Split `amount` over `grants` in their order."""
    parts: list[tuple[Grant, int]] = []
    left = amount
    for g in grants:
        if left == 0:
            break
        part = min(g.remaining, left)
        parts.append((g, part))
        left -= part
    return parts


def _debit(
    session: Session,
    account: Account,
    kind: str,
    parts: list[tuple[Grant, int]],
    key: str,
    reason: str | None,
    actor: str | None,
    meta: dict[str, Any],
    now: datetime,
) -> Posted:
    """Write one debit entry, its allocations, and move the credits out of each grant's remainder."""
    total = sum(part for _, part in parts)
    posted = _post(session, account, kind, -total, key, reason, actor, meta, now)
    if posted.created and parts:
        _moved(kind, parts)
        _write_moves(session, [(posted.entry.id, kind, parts)])
    return posted


def _moved(kind: str, parts: list[tuple[Grant, int]]) -> None:
    """Tell the loaded grants their new values as the database's own (the writes are Core statements, not
    the unit of work: the same rows for a fraction of the CPU), so they read right without a flush or a reload."""
    column = DEBIT_COLUMNS[kind]
    for g, part in parts:
        set_committed_value(g, "remaining", g.remaining - part)
        set_committed_value(g, column, getattr(g, column) + part)


def _write_moves(session: Session, moves: list[tuple[int, str, list[tuple[Grant, int]]]]) -> None:
    """The allocations of each (entry id, kind, parts), and each grant's remainder moved into the kind's column
    once for all the parts that take from it (a batch of spends on one account updates its grant once)."""
    ALLOCATE.execute(session, [{"entry_id": entry_id, "grant_id": g.id, "amount": part}
                               for entry_id, _, parts in moves for g, part in parts])
    totals = _totals(session, moves)
    for kind in DEBIT_COLUMNS:
        updates = [{"grant_id": grant_id, "part": part} for (moved, grant_id), part in totals.items() if moved == kind]
        if updates:
            MOVE[kind].execute(session, updates)


def _totals(session: Session, moves: Sequence[tuple[Any, str, list[tuple[Grant, int]]]]) -> dict[tuple[str, int], int]:
    """What the moves take from each grant, by (kind, grant id); each part counted in the credit metrics."""
    totals: dict[tuple[str, int], int] = {}
    for _, kind, parts in moves:
        for g, part in parts:
            metrics.count_credits(session, kind, g.source, part)
            totals[kind, g.id] = totals.get((kind, g.id), 0) + part
    return totals


def _post(
    session: Session,
    account: Account,
    kind: str,
    amount: int,
    key: str,
    reason: str | None,
    actor: str | None,
    meta: dict[str, Any],
    now: datetime,
    *,
    grant: dict[str, Any] | None = None,
) -> Posted:
    """Insert the entry unless its key exists (ON CONFLICT DO NOTHING), then read back what holds the key;
    with `grant` (its source, expires_at and rollover), the entry's credit grant of `amount` too.

    The INSERT is a Core statement returning the new id, and the entry is then given to the session as the
    row it wrote (every column is known): the ORM loading the row it returned costs several times the CPU.
    On PostgreSQL a grant's entry and its grant row are one statement (ENTRY_AND_GRANT): every refill, pack
    and referral payout posts one, and a statement costs the worker ~85 µs of CPU in SQLAlchemy alone
    (bench/README.md, end to end)."""
    row = {"account_id": account.id, "kind": kind, "amount": amount, "idempotency_key": key, "reason": reason,
           "actor": actor, "created_at": now}
    dialect = session.get_bind().dialect.name
    together = grant is not None and dialect == "postgresql"
    statement = ENTRY_AND_GRANT if together else NEW_ENTRY[dialect]
    created_id = session.execute(statement, {**row, "metadata": meta, **(grant if together else {})}).scalar()
    if created_id is None:
        earlier = session.scalars(BY_KEY, {"key": key}).one()
        _same_operation(earlier, account, kind, amount)
        return Posted(earlier, created=False)
    if grant is not None and not together:
        session.execute(NEW_GRANT, {**row, **grant, "entry_id": created_id, "remaining": amount, "spent": 0,
                                    "expired": 0, "reversed": 0})
    log.info("ledger.posted", kind=kind, amount=amount, idempotency_key=key, account_id=account.public_id)
    return Posted(adopt(session, LedgerEntry(id=created_id, meta=meta, **row)), created=True)


def _new_entry(dialect: str) -> Any:
    """INSERT … ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, for the dialect: a Core statement
    (compiled once, unlike an ORM bulk INSERT's per-call values)."""
    table = LedgerEntry.__table__
    return dialect_insert(dialect, table).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(table.c.id)


# Built once (every grant and debit posts an entry): building a statement and its cache key costs more than
# running it. The grant row is a Core INSERT, not an ORM object flushed: a later query loads it when asked.
NEW_ENTRY = {dialect: _new_entry(dialect) for dialect in ("postgresql", "sqlite")}
NEW_GRANT = Grant.__table__.insert()
# PostgreSQL: NEW_ENTRY and, when it inserted the entry, NEW_GRANT for it, in one round trip; nothing when the
# key was taken (the grant came with the entry that holds it). Returns the new entry's id.
ENTRY_AND_GRANT = text("""
WITH entry AS (
    INSERT INTO ledger_entries (account_id, kind, amount, idempotency_key, reason, actor, metadata, created_at)
    VALUES (:account_id, :kind, :amount, :idempotency_key, :reason, :actor, :metadata, :created_at)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
)
INSERT INTO credit_grants (account_id, entry_id, source, amount, remaining, spent, expired, reversed, expires_at,
                           rollover, created_at)
SELECT CAST(:account_id AS bigint), id, CAST(:source AS varchar), CAST(:amount AS bigint), CAST(:amount AS bigint),
       0, 0, 0, CAST(:expires_at AS timestamptz), CAST(:rollover AS boolean), CAST(:created_at AS timestamptz)
FROM entry
RETURNING entry_id""").bindparams(bindparam("metadata", type_=JSONB), bindparam("created_at", type_=DateTime(timezone=True)),
                                  bindparam("expires_at", type_=DateTime(timezone=True)))
_entries = LedgerEntry.__table__
NEW_ENTRIES = _entries.insert().returning(_entries.c.idempotency_key, _entries.c.id)  # SQLite: a batch's debits
# PostgreSQL: a batch's debits in one round trip — their entries (no ON CONFLICT: the keys are new), their
# allocations (each part names its entry by key) and the grants' remainders moved into spent, expired or
# reversed; each parameter one JSON array. Returns each new entry's key and id. The grants are looked up by
# the list of their ids (see db.listed: joined to the recordset alone the planner scans the whole table).
DEBITS = text("""
WITH entry AS (
    INSERT INTO ledger_entries (account_id, kind, amount, idempotency_key, reason, actor, metadata, created_at)
    SELECT account_id, kind, amount, idempotency_key, reason, actor, metadata, created_at
    FROM jsonb_to_recordset(CAST(:entries AS jsonb)) AS e(account_id bigint, kind text, amount bigint,
        idempotency_key text, reason text, actor text, metadata jsonb, created_at timestamptz)
    RETURNING idempotency_key, id
), allocation AS (
    INSERT INTO ledger_allocations (entry_id, grant_id, amount)
    SELECT entry.id, CAST(p.part->>'grant_id' AS bigint), CAST(p.part->>'amount' AS bigint)
    FROM jsonb_array_elements(CAST(:parts AS jsonb)) WITH ORDINALITY AS p(part, n)
    JOIN entry ON entry.idempotency_key = p.part->>'key'
    ORDER BY p.n
), moved AS (
    UPDATE credit_grants AS g
    SET remaining = g.remaining - m.spent - m.expired - m.reversed,
        spent = g.spent + m.spent, expired = g.expired + m.expired, reversed = g.reversed + m.reversed
    FROM jsonb_to_recordset(CAST(:moves AS jsonb)) AS m(grant_id bigint, spent bigint, expired bigint, reversed bigint)
    WHERE g.id = m.grant_id
      AND g.id = ANY(ARRAY(SELECT CAST(value->>'grant_id' AS bigint) FROM jsonb_array_elements(CAST(:moves AS jsonb))))
)
SELECT idempotency_key, id FROM entry""")
KEY_TAKEN = select(LedgerEntry.__table__.c.id).where(LedgerEntry.__table__.c.idempotency_key == bindparam("key"))


def _find(session: Session, key: str, account: Account, kind: str, amount: int) -> LedgerEntry | None:
    """The entry already holding `key`, checked to be the same operation; None when the key is new."""
    earlier = session.scalar(BY_KEY, {"key": key})
    if earlier is not None:
        _same_operation(earlier, account, kind, amount)
    return earlier


def _same_operation(entry: LedgerEntry, account: Account, kind: str, amount: int | None) -> None:
    """Raise IdempotencyConflict unless `entry` is the same operation as the one asked for again."""
    if entry.account_id != account.id or entry.kind != kind or (amount is not None and entry.amount != amount):
        raise IdempotencyConflict(
            f"idempotency key {entry.idempotency_key!r} was already used for a {entry.kind} of {entry.amount}"
        )


@dataclass(frozen=True)
class Drift:
    """A place where stored state disagrees with what the ledger says it should be."""

    account: str
    what: str
    expected: int
    actual: int


def check(session: Session) -> list[Drift]:
    """Recompute every balance and grant from the ledger; return every disagreement (empty: all good).

    Per account, the sum of entries equals the sum of grant remainders (grants whose expiry has passed but
    not yet been swept still count: the ledger has not yet said they expired). Per grant, its amount
    equals its grant entry, and spent/expired/reversed equal its allocations by kind.

    The sums and the comparisons run in the database (GROUP BY, then only the rows that disagree come back):
    holding a name and sums per account and a total per grant and kind in the process made `credits
    reconcile`'s memory grow with the whole ledger (bench/reconcile).
    """
    entries = select(LedgerEntry.account_id, func.sum(LedgerEntry.amount).label("total")).group_by(LedgerEntry.account_id).subquery()
    remaining = select(Grant.account_id, func.sum(Grant.remaining).label("total")).group_by(Grant.account_id).subquery()
    expected, actual = func.coalesce(entries.c.total, 0), func.coalesce(remaining.c.total, 0)
    balances = (select(Account.public_id, expected, actual)
                .outerjoin(entries, entries.c.account_id == Account.id)
                .outerjoin(remaining, remaining.c.account_id == Account.id)
                .where(expected != actual).order_by(Account.id))
    drifts = [Drift(name, "balance", int(e), int(a)) for name, e, a in session.execute(balances)]

    moved = (select(Allocation.grant_id, *(func.sum(case((LedgerEntry.kind == kind, Allocation.amount), else_=0)).label(kind)
                                           for kind in DEBIT_COLUMNS))
             .join(LedgerEntry, LedgerEntry.id == Allocation.entry_id).group_by(Allocation.grant_id).subquery())
    debits = {kind: func.coalesce(moved.c[kind], 0) for kind in DEBIT_COLUMNS}
    columns = {kind: getattr(Grant, column) for kind, column in DEBIT_COLUMNS.items()}
    granted = aliased(LedgerEntry)
    rebuilt = Grant.amount - sum(debits.values())
    grants = (select(Account.public_id, Grant.id, Grant.amount, granted.amount, Grant.remaining, rebuilt,
                     *columns.values(), *debits.values())
              .join(granted, granted.id == Grant.entry_id).join(Account, Account.id == Grant.account_id)
              .outerjoin(moved, moved.c.grant_id == Grant.id)
              .where(or_(Grant.amount != granted.amount, Grant.remaining != rebuilt,
                         *(columns[kind] != debits[kind] for kind in DEBIT_COLUMNS)))
              .order_by(Grant.id))
    kinds = len(DEBIT_COLUMNS)
    for owner, grant_id, amount, entry_amount, stored_remaining, rebuilt_remaining, *rest in session.execute(grants):
        if amount != entry_amount:
            drifts.append(Drift(owner, f"grant {grant_id} amount", int(entry_amount), int(amount)))
        for column, stored, from_ledger in zip(DEBIT_COLUMNS.values(), rest[:kinds], rest[kinds:]):
            if stored != from_ledger:
                drifts.append(Drift(owner, f"grant {grant_id} {column}", int(from_ledger), int(stored)))
        if stored_remaining != rebuilt_remaining:
            drifts.append(Drift(owner, f"grant {grant_id} remaining", int(rebuilt_remaining), int(stored_remaining)))
    return drifts


def history(session: Session, account: Account, limit: int, before_id: int | None = None) -> list[LedgerEntry]:
    """The account's entries, newest first, at most `limit`, older than entry `before_id` when given."""
    query = select(LedgerEntry).where(LedgerEntry.account_id == account.id)
    if before_id is not None:
        query = query.where(LedgerEntry.id < before_id)
    return list(session.scalars(query.order_by(LedgerEntry.id.desc()).limit(limit)))


def grant_of(entry: LedgerEntry) -> Select[tuple[Grant]]:
    """The grant a grant entry created."""
    return select(Grant).where(Grant.entry_id == entry.id)
