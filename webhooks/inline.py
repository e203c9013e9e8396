"""Processing right after the 2xx, in the receiving process, on a few threads of its own — bounded.

The request hands the stored event's id over and answers at once; a small pool of threads processes it
within milliseconds. The endpoint hands events over only while it is quiet (webhooks/router.py,
QUIET_DELIVERIES, QUIET_PER_SECOND), and when a burst fills the queue anyway the event simply stays pending in the inbox for
the worker: nothing is dropped and the endpoint's accept rate never collapses to the processing rate. On
shutdown the threads finish the event in hand; whatever is still queued is left to the worker.
"""

from __future__ import annotations

import queue
import threading

from service.infra import logs
from service.infra.runtime import Runtime
from webhooks import dispatch

log = logs.get("inline")
STOP = ""


class InlineProcessor:
    """A bounded queue of received event ids and the threads that process them (started on first use)."""

    def __init__(self, rt: Runtime, threads: int = 2, capacity: int = 256) -> None:
        self.rt, self.size = rt, threads
        self.queue: queue.Queue[str] = queue.Queue(maxsize=capacity)
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def submit(self, event_id: str) -> bool:
        """Queue the event for processing; False when the queue is full (the worker will handle it)."""
        self._start()
        try:
            self.queue.put_nowait(event_id)
        except queue.Full:
            log.info("inline.deferred", event_id=event_id, queued=self.queue.qsize())
            return False
        return True

    def wait_idle(self) -> None:
        """Block until every queued event has been processed (tests, and a tidy shutdown)."""
        self.queue.join()

    def stop(self, timeout: float = 30.0) -> None:
        """Let each thread finish the event in hand, then end; queued events stay pending for the worker."""
        with self.lock:
            threads, self.threads = self.threads, []
        for _ in threads:
            self._drop_one_and_signal()
        for thread in threads:
            thread.join(timeout)

    def _drop_one_and_signal(self) -> None:
        while True:
            try:
                self.queue.put_nowait(STOP)
                return
            except queue.Full:
                self.queue.get_nowait()  # left pending in the inbox: the worker picks it up
                self.queue.task_done()

    def _start(self) -> None:
        if self.threads:
            return
        with self.lock:
            while len(self.threads) < self.size:
                thread = threading.Thread(target=self._run, name=f"inline-{len(self.threads)}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def _run(self) -> None:
        while True:
            event_id = self.queue.get()
            try:
                if event_id == STOP:
                    return
                dispatch.process(self.rt, event_id)
            except Exception:  # noqa: BLE001 - dispatch records failures; this only guards the thread
                log.exception("inline.crashed", event_id=event_id)
            finally:
                self.queue.task_done()
