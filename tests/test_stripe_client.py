"""The outbound Stripe client: which failures are retried, what is sent, and how lists are paged.

Every call is intercepted by respx at https://stripe.test; the retry wait is zeroed so the suite never sleeps.
No database fixture is used.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import respx
import stripe
from pydantic import SecretStr
from tenacity import wait_none

from service.infra.config import Settings
from service.infra.stripe_client import MAX_ATTEMPTS, PAGE_SIZE, STRIPE_API_VERSION, StripeGateway

BASE = "https://stripe.test"
CUSTOMER = {"id": "cus_1", "object": "customer", "metadata": {"account_id": "acct_a"}}


def _error(status: int, kind: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": kind, "message": message}})


@pytest.fixture
def stripe_api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
def retried() -> list[BaseException]:
    return []


@pytest.fixture
def gateway(retried: list[BaseException]) -> StripeGateway:
    settings = Settings(stripe_api_key=SecretStr("sk_test_123"), stripe_api_base=BASE)
    return StripeGateway(settings, on_retry=retried.append, retry_wait=wait_none())


def test_rate_limited_call_is_retried_and_returns_the_object(
    stripe_api: respx.MockRouter, gateway: StripeGateway, retried: list[BaseException]
) -> None:
    route = stripe_api.get("/v1/customers/cus_1").mock(
        side_effect=[_error(429, "invalid_request_error", "Too many requests"), httpx.Response(200, json=CUSTOMER)]
    )

    assert gateway.retrieve_customer("cus_1") == CUSTOMER
    assert route.call_count == 2
    assert [type(exc) for exc in retried] == [stripe.RateLimitError]


def test_server_errors_are_retried_until_success(stripe_api: respx.MockRouter, gateway: StripeGateway) -> None:
    invoice = {"id": "in_1", "object": "invoice", "amount_paid": 34900}
    route = stripe_api.get("/v1/invoices/in_1").mock(
        side_effect=[
            _error(500, "api_error", "boom"),
            _error(500, "api_error", "boom"),
            httpx.Response(200, json=invoice),
        ]
    )

    assert gateway.retrieve_invoice("in_1") == invoice
    assert route.call_count == 3


def test_bad_request_is_not_retried(
    stripe_api: respx.MockRouter, gateway: StripeGateway, retried: list[BaseException]
) -> None:
    route = stripe_api.get("/v1/subscriptions/sub_missing").mock(
        return_value=_error(400, "invalid_request_error", "No such subscription")
    )

    with pytest.raises(stripe.InvalidRequestError, match="No such subscription"):
        gateway.retrieve_subscription("sub_missing")
    assert route.call_count == 1
    assert retried == []


def test_persistent_server_error_raises_after_bounded_attempts(
    stripe_api: respx.MockRouter, gateway: StripeGateway
) -> None:
    route = stripe_api.get("/v1/customers/cus_1").mock(return_value=_error(503, "api_error", "unavailable"))

    with pytest.raises(stripe.APIError) as raised:
        gateway.retrieve_customer("cus_1")
    assert raised.value.http_status == 503
    assert route.call_count == MAX_ATTEMPTS == 5


def test_connection_error_is_retried(stripe_api: respx.MockRouter, gateway: StripeGateway) -> None:
    route = stripe_api.get("/v1/customers/cus_1").mock(
        side_effect=[httpx.ConnectError("connection refused"), httpx.Response(200, json=CUSTOMER)]
    )

    assert gateway.retrieve_customer("cus_1") == CUSTOMER
    assert route.call_count == 2


def test_requests_carry_pinned_version_and_api_key(stripe_api: respx.MockRouter, gateway: StripeGateway) -> None:
    route = stripe_api.get("/v1/customers/cus_1").mock(return_value=httpx.Response(200, json=CUSTOMER))

    gateway.retrieve_customer("cus_1")

    headers = route.calls.last.request.headers
    assert stripe.api_version == STRIPE_API_VERSION
    assert headers["Stripe-Version"] == STRIPE_API_VERSION
    assert headers["Authorization"] == "Bearer sk_test_123"


def test_iterate_events_pages_lazily_with_starting_after(stripe_api: respx.MockRouter, gateway: StripeGateway) -> None:
    def page(ids: list[str], has_more: bool) -> httpx.Response:
        events = [{"id": i, "object": "event", "type": "invoice.paid", "data": {"object": {}}} for i in ids]
        return httpx.Response(200, json={"object": "list", "url": "/v1/events", "has_more": has_more, "data": events})

    route = stripe_api.get("/v1/events").mock(
        side_effect=[page(["evt_1", "evt_2"], True), page(["evt_3", "evt_4"], True), page(["evt_5"], False)]
    )

    events = gateway.iterate_events(
        created_gte=1_700_000_000, created_lte=1_700_086_400, types=["invoice.paid"], delivery_success=False
    )
    assert route.call_count == 0
    assert next(events)["id"] == "evt_1"
    assert route.call_count == 1
    assert [e["id"] for e in events] == ["evt_2", "evt_3", "evt_4", "evt_5"]

    common = {
        "created[gte]": "1700000000",
        "created[lte]": "1700086400",
        "types[0]": "invoice.paid",
        "delivery_success": "false",
        "limit": str(PAGE_SIZE),
    }
    sent = [dict(call.request.url.params) for call in route.calls]
    assert sent == [common, {**common, "starting_after": "evt_2"}, {**common, "starting_after": "evt_4"}]


class _CutOff(httpx.SyncByteStream):
    """A body whose connection drops after the first bytes."""

    def __iter__(self) -> Iterator[bytes]:
        yield b'{"object": "list", "data": ['
        raise httpx.ReadError("connection reset by peer")


def test_a_list_page_cut_off_mid_body_is_retried(
    stripe_api: respx.MockRouter, gateway: StripeGateway, retried: list[BaseException]
) -> None:
    whole = {"object": "list", "url": "/v1/invoices", "has_more": False, "data": [{"id": "in_1", "object": "invoice"}]}
    route = stripe_api.get("/v1/invoices").mock(
        side_effect=[httpx.Response(200, stream=_CutOff()), httpx.Response(200, json=whole)]
    )

    assert [i["id"] for i in gateway.iterate_invoices("paid")] == ["in_1"]
    assert route.call_count == 2
    assert [type(exc) for exc in retried] == [stripe.APIConnectionError]


def test_list_checkout_session_line_items_returns_the_items(
    stripe_api: respx.MockRouter, gateway: StripeGateway
) -> None:
    items = [
        {"id": "li_1", "object": "item", "quantity": 1, "price": {"id": "price_boost_1000", "object": "price"}},
        {"id": "li_2", "object": "item", "quantity": 2, "price": {"id": "price_other", "object": "price"}},
    ]
    stripe_api.get("/v1/checkout/sessions/cs_1/line_items").mock(
        return_value=httpx.Response(
            200,
            json={"object": "list", "url": "/v1/checkout/sessions/cs_1/line_items", "has_more": False, "data": items},
        )
    )

    assert gateway.list_checkout_session_line_items("cs_1") == items


def test_a_customers_paid_invoices_are_listed_page_by_page(
    stripe_api: respx.MockRouter, gateway: StripeGateway
) -> None:
    def page(ids: list[str], has_more: bool) -> httpx.Response:
        invoices = [{"id": i, "object": "invoice", "customer": "cus_1", "status": "paid"} for i in ids]
        return httpx.Response(
            200, json={"object": "list", "url": "/v1/invoices", "has_more": has_more, "data": invoices}
        )

    route = stripe_api.get("/v1/invoices").mock(
        side_effect=[
            _error(429, "invalid_request_error", "Too many requests"),
            page(["in_2"], True),
            page(["in_1"], False),
        ]
    )

    assert [i["id"] for i in gateway.iterate_customer_paid_invoices("cus_1")] == ["in_2", "in_1"]
    first = {"customer": "cus_1", "status": "paid", "limit": str(PAGE_SIZE)}
    sent = [dict(call.request.url.params) for call in route.calls]
    assert sent == [first, first, {**first, "starting_after": "in_2"}]
