"""Each grant keeps when its credits were earned in billing time (the invoice's period, the qualifying
payment, the free allowance's month): a renewal cuts only credits earned before its period starts, and each
account keeps its latest renewal's start, the room it left and the extension it ran under, so a credit earned
before that renewal but processed after it is cut (or kept) as the renewal would have. Invoice payments keep
their period's end and their plan's allowance, which an upgrade in that period steps up from. The order
Stripe's events are processed in then does not change a balance. Existing grants were earned when made.

The column is added NOT NULL with a constant default and then filled: SQLite can make a column NOT NULL only
by copying its table, which the foreign keys of the allocations refuse.

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
ACCOUNT_COLUMNS = ("rollover_from", "rollover_room", "rollover_kept_until")


def upgrade() -> None:
    placeholder = sa.text("'1970-01-01 00:00:00'")
    op.add_column(
        "credit_grants", sa.Column("earned_at", sa.DateTime(timezone=True), nullable=False, server_default=placeholder)
    )
    op.execute(GRANTS.update().values(earned_at=GRANTS.c.created_at))
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("credit_grants", "earned_at", server_default=None)
    op.add_column("accounts", sa.Column("rollover_from", sa.DateTime(timezone=True), nullable=True))
    op.add_column("accounts", sa.Column("rollover_room", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("rollover_kept_until", sa.DateTime(timezone=True), nullable=True))
    op.add_column("payments", sa.Column("period_end", sa.DateTime(timezone=True), nullable=True))
    op.add_column("payments", sa.Column("allowance", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+): a batch copy of these tables is refused by the foreign keys into them.
    for column in ("period_end", "allowance"):
        op.execute(f"ALTER TABLE payments DROP COLUMN {column}")
    for column in ACCOUNT_COLUMNS:
        op.execute(f"ALTER TABLE accounts DROP COLUMN {column}")
    op.execute("ALTER TABLE credit_grants DROP COLUMN earned_at")
