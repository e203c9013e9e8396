"""Accounts, credit grants, the append-only ledger with its allocations, and stored API responses.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 10:35:43.219824
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", ID, nullable=False),
        sa.Column("public_id", sa.String(length=255), nullable=False),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=True),
        sa.Column("plan", sa.String(length=100), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("public_id", name=op.f("uq_accounts_public_id")),
        sa.UniqueConstraint("stripe_customer_id", name=op.f("uq_accounts_stripe_customer_id")),
    )
    op.create_table(
        "api_requests",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_api_requests")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=255), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_ledger_entries_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_ledger_entries_idempotency_key")),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_entries_account", ["account_id", "id"], unique=False)

    op.create_table(
        "credit_grants",
        sa.Column("id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("entry_id", ID, nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("expired", sa.BigInteger(), nullable=False),
        sa.Column("reversed", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rollover", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "amount = remaining + spent + expired + reversed", name=op.f("ck_credit_grants_amount_accounted")
        ),
        sa.CheckConstraint("remaining >= 0 AND remaining <= amount", name=op.f("ck_credit_grants_remaining_in_range")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_credit_grants_account_id_accounts")),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["ledger_entries.id"], name=op.f("fk_credit_grants_entry_id_ledger_entries")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_grants")),
        sa.UniqueConstraint("entry_id", name=op.f("uq_credit_grants_entry_id")),
    )
    with op.batch_alter_table("credit_grants", schema=None) as batch_op:
        batch_op.create_index("ix_credit_grants_open", ["account_id", "remaining"], unique=False)

    op.create_table(
        "ledger_allocations",
        sa.Column("id", ID, nullable=False),
        sa.Column("entry_id", ID, nullable=False),
        sa.Column("grant_id", ID, nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_ledger_allocations_positive")),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["ledger_entries.id"], name=op.f("fk_ledger_allocations_entry_id_ledger_entries")
        ),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["credit_grants.id"], name=op.f("fk_ledger_allocations_grant_id_credit_grants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_allocations")),
    )
    with op.batch_alter_table("ledger_allocations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_allocations_entry_id"), ["entry_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledger_allocations_grant_id"), ["grant_id"], unique=False)

    for table in APPEND_ONLY:
        _forbid_changes(table)


APPEND_ONLY = ("ledger_entries", "ledger_allocations")


def _forbid_changes(table: str) -> None:
    """The ledger is append-only: the database itself refuses UPDATE and DELETE on it."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$"
        )
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ledger_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )


def _allow_changes(table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        return
    for action in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")


def downgrade() -> None:
    for table in APPEND_ONLY:
        _allow_changes(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ledger_append_only()")
    with op.batch_alter_table("ledger_allocations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_allocations_grant_id"))
        batch_op.drop_index(batch_op.f("ix_ledger_allocations_entry_id"))

    op.drop_table("ledger_allocations")
    with op.batch_alter_table("credit_grants", schema=None) as batch_op:
        batch_op.drop_index("ix_credit_grants_open")

    op.drop_table("credit_grants")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_account")

    op.drop_table("ledger_entries")
    op.drop_table("api_requests")
    op.drop_table("accounts")
