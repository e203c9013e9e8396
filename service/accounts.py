"""Finding, creating and locking accounts. An account is named by its public id or its Stripe customer id."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.db import insert
from service.models import Account, utcnow


class AccountNotFound(LookupError):
    """No account answers to this id or Stripe customer id."""


def find(session: Session, ref: str) -> Account | None:
    """The account whose public id or Stripe customer id is `ref`; public id wins if both match."""
    rows = session.scalars(
        select(Account).where(or_(Account.public_id == ref, Account.stripe_customer_id == ref))
    ).all()
    return next((a for a in rows if a.public_id == ref), rows[0] if rows else None)


def get(session: Session, ref: str) -> Account:
    """Like find, but an unknown ref is an AccountNotFound error."""
    account = find(session, ref)
    if account is None:
        raise AccountNotFound(ref)
    return account


def get_or_create(session: Session, ref: str) -> Account:
    """The account named `ref`, created when new (race-free: INSERT … ON CONFLICT DO NOTHING).

    A new ref that looks like a Stripe customer id (`cus_…`) is that customer's account, as DESIGN.md
    says for customers that carry no account id.
    """
    existing = find(session, ref)
    if existing is not None:
        return existing
    customer = ref if ref.startswith("cus_") else None
    session.execute(
        insert(session, Account)
        .values(public_id=ref, stripe_customer_id=customer, status="active", created_at=utcnow())
        .on_conflict_do_nothing()
    )
    return get(session, ref)


def lock(session: Session, account: Account) -> Account:
    """Lock the account row until the transaction ends (FOR UPDATE on PostgreSQL; on SQLite the
    transaction already holds the database write lock) and return it freshly read."""
    locked = session.scalars(
        select(Account).where(Account.id == account.id).with_for_update().execution_options(populate_existing=True)
    ).one()
    return locked


def lock_many(session: Session, accounts: list[Account]) -> list[Account]:
    """Lock several accounts in ascending id order, the one order every caller uses, so two
    transactions locking overlapping sets never deadlock."""
    return [lock(session, a) for a in sorted(accounts, key=lambda a: a.id)]
