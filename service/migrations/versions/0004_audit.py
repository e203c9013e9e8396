"""The audit log of support actions, reconciliation runs and findings, and the rollover extension.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 11:06:33.959890
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconcile_runs",
        sa.Column("id", ID, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fix", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("summary", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconcile_runs")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", ID, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("account_id", ID, nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("ticket", sa.String(length=255), nullable=True),
        sa.Column("details", JSON, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_audit_log_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_account_id"), ["account_id"], unique=False)

    op.create_table(
        "findings",
        sa.Column("id", ID, nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("accounts", JSON, nullable=False),
        sa.Column("stripe_ids", JSON, nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("first_run_id", ID, nullable=False),
        sa.Column("last_run_id", ID, nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["first_run_id"], ["reconcile_runs.id"], name=op.f("fk_findings_first_run_id_reconcile_runs")
        ),
        sa.ForeignKeyConstraint(
            ["last_run_id"], ["reconcile_runs.id"], name=op.f("fk_findings_last_run_id_reconcile_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
    )
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.create_index("uq_findings_kind_subject", ["kind", "subject"], unique=True)

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rollover_extended_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("rollover_extensions", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("rollover_extensions")
        batch_op.drop_column("rollover_extended_until")

    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_index("uq_findings_kind_subject")

    op.drop_table("findings")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_account_id"))

    op.drop_table("audit_log")
    op.drop_table("reconcile_runs")
