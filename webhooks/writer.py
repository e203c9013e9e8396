"""Group commit for the webhook endpoint: the events of concurrent deliveries share one INSERT and one commit.

Each delivery must be durable before it is answered, and a commit (a WAL flush on PostgreSQL, an fsync on
SQLite) costs far more than the row. So the endpoint hands its row to one writer thread and awaits the
outcome; the thread takes every row waiting at that moment (up to `max_batch`), writes them with one
INSERT … ON CONFLICT (id) DO NOTHING … RETURNING id (inbox.inserter, pipelined on PostgreSQL), commits, and
answers each waiting delivery. Under load the batches grow by themselves; a lone delivery is written at once,
with no waiting for company.

A row the database refuses (a value it cannot hold) must not fail the deliveries that shared its batch: on
such an error the batch is written again row by row, so only the offender gets the error. A lost connection
fails the whole batch, and every delivery in it answers 503 so Stripe retries.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from contextlib import suppress
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from service import logs
from webhooks import inbox

log = logs.get("writer")


class WriterStopped(Exception):
    """The process is shutting down: the delivery is not stored, and its 503 makes Stripe send it again."""

Pending = tuple[dict[str, Any], "Future[bool]"]
STOP: Pending | None = None


class InboxWriter:
    """Stores inbox rows in batches on a thread of its own (started on first use)."""

    def __init__(self, engine: Engine, max_batch: int = 128) -> None:
        self.engine, self.max_batch = engine, max_batch
        self.insert = inbox.inserter(engine.dialect.name)
        self.conn: Connection | None = None  # the thread's own, held between batches
        self.queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.stopping = False

    async def store(self, row: dict[str, Any]) -> bool:
        """Store one row durably; True when it is new, False for a redelivery (also one in the same batch).
        Raises what the database raised (OperationalError when it is unreachable)."""
        outcome: Future[bool] = Future()
        with self.lock:  # never queue behind STOP: nothing would ever answer the delivery
            if self.stopping:
                raise WriterStopped("shutting down")
            self._start()
            self.queue.put((row, outcome))
        return await asyncio.wrap_future(outcome)

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then end the thread; a delivery still waiting after that gets WriterStopped."""
        with self.lock:
            self.stopping = True
            thread, self.thread = self.thread, None
            self.queue.put(STOP)
        if thread is not None:
            thread.join(timeout)
        self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(WriterStopped("shutting down"))

    def _start(self) -> None:
        """Under the lock: start the thread on first use, or again if it died (a delivery must never wait on
        a thread that is gone)."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="inbox-writer", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        """The thread: batch after batch until STOP."""
        try:
            while True:
                batch, stopping = self._next_batch()
                if batch:
                    self._write(batch)
                if stopping:
                    return
        finally:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    def _next_batch(self) -> tuple[list[Pending], bool]:
        """Block for the first row, then take whatever else is already waiting."""
        first = self.queue.get()
        if first is STOP:
            return [], True
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _write(self, batch: list[Pending]) -> None:
        """Write the batch's rows whose delivery is still waiting (a cancelled one was never answered 200)."""
        live = [(row, outcome) for row, outcome in batch if outcome.set_running_or_notify_cancel()]
        if live:
            self._insert(live)

    def _insert(self, batch: list[Pending]) -> None:
        """One statement and one commit for the batch, then each delivery's answer. When the database refuses
        the batch for one row's sake, the rows are written again one by one, so only that row's delivery fails."""
        try:
            new = self._commit([row for row, _ in batch])
        except (OperationalError, InterfaceError) as exc:
            self._fail(batch, exc)
        except DBAPIError as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
            else:
                for item in batch:  # isolate the row the database refused
                    self._insert([item])
        except Exception as exc:  # noqa: BLE001 - hand any failure to the waiting requests, keep the thread
            log.exception("writer.failed", rows=len(batch))
            self._fail(batch, exc)
        else:
            seen: set[str] = set()
            for row, outcome in batch:
                outcome.set_result(row["id"] in new and row["id"] not in seen)
                seen.add(row["id"])

    def _commit(self, rows: list[dict[str, Any]]) -> set[str]:
        """Insert and commit on the thread's own connection, held from batch to batch: a checkout from the
        pool, with its ping, costs a round trip and about 100 µs of CPU per batch (measured in-process). A
        held connection may have died meanwhile (a database restart); the batch that finds out is written
        once more on a new connection, checked out and pinged as usual, and fails only if that fails too. If
        the lost connection had committed it, the second attempt finds the rows there: they are answered as
        redeliveries, which is what they now are."""
        while True:
            fresh = self.conn is None
            try:
                if self.conn is None:
                    self.conn = self.engine.connect()
                with self.conn.begin():
                    return self.insert(self.conn, rows)
            except (OperationalError, InterfaceError):
                self._drop_connection()
                if fresh:
                    raise

    def _drop_connection(self) -> None:
        """Discard a connection that failed, so the pool never hands it out again."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with suppress(Exception):  # it is already broken: closing it can fail too, and nothing depends on that
                conn.invalidate()
                conn.close()

    @staticmethod
    def _fail(batch: list[Pending], exc: BaseException) -> None:
        for _, outcome in batch:
            outcome.set_exception(exc)

