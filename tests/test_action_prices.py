"""Actions priced by formula: `[actions.gift]` with `base = 8` and `add = "denomination"` makes the spend
`{"action": "gift", "denomination": 25}` cost 33 — through the HTTP API, with exact balances and ledger rows,
on both databases. A missing, non-integer or unexpected field is 422 naming it, with nothing written."""

from __future__ import annotations

from itertools import count

import pytest

from service.domain import spending
from service.entry.schemas import SpendRequest
from service.infra.catalogue import SPEND_FIELDS, ActionPrice
from service.infra.models import ApiRequest
from tests.helpers import spend_rows, state

_keys = count()


def spend(client, body: dict, key: str | None = None):
    return client.post("/v1/accounts/acct_1/spend", json=body, headers={"Idempotency-Key": key or f"gift{next(_keys)}"})


def nothing_written(rt, key: str) -> None:
    assert spend_rows(rt) == []
    assert state(rt, "acct_1")[1] == [("admin", 100, 100, 0, 0, 0)]
    with rt.uow() as uow:
        assert uow.session.get(ApiRequest, key) is None  # the key stays free for the corrected request


def test_a_gift_costs_its_base_plus_its_denomination(client, funded, rt) -> None:
    response = spend(client, {"action": "gift", "denomination": 25})
    assert (response.status_code, response.json()) == (
        200,
        {"balance": 67, "spent": 33, "charged": 33, "entry_id": 2, "action": "gift", "quantity": 1, "denomination": 25},
    )
    assert spend_rows(rt) == [(-33, {"action": "gift", "quantity": 1, "base": 8, "denomination": 25})]
    assert state(rt, "acct_1")[1] == [("admin", 100, 67, 33, 0, 0)]


def test_a_formula_price_is_multiplied_by_the_quantity(client, funded, rt) -> None:
    response = spend(client, {"action": "gift", "denomination": 2, "quantity": 3})
    assert (response.status_code, response.json()["charged"], response.json()["balance"]) == (200, 30, 70)
    assert spend_rows(rt) == [(-30, {"action": "gift", "quantity": 3, "base": 8, "denomination": 2})]


def test_a_formula_spend_shows_in_usage_under_its_action(client, funded) -> None:
    spend(client, {"action": "gift", "denomination": 25})
    spend(client, {"action": "postcard_us"})
    assert client.get("/v1/accounts/acct_1/usage").json()["spent"]["by_action"] == {"gift": 33, "postcard_us": 1}


def test_a_missing_field_is_422_naming_it_and_nothing_is_written(client, funded, rt) -> None:
    response = spend(client, {"action": "gift"}, key="k1")
    assert (response.status_code, response.json()) == (
        422,
        {
            "error": "invalid_request",
            "message": "action 'gift' needs 'denomination', a positive integer",
            "details": [{"loc": ["body", "denomination"], "message": "Field required"}],
        },
    )
    nothing_written(rt, "k1")
    fixed = spend(client, {"action": "gift", "denomination": 25}, key="k1")
    assert (fixed.status_code, fixed.json()["charged"]) == (200, 33)


@pytest.mark.parametrize("value", ["25", 25.0, 2.5, True, None, [25], {"n": 25}, 0, -5, 10**13])
def test_a_field_that_is_not_a_positive_integer_is_422_naming_it(client, funded, rt, value: object) -> None:
    response = spend(client, {"action": "gift", "denomination": value}, key="k1")
    assert (response.status_code, response.json()["error"]) == (422, "invalid_request")
    assert [d["loc"] for d in response.json()["details"]] == [["body", "denomination"]]
    nothing_written(rt, "k1")


def test_a_field_is_checked_with_the_body_before_the_account_is_looked_up(client) -> None:
    response = client.post("/v1/accounts/nobody/spend", json={"action": "gift"}, headers={"Idempotency-Key": "k1"})
    assert (response.status_code, response.json()["details"]) == (
        422,
        [{"loc": ["body", "denomination"], "message": "Field required"}],
    )


def test_a_flat_price_keeps_working(client, funded, rt) -> None:
    response = spend(client, {"action": "postcard_intl", "quantity": 2})
    assert (response.status_code, response.json()["charged"], response.json()["balance"]) == (200, 4, 96)
    assert spend_rows(rt) == [(-4, {"action": "postcard_intl", "quantity": 2})]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": "postcard_us", "colour": 3}, "action 'postcard_us' takes no field 'colour'"),
        ({"action": "postcard_us", "denomination": 25}, "action 'postcard_us' takes no field 'denomination'"),
        ({"amount": 5, "denomination": 25}, "a spend by amount takes no field 'denomination'"),
        ({"action": "gift", "denomination": 25, "colour": 3}, "action 'gift' takes no field 'colour'"),
    ],
)
def test_a_field_the_action_does_not_take_is_refused(client, funded, rt, body: dict, message: str) -> None:
    field = "colour" if "colour" in body else "denomination"
    response = spend(client, body, key="k1")
    assert (response.status_code, response.json()) == (
        422,
        {
            "error": "invalid_request",
            "message": message,
            "details": [{"loc": ["body", field], "message": "Extra inputs are not permitted"}],
        },
    )
    nothing_written(rt, "k1")


def test_an_unknown_field_that_is_no_integer_is_refused_by_validation(client, funded, rt) -> None:
    response = spend(client, {"action": "postcard_us", "colour": "red"}, key="k1")
    assert (response.status_code, response.json()["error"]) == (422, "invalid_request")
    assert [d["loc"] for d in response.json()["details"]] == [["body", "colour"]]
    nothing_written(rt, "k1")


def test_an_unknown_action_is_named_before_its_fields(client, funded) -> None:
    response = spend(client, {"action": "fax", "denomination": 25})
    assert (response.status_code, response.json()["error"]) == (422, "unknown_action")
    assert "gift" in response.json()["known_actions"]


def test_the_same_key_replays_the_same_answer(client, funded, rt) -> None:
    first = spend(client, {"action": "gift", "denomination": 25}, key="k1")
    again = spend(client, {"denomination": 25, "action": "gift"}, key="k1")
    assert (again.status_code, again.json()) == (200, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    assert [amount for amount, _ in spend_rows(rt)] == [-33]


def test_the_same_key_with_another_denomination_is_a_conflict(client, funded, rt) -> None:
    spend(client, {"action": "gift", "denomination": 25}, key="k1")
    other = spend(client, {"action": "gift", "denomination": 50}, key="k1")
    assert (other.status_code, other.json()["error"]) == (409, "idempotency_key_reused")
    assert [amount for amount, _ in spend_rows(rt)] == [-33]
    assert client.get("/v1/accounts/acct_1/balance").json()["balance"] == 67


def test_a_gift_for_a_resource_is_charged_once(client, funded) -> None:
    first = spend(client, {"action": "gift", "denomination": 25, "resource": "order:7"})
    again = spend(client, {"action": "gift", "denomination": 40, "resource": "order:7"})
    assert (first.json()["charged"], again.json()["charged"], again.json()["balance"]) == (33, 0, 67)


def test_a_gift_the_balance_cannot_cover_is_402_and_spends_nothing(client, funded, rt) -> None:
    response = spend(client, {"action": "gift", "denomination": 93})
    assert (response.status_code, response.json()["requested"], response.json()["balance"]) == (402, 101, 100)
    assert spend_rows(rt) == []


def test_the_price_is_computed_by_the_domain_too(rt) -> None:
    assert rt.catalogue.actions["gift"] == ActionPrice(base=8, add="denomination")
    assert spending.cost(rt.catalogue, spending.Charge(action="gift", fields={"denomination": 25})) == 33
    with pytest.raises(spending.FieldRefused, match="'denomination' must be a positive integer"):
        spending.cost(rt.catalogue, spending.Charge(action="gift", fields={"denomination": -25}))


def test_no_formula_can_name_a_field_every_spend_has() -> None:
    """A formula's field is given beside the spend's own; the catalogue refuses the names those take."""
    assert set(SpendRequest.model_fields) <= SPEND_FIELDS
