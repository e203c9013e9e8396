"""Every recorded Stripe object, mutated by hypothesis at one place — a field deleted, given the wrong type, a
huge or negative number, a long or odd string, or a field added — and delivered correctly signed, on both
databases. Whatever the mutation, the event ends `processed`, `ignored` or `invalid` (refused at once with
its reason, never retried), or `failed` only while it waits for something that may still come (the payment a
refund names, a customer at Stripe); an `invalid` object never moves a credit; and the ledger checks clean.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from service.domain import ledger
from service.infra.models import LedgerEntry, StripeEvent
from tests import stripe_events as se

pytestmark = pytest.mark.usefixtures("every_delivery_processed_inline")
MUTATIONS = settings(
    max_examples=30,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Each recorded object, and the event type that carries it.
FIXTURES = {
    "current.invoice.json": "invoice.paid",
    "current.charge.json": "charge.refunded",
    "current.dispute.json": "charge.dispute.closed",
    "current.checkout.session.json": "checkout.session.completed",
    "current.payment_intent.json": "payment_intent.succeeded",
    "current.subscription.json": "customer.subscription.updated",
    "current.customer.json": "customer.updated",
    "localstripe.invoice.payment_succeeded.json": "invoice.payment_succeeded",
    "localstripe.payment_intent.succeeded.json": "payment_intent.succeeded",
    "localstripe.customer.subscription.created.json": "customer.subscription.created",
}
# A handler waiting for what may still come (a payment, Stripe): retried, it may succeed.
WAITING = (
    "PaymentNotFound",
    "StripeError",
    "APIConnectionError",
    "InvalidRequestError",
    "AccountConflict",
)
_ids = itertools.count(1)

odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([10**30, 2**63, -(2**63) - 1, -100, 0, 1.5, -0.0]),
    st.integers(),
    st.text(max_size=20),
    st.just("34900"),
    st.just("x" * 10_000),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x2FFFF, exclude_categories=["Cs"]), max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def recorded(name: str) -> dict[str, Any]:
    """The recorded object (an event's `data.object` when the file holds a whole event)."""
    data = se.fixture(name)
    return data["data"]["object"] if data.get("object") == "event" else data


def paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value, its root's own `object` and `id` kept (they route the event)."""
    found = [here] if here else []
    if isinstance(value, dict):
        for key, inner in value.items():
            if here or key not in ("object", "id"):
                found += paths(inner, (*here, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths(inner, (*here, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, name: str) -> dict[str, Any]:
    obj = copy.deepcopy(recorded(name))
    where = draw(st.sampled_from(paths(obj)))
    parent = obj
    for step in where[:-1]:
        parent = parent[step]
    last = where[-1]
    how = draw(st.sampled_from(["replace", "delete", "add"]))
    if how == "delete" and isinstance(parent, dict):
        del parent[last]
    elif how == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=12))] = draw(odd_values)
    else:
        parent[last] = draw(odd_values)
    return obj


def entries(rt) -> int:
    with rt.uow() as uow:
        return uow.session.scalar(select(func.count()).select_from(LedgerEntry)) or 0


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_a_mutated_recorded_object_is_handled_refused_or_waiting_never_a_crash(
    name: str, deliver, rt, stripe_404
) -> None:
    @MUTATIONS
    @given(obj=mutated(name))
    def check(obj: dict[str, Any]) -> None:
        event_id = f"evt_mutant_{next(_ids)}"
        before = entries(rt)
        assert deliver(se.event(FIXTURES[name], obj, event_id=event_id)).status_code == 200
        with rt.uow() as uow:
            row = uow.session.get_one(StripeEvent, event_id)
            status, error = row.status, row.last_error or ""
            assert ledger.check(uow) == []
        assert status in ("processed", "ignored", "invalid", "failed"), f"{event_id} ended {status!r}"
        if status == "failed":
            assert any(reason in error for reason in WAITING), f"retried for nothing: {error}"
        if status == "invalid":
            assert entries(rt) == before, "an invalid object moved credits"

    check()
