"""Finding, creating and locking accounts. An account is named by its public id or its Stripe customer id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import bindparam, event, exists, or_, select
from sqlalchemy.orm import Session, SessionTransaction

from service import logs
from service.db import among, insert
from service.models import Account, LedgerEntry, Payment, utcnow

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
LOCK_BY_CUSTOMER = (select(Account).where(Account.stripe_customer_id == bindparam("customer")).with_for_update()
                    .execution_options(populate_existing=True))
LOCK_BY_REFS = {dialect: select(Account).where(or_(among(Account.public_id, "refs", dialect),
                                                    among(Account.stripe_customer_id, "refs", dialect)))
                .order_by(Account.id).with_for_update().execution_options(populate_existing=True)
                for dialect in ("postgresql", "sqlite")}
LOCKED = "accounts.locked"  # session.info: ids of the accounts whose rows this transaction has locked


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
    existing = find(session, ref)
    if existing is not None:
        return existing
    keyed_by_customer = ref if ref.startswith("cus_") else None
    created = session.scalar(
        insert(session, Account)
        .values(public_id=ref, stripe_customer_id=customer or keyed_by_customer, status="active", email=email,
                created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["public_id"])  # a customer linked elsewhere meanwhile: an error
        .returning(Account)
    )
    if created is None:
        return get(session, ref)
    if customer is not None:
        log.info("account.linked", account_id=ref, customer=customer)
    _locked(session).add(created.id)  # a row this transaction inserted is invisible to every other until it commits
    return created


def lock(session: Session, account: Account) -> Account:
    """Lock the account row until the transaction ends (FOR UPDATE on PostgreSQL; on SQLite the
    transaction already holds the database write lock) and return it freshly read. A row this transaction
    already locked is not read again: nobody else can have changed it since."""
    if account.id in _locked(session):
        return session.get_one(Account, account.id)
    locked = session.scalars(LOCK, {"id": account.id}).one()
    _locked(session).add(locked.id)
    return locked


def _locked(session: Session) -> set[int]:
    return session.info.setdefault(LOCKED, set())


@event.listens_for(Session, "after_transaction_end")
def _forget_locks(session: Session, transaction: SessionTransaction) -> None:
    """Row locks end with the transaction, and a savepoint rolled back releases those taken inside it: at
    either end (a savepoint released too, to keep this simple) the next `lock` reads and locks again. A flush's
    own subtransaction ends nothing in the database."""
    if transaction.parent is None or transaction.nested:
        session.info.pop(LOCKED, None)


def lock_refs(session: Session, refs: set[str]) -> dict[str, Account]:
    """The accounts named by `refs` (public ids or Stripe customer ids; a public id wins, as in `find`), all
    locked by one statement in ascending id order — the order `lock_many` uses — so a batch of spends on many
    accounts never deadlocks with another transaction. Raises AccountNotFound for the first ref nobody answers to."""
    found = session.scalars(LOCK_BY_REFS[session.get_bind().dialect.name], {"refs": sorted(refs)}).all()
    _locked(session).update(account.id for account in found)
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
    linked = _lock_by_customer(session, who.customer) if who.customer else None
    wanted, email = who.account_id, who.email
    if wanted is None and who.customer and linked is None:
        record = lookup(who.customer)
        wanted, email = record.account_id, email or record.email
    if linked is not None:
        account = _rekey(session, linked, wanted) if wanted and wanted != linked.public_id else linked
    elif wanted is None and who.customer is None:
        raise Unresolvable("the objects name no account id and no customer")
    else:
        account = get_or_create(session, wanted or who.customer, who.customer, email)  # type: ignore[arg-type]
        if who.customer and account.stripe_customer_id is None:
            account.stripe_customer_id = who.customer
            log.info("account.linked", account_id=account.public_id, customer=who.customer)
        elif who.customer and account.stripe_customer_id != who.customer:
            raise AccountConflict(
                f"account {account.public_id!r} is linked to {account.stripe_customer_id}, not {who.customer}"
            )
    if email and not account.email:
        account.email = email
    session.flush()
    return account


def _lock_by_customer(session: Session, customer: str) -> Account | None:
    """The customer's linked account, locked: every handler writes to the account it resolves, so reading it
    with the lock saves the handler's own `lock` a second read."""
    account = session.scalar(LOCK_BY_CUSTOMER, {"customer": customer})
    if account is not None:
        _locked(session).add(account.id)
    return account


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
