"""The Stripe event inbox, payments by the money's own id, and subscription state on accounts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:46:21.022549
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("object_type", sa.String(length=100), nullable=True),
        sa.Column("object_id", sa.String(length=255), nullable=True),
        sa.Column("api_version", sa.String(length=64), nullable=True),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.create_index("ix_stripe_events_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_stripe_events_object_id"), ["object_id"], unique=False)

    op.create_table(
        "payments",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=8), nullable=True),
        sa.Column("payment_intent", sa.String(length=255), nullable=True),
        sa.Column("charge", sa.String(length=255), nullable=True),
        sa.Column("subscription_id", sa.String(length=255), nullable=True),
        sa.Column("billing_reason", sa.String(length=64), nullable=True),
        sa.Column("product", sa.String(length=100), nullable=True),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_payments_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
    )
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_payments_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_payments_charge"), ["charge"], unique=False)
        batch_op.create_index(batch_op.f("ix_payments_payment_intent"), ["payment_intent"], unique=False)

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subscription_id", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("subscription_as_of", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("email", sa.String(length=320), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("email")
        batch_op.drop_column("subscription_as_of")
        batch_op.drop_column("subscription_id")

    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payments_payment_intent"))
        batch_op.drop_index(batch_op.f("ix_payments_charge"))
        batch_op.drop_index(batch_op.f("ix_payments_account_id"))

    op.drop_table("payments")
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stripe_events_object_id"))
        batch_op.drop_index("ix_stripe_events_due")

    op.drop_table("stripe_events")
