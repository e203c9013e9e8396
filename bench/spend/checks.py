"""Zero overdraft, checked after the load from the database itself and the ledger's own check.

- per phase (its Idempotency-Keys share a prefix): the ledger's spend entries under the phase's keys are as
  many as the 200 answers and hold 200s × cost credits; the stored API outcomes (`api_requests`) agree with
  the answers, 200s and 402s alike — so a 402 spent nothing;
- no account's ledger sums below zero, and no grant holds less than nothing;
- `credits check` (ledger.check: every balance and grant recomputed from the entries) exits 0.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from typing import Any

import psycopg

from bench.ingest.run import PYTHON, ROOT

# `credits check` as the console script runs it, with this interpreter (so the tree on PYTHONPATH is used).
CREDITS_CHECK = [PYTHON, "-c", "import sys; from service.cli import main; sys.argv[0] = 'credits'; main()", "check"]


def phase(db: dict[str, Any], key_prefix: str, answers: Counter[str], amount: int) -> dict[str, Any]:
    """The ledger and the stored outcomes of one phase's spends against the answers the client saw."""
    with psycopg.connect(autocommit=True, **db) as conn:
        entries, credits = conn.execute(
            "SELECT count(*), coalesce(sum(-amount), 0) FROM ledger_entries "
            "WHERE kind = 'spend' AND idempotency_key LIKE %s", (f"spend:%:{key_prefix}%",)).fetchone()  # type: ignore[misc]
        stored = dict(conn.execute("SELECT status_code, count(*) FROM api_requests WHERE key LIKE %s GROUP BY 1",
                                   (f"{key_prefix}%",)).fetchall())
    ok, refused = answers.get("200", 0), answers.get("402", 0)
    return {
        "answers": dict(answers),
        "ledger_entries": entries,
        "ledger_credits": int(credits),
        "stored_outcomes": {str(k): v for k, v in stored.items()},
        "ok": entries == ok and credits == ok * amount and stored.get(200, 0) == ok and stored.get(402, 0) == refused,
    }


def overall(db: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """No negative balance or grant anywhere, and the ledger's own check."""
    with psycopg.connect(autocommit=True, **db) as conn:
        negative = conn.execute("SELECT count(*) FROM (SELECT account_id FROM ledger_entries GROUP BY 1 "
                                "HAVING sum(amount) < 0) AS below").fetchone()[0]  # type: ignore[index]
        bad_grants = conn.execute("SELECT count(*) FROM credit_grants WHERE remaining < 0").fetchone()[0]  # type: ignore[index]
    done = subprocess.run(CREDITS_CHECK, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    return {
        "negative_balances": negative,
        "negative_grants": bad_grants,
        "credits_check_exit": done.returncode,
        "credits_check_output": (done.stdout + done.stderr).strip()[-500:],
        "ok": negative == 0 and bad_grants == 0 and done.returncode == 0,
    }


def race(db: dict[str, Any], account: str, credits: int, answers: Counter[str], amount: int) -> dict[str, Any]:
    """The account that ran dry under concurrent spends: what was spent is exactly what the 200s say, never more
    than it held, and what is left is less than one more spend when anything was refused."""
    with psycopg.connect(autocommit=True, **db) as conn:
        balance = conn.execute("SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e JOIN accounts a "
                               "ON a.id = e.account_id WHERE a.public_id = %s", (account,)).fetchone()[0]  # type: ignore[index]
    ok, refused = answers.get("200", 0), answers.get("402", 0)
    return {
        "account": account,
        "credits": credits,
        "balance_after": int(balance),
        "ok": balance == credits - ok * amount and balance >= 0 and (refused == 0 or balance < amount) and refused > 0,
    }
