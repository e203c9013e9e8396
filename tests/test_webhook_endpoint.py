"""POST /webhooks/stripe: what is accepted, what is refused (and then stored nowhere), and durability."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from jobs import worker
from service.entry.api import create_app
from service.infra.db import make_engine, make_sessionmaker
from service.infra.models import StripeEvent
from service.infra.runtime import Runtime
from tests import stripe_events as se
from tests.helpers import balance_of, state
from webhooks.inline import InlineProcessor


def starter_invoice(era: str = "2025", invoice_id: str = "in_1", customer: str = "cus_1") -> dict:
    return se.invoice(
        era,
        invoice_id=invoice_id,
        customer=customer,
        price="price_starter_monthly",
        amount_paid=2000,
        subscription_metadata={"account_id": "acct_1"},
    )


def stored(rt) -> list[tuple[str, str]]:
    with rt.uow() as uow:
        return [(e.id, e.status) for e in uow.session.scalars(select(StripeEvent).order_by(StripeEvent.received_at))]


def test_a_signed_event_is_stored_processed_and_answered_200(deliver, rt) -> None:
    evt = se.event("invoice.paid", starter_invoice(), event_id="evt_1")
    response = deliver(evt)
    assert (response.status_code, response.json()) == (200, {"received": True, "duplicate": False})
    assert stored(rt) == [("evt_1", "processed")]
    assert balance_of(rt, "acct_1") == 2000


def test_a_bad_signature_is_400_and_nothing_is_stored(deliver, rt) -> None:
    response = deliver(se.event("invoice.paid", starter_invoice()), secret="whsec_wrong")
    assert (response.status_code, response.json()["error"]) == (400, "refused")
    assert stored(rt) == []


def test_a_missing_signature_is_400(deliver, rt) -> None:
    assert deliver(se.event("invoice.paid", starter_invoice()), header="").status_code == 400
    assert stored(rt) == []


def test_a_signature_older_than_five_minutes_is_400(deliver, rt) -> None:
    assert deliver(se.event("invoice.paid", starter_invoice()), at=int(time.time()) - 301).status_code == 400
    assert stored(rt) == []


def test_a_signature_from_the_future_is_400(deliver, rt) -> None:
    assert deliver(se.event("invoice.paid", starter_invoice()), at=int(time.time()) + 330).status_code == 400
    assert stored(rt) == []


def test_a_reserialised_body_does_not_verify(deliver, rt) -> None:
    evt = se.event("invoice.paid", starter_invoice())
    header = se.sign(se.encode(evt))
    respaced = se.encode(evt).replace(b'": ', b'":')
    assert deliver(raw=respaced, header=header).status_code == 400
    assert stored(rt) == []


def test_the_previous_secret_still_verifies_during_a_rotation(deliver, rt) -> None:
    assert deliver(se.event("invoice.paid", starter_invoice()), secret="whsec_test_previous").status_code == 200
    assert balance_of(rt, "acct_1") == 2000


def test_any_matching_v1_in_the_header_verifies(deliver) -> None:
    body = se.encode(se.event("invoice.paid", starter_invoice()))
    good = se.sign(body)
    t, v1 = good.split(",")
    assert deliver(raw=body, header=f"{t},v1={'0' * 64},{v1}").status_code == 200


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"id": "evt_1"}', b'{"type": "invoice.paid"}', b"\xff\xfe"])
def test_a_signed_body_that_is_not_an_event_is_400(deliver, rt, raw: bytes) -> None:
    assert deliver(raw=raw).status_code == 400
    assert stored(rt) == []


def test_a_body_over_one_mebibyte_is_413(deliver, rt) -> None:
    raw = b'{"id": "evt_big", "type": "x", "pad": "' + b"x" * (1024 * 1024) + b'"}'
    assert deliver(raw=raw).status_code == 413
    assert stored(rt) == []


def test_a_streamed_body_that_grows_past_one_mebibyte_is_413(client: TestClient, rt) -> None:
    """No Content-Length to refuse it by: it is refused once what was read passes the limit."""
    chunks = (b"x" * 65536 for _ in range(17))
    response = client.post("/webhooks/stripe", content=chunks, headers={"Stripe-Signature": "t=1,v1=0"})
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")
    assert stored(rt) == []


def test_a_redelivery_is_200_and_changes_nothing(deliver, rt) -> None:
    evt = se.event("invoice.paid", starter_invoice(), event_id="evt_1")
    deliver(evt)
    again = deliver(evt)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    assert stored(rt) == [("evt_1", "processed")]
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_an_unknown_event_type_is_stored_ignored_and_answered_200(deliver, rt) -> None:
    evt = se.event("invoice.created", starter_invoice(), event_id="evt_1")
    assert deliver(evt).status_code == 200
    assert stored(rt) == [("evt_1", "ignored")]


def test_an_event_of_the_other_livemode_is_ignored(deliver, rt) -> None:
    deliver(se.event("invoice.paid", starter_invoice(), event_id="evt_1", livemode=True))
    assert stored(rt) == [("evt_1", "ignored")]


def test_an_event_whose_object_is_not_the_expected_type_is_ignored(deliver, rt) -> None:
    deliver(se.event("invoice.paid", se.customer("cus_1"), event_id="evt_1"))
    assert stored(rt) == [("evt_1", "ignored")]


def test_a_database_outage_is_503_so_stripe_retries(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_args: object) -> bool:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr("webhooks.inbox.store_many", down)
    body = se.encode(se.event("invoice.paid", starter_invoice()))
    response = TestClient(create_app(rt)).post(
        "/webhooks/stripe", content=body, headers={"Stripe-Signature": se.sign(body)}
    )
    assert (response.status_code, response.json()["error"]) == (503, "database_unavailable")


def test_an_unexpected_failure_is_a_json_500_with_the_request_id(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> dict:
        raise RuntimeError("a bug")

    monkeypatch.setattr("webhooks.inbox.store_many", broken)
    body = se.encode(se.event("invoice.paid", starter_invoice()))
    response = TestClient(create_app(rt)).post(
        "/webhooks/stripe", content=body, headers={"Stripe-Signature": se.sign(body), "X-Request-Id": "req-1"}
    )
    assert (response.status_code, response.json()["error"], response.headers["x-request-id"]) == (
        500,
        "internal_error",
        "req-1",
    )


def test_other_methods_on_the_webhook_path_are_405_and_store_nothing(client: TestClient, rt) -> None:
    for response in (client.get("/webhooks/stripe"), client.put("/webhooks/stripe", content=b"{}")):
        assert (response.status_code, response.headers["allow"], response.json()["error"]) == (
            405,
            "POST",
            "http_error",
        )
    assert stored(rt) == []


def test_concurrent_duplicate_deliveries_store_and_grant_once(client: TestClient, app: FastAPI, rt) -> None:
    body = se.encode(se.event("invoice.paid", starter_invoice(), event_id="evt_1"))
    start = threading.Barrier(8)

    def post(_: int) -> int:
        start.wait()
        return client.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": se.sign(body)}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(post, range(8)))
    app.state.inline.wait_idle()
    assert codes == [200] * 8
    with rt.uow() as uow:
        assert uow.session.scalar(select(func.count()).select_from(StripeEvent)) == 1
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_invoice_paid_and_payment_succeeded_for_one_invoice_grant_once(deliver, rt) -> None:
    deliver(se.event("invoice.paid", starter_invoice()))
    deliver(se.event("invoice.payment_succeeded", starter_invoice()))
    assert state(rt, "acct_1")[0] == [("grant", 2000, "invoice:in_1")]


def test_a_burst_beyond_the_inline_queue_leaves_events_pending_for_the_worker(client, app, rt) -> None:
    """The endpoint never waits for processing: what the inline queue cannot take stays pending, and the
    worker processes it."""
    app.state.inline.queue.maxsize = 1
    app.state.inline.size = 0  # no processing threads: the queue fills at once
    for n in range(3):
        evt = se.event("invoice.paid", starter_invoice(invoice_id=f"in_{n}"), event_id=f"evt_{n}")
        body = se.encode(evt)
        assert (
            client.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": se.sign(body)}).status_code
            == 200
        )
    assert [status for _, status in stored(rt)] == ["pending"] * 3
    assert worker.drain(rt)["processed"] == 3
    assert [key for _, _, key in state(rt, "acct_1")[0] if key.startswith("invoice:")] == [
        "invoice:in_0",
        "invoice:in_1",
        "invoice:in_2",
    ]


@pytest.mark.parametrize(
    "evt",
    [
        {
            "id": "evt_nul",
            "type": "invoice.paid",
            "data": {"object": {"object": "invoice", "id": "in_\u0000", "note": "a\u0000b"}},
        },
        {
            "id": "evt_when",
            "type": "invoice.paid",
            "created": 10**20,
            "data": {"object": {"object": "invoice", "id": "in_1"}},
        },
        {"id": "evt_data", "type": "invoice.paid", "data": ["not", "an", "object"]},
        {
            "id": "evt_ids",
            "type": "charge.dispute.closed",
            "data": {"object": {"object": {"x": 1}, "id": {"nested": True}}},
        },
    ],
    ids=["nul-characters", "created-out-of-range", "data-not-an-object", "ids-not-strings"],
)
def test_a_signed_event_with_malformed_fields_is_stored_never_a_500_and_credits_nothing(deliver, rt, evt) -> None:
    assert deliver(evt).status_code == 200
    assert [event_id for event_id, _ in stored(rt)] == [evt["id"]]
    with rt.uow() as uow:
        assert (
            uow.session.scalar(select(func.count()).select_from(StripeEvent).where(StripeEvent.status == "processed"))
            == 0
        )


def test_nan_or_infinity_in_a_signed_body_is_400_on_every_database(deliver, rt) -> None:
    assert deliver(raw=b'{"id": "evt_nan", "type": "ping", "created": NaN}').status_code == 400
    assert stored(rt) == []


def test_beyond_the_quiet_pace_the_endpoint_stores_and_answers_and_leaves_processing_to_the_worker(
    app, deliver, rt
) -> None:
    app.state.inline.per_second = 0  # any delivery is past it
    assert deliver(se.event("invoice.paid", starter_invoice(), event_id="evt_1")).status_code == 200
    assert stored(rt) == [("evt_1", "pending")]
    assert worker.drain(rt)["processed"] == 1
    assert balance_of(rt, "acct_1") == 2000


def test_beyond_a_few_waiting_events_the_rest_are_left_to_the_worker(rt) -> None:
    inline = InlineProcessor(rt, threads=0, waiting=1)  # no thread takes the first one off the queue
    inline.submit("evt_1", "cus_1")
    inline.submit("evt_2", "cus_2")
    assert list(inline.queue.queue) == [("evt_1", "cus_1")]


def test_a_database_that_cannot_be_reached_is_503_through_the_real_writer(rt: Runtime) -> None:
    dead = make_engine("postgresql+psycopg://root@127.0.0.1:9/nothing")
    app = create_app(Runtime(rt.settings, rt.catalogue, dead, make_sessionmaker(dead), rt.stripe))
    body = se.encode(se.event("invoice.paid", starter_invoice()))
    response = TestClient(app).post("/webhooks/stripe", content=body, headers={"Stripe-Signature": se.sign(body)})
    assert (response.status_code, response.json()["error"]) == (503, "database_unavailable")


def test_the_pace_is_the_last_whole_seconds_deliveries_or_this_seconds_once_higher(rt, monkeypatch) -> None:
    inline, clock = InlineProcessor(rt), [0.0]
    monkeypatch.setattr("webhooks.inline.time.monotonic", lambda: clock[0])

    def pace_at(now: float) -> int:
        clock[0] = now
        return inline._pace()

    assert [pace_at(now) for now in (10.0, 10.2, 10.9)] == [1, 2, 3]
    assert pace_at(11.1) == 3  # the last whole second still counts
    assert [pace_at(now) for now in (11.2, 11.3, 11.4)] == [3, 3, 4]
    assert pace_at(13.0) == 1  # a silent second in between: nothing carried over
