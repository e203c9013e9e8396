"""Fixtures for the reliability tests.

`fresh_pg` is a PostgreSQL database of the test's own on the run's server (`pg_server` from tests/conftest.py),
created empty, migrated to head, and dropped (WITH FORCE) at the end: the stream and outage tests run other
processes, or a proxy, against it, so they never share `pg_template` with the rest of the suite. The fuzzers
use tests/conftest.py's parametrized fixtures (`engine`, `rt`, `client`, `deliver`) as they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import respx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.infra.db import make_engine
from service.infra.migrate import upgrade


@pytest.fixture
def fresh_pg(pg_server: str) -> Iterator[str]:
    """The URL of an empty, migrated PostgreSQL database of this test's own; dropped afterwards."""
    name = f"credits_rel_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def every_delivery_processed_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests read what processing did right after each delivery, many deliveries a second: above the
    endpoint's quiet rate those would be left to the worker (tested in test_webhook_endpoint.py)."""
    monkeypatch.setattr("webhooks.inline.PER_SECOND", 1_000_000)


@pytest.fixture
def stripe_404():
    """Stripe answers every call 404 (an unknown customer): handlers that ask fail, and are retried later."""
    with respx.mock(base_url="https://stripe.test", assert_all_called=False) as router:
        router.route().mock(
            return_value=httpx.Response(
                404,
                json={
                    "error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such object"}
                },
            )
        )
        yield router
