"""Stripe list pages read one ahead on a thread (jobs/pages.py): the same pages in the same order as reading
them in line, an error raised where the list broke, and no thread left behind by a reader that stops."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator

import pytest

from jobs.pages import prefetched


def test_items_come_in_pages_of_the_size_in_order() -> None:
    assert list(prefetched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(prefetched([], 3)) == []


def test_an_error_reading_the_list_is_raised_after_the_pages_before_it() -> None:
    def broken() -> Iterator[int]:
        yield from range(4)
        raise ConnectionError("Stripe went away")

    pages = prefetched(broken(), 2)
    assert next(pages) == [0, 1]
    assert next(pages) == [2, 3]
    with pytest.raises(ConnectionError, match="Stripe went away"):
        next(pages)


def test_a_reader_that_stops_early_ends_the_reading_thread() -> None:
    def reading() -> bool:
        return any(thread.name == "stripe-pages" for thread in threading.enumerate())

    pages = prefetched(iter(range(1_000)), 10)
    assert isinstance(pages, Generator)  # a generator, so that the reader can close it
    assert next(pages) == list(range(10))
    assert reading()  # a page ahead, waiting for room
    pages.close()
    deadline = time.monotonic() + 5
    while reading() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not reading()
