"""What the on-call engineer relies on: metrics, the backlog warning, bounded request bodies, and
secrets that never reach a log line or an unauthenticated route."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import SecretStr

from service.domain import accounts, ledger
from service.entry.api import create_app
from service.infra import logs
from service.infra.models import utcnow
from service.infra.runtime import Runtime
from tests import stripe_events as se
from tests.conftest import ADMIN_TOKEN, API_TOKEN
from tests.helpers import committed
from webhooks import inbox

ROOT = Path(__file__).parent.parent
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OPEN_ROUTES = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/webhooks/stripe",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A counter or histogram sample from the process's registry (0 when never incremented)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def scraped(text: str, name: str, labels: str = "") -> float:
    """A sample from the /metrics text (for the database-backed gauges)."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_deliveries_processing_and_credits(client, deliver) -> None:
    names = [
        ("credits_webhook_deliveries_total", {"type": "invoice.paid", "outcome": "stored"}),
        ("credits_webhook_deliveries_total", {"type": "unverified", "outcome": "refused_400"}),
        ("credits_credits_total", {"kind": "grant", "source": "plan"}),
        ("credits_event_processing_seconds_count", {"type": "invoice.paid", "status": "processed"}),
    ]
    before = [sample(name, labels) for name, labels in names]
    invoice = se.invoice(
        "2025",
        invoice_id="in_1",
        customer="cus_1",
        price="price_starter_monthly",
        amount_paid=2000,
        subscription_metadata={"account_id": "acct_1"},
    )
    deliver(se.event("invoice.paid", invoice))
    deliver(se.event("invoice.paid", invoice), secret="whsec_wrong")
    after = [sample(name, labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 2000, 1]
    text = client.get("/metrics", headers=ADMIN).text
    assert scraped(text, "credits_inbox_events", '{status="processed"}') == 1
    assert "credits_inbox_oldest_pending_seconds 0.0" in text


def test_stripe_retries_are_counted_and_a_failed_event_shows_in_the_inbox_depth(client, deliver, stripe_api) -> None:
    stripe_api.get("/v1/customers/cus_9").respond(500, json={"error": {"type": "api_error"}})
    before = sample("credits_stripe_api_retries_total", {"error": "APIError"})
    deliver(
        se.event(
            "invoice.paid",
            se.invoice("2025", invoice_id="in_9", customer="cus_9", price="price_starter_monthly", amount_paid=2000),
        )
    )
    assert scraped(client.get("/metrics", headers=ADMIN).text, "credits_inbox_events", '{status="failed"}') == 1
    assert sample("credits_stripe_api_retries_total", {"error": "APIError"}) - before == 4  # 5 attempts


def test_metrics_need_their_token_or_the_admin_token(rt: Runtime) -> None:
    locked = dataclasses.replace(rt, settings=rt.settings.model_copy(update={"metrics_token": SecretStr("scrape-me")}))
    client = TestClient(create_app(locked))
    refused = client.get("/metrics")
    assert (refused.status_code, refused.json()["error"]) == (401, "unauthorized")
    assert client.get("/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200


def test_metrics_are_closed_by_default_and_open_only_when_made_public(rt: Runtime) -> None:
    assert TestClient(create_app(rt)).get("/metrics").status_code == 401
    public = dataclasses.replace(rt, settings=rt.settings.model_copy(update={"metrics_public": True}))
    assert TestClient(create_app(public)).get("/metrics").status_code == 200


def test_an_old_pending_event_logs_a_backlog_warning(rt: Runtime, capsys) -> None:
    with committed(rt) as uow:
        inbox.store(
            uow,
            se.event("invoice.paid", {"object": "invoice", "id": "in_x"}, event_id="evt_old"),
            utcnow() - timedelta(hours=1),
        )
    logs.configure("json")
    text = TestClient(create_app(rt)).get("/metrics", headers=ADMIN).text
    assert scraped(text, "credits_inbox_oldest_pending_seconds") >= 3600
    assert '"event": "inbox.backlog"' in capsys.readouterr().err


def test_a_request_body_over_one_mebibyte_is_413_on_the_api_too(client) -> None:
    response = client.post(
        "/v1/accounts/acct_1/spend",
        content=b"{" + b" " * (1024 * 1024) + b"}",
        headers={"Idempotency-Key": "k", "Content-Type": "application/json"},
    )
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")


def test_a_streamed_request_body_past_one_mebibyte_is_413_on_the_api_too(client) -> None:
    response = client.post(
        "/v1/accounts/acct_1/spend",
        content=(b" " * 65536 for _ in range(17)),
        headers={"Idempotency-Key": "k", "Content-Type": "application/json"},
    )
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")


def test_every_v1_route_refuses_a_request_without_a_token(client) -> None:
    paths = client.app.openapi()["paths"]
    assert {p for p in paths if not p.startswith("/v1/")} <= OPEN_ROUTES
    checked = 0
    for path, operations in paths.items():
        if not path.startswith("/v1/"):
            continue
        concrete = path.replace("{account}", "acct_1").replace("{member_id}", "ana")
        for method in operations:
            assert client.request(method, concrete, headers={"Authorization": ""}).status_code == 401, (method, path)
            checked += 1
    assert checked >= 12


def test_the_admin_token_may_not_equal_the_api_token(rt: Runtime) -> None:
    same = rt.settings.model_copy(update={"credits_admin_token": SecretStr(API_TOKEN)})
    with pytest.raises(ValueError, match="must differ"):
        create_app(dataclasses.replace(rt, settings=same))


def test_serve_refuses_to_start_with_equal_tokens(run, monkeypatch) -> None:
    monkeypatch.setenv("CREDITS_API_TOKEN", "same")
    monkeypatch.setenv("CREDITS_ADMIN_TOKEN", "same")
    code, _, err = run("serve")
    assert (code, "must differ" in err) == (1, True)


def test_no_secret_token_or_signature_reaches_the_logs(client, deliver, admin_headers, stripe_api, capsys) -> None:
    """A full run — grant, spend, a signed webhook with a Stripe look-up, a refused one — logged as JSON."""
    logs.configure("json")
    stripe_api.get("/v1/customers/cus_1").respond(json=se.customer("cus_1", metadata={"account_id": "acct_1"}))
    client.post(
        "/v1/accounts/acct_1/grants",
        json={"amount": 5, "reason": "r"},
        headers={**admin_headers, "Idempotency-Key": "g"},
    )
    client.post("/v1/accounts/acct_1/spend", json={"amount": 1}, headers={"Idempotency-Key": "s"})
    body = se.encode(
        se.event(
            "invoice.paid",
            se.invoice("2025", invoice_id="in_1", customer="cus_1", price="price_starter_monthly", amount_paid=2000),
        )
    )
    signature = se.sign(body)
    deliver(raw=body, header=signature)
    deliver(raw=body, header=signature.replace("v1=", "v1=0"))
    logged = capsys.readouterr().err
    assert '"event": "ledger.posted"' in logged and '"event": "webhook.refused"' in logged
    for secret in (
        API_TOKEN,
        ADMIN_TOKEN,
        "whsec_test_current",
        "whsec_test_previous",
        "sk_test_123",
        signature.split("v1=")[1],
    ):
        assert secret not in logged


def test_sql_is_only_built_with_bound_parameters() -> None:
    """No SQL text is assembled from strings in the service (the migrations' DDL names only constants)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("service", "webhooks", "jobs")
        for path in (ROOT / folder).rglob("*.py")
        if "migrations" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"(text|exec_driver_sql|execute)\(\s*f[\"']", line)
    ]
    assert offenders == []


def test_credits_are_counted_only_once_their_transaction_commits(rt) -> None:
    def counted() -> float:
        return sample("credits_credits_total", {"kind": "grant", "source": "admin"})

    before = counted()
    with rt.uow() as uow:
        ledger.grant(uow, accounts.get_or_create(uow, "acct_1"), 7, source="admin", key="rolled-back")
        uow.session.rollback()
    assert counted() == before
    with committed(rt) as uow:
        ledger.grant(uow, accounts.get_or_create(uow, "acct_1"), 5, source="admin", key="kept")
    assert counted() == before + 5
