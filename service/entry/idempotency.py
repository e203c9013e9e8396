"""Idempotent API requests: the same Idempotency-Key replays the first response, whatever it was.

The key is claimed with INSERT … ON CONFLICT DO NOTHING inside the request's own transaction, so the work, its
response and the claim commit (or roll back) together. A concurrent duplicate waits on the uncommitted claim
(PostgreSQL's unique index, or SQLite's write lock) and then replays the committed response — a stored 402
replays as a 402 (a retry never changes an outcome).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update

from service.infra import db
from service.infra.models import ApiRequest, utcnow
from service.infra.uow import UnitOfWork

MAX_KEY_LENGTH = 255


class KeyReused(Exception):
    """The key was used before with a different request."""


@dataclass(frozen=True)
class Outcome:
    """A response to send: fresh, or replayed from the first request with the same key."""

    status_code: int
    body: dict[str, Any]
    replayed: bool


def scoped(prefix: str, account: str, key: str) -> str:
    """The ledger key a client's Idempotency-Key stands for in an account: `{prefix}:{account}:{key}`, or, when
    that would not fit the ledger's 255 characters (a long key or account id), `{prefix}#` and its SHA-256 —
    so every key of 1-255 characters works, and a hashed key can never equal a written-out one."""
    text = f"{prefix}:{account}:{key}"
    if len(text) <= MAX_KEY_LENGTH:
        return text
    digest = hashlib.sha256("\0".join((account, key)).encode()).hexdigest()
    return f"{prefix}#{digest}"


def fingerprint(method: str, path: str, payload: Any) -> str:
    """A digest of what the request asks for; key order and whitespace in the body do not matter."""
    canonical = json.dumps([method.upper(), path, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_once(uow: UnitOfWork, key: str, digest: str, work: Callable[[], tuple[int, dict[str, Any]]]) -> Outcome:
    """Run `work` under `key` unless the key has a stored outcome, which is then replayed. Raises KeyReused
    when the key was used with another request.

    A stored key always has its answer: the claim and the answer commit together, and a concurrent request
    with the same key waits for that commit (or for the rollback that frees the key)."""
    claim = {"key": key, "fingerprint": digest, "created_at": utcnow()}
    if uow.session.scalar(CLAIM[uow.dialect], claim) is None:
        earlier = uow.session.execute(EARLIER, {"key": key}).one()
        if earlier.fingerprint != digest:
            raise KeyReused(key)
        assert earlier.status_code is not None  # stored with its claim, in the claim's transaction
        return Outcome(earlier.status_code, earlier.response, replayed=True)
    status_code, body = work()
    uow.session.execute(STORE, {"claimed": key, "status_code": status_code, "response": body})
    return Outcome(status_code, body, replayed=False)


# Built once: every POST runs them (see service/domain/ledger.py on the cost of building a statement).
_requests = ApiRequest.__table__
CLAIM = {
    dialect: db.insert(dialect, _requests).on_conflict_do_nothing(index_elements=["key"]).returning(_requests.c.key)
    for dialect in db.DIALECTS
}
EARLIER = select(_requests.c.fingerprint, _requests.c.status_code, _requests.c.response).where(
    _requests.c.key == bindparam("key")
)
STORE = update(_requests).where(_requests.c.key == bindparam("claimed"))
