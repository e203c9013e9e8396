"""After the run: did every event end processed, is every balance what the mix says it must be, and does
the service's own invariant check (`credits check`) pass? Plus what the ledger holds, for the report.

Balances are read straight from the tables (the sum of each account's unexpired grants' `remaining`,
README "The ledger") and compared exactly with mix.expected_balances; `credits check` then recomputes
every balance and grant from the ledger entries and allocations.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psycopg

BALANCES = """
SELECT a.public_id,
       coalesce(sum(g.remaining) FILTER (WHERE g.expires_at IS NULL OR g.expires_at > now()), 0)
FROM accounts a LEFT JOIN credit_grants g ON g.account_id = a.id
GROUP BY a.public_id
"""


def inbox(db: dict[str, Any]) -> dict[str, Any]:
    """Events by status and type, how many needed more than one attempt, and the commonest errors."""
    with psycopg.connect(autocommit=True, **db) as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM stripe_events GROUP BY 1").fetchall())
        types = dict(conn.execute("SELECT type, count(*) FROM stripe_events GROUP BY 1 ORDER BY 2 DESC").fetchall())
        retried = conn.execute("SELECT count(*) FROM stripe_events WHERE attempts > 1").fetchone()[0]  # type: ignore[index]
        errors = conn.execute(
            "SELECT left(last_error, 200), count(*) FROM stripe_events WHERE last_error IS NOT NULL "
            "GROUP BY 1 ORDER BY 2 DESC LIMIT 3"
        ).fetchall()
        last = conn.execute("SELECT extract(epoch FROM max(processed_at)) FROM stripe_events").fetchone()[0]  # type: ignore[index]
    return {"rows": sum(statuses.values()), "statuses": statuses, "types": types, "retried": retried,
            "errors": [[text, n] for text, n in errors], "last_processed": float(last) if last is not None else None}


def balances(db: dict[str, Any], expected: dict[str, int]) -> dict[str, Any]:
    """Every expected account's balance against the database's, exactly; accounts the mix never made
    (a customer keyed by its own id, say) are mismatches too when they hold anything."""
    with psycopg.connect(autocommit=True, **db) as conn:
        actual = {name: int(total) for name, total in conn.execute(BALANCES)}
    wrong = [(acct, want, actual.get(acct)) for acct, want in sorted(expected.items()) if actual.get(acct) != want]
    strays = [(acct, 0, got) for acct, got in sorted(actual.items()) if acct not in expected and got]
    return {
        "accounts_expected": len(expected),
        "accounts_in_database": len(actual),
        "credits_expected": sum(expected.values()),
        "credits_in_database": sum(actual.values()),
        "mismatches": len(wrong) + len(strays),
        "examples": [list(row) for row in (wrong + strays)[:5]],
        "equal": not wrong and not strays,
    }


def ledger(db: dict[str, Any]) -> dict[str, Any]:
    """What the run wrote: ledger entries by kind, grants by source, payments by outcome, referrals by status."""
    with psycopg.connect(autocommit=True, **db) as conn:
        count = lambda sql: dict(conn.execute(sql).fetchall())  # noqa: E731
        return {
            "entries": count("SELECT kind, count(*) FROM ledger_entries GROUP BY 1 ORDER BY 2 DESC"),
            "grants": count("SELECT source, count(*) FROM credit_grants GROUP BY 1 ORDER BY 2 DESC"),
            "payments": count("SELECT outcome, count(*) FROM payments GROUP BY 1 ORDER BY 2 DESC"),
            "referrals": count("SELECT status, count(*) FROM referrals GROUP BY 1 ORDER BY 2 DESC"),
            "accounts": conn.execute("SELECT count(*) FROM accounts").fetchone()[0],  # type: ignore[index]
        }


def credits_check(credits: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """`credits check`, the service's own invariant check, against the run's database."""
    done = subprocess.run([str(credits), "check"], cwd=cwd, env={**env, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=300, check=False)
    output = (done.stdout + done.stderr).strip().splitlines()
    return {"exit_code": done.returncode, "passed": done.returncode == 0, "output": "\n".join(output[-5:])}
