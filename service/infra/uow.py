"""The unit of work: one transaction, opened by an entry point and handed to the domain.

An HTTP request, a CLI command, a worker batch or a job opens one (`with rt.uow() as uow:`), passes it to the
domain functions it calls and says `uow.commit()` when all of it is done; leaving the block without committing
rolls everything back. Domain modules never commit and never open a transaction of their own.

It also knows which account rows the transaction holds locked. An account is locked before any check whose
answer a concurrent writer could change (is there enough? was this key used?); several accounts locked
together are locked in ascending id order, so two transactions never wait for each other in a cycle over
them. A row already locked is not read again: nobody else can change it until this transaction ends.
Processing Stripe events also takes a lock per customer, so one customer's events are handled by one
transaction at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from sqlalchemy import ColumnElement, Table, select
from sqlalchemy.orm import Session, sessionmaker

from service.infra import db, metrics
from service.infra.models import Account


class UnitOfWork:
    """A transaction, the account rows it holds locked and the credits it moved (counted once it commits)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def __enter__(self) -> UnitOfWork:
        self.session = self._sessions()
        self.dialect = self.session.get_bind().dialect.name
        self._locked: dict[int, Account] = {}
        self._moved: list[tuple[str, str, int]] = []
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.session.close()  # rolls back whatever was not committed; what was read stays readable

    def commit(self) -> None:
        """Make everything done so far durable. The row locks end here; the credits moved are counted."""
        self.session.commit()
        self._locked.clear()
        for kind, source, amount in self._moved:
            metrics.CREDITS.labels(kind, source).inc(amount)
        self._moved.clear()

    def lock(self, *accounts: Account) -> list[Account]:
        """Lock these accounts' rows until the transaction ends, in ascending id order, and return them freshly
        read (in that order)."""
        wanted = sorted({account.id for account in accounts})
        missing = [account_id for account_id in wanted if account_id not in self._locked]
        if missing:
            self.lock_where(Account.id.in_(missing))
        return [self._locked[account_id] for account_id in wanted]

    def lock_one(self, account: Account) -> Account:
        """`lock` for one account."""
        return self.lock(account)[0]

    def lock_where(self, *criteria: ColumnElement[bool]) -> list[Account]:
        """Lock the accounts that meet `criteria` (FOR UPDATE, in ascending id order) and return them."""
        query = select(Account).where(*criteria).order_by(Account.id).with_for_update()
        found = list(self.session.scalars(query.execution_options(populate_existing=True)))
        self._locked.update((account.id, account) for account in found)
        return found

    def wait_for_customer(self, customer: str) -> None:
        """Take the customer's lock for the rest of the transaction (see `db.customer_free`), waiting for the
        transaction that holds it."""
        db.wait_for_customer(self.session, customer)

    def hold_inserted(self, account: Account) -> None:
        """An account row this transaction inserted: no other can see it until this one commits, so it is held
        as if locked without a statement."""
        self._locked[account.id] = account

    def holding(self, customer: str) -> Account | None:
        """The locked account linked to this Stripe customer, if this transaction holds it."""
        return next((a for a in self._locked.values() if a.stripe_customer_id == customer), None)

    def forget(self, account: Account) -> None:
        """The account's row is gone (merged into another): nothing to remember of it."""
        self._locked.pop(account.id, None)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the transaction that can fail alone: on an error it is undone, the error is raised, and
        the rest of the transaction goes on. Locks taken inside it end with it, so none is remembered then (the
        accounts are locked and read again when next needed), and the credits it moved are not counted."""
        moved = len(self._moved)
        try:
            with self.session.begin_nested():
                yield
        except Exception:
            self._locked.clear()
            del self._moved[moved:]
            raise

    def moved(self, kind: str, source: str, amount: int) -> None:
        """Count credits granted or debited by this transaction, published when it commits."""
        self._moved.append((kind, source, amount))

    def insert(self, table: type[Any] | Table) -> db.Insert:
        """INSERT with ON CONFLICT for this database."""
        return db.insert(self.dialect, table)
