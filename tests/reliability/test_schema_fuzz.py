"""schemathesis, with every check it has, against the service's own OpenAPI schema: whatever a /v1 operation is
sent, it answers no 5xx, only answers its document lists (status, content type, body schema, headers), refuses
what breaks the schema and accepts what keeps it — but for what no schema can say (a balance, the catalogue).

The app is the real one (service.entry.api.create_app) served in-process over ASGI, on the test's empty database
(tests/conftest.py's `rt`: SQLite, then PostgreSQL, whose text columns refuse the NUL characters SQLite
stores), seeded with one account that holds credits, a referral code and a member, so that generated
requests reach the ledger and not only the 404 path: half of the generated account ids are replaced by it,
and well-formed spends and the seeded referral code are mixed into the generated bodies (the schema cannot
express either) — into bodies valid by the schema only, so a broken one stays broken. A POST whose case
leaves the Idempotency-Key out gets a fresh one (its absence is a plain 400, tested in tests/test_api.py).

Each operation gets EXAMPLES cases, valid by the schema and not (schemathesis' positive and negative
generation), checked with every check schemathesis has: once with the API token (admin routes then answer
403) and once with the admin token. The operations are parametrized here, and hypothesis is driven directly
with `APIOperation.as_strategy()`: schemathesis 4.32.5's own pytest integration does not name its items per
operation under pytest 9.2, and its `from_fixture` mode fails there (`Function` has no `_nodeid`).

Below the fuzzer, regression tests for two 500s found on the way: a NUL character in a request (PostgreSQL
cannot store one: found by running this fuzzer on PostgreSQL) and a ledger cursor of Unicode digits or
beyond 64 bits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis.core.result import Err, Ok
from schemathesis.errors import InvalidSchema

from service.domain import accounts, ledger, referrals, spending
from service.entry.api import create_app
from service.infra.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, API_TOKEN
from tests.helpers import committed
from tests.reliability.support import runtime_for, settings_for

KNOWN = "acct_fuzz"
EXAMPLES = 25  # per operation and token

# The app whose schema is fuzzed. Its Runtime is a placeholder at import (loading the schema needs no
# database, and this engine never connects); `fuzz_db` puts a fresh, seeded database behind it for each
# test (every route under /v1 reads `app.state.runtime` at request time).
APP = create_app(runtime_for(settings_for("sqlite://")))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP).include(path_regex=r"^/v1/")
# The tokens are the test's to send (the API token, then the admin one): schemathesis generates no
# Authorization of its own. Query parameters a route does not declare are ignored, as most APIs do, so it
# generates none.
SCHEMA.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
# What a request valid by the schema may still be answered for what no schema can say: a cursor that is no
# page of ours (400), a balance too low (402), an unknown account (404), a key reused (409), an unknown action,
# an allocation that does not fit or an expiry in the past (422).
SCHEMA.config.checks.positive_data_acceptance.expected_statuses = [
    "2xx",
    "400",
    "401",
    "402",
    "403",
    "404",
    "409",
    "422",
]


def _operation(result: Ok[APIOperation] | Err[InvalidSchema]) -> APIOperation:
    """An operation of the schema; one the schema fails to describe is raised as the error it is."""
    if isinstance(result, Err):
        raise result.err()
    return result.ok()


OPERATIONS = {op.label: op for op in (_operation(result) for result in SCHEMA.get_all_operations())}


@SCHEMA.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Half of the generated account ids name the seeded account, so requests reach the ledger."""
    if not path_parameters or "account" not in path_parameters:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, "account": KNOWN}])


def well_formed_bodies(path: str, body: Any) -> st.SearchStrategy[Any]:
    """The schema cannot say that a spend takes an amount or an action (not both, not neither), nor which
    referral codes exist: a body valid by the schema is also sent as a well-formed spend or with the seeded
    account's code, to reach the ledger. (Only a valid one: a body that breaks the schema must stay broken.)"""
    if not isinstance(body, dict):
        return st.just(body)
    if path.endswith("/spend"):
        return st.one_of(
            st.just(body),
            st.fixed_dictionaries({"amount": st.integers(1, 2000)}),
            st.fixed_dictionaries(
                {"action": st.sampled_from(["unlock_prospect", "handwritten_note", "gift", "no_such_action"])},
                optional={
                    "denomination": st.integers(1, 100),
                    "quantity": st.integers(1, 50),
                    "resource": st.text(min_size=1, max_size=20),
                    "member_id": st.sampled_from(["member_1", "nobody"]),
                },
            ),
        )
    if path == "/v1/referrals":
        return st.sampled_from([body, {**body, "code": SEEDED["code"]}])
    return st.just(body)


SEEDED: dict[str, str] = {"code": "NOTACODE"}


@pytest.fixture
def fuzz_db(rt: Runtime) -> Iterator[Runtime]:
    """The test's empty database (tests/conftest.py: SQLite, then PostgreSQL) behind APP, seeded with one
    account with credits, a referral code and a member."""
    with committed(rt) as uow:
        account = accounts.get_or_create(uow, KNOWN)
        ledger.grant(uow, account, 1000, source="admin", key="seed:acct_fuzz", reason="seed")
        SEEDED["code"] = referrals.code_for(uow, account)
        spending.set_member(uow, account, "member_1", allocation=None, limit_per_period=100)
    placeholder, APP.state.runtime = APP.state.runtime, rt
    yield rt
    APP.state.runtime = placeholder


def _fuzz(label: str, token: str) -> None:
    operation = OPERATIONS[label]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=cases, data=st.data())
    def check(case: Any, data: st.DataObject) -> None:
        if case.meta.generation.mode is GenerationMode.POSITIVE:
            case.body = data.draw(well_formed_bodies(operation.path, case.body))
        headers = {"Authorization": f"Bearer {token}"}
        if case.method.upper() == "POST" and "Idempotency-Key" not in (case.headers or {}):
            headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4()}"
        case.call_and_validate(headers=headers)  # every check schemathesis has

    check()


def test_every_v1_operation_is_fuzzed() -> None:
    assert len(OPERATIONS) >= 12, sorted(OPERATIONS)


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_every_v1_operation_answers_as_its_document_says_with_the_api_token(label: str, fuzz_db: Runtime) -> None:
    _fuzz(label, API_TOKEN)


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_every_v1_operation_answers_as_its_document_says_with_the_admin_token(label: str, fuzz_db: Runtime) -> None:
    _fuzz(label, ADMIN_TOKEN)


# --- 500s found on the way ---------------------------------------------------------------------------------


def test_a_nul_character_in_a_v1_request_is_not_a_5xx(client, admin_headers) -> None:
    key = {"Idempotency-Key": "nul-1"}
    answers = {
        "path account": client.get("/v1/accounts/a%00b/balance").status_code,
        "spend reason": client.post(
            "/v1/accounts/acct_1/spend", json={"amount": 1, "reason": "a\x00b"}, headers=key
        ).status_code,
        "grant reason": client.post(
            "/v1/accounts/acct_1/grants",
            json={"amount": 1, "reason": "a\x00b"},
            headers={**admin_headers, "Idempotency-Key": "nul-2"},
        ).status_code,
        "referee id": client.post(
            "/v1/referrals",
            json={"code": "ABCDEFGH", "referee_account_id": "a\x00b"},
            headers={"Idempotency-Key": "nul-3"},
        ).status_code,
    }
    assert all(status < 500 for status in answers.values()), answers


@pytest.mark.parametrize("cursor", ["²", "9" * 25], ids=["unicode-digit", "beyond-64-bits"])
def test_a_ledger_cursor_that_is_no_page_of_ours_is_400(cursor: str, client, admin_headers) -> None:
    client.post(
        "/v1/accounts/acct_1/grants",
        json={"amount": 5, "reason": "x"},
        headers={**admin_headers, "Idempotency-Key": "g"},
    )
    response = client.get("/v1/accounts/acct_1/ledger", params={"cursor": cursor})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_cursor")
