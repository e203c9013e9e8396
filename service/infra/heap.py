"""The cyclic garbage collector kept off the objects a process made before its work began.

CPython's oldest generation is collected when it has grown by a quarter, and each such collection walks every
object still alive — the imported modules, SQLAlchemy's metadata and compiled statements, the FastAPI app:
~140k objects in the API process, almost none of them ever garbage. In the API process one such pass held
the GIL for 40-110 ms on this 2-core machine under load (bench/ingest), freezing the event loop and the group
commit's thread at once, so every delivery that arrived meanwhile waited for it: one cause of the open
loop's tail (the benchmark's p99 moved within its spread when it went; bench/ingest/report.py says what remains).
`gc.freeze()` moves what exists into a permanent generation that collections skip; later garbage is
collected as before.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen() -> Iterator[None]:
    """Keep the collector off what exists now for the duration of the block, then give it back, so nothing
    stays exempt after (garbage among it waits until then): the API app's lifespan, and a job that allocates many
    containers in a loop (reconcile decoding Stripe's pages, where each collection of the older generations
    re-traversed the whole start-up heap: 45% of the decoding time, bench/reconcile)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
