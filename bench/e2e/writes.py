"""Row writes per event, counted by PostgreSQL, and the pgbench script that does as many per transaction.

The count is the change of `pg_stat_user_tables` (n_tup_ins, n_tup_upd, n_tup_del: every row version a
statement wrote, rolled back or not) and of `pg_stat_database.xact_commit` over the run. Backends report
their counters when they go idle, at most once a second, and when they exit, so the snapshot after the run
is taken once the service's processes have stopped.

The reference is what PostgreSQL itself sustains for that much writing per event, with the same number of
clients as the load generator has accounts in flight: pgbench, one script run per event — the event body
stored as JSONB in an autocommitted INSERT (the service answers Stripe only once its inbox row is
committed), then one transaction with the rest: an UPDATE of that row (the service marks it processed),
UPDATEs of random rows of an accounts-like table and INSERTs of ledger-like rows, as many of each as the
service wrote per event (rounded).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.e2e import budget
from bench.ingest import pgbench

ACCOUNTS = 10_000  # rows of the accounts-like table; updates pick one at random, so clients rarely collide
SETUP = [
    "DROP TABLE IF EXISTS bench_e2e_inbox, bench_e2e_accounts, bench_e2e_rows",
    "CREATE TABLE bench_e2e_inbox (id text PRIMARY KEY, payload jsonb NOT NULL, status text NOT NULL, "
    "created timestamptz NOT NULL)",
    "CREATE TABLE bench_e2e_accounts (id int PRIMARY KEY, touched bigint NOT NULL DEFAULT 0, "
    "updated timestamptz NOT NULL DEFAULT now())",
    f"INSERT INTO bench_e2e_accounts (id) SELECT generate_series(1, {ACCOUNTS})",
    "CREATE TABLE bench_e2e_rows (id bigserial PRIMARY KEY, account_id int NOT NULL, amount bigint NOT NULL, "
    "note text NOT NULL, created timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX ON bench_e2e_rows (account_id)",
    "ANALYZE",
]


def snapshot(db: dict[str, Any]) -> dict[str, Any]:
    """The cumulative write counters of the service's tables and the database's commit count."""
    with psycopg.connect(autocommit=True, **db) as conn:
        tables = {name: (ins, upd, dele) for name, ins, upd, dele in conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables")}
        commits = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return {"tables": tables, "commits": commits[0] if commits else 0, "at": time.time()}


def delta(before: dict[str, Any], after: dict[str, Any], events: int) -> dict[str, Any]:
    """Inserts, updates and deletes per event, in all and by table (busiest first), and commits per event."""
    by_table = {}
    for name, now in after["tables"].items():
        then = before["tables"].get(name, (0, 0, 0))
        ins, upd, dele = (a - b for a, b in zip(now, then))
        if ins or upd or dele:
            by_table[name] = {"inserts": ins, "updates": upd, "deletes": dele}
    total = {kind: sum(t[kind] for t in by_table.values()) for kind in ("inserts", "updates", "deletes")}
    per = lambda n: round(n / events, 2) if events else None  # noqa: E731
    return {
        "events": events,
        **total,
        "writes": sum(total.values()),
        "writes_per_event": per(sum(total.values())),
        "inserts_per_event": per(total["inserts"]),
        "updates_per_event": per(total["updates"]),
        "deletes_per_event": per(total["deletes"]),
        "commits_per_event": per(after["commits"] - before["commits"]),
        "by_table": {name: {k: per(v) for k, v in counts.items()}
                     for name, counts in sorted(by_table.items(), key=lambda kv: -sum(kv[1].values()))},
    }


def script(payload: bytes, inserts: int, updates: int) -> str:
    """One event's writes: `inserts` row inserts (the first the JSONB body, autocommitted) and `updates` row
    updates (the first of the inbox row just stored) — see the module's docstring."""
    literal = payload.decode().replace("'", "''")
    lines = [
        f"\\set aid random(1, {ACCOUNTS})",
        "INSERT INTO bench_e2e_inbox (id, payload, status, created)",
        f"VALUES ('evt_pgb_' || gen_random_uuid(), '{literal}'::jsonb, 'pending', now()) RETURNING id AS evt \\gset",
        "BEGIN;",
    ]
    if updates > 0:
        lines.append("UPDATE bench_e2e_inbox SET status = 'processed' WHERE id = ':evt';")
    lines += ["UPDATE bench_e2e_accounts SET touched = touched + 1, updated = now() WHERE id = :aid;"] * max(0, updates - 1)
    lines += ["INSERT INTO bench_e2e_rows (account_id, amount, note) VALUES (:aid, 1, 'bench');"] * max(0, inserts - 1)
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def reference(db: dict[str, Any], workdir: Path, payload: bytes, counted: dict[str, Any], transactions: int,
              clients: int, server: int | None) -> dict[str, Any]:
    """pgbench with `script` for the writes counted per event (deletes count as updates: both write a row
    version); returns its figures, the script's composition, the command as the README shows it, and what
    its run cost the machine (`server`, the postmaster: budget.Budget)."""
    inserts = max(1, round(counted["inserts_per_event"] or 0))
    updates = round((counted["updates_per_event"] or 0) + (counted["deletes_per_event"] or 0))
    with psycopg.connect(autocommit=True, **db) as conn:
        for statement in SETUP:
            conn.execute(statement)
        pgbench.compressed_as_the_inbox(conn, "bench_e2e_inbox")
    path = workdir / "pgbench_e2e.sql"
    path.write_text(script(payload, inserts, updates))
    with budget.Budget(server) as spent:
        done = pgbench.run_script(db, path, clients, ["-t", str(max(1, math.ceil(transactions / clients)))])
    if "command" in done:
        done["command"] = done["command"].replace(str(workdir), "$WORKDIR")
    return {**done, "cpu": spent.result(), "inserts_per_transaction": inserts, "updates_per_transaction": updates,
            "writes_per_transaction": inserts + updates, "commits_per_transaction": 2}
