"""Spend benchmark: spends per second across 1,000 accounts and on one hot account through
`POST /v1/accounts/{id}/spend`, against pgbench running the same transaction in SQL, with zero overdraft
checked after.

Modules, one job each (the database, server and process helpers are bench/ingest's):
- `run`        the orchestrator: fresh database, seed, server, turns of load and pgbench, race, profile, checks
- `seed`       accounts with credits, in SQL (not measured)
- `loadgen`    the load generator process (asyncio + aiohttp, closed loop, distinct Idempotency-Keys)
- `pgbench`    the database's own limit: the spend's transaction in SQL
- `statements` the SQL statements one spend sends (the app in a process of its own)
- `batch`      a batch of spends alone, in-process: its wall time, CPU and each statement's (not run by `make bench`)
- `checks`     zero overdraft: ledger against answers, 402s spent nothing, `credits check`
- `profile`    the spend path's stages for the py-spy summary
- `report`     the table printed at the end and the README section
"""
