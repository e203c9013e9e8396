"""The webhook endpoint's group commit (webhooks/writer.py): deliveries in flight share one INSERT and one
commit, yet each gets its own answer — new, redelivery, or the error that concerns it alone."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from service.infra.db import make_engine
from service.infra.group_commit import Stopped
from service.infra.models import StripeEvent, utcnow
from tests import stripe_events as se
from webhooks import inbox
from webhooks.writer import InboxWriter


def rows(*event_ids: str) -> list[dict[str, Any]]:
    return [inbox.row(se.event("invoice.paid", {"object": "invoice", "id": f"in_{i}"}, event_id=i), utcnow())
            for i in event_ids]


def store_together(writer: InboxWriter, batch: list[dict[str, Any]]) -> list[Any]:
    """Hand every row to the writer at once (as concurrent deliveries do) and collect each one's outcome."""

    async def deliver() -> list[Any]:
        return await asyncio.gather(*(writer.store(row) for row in batch), return_exceptions=True)

    try:
        return asyncio.run(deliver())
    finally:
        writer.stop()


def stored_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(StripeEvent.id).order_by(StripeEvent.id)))


def test_new_events_are_stored_and_answered_new(engine: Engine) -> None:
    assert store_together(InboxWriter(engine), rows("evt_a", "evt_b", "evt_c")) == [True, True, True]
    assert stored_ids(engine) == ["evt_a", "evt_b", "evt_c"]


def test_a_redelivery_in_the_same_batch_or_a_later_one_is_answered_as_a_duplicate(engine: Engine) -> None:
    assert store_together(InboxWriter(engine), rows("evt_a", "evt_a")) == [True, False]
    assert store_together(InboxWriter(engine), rows("evt_a", "evt_b")) == [False, True]
    assert stored_ids(engine) == ["evt_a", "evt_b"]


def test_a_row_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_stored(engine: Engine) -> None:
    batch = rows("evt_a", "evt_bad", "evt_c")
    batch[1]["type"] = None  # NOT NULL: refused by either database
    outcomes = store_together(InboxWriter(engine), batch)
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], IntegrityError)
    assert stored_ids(engine) == ["evt_a", "evt_c"]


def test_an_unreachable_database_fails_every_delivery_in_the_batch() -> None:
    dead = make_engine("postgresql+psycopg://root@127.0.0.1:9/nothing")
    outcomes = store_together(InboxWriter(dead), rows("evt_a", "evt_b"))
    assert [type(outcome) for outcome in outcomes] == [OperationalError, OperationalError]


def test_the_payload_is_stored_from_the_text_as_received(engine: Engine) -> None:
    row = inbox.row({"id": "evt_raw", "type": "ping"}, utcnow(), '{"id": "evt_raw",  "type": "ping"}')
    assert store_together(InboxWriter(engine), [row]) == [True]
    with engine.connect() as conn:
        assert conn.scalar(select(StripeEvent.payload)) == {"id": "evt_raw", "type": "ping"}


def test_a_delivery_after_the_writer_stopped_is_refused_not_left_waiting(engine: Engine) -> None:
    writer = InboxWriter(engine)
    writer.stop()
    with pytest.raises(Stopped):
        asyncio.run(writer.store(rows("evt_a")[0]))
    assert stored_ids(engine) == []


def test_a_delivery_whose_client_went_away_before_its_batch_began_is_not_stored(engine: Engine) -> None:
    writer = InboxWriter(engine)
    busy, release, write = threading.Event(), threading.Event(), writer.work

    def hold_the_first_batch(conn: Any, batch: list[dict[str, Any]]) -> list[bool]:
        if not busy.is_set():
            busy.set()
            release.wait(10)
        return write(conn, batch)

    async def deliver() -> tuple[Any, list[Any]]:
        first = asyncio.ensure_future(writer.store(rows("evt_a")[0]))
        await asyncio.to_thread(busy.wait, 10)  # the writer's thread is inside evt_a's batch
        gone = asyncio.ensure_future(writer.store(rows("evt_b")[0]))
        await asyncio.sleep(0)  # evt_b is queued for the next batch
        gone.cancel()  # its client went away
        release.set()
        return await first, await asyncio.gather(gone, return_exceptions=True)

    writer.work = hold_the_first_batch
    try:
        answered, (cancelled,) = asyncio.run(deliver())
    finally:
        writer.stop()
    assert answered is True and isinstance(cancelled, asyncio.CancelledError)
    assert stored_ids(engine) == ["evt_a"]


def test_deliveries_in_flight_together_share_commits(engine: Engine) -> None:
    commits: list[object] = []

    def count(connection: object) -> None:
        commits.append(connection)

    event.listen(engine, "commit", count)
    try:
        assert store_together(InboxWriter(engine), rows(*(f"evt_{n:02d}" for n in range(20)))) == [True] * 20
    finally:
        event.remove(engine, "commit", count)
    assert len(stored_ids(engine)) == 20
    assert len(commits) < 20  # one per batch, not one per delivery


def test_a_held_connection_that_died_is_replaced_and_the_batch_still_stored(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("an embedded SQLite database has no server to restart under the writer")
    writer = InboxWriter(engine)

    async def deliver(row: dict[str, Any]) -> bool:
        return await writer.store(row)

    try:
        assert asyncio.run(deliver(rows("evt_a")[0])) is True
        with engine.connect() as conn:  # as a server restart would: the writer's held connection is cut
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        assert asyncio.run(deliver(rows("evt_b")[0])) is True
    finally:
        writer.stop()
    assert stored_ids(engine) == ["evt_a", "evt_b"]
