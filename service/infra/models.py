"""The schema: accounts, credit grants, the append-only ledger and stored API responses.

Balances are never stored: an account's balance is the sum of its grants' `remaining`, and every change
to a `remaining` is explained by a ledger entry and its allocations (which grant gave how much).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite forgets the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """Now, in UTC, timezone-aware."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with portable naming conventions, so migrations name constraints alike."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSONType}
    __table__: ClassVar[Table]  # every model here is mapped to a table


Base.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY


class Account(Base):
    """Holds credits. `public_id` is what the product and Stripe metadata call it; `id` never changes,
    so re-keying an account (customer id → real account id) touches one row, not the ledger."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(255), unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    plan: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(32), default="active")
    period_end: Mapped[datetime | None]
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    # `created` of the newest subscription event applied: an older event never overwrites newer state.
    subscription_as_of: Mapped[datetime | None]
    email: Mapped[str | None] = mapped_column(String(320))
    referral_code: Mapped[str | None] = mapped_column(String(16), unique=True)
    # Support's one-time extension: at the next renewal, what the rollover policy would cut is kept until then.
    rollover_extended_until: Mapped[datetime | None]
    rollover_extensions: Mapped[int] = mapped_column(default=0, server_default="0")
    # The latest renewal that ran the rollover policy (its period's start), and how many more credits earned
    # before it that renewal could have carried (None: no limit). A credit earned before it but processed after
    # is cut as that renewal would have cut it.
    rollover_from: Mapped[datetime | None]
    rollover_room: Mapped[int | None] = mapped_column(BigInteger)
    rollover_kept_until: Mapped[datetime | None]  # the extension that renewal ran under, if any
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Grant(Base):
    """Credits given to an account at once, consumed by spends, expiries and reversals."""

    __tablename__ = "credit_grants"
    __table_args__ = (
        CheckConstraint("remaining >= 0 AND remaining <= amount", name="remaining_in_range"),
        CheckConstraint("amount = remaining + spent + expired + reversed", name="amount_accounted"),
        Index("ix_credit_grants_open", "account_id", "remaining"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"), unique=True)
    source: Mapped[str] = mapped_column(String(32))
    amount: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    spent: Mapped[int] = mapped_column(BigInteger, default=0)
    expired: Mapped[int] = mapped_column(BigInteger, default=0)
    reversed: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime | None]
    rollover: Mapped[bool] = mapped_column(default=False)
    # When the credits were earned in billing time (the invoice's period, the qualifying payment, the free
    # allowance's month), which may precede `created_at`: a renewal cuts only what was earned before its period.
    earned_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerEntry(Base):
    """One append-only movement of credits. Positive for grants, negative for spend/expire/reverse."""

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_entries_account", "account_id", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Allocation(Base):
    """How much of one grant one debit entry took: rebuilds every grant's `remaining` from the ledger."""

    __tablename__ = "ledger_allocations"
    __table_args__ = (CheckConstraint("amount > 0", name="positive"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"), index=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("credit_grants.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class StripeEvent(Base):
    """The inbox: every verified Stripe event, stored before it is answered, processed at least once.

    `status` is pending → processed | ignored, or failed (retried at `next_attempt_at`) → dead after the
    configured number of attempts. It is written in the handler's own transaction, so "processed" and the
    credits it caused commit together.
    """

    __tablename__ = "stripe_events"
    __table_args__ = (Index("ix_stripe_events_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    object_type: Mapped[str | None] = mapped_column(String(100))
    object_id: Mapped[str | None] = mapped_column(String(255), index=True)
    # The Stripe customer the object names: a worker takes a customer's due events together, one customer's
    # events in one transaction at a time.
    customer: Mapped[str | None] = mapped_column(String(255), index=True)
    api_version: Mapped[str | None] = mapped_column(String(64))
    livemode: Mapped[bool] = mapped_column(default=False)
    created: Mapped[datetime]
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    processed_at: Mapped[datetime | None]


class Payment(Base):
    """Money received from Stripe, keyed by the money's own id (an invoice, or a pack's payment intent).

    Several events describe the same money; this row and the grant key (`invoice:{id}` / `purchase:{pi}`)
    are what make them count once. It also maps charges and payment intents back to what they paid for,
    so a refund or dispute finds the credits to reverse, and records outcomes such as an unknown price.
    """

    __tablename__ = "payments"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(8))
    payment_intent: Mapped[str | None] = mapped_column(String(255), index=True)
    charge: Mapped[str | None] = mapped_column(String(255), index=True)
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    billing_reason: Mapped[str | None] = mapped_column(String(64))
    product: Mapped[str | None] = mapped_column(String(100))
    credits: Mapped[int] = mapped_column(BigInteger, default=0)
    # An invoice's billing period end and its plan's allowance for it (what an upgrade in the period steps up
    # from), kept even when it granted nothing.
    period_end: Mapped[datetime | None]
    allowance: Mapped[int | None] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    paid_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Referral(Base):
    """One referee's attribution to a referrer, and what became of it.

    A referee has at most one live attribution (the first wins and is locked: a partial unique index
    ignores rejected ones). The payouts are ledger grants keyed `referral:{id}:referrer` and
    `referral:{id}:referee`, so each side is paid at most once, whoever triggers it.
    """

    __tablename__ = "referrals"
    __table_args__ = (
        Index(
            "uq_referrals_live_referee",
            "referee_id",
            unique=True,
            postgresql_where=text("status <> 'rejected'"),
            sqlite_where=text("status <> 'rejected'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    referrer_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    referee_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    code: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    email: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), index=True)  # the worker looks for qualified and held ones
    reason: Mapped[str | None] = mapped_column(Text)
    qualifying_payment: Mapped[str | None] = mapped_column(String(255))
    attributed_at: Mapped[datetime]
    qualified_at: Mapped[datetime | None]
    paid_at: Mapped[datetime | None]


class AuditEntry(Base):
    """A support action: who did what to which account, why, under which ticket, and what changed."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    ticket: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ReconcileRun(Base):
    """One run of `credits reconcile`: its window, whether it fixed, and the summary it reported."""

    __tablename__ = "reconcile_runs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    since: Mapped[datetime]
    until: Mapped[datetime]
    fix: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default="running")
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Finding(Base):
    """Something reconciliation found, by stable kind and subject, with its history across runs."""

    __tablename__ = "findings"
    __table_args__ = (Index("uq_findings_kind_subject", "kind", "subject", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    accounts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stripe_ids: Mapped[dict[str, Any]] = mapped_column(default=dict)
    credits: Mapped[int] = mapped_column(BigInteger, default=0)
    detail: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="open")
    first_run_id: Mapped[int] = mapped_column(ForeignKey("reconcile_runs.id"))
    last_run_id: Mapped[int] = mapped_column(ForeignKey("reconcile_runs.id"))
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]


class Team(Base):
    """A team of an account's members: its own credits, a limit on what its members spend together, or both.

    `allocation` is the team's unspent credits, reserved out of the account's pool as a member's allocation is;
    the allocations of its members come out of it (never reserved twice), and its members without an allocation
    of their own share the rest. `limit_per_period` bounds the sum of its members' spends in a billing period.
    """

    __tablename__ = "teams"
    __table_args__ = (Index("uq_teams_account_team", "account_id", "team_id", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    team_id: Mapped[str] = mapped_column(String(255))
    allocation: Mapped[int | None] = mapped_column(BigInteger)
    limit_per_period: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Member(Base):
    """A member of an account: shares the pool, or spends only an allocation, or up to a limit; in a team or not.

    `allocation` is the member's own unspent credits, reserved out of the account's pool — or, in a team with an
    allocation, out of the team's (the credits stay in the account's grants; the pool simply cannot spend what is
    reserved). Shrinking it or removing the member returns the difference to the pool, or to the team.
    """

    __tablename__ = "members"
    __table_args__ = (Index("uq_members_account_member", "account_id", "member_id", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    member_id: Mapped[str] = mapped_column(String(255))
    allocation: Mapped[int | None] = mapped_column(BigInteger)
    limit_per_period: Mapped[int | None] = mapped_column(BigInteger)
    # The team's row id (teams.id), not its `team_id`: a team is named by its account and its `team_id`.
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ResourceCharge(Base):
    """The one charge for an (action, resource) in an account: unlocking a prospect again costs nothing,
    even for a colleague. The unique index is what makes it once under concurrency."""

    __tablename__ = "resource_charges"
    __table_args__ = (Index("uq_resource_charges", "account_id", "action", "resource", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    action: Mapped[str] = mapped_column(String(100))
    resource: Mapped[str] = mapped_column(String(255))
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"))
    member_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiRequest(Base):
    """An API POST's Idempotency-Key, the fingerprint of its body and the response it got."""

    __tablename__ = "api_requests"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None]
    response: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
