"""The end-to-end mix's processing alone, in this process: `python -m bench.e2e.processing [-n 4000] [--months 3]`.

A fresh PostgreSQL database; the referrers' codes made directly (referrals.code_for); then month after month
the month's events are stored in the inbox in delivery order (inbox.store, as the endpoint does) and drained
by `jobs.worker.drain` — what `credits worker` runs, its lanes and threads — before the next month's go in.
No HTTP, no other process: what is measured is the processing's own cost per event — CPU (this process),
SQL statements (also by verb and first table, `statements_per_event_by_kind`: which statements a change
removed, or a set-based handler would batch) and COMMITs — every balance is compared with the mix's
arithmetic, as bench.e2e does, and the ledger is checked (`credits check`'s ledger.check). A quick,
quiet-machine-independent figure for changes to the worker, the handlers and the ledger's grant path.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import Counter
from contextlib import suppress
from typing import Any

from sqlalchemy import event, select

from bench.e2e import mix
from bench.e2e.events import Builder
from bench.ingest import run as harness
from jobs import worker
from service import accounts, ledger, logs, referrals, runtime
from service.config import Settings
from service.db import transaction
from service.models import Account, Grant, utcnow
from webhooks import inbox


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e.processing", description=__doc__)
    parser.add_argument("-n", "--events", type=int, default=4000, help="events in the mix (at least; default 4000)")
    parser.add_argument("--months", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--admin-url", default=harness.DEFAULT_ADMIN_URL)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="structlog level, to stderr (default info, as `credits worker` logs)")
    args = parser.parse_args(argv)
    if not 0 < args.events <= 50_000 or not 1 <= args.months <= 12:
        parser.error("events or months out of range")
    return args


def counted(rt: runtime.Runtime) -> Counter[str]:
    """SQL statements and COMMITs sent through the engine, counted as they go; and the statements by kind
    (`kind`, keyed KIND + kind), which says which of them a change removed or a set-based handler would batch."""
    counts: Counter[str] = Counter()

    @event.listens_for(rt.engine, "before_cursor_execute")
    def _statement(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        counts["statements"] += 1
        counts[KIND + kind(statement)] += 1

    @event.listens_for(rt.engine, "commit")
    def _commit(*_args: object) -> None:
        counts["commits"] += 1

    return counts


KIND = "statements of kind "
VERB = re.compile(r"\s*(WITH|SELECT|INSERT|UPDATE|DELETE|SAVEPOINT|RELEASE)\b", re.IGNORECASE)
TABLE = re.compile(r"\b(?:INTO|FROM|UPDATE)\s+(\w+)", re.IGNORECASE)


def kind(statement: str) -> str:
    """A statement's verb and first table, e.g. `SELECT accounts`, `WITH ledger_entries` (a data-modifying CTE
    names the table it writes first), `SAVEPOINT`."""
    verb, table = VERB.match(statement), TABLE.search(statement)
    if verb is None:
        return "other"
    name = verb.group(1).upper()
    return name if name in ("SAVEPOINT", "RELEASE") or table is None else f"{name} {table.group(1)}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = harness.conninfo(args.admin_url)
    dbname = harness.create_database(admin)
    try:
        url = f"postgresql+psycopg://{admin['user']}@{admin['host']}:{admin['port']}/{dbname}"
        harness.migrate(url)
        rt = runtime.load(Settings(database_url=url, credits_config=str(harness.ROOT / "credits.toml"),
                                   stripe_api_base="http://127.0.0.1:9", stripe_api_key="sk_test_bench"))
        plan = mix.plan(args.events, args.months, args.seed)
        with transaction(rt.sessions) as session:
            codes = {a.key: referrals.code_for(session, accounts.get_or_create(session, f"acct_b{a.key}"))
                     for a in plan.referrers}
        builder = Builder("b", codes, args.months)
        counts = counted(rt)
        months, cpu_total, wall_total, events_total, used_total = [], 0.0, 0.0, 0, Counter[str]()
        for month in range(1, args.months + 1):
            bodies = [b for chain in plan.chains(month) for b in builder.bodies(chain)]
            with transaction(rt.sessions) as session:
                for body in bodies:
                    inbox.store(session, json.loads(body), utcnow())
            before = counts.copy()
            wall, cpu = time.perf_counter(), time.process_time()
            done = worker.drain(rt)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            used = counts - before
            months.append({"month": month, "events": len(bodies), "statuses": dict(done), "seconds": round(wall, 2),
                           "cpu_ms_per_event": round(1000 * cpu / len(bodies), 2),
                           "statements_per_event": round(used["statements"] / len(bodies), 2),
                           "commits_per_event": round(used["commits"] / len(bodies), 2)})
            cpu_total, wall_total, events_total = cpu_total + cpu, wall_total + wall, events_total + len(bodies)
            used_total += used
        delivered = {m: {a.key for a in plan.accounts} for m in range(1, args.months + 1)}
        expected = {f"acct_b{k}": n for k, n in mix.expected_balances(plan, rt.catalogue, delivered).items()}
        mismatches = balance_mismatches(rt, expected)
        with transaction(rt.sessions) as session:
            drifts = len(ledger.check(session))
        rt.engine.dispose()
        return {"events": events_total, "events_per_s": round(events_total / wall_total, 1),
                "cpu_ms_per_event": round(1000 * cpu_total / events_total, 2),
                "statements_per_event": round(used_total["statements"] / events_total, 2),
                "commits_per_event": round(used_total["commits"] / events_total, 2),
                "statements_per_event_by_kind": {name.removeprefix(KIND): round(n / events_total, 3)
                                                 for name, n in used_total.most_common() if name.startswith(KIND)},
                "balances": len(expected), "mismatches": mismatches, "ledger_check_drifts": drifts, "months": months}
    finally:
        with suppress(Exception):
            harness.drop_database(admin, dbname)


def balance_mismatches(rt: runtime.Runtime, expected: dict[str, int]) -> int:
    """Accounts whose balance (unexpired `remaining`) differs from the mix's arithmetic."""
    with transaction(rt.sessions) as session:
        found = Counter[str]()
        now = utcnow()
        for public_id, remaining, expires_at in session.execute(
            select(Account.public_id, Grant.remaining, Grant.expires_at).join(Grant, Grant.account_id == Account.id)
        ):
            if expires_at is None or expires_at > now:
                found[public_id] += remaining
    return sum(1 for key, n in expected.items() if found.get(key, 0) != n)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logs.configure("json", level=getattr(logging, args.log_level.upper()))
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
