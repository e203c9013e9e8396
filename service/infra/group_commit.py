"""Group commit: the work of concurrent requests done by one thread in batches — one transaction and one
commit per batch — and each request answered with its own result.

A write must be durable before it is answered, and a commit (a WAL flush on PostgreSQL, an fsync on SQLite)
costs far more than a row; so does each round trip, each pool checkout and each lock taken. So a request
hands its item to the thread and awaits the outcome; the thread takes every item waiting at that moment (up
to `max_batch`), does them all in one transaction on a connection of its own, commits, and answers the
waiting requests with one wake-up of their event loop for the whole batch (an asyncio future each, settled
by one `call_soon_threadsafe`: a concurrent Future per request, wrapped and chained, took about a tenth of
the event loop's CPU in the spend door's py-spy profile). Under load the batches grow by themselves; a lone
item is done at once, with no waiting for company. The webhook endpoint stores its events this way
(webhooks/writer.py), the spend API its spends (service/spends.py).

An item that makes its batch fail (a value the database refuses, an unknown account) must not fail the
items that shared the batch: on any failure but a lost connection the batch is done again item by item, so
only the offender gets the error. A lost connection fails the whole batch, and every request in it gets
the database's error (a 503, so the client retries).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Generic, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from service.infra import metrics

Item = TypeVar("Item")
Result = TypeVar("Result")
# Does a batch's items in ONE transaction on the connection and commits it; returns one result per item, in order.
Work = Callable[[Connection, list[Item]], list[Result]]


class Stopped(Exception):
    """The process is shutting down: the item was not done, and its 503 makes the client send it again."""


Pending = tuple[Item, asyncio.Future[Result]]  # an item and the future its request awaits
Answer = tuple[asyncio.Future[Result], Result | None, BaseException | None]  # a future and its result or error


def _settle(answers: list[Answer[Result]]) -> None:
    """On the event loop: each request's result or error, unless it stopped waiting (cancelled)."""
    for future, result, error in answers:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]


def _answer(answers: list[Answer[Result]]) -> None:
    """From the thread: hand the answers to their event loops, one wake-up per loop (a process has one; tests
    may have several). A loop already closed has no one left to answer."""
    loops: dict[asyncio.AbstractEventLoop, list[Answer[Result]]] = {}
    for answer in answers:
        loops.setdefault(answer[0].get_loop(), []).append(answer)
    for loop, share in loops.items():
        with suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(_settle, share)


class GroupCommit(Generic[Item, Result]):
    """Does items in batches on a thread of its own (started on first use)."""

    def __init__(self, engine: Engine, work: Work[Item, Result], *, name: str, max_batch: int = 128) -> None:
        self.engine, self.work, self.name, self.max_batch = engine, work, name, max_batch
        self.conn: Connection | None = None  # the thread's own, held between batches
        self.queue: queue.SimpleQueue[Pending[Item, Result] | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.stopping = False

    async def submit(self, item: Item) -> Result:
        """Do `item` durably with whatever else is waiting; its result, or what the database raised for it
        (OperationalError when it is unreachable), or Stopped when the process is shutting down."""
        outcome: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        with self.lock:  # never queue behind the stop mark: nothing would ever answer the request
            if self.stopping:
                raise Stopped("shutting down")
            self._start()
            self.queue.put((item, outcome))
        return await outcome

    def stop(self, timeout: float = 30.0) -> None:
        """Do what is queued, then end the thread; a request still waiting after that gets Stopped."""
        with self.lock:
            self.stopping = True
            thread, self.thread = self.thread, None
            self.queue.put(None)
        if thread is not None:
            thread.join(timeout)
        self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        left: list[Answer[Result]] = []
        while True:
            try:
                pending = self.queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                left.append((pending[1], None, Stopped("shutting down")))
        _answer(left)

    def _start(self) -> None:
        """Under the lock: start the thread on first use, or again if it died (a request must never wait on
        a thread that is gone)."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        """The thread: batch after batch until the stop mark."""
        try:
            while True:
                batch, stopping = self._next_batch()
                live = [(item, outcome) for item, outcome in batch if not outcome.cancelled()]
                if live:  # a cancelled request (the client went away) is not waiting: nothing to do for it
                    self._do(live)
                if stopping:
                    return
        finally:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    def _next_batch(self) -> tuple[list[Pending[Item, Result]], bool]:
        """Block for the first item, then take whatever else is already waiting."""
        first = self.queue.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                pending = self.queue.get_nowait()
            except queue.Empty:
                break
            if pending is None:
                return batch, True
            batch.append(pending)
        return batch, False

    def _do(self, batch: list[Pending[Item, Result]]) -> None:
        """One transaction and one commit for the batch, then each request's answer. When the batch fails for
        one item's sake, the items are done again one by one, so only that item's request fails."""
        try:
            results = self._commit([item for item, _ in batch])
        except (OperationalError, InterfaceError) as exc:
            self._fail(batch, exc)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request(s); the thread carries on
            if len(batch) == 1:
                self._fail(batch, exc)
            else:
                for pending in batch:  # isolate the item that failed
                    self._do([pending])
        else:
            metrics.BATCHES.labels(self.name).observe(len(batch))
            _answer([(outcome, result, None) for (_, outcome), result in zip(batch, results, strict=True)])

    def _commit(self, items: list[Item]) -> list[Result]:
        """Do and commit on the thread's own connection, held from batch to batch: a checkout from the pool,
        with its ping, costs a round trip and about 100 µs of CPU per batch (measured in-process). A held
        connection may have died meanwhile (a database restart); the batch that finds out is done once more
        on a new connection, checked out and pinged as usual, and fails only if that fails too. If the lost
        connection had committed it, the second attempt finds its writes there, as a retry would: the work
        must be idempotent (the inbox's ON CONFLICT, the spends' Idempotency-Keys)."""
        while True:
            fresh = self.conn is None
            try:
                if self.conn is None:
                    self.conn = self.engine.connect()
                return self.work(self.conn, items)
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
    def _fail(batch: list[Pending[Item, Result]], exc: BaseException) -> None:
        _answer([(outcome, None, exc) for _, outcome in batch])
