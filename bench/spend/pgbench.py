"""The database's own limit for a spend: pgbench running the spend's transaction directly in SQL.

On the benchmark's own tables and seeded accounts, each pgbench transaction does what a spend must do at
the least: lock the account row (FOR UPDATE), find the soonest-expiring grant with credits left, insert the
ledger entry (RETURNING its id) and its allocation, move the credits in the grant, commit — one statement
per round trip, as an application would send them. Over `accounts` ids from `first` (random, like the load
generator), or all on one (`accounts` = 1). The rows it writes keep the ledger's invariants (an entry, its
allocation and the grant agree), so `credits check` holds after it; its keys start with `pgbench:`, apart
from the service's `spend:…` ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.ingest.pgbench import run_script

SCRIPT = """\\set aid :first + random(0, :accounts - 1)
BEGIN;
SELECT id FROM accounts WHERE id = :aid FOR UPDATE;
SELECT id AS gid FROM credit_grants WHERE account_id = :aid AND remaining >= :amount
  AND (expires_at IS NULL OR expires_at > now()) ORDER BY expires_at NULLS LAST, id LIMIT 1 \\gset
INSERT INTO ledger_entries (account_id, kind, amount, idempotency_key, actor, metadata, created_at)
  VALUES (:aid, 'spend', -:amount, 'pgbench:' || gen_random_uuid(), 'pgbench', '{}', now()) RETURNING id AS eid \\gset
INSERT INTO ledger_allocations (entry_id, grant_id, amount) VALUES (:eid, :gid, :amount);
UPDATE credit_grants SET remaining = remaining - :amount, spent = spent + :amount WHERE id = :gid;
COMMIT;
"""


def run(db: dict[str, Any], workdir: Path, *, first: int, accounts: int, amount: int, clients: int,
        seconds: float) -> dict[str, Any]:
    """pgbench for `seconds` with `clients` connections; its TPS and latency, with the command as run."""
    path = workdir / "pgbench_spend.sql"
    path.write_text(SCRIPT)
    result = run_script(db, path, clients, ["-T", str(max(1, round(seconds)))],
                        defines={"first": first, "accounts": accounts, "amount": amount}, timeout=seconds + 60)
    result["command"] = result.get("command", "").replace(str(workdir), "$WORKDIR")
    return result
