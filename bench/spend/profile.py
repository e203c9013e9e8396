"""Where a spend's time goes, from a py-spy profile of the service (bench/ingest/profile.py records it).

The stages are tried in this order and the first whose function is anywhere in a sample's stack wins, so
the innermost step of the spend path is named: the ledger's writes, then its reads, then the rest of
`spending.spend`, the account look-up, the idempotency claim and record, the commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.ingest import profile

STAGES = [
    ("logging (structlog)", r"\(structlog/|\(service/logs\.py"),
    ("ledger writes (ledger._debit/_post: entry, allocations, grant update, flush)",
     r"(^|\.)(_debit|_post) \(service/ledger\.py"),
    ("ledger reads (open grants, balance, expiry sweep, earlier entry)",
     r"(^|\.)(open_grants|spendable|_held|balance|expire_due|_expire|_find) \(service/ledger\.py"),
    ("account row lock (accounts.lock, accounts.lock_ref)", r"(^|\.)(lock|lock_ref) \(service/accounts\.py"),
    ("rest of spending.spend (the one read under the lock: earlier entry, members' reserve, grants; members, "
     "resource checks)", r"\(service/spending\.py"),
    ("account look-up (accounts.get)", r"(^|\.)(get|find) \(service/accounts\.py"),
    ("idempotency claim and response record (idempotency.run_once)", r"\(service/idempotency\.py"),
    ("transaction begin/commit, session (db.transaction)", r"(^|\.)transaction \(service/db\.py"),
    ("request body and response (pydantic, JSON, fingerprint)",
     r"(^|\.)(fingerprint|_once|_outcome|_answer|_well_formed|_read_body) \(service/"),
]
OTHER = "HTTP/ASGI machinery, routing, event loop, threads (uvicorn, h11, starlette, fastapi, asyncio, anyio)"


def summarise(raw: Path) -> dict[str, Any]:
    """The ingest summary (by library, hottest leaves) with the spend path's stages."""
    return profile.summarise(raw, stages_rules=STAGES, stage_other=OTHER)
