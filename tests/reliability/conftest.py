"""Fixtures for the reliability tests.

`fresh_pg` is a PostgreSQL database of the test's own on the run's server (`pg_server` from tests/conftest.py),
created empty, migrated to head, and dropped (WITH FORCE) at the end: the stream and outage tests run other
processes, or a proxy, against it, so they never share `pg_template` with the rest of the suite. The fuzzers
use tests/conftest.py's parametrized fixtures (`engine`, `rt`, `client`, `deliver`) as they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
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
