"""Process the inbox's backlog in a process of its own, the way `credits worker --once` does (jobs.worker.drain:
each customer's due events in order, a lane to a transaction), and print how many events per second that was.

`python -m bench.ingest.drain [--log-level L]` (DATABASE_URL etc. from the environment). Used by the
benchmark's diagnostic phase to measure the processing alone, apart from the HTTP ingest; it also counts the SQL
statements sent (the worker's own `due` queries included; connection pings are not statements) and the COMMITs.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

from sqlalchemy import event

from jobs import worker
from service import logs, runtime
from service.config import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest.drain", description=__doc__)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop after this long, finished or not")
    args = parser.parse_args(argv)
    settings = Settings()
    logs.configure(settings.log_format, level=getattr(logging, args.log_level.upper()))
    rt = runtime.load(settings)
    statements, commits = [0], [0]

    @event.listens_for(rt.engine, "before_cursor_execute")
    def _count(*_args: object) -> None:
        statements[0] += 1

    @event.listens_for(rt.engine, "commit")
    def _count_commit(*_args: object) -> None:
        commits[0] += 1

    stop = threading.Event()
    timer = threading.Timer(args.max_seconds, stop.set)
    timer.start()
    started, cpu = time.perf_counter(), time.process_time()
    try:
        counts = worker.drain(rt, stop)
    finally:
        timer.cancel()
        rt.engine.dispose()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    done = sum(counts.values())
    print(json.dumps({"events": done, "counts": dict(counts), "seconds": round(elapsed, 2),
                      "events_per_s": round(done / elapsed, 1) if elapsed else None,
                      "cpu_ms_per_event": round(1000 * cpu / done, 2) if done else None,
                      "sql_statements_per_event": round(statements[0] / done, 1) if done else None,
                      "commits_per_event": round(commits[0] / done, 2) if done else None,
                      "stopped_early": stop.is_set()}))


if __name__ == "__main__":
    main()
