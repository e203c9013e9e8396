"""Fixtures: every database test runs twice, on SQLite and on PostgreSQL.

PostgreSQL comes from TEST_DATABASE_URL, else 127.0.0.1:5432; when nothing answers there, a throwaway
cluster is started from the installed binaries (pytest-postgresql). Only when PostgreSQL is not installed
at all are its cases skipped, with a loud reason; with CI=true that is a failure instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from tenacity import wait_none

from service.entry import cli
from service.entry.api import create_app
from service.infra import catalogue, logs, metrics, stripe_client
from service.infra.config import Settings
from service.infra.db import make_engine, make_sessionmaker
from service.infra.migrate import upgrade
from service.infra.models import Base
from service.infra.runtime import Runtime
from service.infra.stripe_client import StripeGateway
from service.infra.uow import UnitOfWork
from tests import stripe_events

DATA = Path(__file__).parent / "data"
API_TOKEN = "test-api-token"
ADMIN_TOKEN = "test-admin-token"
DEFAULT_PG = "postgresql+psycopg://root@127.0.0.1:5432/test"


@pytest.fixture(scope="session", autouse=True)
def _logs() -> None:
    """Log as every entry point does (to stderr), so a test reading a command's stdout reads only its output."""
    logs.configure("console")


def _answers(url: str) -> bool:
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> str:
    """A PostgreSQL URL that answers, or a loud skip (a failure under CI=true)."""
    url = Settings(database_url=os.environ.get("TEST_DATABASE_URL", DEFAULT_PG)).database_url
    if _answers(url):
        return url
    try:
        proc = request.getfixturevalue("postgresql_proc")
    except Exception as exc:
        reason = f"PostgreSQL is not reachable at {url} and no throwaway cluster could start: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(f"!!! SKIPPING EVERY POSTGRESQL CASE: {reason}")
    return f"postgresql+psycopg://{proc.user}@{proc.host}:{proc.port}/postgres"


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[Engine]:
    """A database of its own for this test run, migrated to head; dropped at the end."""
    name = f"credits_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(make_url(pg_server).set(database=name).render_as_string(hide_password=False))
    upgrade(engine)
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "credits.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()  # the last connection to close checkpoints the WAL into the file
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty, migrated database: a fresh SQLite copy, or the run's PostgreSQL database truncated."""
    if request.param == "sqlite":
        path = tmp_path / "credits.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        sqlite_engine = make_engine(f"sqlite:///{path}")
        yield sqlite_engine
        sqlite_engine.dispose()
        return
    pg: Engine = request.getfixturevalue("pg_template")
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with pg.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield pg


@pytest.fixture
def settings(engine: Engine) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        credits_config=DATA / "catalogue.toml",
        credits_api_token=SecretStr(API_TOKEN),
        credits_admin_token=SecretStr(ADMIN_TOKEN),
        stripe_webhook_secret=SecretStr("whsec_test_current,whsec_test_previous"),
        stripe_api_key=SecretStr("sk_test_123"),
        stripe_api_base="https://stripe.test",
        serve_worker=False,  # the in-process app processes what tests deliver inline; tests drain the rest
    )


@pytest.fixture
def rt(settings: Settings, engine: Engine) -> Runtime:
    gateway = StripeGateway(settings, retry_wait=wait_none(), on_retry=metrics.stripe_retry)
    return Runtime(settings, catalogue.load(settings.credits_config), engine, make_sessionmaker(engine), gateway)


@pytest.fixture
def uow(rt: Runtime) -> Iterator[UnitOfWork]:
    """A unit of work for the test's own reads and domain calls, never committed: what the domain did is read
    back in it."""
    with rt.uow() as unit:
        yield unit


@pytest.fixture
def app(rt: Runtime) -> FastAPI:
    """The service's app on the test's runtime, as `client` serves it: its `state` is the app's own."""
    return create_app(rt)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {API_TOKEN}"}) as test_client:
        yield test_client


Deliver = Callable[..., httpx.Response]


@pytest.fixture
def deliver(client: TestClient, app: FastAPI) -> Deliver:
    """POST a Stripe event to the webhook endpoint, signed as Stripe signs it (or as a test says)."""

    def post(
        evt: dict[str, Any] | None = None,
        *,
        raw: bytes | None = None,
        secret: str = stripe_events.SECRET,
        at: int | None = None,
        header: str | None = None,
    ) -> httpx.Response:
        body = raw if raw is not None else stripe_events.encode(evt or {})
        signature = header if header is not None else stripe_events.sign(body, secret, at)
        response = client.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": signature})
        app.state.inline.wait_idle()  # the test reads what processing did: wait for it
        return response

    return post


@pytest.fixture
def stripe_api() -> Iterator[respx.MockRouter]:
    """Stripe's API as respx sees it; a call a test did not expect fails the handler (and so the test)."""
    with respx.mock(base_url="https://stripe.test", assert_all_called=False) as router:
        yield router


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run `credits ARGS…` in-process against the test database; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CREDITS_CONFIG", str(settings.credits_config))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("STRIPE_API_BASE", settings.stripe_api_base)
    monkeypatch.setenv("STRIPE_API_KEY", settings.stripe_api_key.get_secret_value())
    monkeypatch.setattr(stripe_client, "RETRY_POLICY", stripe_client.RETRY_POLICY.copy(wait=wait_none()))

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["credits", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def funded(client: TestClient, admin_headers: dict[str, str]) -> None:
    """acct_1 with 100 credits, granted by hand."""
    response = client.post(
        "/v1/accounts/acct_1/grants",
        json={"amount": 100, "reason": "seed"},
        headers={**admin_headers, "Idempotency-Key": "seed"},
    )
    assert response.status_code == 201
