"""Referrals are indexed by status: every drain of the worker looks for the qualified ones left one-sided and
the held ones a new month may release, and support lists them by status.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 19:30:00
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_referrals_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_referrals_status"))
