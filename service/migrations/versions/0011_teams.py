"""Teams: an account's members grouped, with an allocation reserved for them and a limit on what they spend
together per billing period. A member belongs to at most one team (`members.team_id`, NULL for none); the
members there are when it runs stay outside any team.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 20:00:00
"""

import sqlalchemy as sa
from alembic import op

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("team_id", sa.String(length=255), nullable=False),
        sa.Column("allocation", sa.BigInteger(), nullable=True),
        sa.Column("limit_per_period", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_teams_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teams")),
    )
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.create_index("uq_teams_account_team", ["account_id", "team_id"], unique=True)

    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team_id", ID, nullable=True))
        batch_op.create_foreign_key(op.f("fk_members_team_id_teams"), "teams", ["team_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("members", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_members_team_id_teams"), type_="foreignkey")
        batch_op.drop_column("team_id")

    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_index("uq_teams_account_team")

    op.drop_table("teams")
