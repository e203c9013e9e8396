-- The tables of pgbench's end-to-end reference (bench/e2e.py writes its script: as many row writes per event as
-- the service made): an inbox-like table for the event's body, an accounts-like table to update, a ledger-like one.
CREATE TABLE bench_inbox (id text PRIMARY KEY, payload jsonb NOT NULL, status text NOT NULL, created timestamptz NOT NULL);
CREATE TABLE bench_accounts (id int PRIMARY KEY, touched bigint NOT NULL DEFAULT 0, updated timestamptz NOT NULL DEFAULT now());
INSERT INTO bench_accounts (id) SELECT generate_series(1, 10000);
CREATE TABLE bench_rows (id bigserial PRIMARY KEY, account_id int NOT NULL, amount bigint NOT NULL, note text NOT NULL,
                         created timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON bench_rows (account_id);
