"""PostgreSQL: the inbox's payloads compressed with lz4 rather than pglz, where the server has lz4.

A ~6 KB event body is stored out of line (TOAST) and compressed: lz4 costs the database server less CPU
than pglz per INSERT for a similar size, and decompresses faster (bench/README.md, "What the mechanisms
save"). The rows already stored keep pglz; PostgreSQL reads both.
SQLite has nothing of the kind.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 15:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# A server built without lz4 refuses SET COMPRESSION lz4; its default_toast_compression does not offer it (and
# before PostgreSQL 14, which has no such setting, this is NULL: nothing to do).
HAS_LZ4 = "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"


def upgrade() -> None:
    _compress_with("lz4")


def downgrade() -> None:
    _compress_with("DEFAULT")  # follow the server's default_toast_compression


def _compress_with(method: str) -> None:
    """SET COMPRESSION takes the table's ACCESS EXCLUSIVE lock: waiting for it would block every delivery's
    INSERT behind this migration, so it gives up after 5 s instead (run it again when the inbox is quieter)."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(sa.text(HAS_LZ4)).scalar():
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.execute(f"ALTER TABLE stripe_events ALTER COLUMN payload SET COMPRESSION {method}")
