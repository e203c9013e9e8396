"""Where a spend's time goes, from a py-spy profile of the service (bench/ingest/profile.py records it).

The stages are tried in this order and the first whose function is anywhere in a sample's stack wins, so
the innermost step of the spend path is named: in the batch thread the ledger's writes, the reads under the
locks, deciding the spends, the keys' claim with the accounts' lock, the idempotency claim and record,
the rest (session, COMMIT);
on the event loop the request's own parsing, checking and answer; the rest is the HTTP machinery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.ingest import profile

STAGES = [
    ("logging (structlog)", r"\(structlog/|\(service/logs\.py"),
    ("batch: ledger writes (ledger.write_debits: entries, allocations, grant updates)",
     r"(^|\.)(write_debits|_write_moves|_debit|_post) \(service/ledger\.py"),
    ("batch: reads under the locks (grants and reserves, earlier entries)", r"_Batch\.__init__ \(service/spending\.py"),
    ("batch: deciding the spends in memory (spending._Batch._spend; expiry, members, resources)",
     r"\(service/spending\.py"),
    ("batch: the keys' claim and the accounts' lock, one statement (spends._claim_and_lock)",
     r"(^|\.)_claim_and_lock \(service/spends\.py"),
    ("batch: the accounts' lock (accounts.lock_refs)", r"(^|\.)lock_refs \(service/accounts\.py"),
    ("batch: idempotency claim and stored responses (idempotency.claim, record)", r"\(service/idempotency\.py"),
    ("batch: the rest (session, BEGIN, COMMIT, answers)", r"\(service/(spends|group_commit)\.py"),
    ("request: body, checks, fingerprint, hand-off and answer (api.SpendDoor)",
     r"(^|\.)(fingerprint|_spend|_digest|_answer|_well_formed|_read_body) \(service/api\.py|SpendDoor\.__call__"),
]
OTHER = "HTTP/ASGI machinery, event loop, threads (uvicorn, httptools, asyncio, futures)"


def summarise(raw: Path) -> dict[str, Any]:
    """The ingest summary (by library, hottest leaves) with the spend path's stages."""
    return profile.summarise(raw, stages_rules=STAGES, stage_other=OTHER)
