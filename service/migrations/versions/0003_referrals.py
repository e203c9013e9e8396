"""Referral codes on accounts and referrals (attribution, qualification, payout state).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 11:00:11.062579
"""

import sqlalchemy as sa
from alembic import op

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "referrals",
        sa.Column("id", ID, nullable=False),
        sa.Column("referrer_id", ID, nullable=False),
        sa.Column("referee_id", ID, nullable=False),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("qualifying_payment", sa.String(length=255), nullable=True),
        sa.Column("attributed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("qualified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["referee_id"], ["accounts.id"], name=op.f("fk_referrals_referee_id_accounts")),
        sa.ForeignKeyConstraint(["referrer_id"], ["accounts.id"], name=op.f("fk_referrals_referrer_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_referrals")),
    )
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_referrals_referrer_id"), ["referrer_id"], unique=False)
        batch_op.create_index(
            "uq_referrals_live_referee",
            ["referee_id"],
            unique=True,
            postgresql_where=sa.text("status <> 'rejected'"),
            sqlite_where=sa.text("status <> 'rejected'"),
        )

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("referral_code", sa.String(length=16), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_accounts_referral_code"), ["referral_code"])


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_accounts_referral_code"), type_="unique")
        batch_op.drop_column("referral_code")

    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_referrals_live_referee",
            postgresql_where=sa.text("status <> 'rejected'"),
            sqlite_where=sa.text("status <> 'rejected'"),
        )
        batch_op.drop_index(batch_op.f("ix_referrals_referrer_id"))

    op.drop_table("referrals")
