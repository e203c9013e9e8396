"""The inbox's writer: concurrent deliveries stored together, one transaction and one commit for all of them.

A delivery must be durable before it is answered, and the transaction around its one row — BEGIN, the INSERT,
COMMIT, a WAL flush — costs the API process several times the row itself. So each delivery hands its event to
this writer's thread and awaits the answer; the thread takes every event waiting at that moment, stores them
with one pipelined round of INSERT … ON CONFLICT DO NOTHING (`db.insert_many`), commits, and answers each.
Alone, an event is stored at once; under load the batches grow by themselves. A transaction per delivery
costs the API process nearly three times the CPU a delivery (bench/README.md, "What the mechanisms save").

An event the database refuses (a value no column holds) must not fail the others of its batch: the batch is
then stored again event by event, so only that delivery gets the error. A database that cannot be reached
fails the whole batch, and every delivery in it answers 503, so Stripe retries.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from service.infra import logs
from service.infra.db import is_unreachable
from service.infra.models import utcnow
from service.infra.runtime import Runtime
from webhooks import inbox

log = logs.get("writer")
MOST = 128  # events in one transaction at most
Delivery = tuple[dict[str, Any], str, "asyncio.Future[bool]"]  # the event, its text, and whether it was new
Answer = tuple["asyncio.Future[bool]", bool | None, BaseException | None]  # a delivery's result or error


class Stopped(Exception):
    """The process is shutting down: the event was not stored; its 503 makes Stripe send it again."""


class InboxWriter:
    """Stores events on a thread of its own (started by the first delivery, stopped with the app)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.waiting: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="inbox-writer", daemon=True)
        self.lock = threading.Lock()
        self.stopping = False

    async def store(self, event: dict[str, Any], text: str) -> bool:
        """Store the event durably with whatever else is waiting: True when it is new, False for a redelivery
        (also one earlier in the same batch). Raises what the database raised for it, or Stopped."""
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        with self.lock:  # never queued behind the stop mark, where nothing would answer it
            if self.stopping:
                raise Stopped("shutting down")
            if not self.thread.is_alive():
                self.thread.start()
            self.waiting.put((event, text, stored))
        return await stored

    def stop(self, timeout: float = 30.0) -> None:
        """Store what is waiting, then end the thread; a delivery that arrives after is answered Stopped."""
        with self.lock:
            self.stopping = True
            self.waiting.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)
        while True:
            try:
                left = self.waiting.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                _answer([(left[2], None, Stopped("shutting down"))])

    def _run(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch, stopping = [first], False
            while len(batch) < MOST:
                try:
                    more = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            self._write(batch)
            if stopping:
                return

    def _write(self, batch: list[Delivery]) -> None:
        _answer(self._store(batch))

    def _store(self, batch: list[Delivery]) -> list[Answer]:
        """Each delivery's answer: whether its event was new, or the error that kept it from being stored."""
        try:
            new = self._insert(batch)
        except Exception as exc:
            if len(batch) == 1 or is_unreachable(exc):
                return [(stored, None, exc) for _, _, stored in batch]
            # find the event the database refused: every other one is stored
            return [answer for delivery in batch for answer in self._store([delivery])]
        seen: set[str] = set()
        answers: list[Answer] = []
        for event, _, stored in batch:
            answers.append((stored, event["id"] in new and event["id"] not in seen, None))
            seen.add(event["id"])
        return answers

    def _insert(self, batch: list[Delivery]) -> set[str]:
        """The ids of the batch's events that were new, once stored and committed."""
        with self.rt.uow() as uow:
            new = inbox.store_many(uow, [(event, text) for event, text, _ in batch], utcnow())
            uow.commit()
        return new


def _answer(answers: list[Answer]) -> None:
    """From the writer's thread: hand the answers to the event loops awaiting them, one wake-up per loop."""
    loops: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
    for answer in answers:
        loops.setdefault(answer[0].get_loop(), []).append(answer)
    for loop, share in loops.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, share)


def _settle(answers: list[Answer]) -> None:
    """On the event loop: each delivery's result or error, unless it stopped waiting (the client went away)."""
    for stored, new, error in answers:
        if stored.done():
            continue
        if error is not None:
            stored.set_exception(error)
        else:
            stored.set_result(bool(new))
