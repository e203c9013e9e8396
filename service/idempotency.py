"""Idempotent API requests: the same Idempotency-Key replays the first response, whatever it was.

The key is claimed with INSERT … ON CONFLICT DO NOTHING inside the request's own transaction, so the
work, its response and the claim commit (or roll back) together. A concurrent duplicate blocks on the
uncommitted claim (PostgreSQL) or the write lock (SQLite) and then replays the committed response — a
stored 402 replays as a 402 (a retry never changes an outcome).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Insert, bindparam, update
from sqlalchemy.orm import Session

from service.db import dialect_insert
from service.models import ApiRequest, utcnow

MAX_KEY_LENGTH = 255


class KeyReused(Exception):
    """The key was used before with a different request."""


class KeyInFlight(Exception):
    """The key is held by a request that has not finished."""


@dataclass(frozen=True)
class Outcome:
    """A response to send: fresh, or replayed from the first request with the same key."""

    status_code: int
    body: dict[str, Any]
    replayed: bool


def _claim(dialect: str) -> Insert:
    table = ApiRequest.__table__
    return (dialect_insert(dialect, table)
            .values(key=bindparam("claimed"), fingerprint=bindparam("digest"), created_at=bindparam("at"))
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(table.c.key))


# Built once, per dialect: every API POST runs both, and building a statement costs more than running it.
CLAIM = {dialect: _claim(dialect) for dialect in ("postgresql", "sqlite")}
RECORD = (update(ApiRequest.__table__).where(ApiRequest.__table__.c.key == bindparam("claimed"))
          .values(status_code=bindparam("status"), response=bindparam("body")))


def fingerprint(method: str, path: str, payload: Any) -> str:
    """A digest of what the request asks for; key order and whitespace in the body do not matter."""
    canonical = json.dumps([method.upper(), path, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_once(session: Session, key: str, digest: str, work: Callable[[], tuple[int, dict[str, Any]]]) -> Outcome:
    """Run `work` under `key` unless the key has a stored outcome, which is then replayed."""
    claim = CLAIM[session.get_bind().dialect.name]
    claimed = session.scalar(claim, {"claimed": key, "digest": digest, "at": utcnow()})
    if claimed is None:
        earlier = session.get_one(ApiRequest, key, populate_existing=True)
        if earlier.fingerprint != digest:
            raise KeyReused(key)
        if earlier.status_code is None or earlier.response is None:
            raise KeyInFlight(key)
        return Outcome(earlier.status_code, earlier.response, replayed=True)
    status_code, body = work()
    session.execute(RECORD, {"claimed": key, "status": status_code, "body": body})
    return Outcome(status_code, body, replayed=False)
