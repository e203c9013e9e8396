"""Processing right after the 2xx, in the process that received the event, while deliveries are quiet.

The endpoint hands each stored event over and answers at once; a couple of threads process it within
milliseconds — with every other due event of its customer, in the order received, as a worker's batch would
(`dispatch.process_due`). Only while deliveries are quiet, though: an event's processing costs several times its
acceptance, and this process's Python runs on one core at a time, so processing a burst or a steady stream
here would turn the endpoint's milliseconds into hundreds. Beyond a few events waiting, or more than
PER_SECOND deliveries a second, an event is left pending for the worker's drain loop (`credits serve`'s
own, or `credits worker`'s), which finds everything due in the inbox: nothing is ever dropped.
"""

from __future__ import annotations

import queue
import threading
import time

from service.infra import logs
from service.infra.runtime import Runtime
from webhooks import dispatch

log = logs.get("inline")
STOP = ("", None)
Stored = tuple[str, str | None]  # an event's id and the customer it names
WAITING = 8  # events queued here at most; beyond, deliveries are coming faster than these threads process
PER_SECOND = 50  # deliveries a second beyond which the endpoint is taking a burst or a stream


class InlineProcessor:
    """A short queue of received event ids and the threads that process them (started on first use)."""

    def __init__(
        self, rt: Runtime, threads: int = 2, waiting: int | None = None, per_second: int | None = None
    ) -> None:
        self.rt, self.size = rt, threads
        self.per_second = PER_SECOND if per_second is None else per_second
        self.queue: queue.Queue[Stored] = queue.Queue(maxsize=WAITING if waiting is None else waiting)
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.second, self.this_second, self.last_second = 0, 0, 0

    def submit(self, event_id: str, customer: str | None) -> None:
        """Process the event soon if deliveries are quiet; else leave it pending for the worker."""
        if self._pace() > self.per_second:
            return
        self._start()
        try:
            self.queue.put_nowait((event_id, customer))
        except queue.Full:
            log.debug("inline.deferred", event_id=event_id)

    def wait_idle(self) -> None:
        """Block until every queued event has been processed (tests, and the demo, read what it did)."""
        self.queue.join()

    def stop(self, timeout: float = 30.0) -> None:
        """Let each thread finish the event in hand, then end; queued events stay pending for the worker."""
        with self.lock:
            threads, self.threads = self.threads, []
        while True:
            try:
                self.queue.get_nowait()
                self.queue.task_done()
            except queue.Empty:
                break
        for _ in threads:
            self.queue.put(STOP)
        for thread in threads:
            thread.join(timeout)

    def _pace(self) -> int:
        """Deliveries a second, counting this one: the last whole second's, or this second's once higher."""
        now = int(time.monotonic())
        with self.lock:
            if now != self.second:
                self.last_second = self.this_second if now == self.second + 1 else 0
                self.second, self.this_second = now, 0
            self.this_second += 1
            return max(self.last_second, self.this_second)

    def _start(self) -> None:
        with self.lock:
            while len(self.threads) < self.size:
                thread = threading.Thread(target=self._run, name=f"inline-{len(self.threads)}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def _run(self) -> None:
        while True:
            event_id, customer = self.queue.get()
            try:
                if (event_id, customer) == STOP:
                    return
                if customer is None:
                    dispatch.process(self.rt, event_id)
                else:
                    dispatch.process_due(self.rt, customer=customer)
            except Exception:
                log.exception("inline.crashed", event_id=event_id)
            finally:
                self.queue.task_done()
