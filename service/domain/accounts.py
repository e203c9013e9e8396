"""Finding, creating and linking accounts. An account is named by its public id or its Stripe customer id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import bindparam, exists, or_, select

from service.infra import db, logs
from service.infra.models import Account, LedgerEntry, Payment, utcnow
from service.infra.uow import UnitOfWork

log = logs.get("accounts")


class AccountNotFound(LookupError):
    """No account answers to this id or Stripe customer id."""


class AccountConflict(Exception):
    """Stripe says two different things about who an account is; a person has to decide."""


class Unresolvable(Exception):
    """The Stripe objects name neither an account nor a customer: nothing links them to anyone, now or later,
    so the event is refused as invalid rather than retried."""


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


def find(uow: UnitOfWork, ref: str, *, lock: bool = False) -> Account | None:
    """The account whose public id or Stripe customer id is `ref`; the public id wins if both match. With
    `lock`, what answers to `ref` is locked as it is read (one statement where reading, then locking, is two)."""
    if lock:
        found = uow.lock_where(or_(Account.public_id == ref, Account.stripe_customer_id == ref))
    else:
        found = list(uow.session.scalars(BY_REF, {"ref": ref}))
    return next((a for a in found if a.public_id == ref), found[0] if found else None)


def get(uow: UnitOfWork, ref: str, *, lock: bool = False) -> Account:
    """Like find, but an unknown ref is an AccountNotFound error."""
    account = find(uow, ref, lock=lock)
    if account is None:
        raise AccountNotFound(ref)
    return account


def get_or_create(uow: UnitOfWork, ref: str, customer: str | None = None, email: str | None = None) -> Account:
    """The account named `ref`, created when new — linked to `customer` and with `email` when given. Race-free:
    INSERT … ON CONFLICT DO NOTHING, then the row whoever inserted it.

    A new ref that looks like a Stripe customer id (`cus_…`) is that customer's account, as for customers that
    carry no account id."""
    return find(uow, ref) or _create(uow, ref, customer, email)


def _create(uow: UnitOfWork, ref: str, customer: str | None, email: str | None) -> Account:
    linked = customer or (ref if ref.startswith("cus_") else None)
    created = uow.session.scalar(
        NEW[uow.dialect],
        {
            "public_id": ref,
            "stripe_customer_id": linked,
            "status": "active",
            "email": email,
            "created_at": utcnow(),
            "rollover_extensions": 0,
        },
    )
    if created is None:  # inserted meanwhile by a transaction that has committed since
        return uow.lock_one(get(uow, ref))
    if customer is not None:
        log.info("account.linked", account_id=ref, customer=customer)
    uow.hold_inserted(created)
    return created


def resolve(uow: UnitOfWork, who: Identity, lookup: CustomerLookup) -> Account:
    """The account these Stripe objects belong to, locked, created and linked to the customer as needed.

    An account id carried by the objects wins; else a customer already linked keeps its account; else the
    customer is retrieved from Stripe (`lookup`) for its `metadata.account_id`; else the customer id is the
    account id. A customer first keyed by its own id is re-keyed when an account id for it turns up.
    """
    linked, named = _locked_accounts(uow, who.customer, who.account_id)
    wanted, email = who.account_id, who.email
    if wanted is None and who.customer and linked is None:
        record = lookup(who.customer)
        wanted, email = record.account_id, email or record.email
    if linked is not None:
        account = _rekey(uow, linked, wanted) if wanted and wanted != linked.public_id else linked
    else:
        ref = wanted or who.customer
        if ref is None:
            raise Unresolvable("the objects name no account id and no customer")
        if ref == who.account_id:  # looked for, and locked when found, by `_locked_accounts`
            account = named or _create(uow, ref, who.customer, email)
        else:
            account = uow.lock_one(get_or_create(uow, ref, who.customer, email))
        if who.customer and account.stripe_customer_id is None:
            account.stripe_customer_id = who.customer
            log.info("account.linked", account_id=account.public_id, customer=who.customer)
        elif who.customer and account.stripe_customer_id != who.customer:
            raise AccountConflict(
                f"account {account.public_id!r} is linked to {account.stripe_customer_id}, not {who.customer}"
            )
    if email and not account.email:
        account.email = email
    uow.session.flush()
    return account


def _locked_accounts(uow: UnitOfWork, customer: str | None, named: str | None) -> tuple[Account | None, Account | None]:
    """The customer's linked account and the account named `named` (each None when there is none), both locked
    by one statement: every handler writes to the account it resolves. An account this transaction holds
    already is not read again (a worker batch's later events of one customer)."""
    held = uow.holding(customer) if customer else None
    if held is not None or (customer is None and named is None):
        return held, None
    criteria = [Account.stripe_customer_id == customer] if customer else []
    criteria += [Account.public_id == named] if named else []
    found = uow.lock_where(or_(*criteria))
    linked = next((a for a in found if customer and a.stripe_customer_id == customer), None)
    return linked, next((a for a in found if a.public_id == named), None)


def _rekey(uow: UnitOfWork, account: Account, wanted: str) -> Account:
    """Give an account keyed by its customer id the real account id, ledger and all.

    The ledger refers to the account's internal id, so renaming touches one row. When the real id already
    names another account, the customer moves to it only if the customer-keyed account holds nothing.
    """
    if account.public_id != account.stripe_customer_id:
        raise AccountConflict(
            f"customer {account.stripe_customer_id} belongs to account {account.public_id!r}, not {wanted!r}"
        )
    found = uow.lock_where(Account.public_id == wanted)  # locked before what follows checks it
    target = found[0] if found else None
    if target is None:
        log.info("account.rekeyed", account_id=wanted, previous=account.public_id)
        account.public_id = wanted
        return account
    if target.stripe_customer_id is None and not _holds_anything(uow, account):
        customer = account.stripe_customer_id
        uow.session.delete(account)
        uow.session.flush()
        uow.forget(account)
        target.stripe_customer_id = customer
        log.info("account.linked", account_id=target.public_id, customer=customer)
        return target
    raise AccountConflict(
        f"customer {account.stripe_customer_id} has its own ledger and account {wanted!r} exists too; merge by hand"
    )


# Built once: every event names an account, and building a statement anew costs nearly as much CPU as running it.
BY_REF = select(Account).where(
    or_(Account.public_id == bindparam("ref"), Account.stripe_customer_id == bindparam("ref"))
)
NEW = {
    dialect: db.insert(dialect, Account).on_conflict_do_nothing(index_elements=["public_id"]).returning(Account)
    for dialect in db.DIALECTS
}


def _holds_anything(uow: UnitOfWork, account: Account) -> bool:
    return bool(
        uow.session.scalar(select(exists().where(LedgerEntry.account_id == account.id)))
        or uow.session.scalar(select(exists().where(Payment.account_id == account.id)))
    )
