"""Team members (allocations, limits) and once-per-resource charges.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 11:15:27.260236
"""

import sqlalchemy as sa
from alembic import op

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "members",
        sa.Column("id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("member_id", sa.String(length=255), nullable=False),
        sa.Column("allocation", sa.BigInteger(), nullable=True),
        sa.Column("limit_per_period", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_members_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_members")),
    )
    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.create_index("uq_members_account_member", ["account_id", "member_id"], unique=True)

    op.create_table(
        "resource_charges",
        sa.Column("id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("resource", sa.String(length=255), nullable=False),
        sa.Column("entry_id", ID, nullable=False),
        sa.Column("member_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_resource_charges_account_id_accounts")),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["ledger_entries.id"], name=op.f("fk_resource_charges_entry_id_ledger_entries")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resource_charges")),
    )
    with op.batch_alter_table("resource_charges", schema=None) as batch_op:
        batch_op.create_index("uq_resource_charges", ["account_id", "action", "resource"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("resource_charges", schema=None) as batch_op:
        batch_op.drop_index("uq_resource_charges")

    op.drop_table("resource_charges")
    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.drop_index("uq_members_account_member")

    op.drop_table("members")
