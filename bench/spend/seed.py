"""Accounts with credits for the spend benchmark, written in three set-based statements (not counted).

Each account `PREFIX0000 … PREFIX{N-1}` gets one admin grant (no expiry, no rollover) with its ledger entry,
exactly the rows `ledger.grant` writes, so the ledger's own check (`credits check`) holds from the start. The
seed takes well under a second for 1,000 accounts, where 1,000 calls through the ledger API would take
seconds of the benchmark's budget.
"""

from __future__ import annotations

from typing import Any

import psycopg

SEED_KEY = "seed:"


def seed(db: dict[str, Any], prefix: str, count: int, credits: int) -> list[int]:
    """Create `count` accounts named `prefix` + 4 digits holding `credits` each; their database ids, in order."""
    with psycopg.connect(**db) as conn:  # one transaction
        ids = [row[0] for row in conn.execute(
            "INSERT INTO accounts (public_id, status, rollover_extensions, created_at) "
            "SELECT %(prefix)s || lpad(i::text, 4, '0'), 'active', 0, now() FROM generate_series(0, %(n)s - 1) AS i "
            "RETURNING id", {"prefix": prefix, "n": count})]
        conn.execute(
            "INSERT INTO ledger_entries (account_id, kind, amount, idempotency_key, reason, actor, metadata, created_at) "
            "SELECT id, 'grant', %(credits)s, %(key)s || public_id, 'benchmark seed', 'bench', "
            "'{\"source\": \"admin\"}'::jsonb, now() FROM accounts WHERE id = ANY(%(ids)s)",
            {"credits": credits, "key": SEED_KEY, "ids": ids})
        conn.execute(
            "INSERT INTO credit_grants (account_id, entry_id, source, amount, remaining, spent, expired, reversed, "
            "rollover, created_at) "
            "SELECT account_id, id, 'admin', amount, amount, 0, 0, 0, false, now() FROM ledger_entries "
            "WHERE account_id = ANY(%(ids)s) AND kind = 'grant'", {"ids": ids})
    return sorted(ids)


HISTORY_KEY = "history-"


def history(db: dict[str, Any], requests: int) -> None:
    """Earlier API requests' stored outcomes (`api_requests`), then VACUUM ANALYZE: the database a service that
    has been running keeps, with its planner statistics. On a nearly empty table planned once (psycopg prepares
    a statement on its fifth run) PostgreSQL keeps the plan it made for a few rows — a sequential scan — while
    the table grows by thousands of rows a second under the benchmark, and a spend's cost with it."""
    with psycopg.connect(**db) as conn:
        conn.execute(
            "INSERT INTO api_requests (key, fingerprint, status_code, response, created_at) "
            "SELECT %(key)s || i, md5(i::text) || md5(i::text), 200, '{\"history\": true}'::jsonb, now() "
            "FROM generate_series(1, %(n)s) AS i", {"key": HISTORY_KEY, "n": requests})
    with psycopg.connect(**db, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")

