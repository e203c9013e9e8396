"""Webhook ingest benchmark: POST /webhooks/stripe against a minimal verify-only handler and pgbench.

Modules, one job each:
- `run`       the orchestrator: fresh database, servers and the service's `credits worker`, load phases,
              durability check, pgbench, profile
- `server`    launcher for the real service (uvicorn, one worker) in its own process
- `reference` launcher for the minimal handler: verify the signature, store nothing, 200
- `loadgen`   the load generator process (asyncio + aiohttp): closed loop (C connections) or open loop (fixed rate)
- `events`    realistic, distinct, signed `invoice.paid` events (tests/stripe_events.py's builders)
- `pgbench`   the database's own limit: one durable JSONB insert per event, same payload and concurrency
- `profile`   py-spy sampling of the server under load, summarised by component
- `report`    the table printed at the end and the README section
"""

# What both server launchers pass to uvicorn, so the service and the reference differ only in the app.
# "auto" picks uvloop/httptools when installed (as `credits serve` would); the run records what it found.
UVICORN = {"workers": 1, "loop": "auto", "http": "auto", "access_log": False, "log_config": None, "log_level": "warning"}
