"""The migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

import importlib
import json

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from service.infra.migrate import alembic_config, upgrade
from service.infra.models import Base, utcnow

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


def test_upgrading_to_customer_batches_names_the_customer_of_every_event_still_due(engine: Engine) -> None:
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0007")
    rows = [
        ("evt_invoice", "pending", {"object": "invoice", "id": "in_1", "customer": "cus_A"}),
        (
            "evt_expanded",
            "failed",
            {"object": "invoice", "id": "in_2", "customer": {"id": "cus_B", "object": "customer"}},
        ),
        ("evt_customer", "pending", {"object": "customer", "id": "cus_C"}),
        ("evt_product", "pending", {"object": "product", "id": "prod_1"}),
        ("evt_done", "processed", {"object": "invoice", "id": "in_3", "customer": "cus_D"}),
    ]
    with engine.begin() as conn:
        for event_id, status, obj in rows:
            conn.execute(
                text(
                    "INSERT INTO stripe_events (id, type, livemode, created, payload, status, attempts, "
                    "next_attempt_at, received_at) VALUES (:id, 'x', false, :now, :payload, :status, 0, :now, :now)"
                ),
                {"id": event_id, "status": status, "payload": json.dumps({"data": {"object": obj}}), "now": utcnow()},
            )

    upgrade(engine)

    with engine.connect() as conn:
        named: dict[str, str | None] = dict(conn.execute(text("SELECT id, customer FROM stripe_events")).all())
    assert named == {
        "evt_invoice": "cus_A",
        "evt_expanded": "cus_B",
        "evt_customer": "cus_C",
        "evt_product": None,
        "evt_done": None,
    }
