"""Finding, creating and locking accounts. An account is named by its public id or its Stripe customer id."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, event, exists, or_, select
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import set_committed_value

from service.infra import logs
from service.infra.db import adopt, among, dialect_insert
from service.infra.models import Account, LedgerEntry, Payment, utcnow

log = logs.get("accounts")


class AccountNotFound(LookupError):
    """No account answers to this id or Stripe customer id."""


class AccountConflict(Exception):
    """Stripe says two different things about who an account is; a person has to decide."""


class Unresolvable(Exception):
    """The Stripe objects name neither an account nor a customer (yet): retry when a later event links it."""


@dataclass(frozen=True)
class Identity:
    """What Stripe objects say about whose money this is: the customer, and the account id from
    `metadata.account_id` or Checkout's `client_reference_id` when one carries it."""

    customer: str | None = None
    account_id: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class CustomerRecord:
    """What the service reads from a Stripe customer it has not linked yet."""

    account_id: str | None
    email: str | None
    referral_code: str | None = None


CustomerLookup = Callable[[str], CustomerRecord]


# The hot statements, built once: building a statement and its cache key costs more than running it.
BY_REF = select(Account).where(or_(Account.public_id == bindparam("ref"), Account.stripe_customer_id == bindparam("ref")))
LOCK = (select(Account).where(Account.id == bindparam("id")).with_for_update()
        .execution_options(populate_existing=True))
LOCK_BY_REFS = {dialect: select(Account).where(or_(among(Account.public_id, "refs", dialect),
                                                    among(Account.stripe_customer_id, "refs", dialect)))
                .order_by(Account.id).with_for_update().execution_options(populate_existing=True)
                for dialect in ("postgresql", "sqlite")}
# The customer's linked account and the account the objects name, locked in ascending id order (Sort under LockRows).
LOCK_LINKED = (select(Account).where(or_(Account.stripe_customer_id == bindparam("customer"), Account.public_id == bindparam("named")))
               .order_by(Account.id).with_for_update().execution_options(populate_existing=True))
# A Core INSERT returning the whole row, given to the session as an Account (db.adopt): the ORM loading the
# row it returned cost twice any other statement of a first invoice's processing (bench/ingest's drain profile).
NEW = {dialect: dialect_insert(dialect, Account.__table__).on_conflict_do_nothing(index_elements=["public_id"])
       .returning(*Account.__table__.c) for dialect in ("postgresql", "sqlite")}
# SET from the parameters given: compiled once per set of columns (the compiled cache keys on them).
UPDATE = Account.__table__.update().where(Account.__table__.c.id == bindparam("account_id"))
INSERTED = "inserted"  # Hold.facts: the row was inserted by this transaction (nothing else refers to it yet)
LOCKED = "accounts.locked"  # session.info: the accounts whose rows this transaction has locked, by id (a Hold each)


@dataclass
class Hold:
    """An account row this transaction holds locked. The ORM object is kept referenced, so the session keeps it
    in its identity map and the next `lock` or `resolve` of the account reads nothing: nobody else can change
    the row until the transaction ends. `facts` is what the transaction has learnt about the account meanwhile
    (referrals.py keeps its live referral's status there), valid for as long as the lock."""

    account: Account
    facts: dict[str, Any] = field(default_factory=dict)


def find(session: Session, ref: str) -> Account | None:
    """The account whose public id or Stripe customer id is `ref`; public id wins if both match."""
    rows = session.scalars(BY_REF, {"ref": ref}).all()
    return next((a for a in rows if a.public_id == ref), rows[0] if rows else None)


def get(session: Session, ref: str) -> Account:
    """Like find, but an unknown ref is an AccountNotFound error."""
    account = find(session, ref)
    if account is None:
        raise AccountNotFound(ref)
    return account


def get_or_create(session: Session, ref: str, customer: str | None = None, email: str | None = None) -> Account:
    """The account named `ref`, created when new (race-free: INSERT … ON CONFLICT DO NOTHING), and when it is
    created, created linked to `customer` and with `email` if given (one statement, not an INSERT and an UPDATE).

    A new ref that looks like a Stripe customer id (`cus_…`) is that customer's account, as DESIGN.md
    says for customers that carry no account id.
    """
    return find(session, ref) or _create(session, ref, customer, email)


def _create(session: Session, ref: str, customer: str | None, email: str | None) -> Account:
    """`get_or_create` once `find` has found nothing: the INSERT, or the row a concurrent one inserted."""
    keyed_by_customer = ref if ref.startswith("cus_") else None
    row = session.execute(NEW[session.get_bind().dialect.name], {  # a customer linked elsewhere meanwhile: an error
        "public_id": ref, "stripe_customer_id": customer or keyed_by_customer, "status": "active", "email": email,
        "created_at": utcnow(),
    }).mappings().first()
    if row is None:
        return get(session, ref)
    created = adopt(session, Account(**row))
    if customer is not None:
        log.info("account.linked", account_id=ref, customer=customer)
    _hold(session, created).facts[INSERTED] = True  # invisible to every other transaction until this one commits
    return created


def lock(session: Session, account: Account) -> Account:
    """Lock the account row until the transaction ends (FOR UPDATE on PostgreSQL; on SQLite the
    transaction already holds the database write lock) and return it freshly read. A row this transaction
    already locked is not read again: nobody else can have changed it since."""
    held = _locked(session).get(account.id)
    if held is not None:
        return held.account
    locked = session.scalars(LOCK, {"id": account.id}).one()
    _hold(session, locked)
    return locked


def update(session: Session, account: Account, **values: Any) -> None:
    """Write the columns of `values` that differ now, with one Core UPDATE, and give them to the loaded account
    as the database's own: the same row for a fraction of a unit-of-work flush's CPU, and nothing left for
    the next flush to write. The processing path's account writes (a subscription's state, a refill's plan)."""
    changed = {name: value for name, value in values.items() if getattr(account, name) != value}
    if not changed:
        return
    session.execute(UPDATE, {"account_id": account.id, **changed})
    for name, value in changed.items():
        set_committed_value(account, name, value)


def facts(session: Session, account_id: int) -> dict[str, Any] | None:
    """What this transaction has noted about an account it holds locked (see Hold); None when it does not hold
    the account's lock, and so cannot know that a fact still holds."""
    held = _locked(session).get(account_id)
    return held.facts if held is not None else None


def expire_all_but_locked(session: Session) -> None:
    """Flush, then expire every object the session holds but the accounts it holds locked: what the next
    statements use is read afresh, as in a transaction of its own, except the rows nobody else can change."""
    session.flush()
    locked = {id(held.account) for held in _locked(session).values()}
    for instance in list(session.identity_map.values()):
        if id(instance) not in locked:
            session.expire(instance)


def _locked(session: Session) -> dict[int, Hold]:
    return session.info.setdefault(LOCKED, {})


def _hold(session: Session, account: Account) -> Hold:
    return _locked(session).setdefault(account.id, Hold(account))


@event.listens_for(Session, "after_transaction_end")
def _forget_locks(session: Session, transaction: SessionTransaction) -> None:
    """Row locks end with the transaction: the next `lock` reads and locks again. A savepoint released keeps
    its locks (they pass to the enclosing transaction), and a flush's own subtransaction ends nothing."""
    if transaction.parent is None:
        session.info.pop(LOCKED, None)


@event.listens_for(Session, "after_rollback")
def _forget_locks_rolled_back(session: Session) -> None:
    """A rollback — of a savepoint too, which releases the locks taken inside it and expires what it changed
    — forgets every lock and fact (all of them, to keep this simple): the next `lock` reads and locks again."""
    session.info.pop(LOCKED, None)


def lock_refs(session: Session, refs: set[str], found: Sequence[Account] | None = None) -> dict[str, Account]:
    """The accounts named by `refs` (public ids or Stripe customer ids; a public id wins, as in `find`), all
    locked by one statement in ascending id order — the order `lock_many` uses — so a batch of spends on many
    accounts never deadlocks with another transaction. Raises AccountNotFound for the first ref nobody answers to.
    `found`: the rows of LOCK_BY_REFS the caller ran itself, for these refs and maybe more (spends.CLAIM_AND_LOCK)."""
    if found is None:
        found = session.scalars(LOCK_BY_REFS[session.get_bind().dialect.name], {"refs": sorted(refs)}).all()
    for account in found:
        _hold(session, account)
    by_public_id = {account.public_id: account for account in found}
    by_customer = {account.stripe_customer_id: account for account in found if account.stripe_customer_id}
    named = {ref: by_public_id.get(ref) or by_customer.get(ref) for ref in refs}
    missing = sorted(ref for ref, account in named.items() if account is None)
    if missing:
        raise AccountNotFound(missing[0])
    return named  # type: ignore[return-value]


def lock_many(session: Session, accounts: list[Account]) -> list[Account]:
    """Lock several accounts in ascending id order, the one order every caller uses, so two
    transactions locking overlapping sets never deadlock."""
    return [lock(session, a) for a in sorted(accounts, key=lambda a: a.id)]


def resolve(session: Session, who: Identity, lookup: CustomerLookup) -> Account:
    """The account these Stripe objects belong to, created and linked to the customer as needed.

    An account id carried by the objects wins; else a customer already linked keeps its account; else the
    customer is retrieved from Stripe (`lookup`) for its `metadata.account_id`; else the customer id is the
    account id. A customer first keyed by its own id is re-keyed when an account id for it turns up.
    """
    linked, named = _lock_linked(session, who.customer, who.account_id)
    wanted, email = who.account_id, who.email
    if wanted is None and who.customer and linked is None:
        record = lookup(who.customer)
        wanted, email = record.account_id, email or record.email
    if linked is not None:
        account = _rekey(session, linked, wanted) if wanted and wanted != linked.public_id else linked
    elif wanted is None and who.customer is None:
        raise Unresolvable("the objects name no account id and no customer")
    else:
        ref: str = wanted or who.customer  # type: ignore[assignment]
        if ref == who.account_id:  # looked for already, by `_lock_linked`
            account = named or _create(session, ref, who.customer, email)
        else:
            account = get_or_create(session, ref, who.customer, email)
        if who.customer and account.stripe_customer_id is None:
            update(session, account, stripe_customer_id=who.customer)
            log.info("account.linked", account_id=account.public_id, customer=who.customer)
        elif who.customer and account.stripe_customer_id != who.customer:
            raise AccountConflict(
                f"account {account.public_id!r} is linked to {account.stripe_customer_id}, not {who.customer}"
            )
    if email and not account.email:
        update(session, account, email=email)
    session.flush()
    return account


def _lock_linked(session: Session, customer: str | None, named: str | None) -> tuple[Account | None, Account | None]:
    """The customer's linked account and the account named `named` (each None when there is none), both read
    with their locks by one statement: every handler writes to the account it resolves, so reading it locked
    saves the handler's own `lock` a second read. An account this transaction already holds linked to the
    customer is not read again (a worker lane's later events: one customer's, in one transaction)."""
    held = next((h.account for h in _locked(session).values() if customer and h.account.stripe_customer_id == customer), None)
    if held is not None or (customer is None and named is None):
        return held, None
    found = session.scalars(LOCK_LINKED, {"customer": customer, "named": named}).all()
    for account in found:
        _hold(session, account)
    linked = next((a for a in found if customer and a.stripe_customer_id == customer), None)
    return linked, next((a for a in found if a.public_id == named), None)


def _rekey(session: Session, account: Account, wanted: str) -> Account:
    """Give an account keyed by its customer id the real account id, ledger and all.

    The ledger refers to the account's internal id, so renaming touches one row. When the real id already
    names another account, the customer moves to it only if the customer-keyed account holds nothing.
    """
    if account.public_id != account.stripe_customer_id:
        raise AccountConflict(
            f"customer {account.stripe_customer_id} belongs to account {account.public_id!r}, not {wanted!r}"
        )
    target = session.scalar(select(Account).where(Account.public_id == wanted))
    if target is None:
        log.info("account.rekeyed", account_id=wanted, previous=account.public_id)
        account.public_id = wanted
        return account
    if target.stripe_customer_id is None and not _holds_anything(session, account):
        customer = account.stripe_customer_id
        session.delete(account)
        session.flush()
        _locked(session).pop(account.id, None)
        target.stripe_customer_id = customer
        log.info("account.linked", account_id=target.public_id, customer=customer)
        return target
    raise AccountConflict(
        f"customer {account.stripe_customer_id} has its own ledger and account {wanted!r} exists too; merge by hand"
    )


def _holds_anything(session: Session, account: Account) -> bool:
    return bool(
        session.scalar(select(exists().where(LedgerEntry.account_id == account.id)))
        or session.scalar(select(exists().where(Payment.account_id == account.id)))
    )
