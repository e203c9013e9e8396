"""The inbox keeps each event's lane (its customer, else its object) as a column, filled when it is stored.

Rows stored before it keep NULL: the worker reads their lane from the payload, as it did for every row.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 14:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lane", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.drop_column("lane")
