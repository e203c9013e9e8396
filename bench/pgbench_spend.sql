-- pgbench's spend, the reference for POST /v1/accounts/{id}/spend: what a spend must do at the least, one statement
-- per round trip as an application sends them. pgbench -D first=<first account id> -D accounts=<how many> -f bench/pgbench_spend.sql
\set aid :first + random(0, :accounts - 1)
BEGIN;
SELECT id FROM accounts WHERE id = :aid FOR UPDATE;
SELECT id AS gid FROM credit_grants WHERE account_id = :aid AND remaining >= 1
  AND (expires_at IS NULL OR expires_at > now()) ORDER BY expires_at NULLS LAST, id LIMIT 1 \gset
INSERT INTO ledger_entries (account_id, kind, amount, idempotency_key, actor, metadata, created_at)
  VALUES (:aid, 'spend', -1, 'pgbench:' || gen_random_uuid(), 'pgbench', '{}', now()) RETURNING id AS eid \gset
INSERT INTO ledger_allocations (entry_id, grant_id, amount) VALUES (:eid, :gid, 1);
UPDATE credit_grants SET remaining = remaining - 1, spent = spent + 1 WHERE id = :gid;
COMMIT;
