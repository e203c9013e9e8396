"""The migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from service.infra.models import Base

HAS_LZ4 = importlib.import_module("service.migrations.versions.0007_payload_lz4").HAS_LZ4


def test_migrations_at_head_match_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_the_inbox_payloads_are_compressed_with_lz4_where_postgresql_has_it(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not compress")
    with engine.connect() as conn:
        if int(conn.execute(text("SHOW server_version_num")).scalar_one()) < 140000:
            pytest.skip("no per-column compression before PostgreSQL 14")
        offered = conn.execute(text(HAS_LZ4)).scalar()
        method = conn.execute(
            text(
                "SELECT attcompression FROM pg_attribute WHERE attrelid = 'stripe_events'::regclass "
                "AND attname = 'payload'"
            )
        ).scalar()
    assert method == ("l" if offered else "")
