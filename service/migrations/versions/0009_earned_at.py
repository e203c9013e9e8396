"""Each grant keeps when its credits were earned in billing time (the invoice's period, the qualifying
payment, the free allowance's month): a renewal cuts only credits earned before its period starts, and each
account keeps its latest renewal's start and the room it left, so a credit earned before that renewal but
processed after it is cut as the renewal would have cut it. The order Stripe's events are processed in never
changes what is cut. Existing grants were earned when made.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

GRANTS = sa.table("credit_grants", sa.column("earned_at", sa.DateTime), sa.column("created_at", sa.DateTime))


def upgrade() -> None:
    with op.batch_alter_table("credit_grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("earned_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(GRANTS.update().values(earned_at=GRANTS.c.created_at))
    with op.batch_alter_table("credit_grants", schema=None) as batch_op:
        batch_op.alter_column("earned_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rollover_from", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("rollover_room", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("rollover_room")
        batch_op.drop_column("rollover_from")
    with op.batch_alter_table("credit_grants", schema=None) as batch_op:
        batch_op.drop_column("earned_at")
