"""A batch of spends alone, in this process: `python -m bench.spend.batch [-b 16] [-n 400]`.

A fresh PostgreSQL database seeded as bench.spend seeds it (1,000 accounts, 100,000 earlier requests' stored
outcomes, planner statistics); then N batches of B spends, each on an account drawn at random, done by the
spends' own work function (`service.spends.Spends.work`: one transaction on one held connection, as the
batch thread does) one after the other. No HTTP, no event loop, no other process: what is measured is a
batch's own cost — its wall time and this thread's CPU (medians, the first fifth not counted), and each
statement's wall time and CPU inside the driver's cursor execution (SQLAlchemy's cursor events). A quick,
quiet-machine-independent figure for changes to the batch's statements, as bench/e2e/processing.py is for
the worker's; bench/README.md's spend section quotes it.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import random
import statistics
import time
import uuid
from collections import defaultdict
from typing import Any

from sqlalchemy import event

from bench.ingest import run as harness
from bench.spend import seed
from service import logs, runtime
from service.config import Settings
from service.schemas import SpendRequest
from service.spends import SpendJob, Spends

ACCOUNTS = 1000


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.spend.batch", description=__doc__)
    parser.add_argument("-b", "--batch", type=int, default=16, help="spends per batch (default 16, as under load)")
    parser.add_argument("-n", "--batches", type=int, default=400)
    parser.add_argument("--admin-url", default=harness.DEFAULT_ADMIN_URL)
    args = parser.parse_args(argv)
    if not 0 < args.batch <= 64 or not 5 <= args.batches <= 10_000:
        parser.error("batch or batches out of range")
    return args


class Timings:
    """Each statement's wall time and CPU inside the cursor execution, by the statement's first words."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.wall: defaultdict[str, list[float]] = defaultdict(list)
        self.cpu: defaultdict[str, list[float]] = defaultdict(list)
        self.started = (0.0, 0.0)
        event.listen(rt.engine, "before_cursor_execute", self._before)
        event.listen(rt.engine, "after_cursor_execute", self._after)

    def _before(self, *_args: object) -> None:
        self.started = (time.perf_counter(), time.thread_time())

    def _after(self, _conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        name = " ".join(statement.split()[:4])[:50]
        self.wall[name].append(time.perf_counter() - self.started[0])
        self.cpu[name].append(time.thread_time() - self.started[1])


def jobs(rng: random.Random, batch: int) -> list[SpendJob]:
    """A batch of spends of 1 credit, each on a random account, each under its own key: a UUID, as clients
    make them (a key's length is paid for in every statement that carries it)."""
    body = SpendRequest(amount=1)
    return [SpendJob(f"acct-{rng.randrange(ACCOUNTS):04d}", body, str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                     "bench", contextvars.copy_context()) for _ in range(batch)]


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = harness.conninfo(args.admin_url)
    dbname = harness.create_database(admin)
    try:
        db = {**admin, "dbname": dbname}
        url = f"postgresql+psycopg://{admin['user']}@{admin['host']}:{admin['port']}/{dbname}"
        harness.migrate(url)
        seed.seed(db, "acct-", ACCOUNTS, 10_000_000)
        seed.history(db, 100_000)
        rt = runtime.load(Settings(database_url=url, credits_config=str(harness.ROOT / "credits.toml")))
        spends, rng, skip = Spends(rt), random.Random(1), args.batches // 5
        conn = rt.engine.connect()
        walls, cpus = [], []
        for n in range(args.batches):
            if n == skip:
                timings = Timings(rt)
            work = jobs(rng, args.batch)
            wall, cpu = time.perf_counter(), time.thread_time()
            outcomes = spends.work(conn, work)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.thread_time() - cpu)
            if any(outcome.status_code != 200 for outcome in outcomes):
                raise RuntimeError(f"a spend was refused: {outcomes}")
        conn.close()
        rt.engine.dispose()
        return {"batch": args.batch, "batches": args.batches, "wall_ms": median_ms(walls[skip:]),
                "cpu_ms": median_ms(cpus[skip:]),
                "statements": [{"statement": name, "wall_ms": median_ms(timings.wall[name]),
                                "cpu_ms": median_ms(timings.cpu[name])} for name in timings.wall]}
    finally:
        harness.drop_database(admin, dbname)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logs.configure("json", level=logging.WARNING)
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
