"""The migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

import importlib
import json
from datetime import timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from service.infra.migrate import alembic_config, upgrade
from service.infra.models import Account, Base, Grant, utcnow

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


def test_upgrading_to_teams_keeps_every_member_with_its_allocation_outside_any_team(engine: Engine) -> None:
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0010")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO accounts (id, public_id, status, rollover_extensions, created_at) "
                "VALUES (1, 'a', 'active', 0, :now)"
            ),
            {"now": utcnow()},
        )
        conn.execute(
            text(
                "INSERT INTO members (account_id, member_id, allocation, limit_per_period, created_at) "
                "VALUES (1, 'ana', 30, NULL, :now), (1, 'bob', NULL, 10, :now)"
            ),
            {"now": utcnow()},
        )

    upgrade(engine)

    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT member_id, allocation, limit_per_period, team_id FROM members ORDER BY member_id")
        ).all()
        assert conn.execute(text("SELECT count(*) FROM teams")).scalar() == 0
    assert [tuple(r) for r in rows] == [("ana", 30, None, None), ("bob", None, 10, None)]


def test_upgrading_to_billing_time_gives_each_grant_spent_or_not_its_creation_time_as_when_it_was_earned(
    engine: Engine,
) -> None:
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0008")
    made = utcnow().replace(microsecond=0) - timedelta(days=40)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO accounts (id, public_id, status, rollover_extensions, created_at) "
                "VALUES (1, 'a', 'active', 0, :at)"
            ),
            {"at": made},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_entries (id, account_id, kind, amount, idempotency_key, metadata, created_at) "
                "VALUES (1, 1, 'grant', 2000, 'invoice:in_1', '{}', :at)"
            ),
            {"at": made},
        )
        conn.execute(
            text(
                "INSERT INTO credit_grants (account_id, entry_id, source, amount, remaining, spent, expired, "
                "reversed, rollover, created_at) VALUES (1, 1, 'plan', 2000, 1500, 500, 0, 0, true, :at)"
            ),
            {"at": made},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_entries (id, account_id, kind, amount, idempotency_key, metadata, created_at) "
                "VALUES (2, 1, 'spend', -500, 'spend:a:1', '{}', :at)"
            ),
            {"at": made},
        )
        conn.execute(text("INSERT INTO ledger_allocations (entry_id, grant_id, amount) VALUES (2, 1, 500)"))

    upgrade(engine)

    with Session(engine) as session:
        grant = session.scalars(select(Grant)).one()
        account = session.get_one(Account, 1)
    assert (grant.earned_at, account.rollover_from, account.rollover_room) == (made, None, None)
