"""End-to-end benchmark: a realistic mix of signed Stripe events delivered to the real service (API and
`credits worker`) and processed into the ledger; events per second until the last balance is final,
against 1,000/s and against pgbench doing as many row writes per event.

Modules, one job each:
- `run`      the orchestrator: fresh database, service and worker, referral codes, the load, row-write
             counts, verification, pgbench, profile (bench/ingest/run.py's helpers)
- `mix`      who signs up, renews, buys packs and refers whom, month by month; the balances that must result
- `events`   the mix's Stripe events (tests/stripe_events.py's builders), from cached templates
- `loadgen`  the load generator process: month after month, customers' events in order, C customers in flight
- `writes`   row writes per event from PostgreSQL's counters, and the pgbench script doing as many
- `verify`   inbox statuses, balances against the mix's, `credits check`, ledger counts
- `profile`  py-spy on the worker, by stage of the processing (bench/ingest/profile.py's recorder)
- `report`   the table printed at the end and the README section
"""
