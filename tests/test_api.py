"""The HTTP API as a client sees it, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from service.entry.api import create_app
from service.infra.db import make_engine, make_sessionmaker
from service.infra.models import ApiRequest
from service.infra.runtime import Runtime
from tests.conftest import API_TOKEN


def grant(client: TestClient, admin: dict[str, str], account: str, amount: int, key: str, **extra: object):
    body = {"amount": amount, "reason": "support gesture", **extra}
    return client.post(f"/v1/accounts/{account}/grants", json=body, headers={**admin, "Idempotency-Key": key})


def spend(client: TestClient, account: str, amount: object, key: str):
    return client.post(f"/v1/accounts/{account}/spend", json={"amount": amount}, headers={"Idempotency-Key": key})


def test_healthz_answers_without_a_token(client: TestClient) -> None:
    response = client.get("/healthz", headers={"Authorization": ""})
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_is_200_when_the_database_answers(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_database_does_not_answer(rt: Runtime) -> None:
    dead = make_engine("postgresql+psycopg://root@127.0.0.1:1/none?connect_timeout=1")
    down = Runtime(rt.settings, rt.catalogue, dead, make_sessionmaker(dead), rt.stripe)
    response = TestClient(create_app(down)).get("/readyz")
    assert (response.status_code, response.json()["error"]) == (503, "database_unavailable")


def test_a_route_under_v1_needs_a_token(client: TestClient) -> None:
    response = client.get("/v1/accounts/acct_1/balance", headers={"Authorization": ""})
    assert (response.status_code, response.json()["error"]) == (401, "unauthorized")


def test_a_wrong_token_is_401(client: TestClient) -> None:
    response = client.get("/v1/accounts/acct_1/balance", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


def test_the_api_token_cannot_use_an_admin_route(client: TestClient) -> None:
    response = client.post(
        "/v1/accounts/acct_1/grants", json={"amount": 5, "reason": "x"}, headers={"Idempotency-Key": "k"}
    )
    assert (response.status_code, response.json()["error"]) == (403, "forbidden")


def test_admin_grant_creates_the_account_and_answers_201(client: TestClient, admin_headers) -> None:
    response = grant(client, admin_headers, "acct_new", 100, "g1")
    assert response.status_code == 201
    body = response.json()
    assert (body["account_id"], body["balance"]) == ("acct_new", 100)
    assert body["grant"] == {"id": 1, "source": "admin", "amount": 100, "remaining": 100, "expires_at": None}


def test_grant_with_an_expiry_shows_it_on_the_balance(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1", expires_at="2099-01-01T00:00:00Z")
    grants = client.get("/v1/accounts/acct_1/balance").json()["grants"]
    assert grants[0]["expires_at"] == "2099-01-01T00:00:00+00:00"


def test_grant_expiring_in_the_past_is_422(client: TestClient, admin_headers) -> None:
    response = grant(client, admin_headers, "acct_1", 100, "g1", expires_at="2001-01-01T00:00:00Z")
    assert response.status_code == 422


def test_balance_lists_grants_and_total(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    grant(client, admin_headers, "acct_1", 50, "g2")
    body = client.get("/v1/accounts/acct_1/balance").json()
    assert body["balance"] == 150
    assert [(g["amount"], g["remaining"]) for g in body["grants"]] == [(100, 100), (50, 50)]


def test_an_account_answers_to_its_stripe_customer_id(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "cus_ABC", 10, "g1")
    assert client.get("/v1/accounts/cus_ABC/balance").json()["account_id"] == "cus_ABC"


def test_an_unknown_account_is_404_with_a_json_error(client: TestClient) -> None:
    response = client.get("/v1/accounts/nobody/balance")
    assert (response.status_code, response.json()["error"]) == (404, "account_not_found")


def test_spend_answers_the_new_balance(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    response = spend(client, "acct_1", 30, "s1")
    assert response.status_code == 200
    assert response.json() == {"balance": 70, "spent": 30, "charged": 30, "entry_id": 2}


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/merge-patch+json"])
def test_a_spend_streamed_or_with_any_json_content_type_is_answered_the_same(
    client: TestClient, admin_headers, content_type: str
) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    streamed = client.post(
        "/v1/accounts/acct_1/spend",
        content=iter([b'{"amount": ', b"30}"]),
        headers={"Idempotency-Key": "s1", "Content-Type": "application/json"},
    )
    typed = client.post(
        "/v1/accounts/acct_1/spend",
        content=b'{"amount": 30}',
        headers={"Idempotency-Key": "s2", "Content-Type": content_type},
    )
    assert (streamed.status_code, streamed.json()["balance"]) == (200, 70)
    assert (typed.status_code, typed.json()["balance"]) == (200, 40)


def test_spend_beyond_the_balance_is_402_and_spends_nothing(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 10, "g1")
    response = spend(client, "acct_1", 11, "s1")
    assert response.status_code == 402
    assert response.json() == {
        "error": "insufficient_credits",
        "message": "10 credits available, 11 requested",
        "balance": 10,
        "requested": 11,
    }
    assert client.get("/v1/accounts/acct_1/balance").json()["balance"] == 10


def test_a_retried_spend_replays_the_first_response_and_spends_once(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    first = spend(client, "acct_1", 30, "s1")
    again = spend(client, "acct_1", 30, "s1")
    assert (again.status_code, again.json()) == (200, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    assert client.get("/v1/accounts/acct_1/balance").json()["balance"] == 70


def test_a_stored_402_replays_as_402_even_after_a_top_up(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 1, "g1")
    assert spend(client, "acct_1", 5, "s1").status_code == 402
    grant(client, admin_headers, "acct_1", 100, "g2")
    replay = spend(client, "acct_1", 5, "s1")
    assert (replay.status_code, replay.json()["balance"]) == (402, 1)
    assert client.get("/v1/accounts/acct_1/balance").json()["balance"] == 101


def test_the_same_key_with_another_body_is_409(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    spend(client, "acct_1", 30, "s1")
    response = spend(client, "acct_1", 31, "s1")
    assert (response.status_code, response.json()["error"]) == (409, "idempotency_key_reused")
    assert client.get("/v1/accounts/acct_1/balance").json()["balance"] == 70


def test_a_replayed_grant_grants_once(client: TestClient, admin_headers) -> None:
    first = grant(client, admin_headers, "acct_1", 100, "g1")
    again = grant(client, admin_headers, "acct_1", 100, "g1")
    assert (again.status_code, again.json()) == (201, first.json())
    assert client.get("/v1/accounts/acct_1/balance").json()["balance"] == 100


@pytest.mark.parametrize("length", [1, 236, 255])
def test_every_idempotency_key_of_1_to_255_characters_works_and_replays(
    client: TestClient, admin_headers, length: int
) -> None:
    account, key = "acct_" + "a" * 200, "k" * length
    assert grant(client, admin_headers, account, 100, "g" * length).status_code == 201
    first, again = spend(client, account, 30, key), spend(client, account, 30, key)
    assert (first.status_code, again.status_code, again.headers["Idempotent-Replayed"]) == (200, 200, "true")
    assert again.json() == first.json()
    assert client.get(f"/v1/accounts/{account}/balance").json()["balance"] == 70


def test_a_key_over_255_characters_is_400(client: TestClient, admin_headers) -> None:
    response = grant(client, admin_headers, "acct_1", 100, "k" * 256)
    assert (response.status_code, response.json()["error"]) == (400, "idempotency_key_required")


def test_a_refused_request_saves_nothing_and_its_key_stays_free(client: TestClient, admin_headers, rt) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    headers = {"Idempotency-Key": "s1"}
    refused = client.post("/v1/accounts/acct_1/spend", json={"action": "nope"}, headers=headers)
    assert (refused.status_code, refused.json()["error"]) == (422, "unknown_action")
    with rt.uow() as uow:
        assert uow.session.get(ApiRequest, "s1") is None
    fixed = client.post("/v1/accounts/acct_1/spend", json={"action": "unlock_prospect"}, headers=headers)
    assert (fixed.status_code, fixed.json()["charged"]) == (200, 1)


def test_a_402_is_a_result_and_replays_even_after_a_top_up(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 10, "g1")
    assert spend(client, "acct_1", 30, "s1").status_code == 402
    grant(client, admin_headers, "acct_1", 100, "g2")
    again = spend(client, "acct_1", 30, "s1")
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (402, "true")


def test_a_post_without_an_idempotency_key_is_400(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    response = client.post("/v1/accounts/acct_1/spend", json={"amount": 1})
    assert (response.status_code, response.json()["error"]) == (400, "idempotency_key_required")


@pytest.mark.parametrize("amount", [0, -5, 1.5, "10", True, None, 10**13])
def test_a_bad_amount_is_422_never_500(client: TestClient, admin_headers, amount: object) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    response = spend(client, "acct_1", amount, "s1")
    assert (response.status_code, response.json()["error"]) == (422, "invalid_request")


def test_malformed_json_is_422_with_a_json_error(client: TestClient) -> None:
    response = client.post(
        "/v1/accounts/acct_1/spend",
        content=b"{not json",
        headers={"Idempotency-Key": "s1", "Content-Type": "application/json"},
    )
    assert (response.status_code, response.json()["error"]) == (422, "invalid_request")


def test_an_unknown_field_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/accounts/acct_1/spend", json={"amount": 1, "amuont": 2}, headers={"Idempotency-Key": "k"}
    )
    assert response.status_code == 422


def test_ledger_pages_newest_first(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    for n in range(4):
        spend(client, "acct_1", 1, f"s{n}")
    first = client.get("/v1/accounts/acct_1/ledger", params={"limit": 3}).json()
    assert [(e["kind"], e["amount"]) for e in first["entries"]] == [("spend", -1)] * 3
    second = client.get("/v1/accounts/acct_1/ledger", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [(e["kind"], e["amount"], e["reason"]) for e in second["entries"]] == [
        ("spend", -1, None),
        ("grant", 100, "support gesture"),
    ]
    assert second["next_cursor"] is None
    assert second["entries"][1]["actor"] == "api:admin"


def test_a_bad_cursor_is_400(client: TestClient, admin_headers) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    assert client.get("/v1/accounts/acct_1/ledger", params={"cursor": "x"}).status_code == 400


def test_a_database_outage_during_a_spend_is_503(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr("service.entry.idempotency.run_once", down)
    client = TestClient(create_app(rt), headers={"Authorization": f"Bearer {API_TOKEN}"})
    response = spend(client, "acct_1", 1, "s1")
    assert (response.status_code, response.json()["error"]) == (503, "database_unavailable")


def test_the_openapi_schema_is_served(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/accounts/{account}/spend", "/v1/accounts/{account}/grants"} <= set(paths)


@pytest.mark.parametrize("cursor", ["²", "9" * 30])
def test_a_cursor_that_is_not_a_small_ascii_number_is_400(client: TestClient, admin_headers, cursor: str) -> None:
    grant(client, admin_headers, "acct_1", 100, "g1")
    assert client.get("/v1/accounts/acct_1/ledger", params={"cursor": cursor}).status_code == 400


def test_a_value_the_database_cannot_store_is_never_a_500(client: TestClient, admin_headers) -> None:
    """PostgreSQL refuses an over-long id or a NUL character (422); SQLite stores them (201 / 404)."""
    assert grant(client, admin_headers, "acct_" + "x" * 300, 5, "g1").status_code in (201, 422)
    assert client.get("/v1/accounts/acct_%00/balance").status_code in (404, 422)


def test_an_error_repeats_only_a_short_prefix_of_what_was_sent(client: TestClient, admin_headers) -> None:
    long_id = "x" * 10_000
    missing = client.get(f"/v1/accounts/{long_id}/balance")
    assert (missing.status_code, missing.json()["message"]) == (
        404,
        f"no account or Stripe customer '{'x' * 40}…'",
    )
    grant(client, admin_headers, "acct_1", 100, "g1")
    odd = client.post("/v1/accounts/acct_1/spend", json={"amount": 1, "y" * 5000: 1}, headers={"Idempotency-Key": "s"})
    assert odd.status_code == 422
    assert len(odd.text) < 1000 and "y" * 41 not in odd.text


def test_a_method_a_route_does_not_take_is_405_saying_which_it_does(client: TestClient) -> None:
    response = client.request("TRACE", "/v1/accounts/acct_1/balance")
    assert (response.status_code, response.headers["Allow"], response.json()["error"]) == (405, "GET", "http_error")


def test_the_openapi_document_lists_every_answer_in_the_one_error_shape(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    spend = document["paths"]["/v1/accounts/{account}/spend"]["post"]
    assert sorted(spend["responses"]) == ["200", "400", "401", "402", "404", "409", "413", "422", "500", "503"]
    assert {
        r["content"]["application/json"]["schema"]["$ref"] for s, r in spend["responses"].items() if s >= "400"
    } == {"#/components/schemas/ErrorAnswer"}
    [key] = [p for p in spend["parameters"] if p["name"] == "Idempotency-Key"]
    assert (key["required"], key["schema"]["maxLength"]) == (True, 255)
    assert document["components"]["schemas"]["SpendRequest"]["oneOf"] == [
        {"required": ["amount"], "properties": {"amount": {"type": "integer"}}},
        {"required": ["action"], "properties": {"action": {"type": "string"}}},
    ]
    assert "403" in document["paths"]["/v1/accounts/{account}/grants"]["post"]["responses"]


def test_a_405_names_every_method_of_a_path_that_several_routes_share(client: TestClient) -> None:
    response = client.request("OPTIONS", "/v1/accounts/acct_1/members")
    assert (response.status_code, response.headers["Allow"]) == (405, "GET, POST")
