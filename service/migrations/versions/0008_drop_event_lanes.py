"""The inbox keeps no lane per event: workers claim due events with SKIP LOCKED, oldest first.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:00:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('stripe_events', schema=None) as batch_op:
        batch_op.drop_column('lane')


def downgrade() -> None:
    with op.batch_alter_table('stripe_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lane', sa.String(length=255), nullable=True))
