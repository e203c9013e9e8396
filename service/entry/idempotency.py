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

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from service.infra.db import Bulk, among, dialect_insert, listed, recordset
from service.infra.models import ApiRequest, utcnow

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


_requests = ApiRequest.__table__


def _claim() -> Bulk:
    """Rows of (claimed, digest, at): INSERT … ON CONFLICT (key) DO NOTHING RETURNING the keys claimed, in
    the order of the keys."""
    rows = recordset(claimed=_requests.c.key.type, digest=_requests.c.fingerprint.type, at=_requests.c.created_at.type)
    new = select(rows.c.claimed, rows.c.digest, rows.c.at).order_by(rows.c.claimed)
    return Bulk(
        dialect_insert("postgresql", _requests).from_select(["key", "fingerprint", "created_at"], new)
        .on_conflict_do_nothing(index_elements=["key"]).returning(_requests.c.key),
        dialect_insert("sqlite", _requests)
        .values(key=bindparam("claimed"), fingerprint=bindparam("digest"), created_at=bindparam("at"))
        .on_conflict_do_nothing(index_elements=["key"]).returning(_requests.c.key))


def _record() -> Bulk:
    """Rows of (claimed, status, body): the outcome stored under each claimed key."""
    rows = recordset(claimed=_requests.c.key.type, status=_requests.c.status_code.type, body=_requests.c.response.type)
    return Bulk(
        update(_requests).where(_requests.c.key == rows.c.claimed, listed(_requests.c.key, "claimed")).values(status_code=rows.c.status, response=rows.c.body),
        update(_requests).where(_requests.c.key == bindparam("claimed"))
        .values(status_code=bindparam("status"), response=bindparam("body")))


# Built once: every API POST runs them, and building a statement costs more than running it.
CLAIM, RECORD = _claim(), _record()
EARLIER = {dialect: select(_requests.c.key, _requests.c.fingerprint, _requests.c.status_code, _requests.c.response)
           .where(among(_requests.c.key, "keys", dialect)) for dialect in ("postgresql", "sqlite")}


def fingerprint(method: str, path: str, payload: Any) -> str:
    """A digest of what the request asks for; key order and whitespace in the body do not matter."""
    canonical = json.dumps([method.upper(), path, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim(session: Session, requests: list[tuple[str, str]]) -> dict[str, Outcome | None]:
    """Claim each (key, digest) for this transaction: None for a key now claimed (do the work, then `record`),
    the stored Outcome to replay for a key an earlier request holds. Raises KeyReused when a key was used with
    another request, KeyInFlight when its request has not finished. The keys must be distinct.

    The keys are claimed in sorted order, so two transactions claiming overlapping keys (a batch of spends
    and a client's retry in another) wait for each other in one order, never in a cycle."""
    claimed = set(CLAIM.execute(session, claim_rows(requests)).scalars())
    return replays(session, requests, claimed)


def claim_rows(requests: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """CLAIM's rows for the (key, digest) requests, in key order."""
    at = utcnow()
    return [{"claimed": key, "digest": digest, "at": at} for key, digest in sorted(requests)]


def replays(session: Session, requests: list[tuple[str, str]], claimed: set[str]) -> dict[str, Outcome | None]:
    """`claim`'s answer once CLAIM has run: None for each key in `claimed`, the stored Outcome of every other
    (or KeyReused, KeyInFlight)."""
    earlier = {key: digest for key, digest in requests if key not in claimed}
    replays: dict[str, Outcome | None] = dict.fromkeys(claimed)
    if earlier:
        lookup = EARLIER[session.get_bind().dialect.name]
        for key, fingerprint_, status_code, response in session.execute(lookup, {"keys": list(earlier)}):
            if fingerprint_ != earlier[key]:
                raise KeyReused(key)
            if status_code is None or response is None:
                raise KeyInFlight(key)
            replays[key] = Outcome(status_code, response, replayed=True)
    return replays


def record(session: Session, outcomes: list[tuple[str, int, dict[str, Any]]]) -> None:
    """Store each claimed key's (key, status, body) outcome, in the transaction that did its work."""
    if outcomes:
        RECORD.execute(session, [{"claimed": key, "status": status, "body": body} for key, status, body in outcomes])


def run_once(session: Session, key: str, digest: str, work: Callable[[], tuple[int, dict[str, Any]]]) -> Outcome:
    """Run `work` under `key` unless the key has a stored outcome, which is then replayed."""
    earlier = claim(session, [(key, digest)])[key]
    if earlier is not None:
        return earlier
    status_code, body = work()
    record(session, [(key, status_code, body)])
    return Outcome(status_code, body, replayed=False)
