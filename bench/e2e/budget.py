"""Where the machine's CPU went while the events were delivered and processed: the budget that bounds events
per second on this shared 2-core machine.

The service's processes are measured by the harness itself (bench/ingest/run.py `Child.cpu`); this adds
PostgreSQL's processes — the backends serving the API, the worker and the load generator, and the server's
own writers — and the machine as a whole (/proc/stat), so a run can say what each event cost the machine in
all, and what a rate would need. PostgreSQL's backends come and go (autovacuum's workers, a pool's new
connection), so its processes are sampled every SAMPLE_SECONDS and each one's CPU is counted from when it was
first seen, or its start when that was during the stretch: only the last interval of one that exits is lost.
"""

from __future__ import annotations

import resource
import threading
from types import TracebackType
from typing import Any

import psycopg

from bench.ingest.loadgen import CLK_TCK, machine_cpu, tree

SAMPLE_SECONDS = 0.25


def postmaster(db: dict[str, Any]) -> int | None:
    """The PostgreSQL server's main process, when it runs on this machine: the parent of a backend."""
    with psycopg.connect(autocommit=True, **db) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    try:
        with open(f"/proc/{backend}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:  # the server is on another machine
        return None


class Budget:
    """`with Budget(pid) as b: …`, then `b.result()`: over the stretch, PostgreSQL's CPU seconds (the tree under
    the postmaster `pid`; None without one), those of the child processes this one waited for (the load
    generator, pgbench: the client's side), and the machine's busy share and core-seconds."""

    def __init__(self, server: int | None) -> None:
        self.server = server
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample_until_stopped, name="bench-budget", daemon=True)
        self.machine: tuple[int, int] = (0, 0)
        self.children = 0.0

    def __enter__(self) -> Budget:
        self._sample(first=True)
        self.machine, self.children = machine_cpu(), _waited_children()
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()
        busy, total = machine_cpu()
        self.machine = (busy - self.machine[0], total - self.machine[1])
        self.children = _waited_children() - self.children

    def _sample_until_stopped(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        if self.server is None:
            return
        for key, seconds in tree(self.server).items():
            if key not in self.last:
                self.first[key] = seconds if first else 0.0  # started during the stretch: all of its CPU
            self.last[key] = seconds

    def result(self) -> dict[str, Any]:
        busy, total = self.machine
        return {"postgresql_seconds": round(sum(self.last[k] - self.first[k] for k in self.last), 2)
                if self.server is not None else None,
                "children_seconds": round(self.children, 2),
                "machine_busy": round(busy / total, 3) if total else None,
                "machine_core_seconds": round(total / CLK_TCK, 2)}


def _waited_children() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime
