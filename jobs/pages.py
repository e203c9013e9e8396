"""Pages of a Stripe list, the next one fetched in the background while the current one is checked.

A reconciliation run alternates between waiting for Stripe (the request, the response body) and working on
what came (JSON, SQL, the checks). Stripe lists are cursor-paged — a page's request names the last id of the
one before — so they cannot be fetched in parallel, but one page can be on its way while the previous one is
checked: one producer thread per list, one page ahead. The thread holds the GIL only while it decodes, so it
overlaps the waits (Stripe's, the database's) rather than the work; memory stays at a few pages whatever the
list's length. The thread shares the Stripe client with the main one: httpx's connection pool is locked and
the SDK keeps its request metrics per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from queue import Full, Queue
from typing import Final, Generic, TypeVar

T = TypeVar("T")
AHEAD: Final = 1  # pages waiting in the queue: one is enough to hide a wait, more would only hold memory
POLL_SECONDS: Final = 0.5  # how often a producer blocked on a full queue checks whether the reader is gone


class _End:
    """What the producer puts last: the list ended, or `error` ended it."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class _Producer(Generic[T]):
    """Cuts `items` into pages on a thread of its own and hands them over through a bounded queue."""

    def __init__(self, items: Iterable[T], size: int) -> None:
        self.items, self.size = items, size
        self.queue: Queue[list[T] | _End] = Queue(maxsize=AHEAD)
        self.gone = threading.Event()

    def run(self) -> None:
        try:
            iterator = iter(self.items)
            while page := list(islice(iterator, self.size)):
                if not self._put(page):
                    return
            self._put(_End())
        except BaseException as exc:
            self._put(_End(exc))

    def _put(self, item: list[T] | _End) -> bool:
        """False when the reader stopped reading, so the thread ends instead of waiting for ever."""
        while not self.gone.is_set():
            try:
                self.queue.put(item, timeout=POLL_SECONDS)
                return True
            except Full:
                continue
        return False

    def pages(self) -> Iterator[list[T]]:
        try:
            while not isinstance(page := self.queue.get(), _End):
                yield page
            if page.error is not None:
                raise page.error
        finally:
            self.gone.set()  # the reader stopped before the end (an error, a break): the thread ends at its next put


def prefetched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size`, the next list already being read while the caller works on one; an
    error reading them is raised in the caller, at the page it ended."""
    producer = _Producer(items, size)
    threading.Thread(target=producer.run, name="stripe-pages", daemon=True).start()
    return producer.pages()
