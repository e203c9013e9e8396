"""A signed event whose object does not fit what the service reads is `invalid` at once, with its reason:
never retried, never a credit, listed by `credits events list --status invalid`."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from jobs import worker
from service.infra import stripe_payloads
from service.infra.models import LedgerEntry, StripeEvent, utcnow
from tests import stripe_events as se
from tests.helpers import committed
from webhooks import inbox
from webhooks.handlers import HANDLERS


def invoice(**changes: object) -> dict:
    obj = se.invoice(
        "2025",
        invoice_id="in_1",
        customer="cus_1",
        price="price_starter_monthly",
        amount_paid=34900,
        subscription_metadata={"account_id": "acct_1"},
    )
    obj.update(changes)
    return obj


def status_of(rt, event_id: str) -> tuple[str, str | None, int]:
    with rt.uow() as uow:
        row = uow.session.get_one(StripeEvent, event_id)
        return row.status, row.outcome, row.attempts


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        ("34900", "amount_paid: Input should be a valid integer"),
        (10**30, "amount_paid: Input should be less than or equal to 1000000000000"),
        (-1, "amount_paid: Input should be greater than or equal to 0"),
    ],
    ids=["string", "huge", "negative"],
)
def test_an_invoice_with_an_unreadable_amount_is_invalid_at_once_and_grants_nothing(
    deliver, rt, amount: object, reason: str
) -> None:
    deliver(se.event("invoice.paid", invoice(amount_paid=amount), event_id="evt_1"))
    status, outcome, attempts = status_of(rt, "evt_1")
    assert (status, attempts) == ("invalid", 1)  # handled once, refused, never again
    assert outcome is not None and outcome.startswith(reason)
    assert ledger_entries(rt) == 0


def test_an_invalid_event_is_never_retried(deliver, rt) -> None:
    deliver(se.event("invoice.paid", invoice(amount_paid="34900"), event_id="evt_1"))
    assert worker.drain(rt) == {}
    assert status_of(rt, "evt_1")[0] == "invalid"


def test_a_pack_with_a_negative_amount_is_invalid_and_one_of_zero_grants_nothing(deliver, rt) -> None:
    meta = {"pack": "boost", "account_id": "acct_1"}
    deliver(se.event("payment_intent.succeeded", se.payment_intent(amount=-100, metadata=meta), event_id="evt_neg"))
    free = se.payment_intent(intent_id="pi_2", amount=0, metadata=meta, charge="ch_2")
    deliver(se.event("payment_intent.succeeded", free, event_id="evt_zero"))
    status, outcome, _ = status_of(rt, "evt_neg")
    assert (status, outcome) == ("invalid", "amount: Input should be greater than or equal to 0 (2 problems)")
    assert status_of(rt, "evt_zero")[:2] == ("processed", "no credits: amount is 0")
    assert ledger_entries(rt) == 0


def ledger_entries(rt) -> int:
    with rt.uow() as uow:
        return uow.session.scalar(select(func.count()).select_from(LedgerEntry)) or 0


def test_an_account_id_longer_than_an_account_id_can_be_is_invalid(deliver, rt) -> None:
    long = invoice()
    long["parent"]["subscription_details"]["metadata"] = {"account_id": "a" * 400}
    deliver(se.event("invoice.paid", long, event_id="evt_1"))
    assert status_of(rt, "evt_1")[0] == "invalid"


def test_invalid_events_are_listed_by_the_cli(deliver, run) -> None:
    deliver(se.event("invoice.paid", invoice(amount_paid="34900"), event_id="evt_1"))
    code, out, _ = run("events", "list", "--status", "invalid", "--json")
    assert code == 0
    [listed] = json.loads(out)["events"]
    assert (listed["id"], listed["status"]) == ("evt_1", "invalid")
    assert listed["outcome"].startswith("amount_paid: Input should be a valid integer")


def test_an_object_that_names_no_account_and_no_customer_is_invalid_not_retried(deliver, rt) -> None:
    session = se.checkout_session(customer=None, client_reference_id=None, metadata={"pack": "boost"})
    deliver(se.event("checkout.session.completed", session, event_id="evt_1"))
    with rt.uow() as uow:
        row = uow.session.get_one(StripeEvent, "evt_1")
        assert (row.status, row.attempts) == ("invalid", 1)
        assert "Unresolvable: the objects name no account id and no customer" in (row.last_error or "")
    assert ledger_entries(rt) == 0


@pytest.mark.parametrize("data", ["x", None, {"object": "x"}], ids=["string", "null", "object-a-string"])
def test_an_event_whose_data_holds_no_object_is_invalid_at_once(deliver, rt, data: object) -> None:
    deliver({"id": "evt_1", "object": "event", "type": "invoice.paid", "livemode": False, "created": 1, "data": data})
    status, outcome, attempts = status_of(rt, "evt_1")
    assert (status, attempts) == ("invalid", 1)
    assert outcome is not None and outcome.startswith("data.object: not an object")


def test_an_id_too_long_to_key_the_ledger_is_invalid(deliver, rt) -> None:
    deliver(se.event("invoice.paid", invoice(id="in_" + "a" * 250), event_id="evt_1"))
    status, outcome, _ = status_of(rt, "evt_1")
    assert (status, outcome) == ("invalid", "id: String should have at most 200 characters (1 problem)")


def test_a_batch_of_invalid_events_does_not_stop_the_worker_draining_the_rest(rt) -> None:
    with committed(rt) as uow:
        for n in range(10):
            bad = invoice(id=f"in_{n}", amount_paid="34900", customer=f"cus_{n}")
            inbox.store(uow, se.event("invoice.paid", bad, event_id=f"evt_bad_{n}"), utcnow())
        inbox.store(uow, se.event("invoice.paid", invoice(id="in_ok", customer="cus_ok"), event_id="evt_ok"), utcnow())
    assert worker.drain(rt) == {"invalid": 10, "processed": 1}
    assert ledger_entries(rt) == 1


def test_every_object_a_handler_takes_has_its_model_at_the_door() -> None:
    assert {expected for expected, _ in HANDLERS.values()} <= set(stripe_payloads.MODELS)


def test_an_event_whose_time_is_not_an_epoch_is_invalid(deliver, rt) -> None:
    evt = se.event("invoice.paid", invoice(), event_id="evt_1")
    evt["created"] = "x"
    deliver(evt)
    assert status_of(rt, "evt_1")[:2] == ("invalid", "created: Input should be a valid integer (1 problem)")
