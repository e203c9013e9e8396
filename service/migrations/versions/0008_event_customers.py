"""The inbox keeps the Stripe customer each event's object names, in place of a lane: a worker batch takes
customers whole, and no two transactions handle one customer's events at once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.drop_column("lane")
        batch_op.add_column(sa.Column("customer", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_stripe_events_customer"), ["customer"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stripe_events_customer"))
        batch_op.drop_column("customer")
        batch_op.add_column(sa.Column("lane", sa.String(length=255), nullable=True))
