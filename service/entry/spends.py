"""The spend API's requests, done in batches: concurrent `POST /v1/accounts/{id}/spend` requests share one
transaction, one statement locking their accounts and one commit (service/group_commit.py).

A spend is the product's hot path, and most of its cost was per transaction, not per spend: the BEGIN and
the COMMIT (a WAL flush), a pool checkout, the account's row lock taken and held across round trips. A
batch pays them once. Each spend in it is still exactly what it was alone — its Idempotency-Key claimed
and its outcome stored with it, its account locked before its balance is read, refused (402) with nothing
spent when short — and the batch does them in arrival order, so two spends on one account in one batch
see each other as they would in two transactions one after the other.

A spend that cannot be answered as part of its batch (an unknown account, an Idempotency-Key reused for
another request, a value the database refuses) makes the batch roll back; group_commit then does the
batch's spends again one by one, so that only that request gets the error.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection, Select, case, func, select, true
from sqlalchemy.orm import Session, aliased

from service.entry import idempotency

from service.domain import accounts, ledger, spending

from service.infra import logs
from service.infra.db import is_postgresql, recordset_parameters
from service.infra.group_commit import GroupCommit
from service.entry.idempotency import Outcome
from service.infra.models import Account
from service.infra.runtime import Runtime
from service.entry.schemas import SpendRequest

log = logs.get("spends")
MAX_BATCH = 64  # spends in one transaction at most: under one lock, a batch also delays the next one's requests


@dataclass(frozen=True)
class SpendJob:
    """One spend request: the account as the request names it (public id or Stripe customer id), its body,
    its Idempotency-Key, its fingerprint, and its context (the request id its log lines carry)."""

    account: str
    body: SpendRequest
    key: str
    digest: str
    context: contextvars.Context


class Spends(GroupCommit[SpendJob, Outcome]):
    """The process's spends, done in batches on a thread of its own."""

    def __init__(self, rt: Runtime, max_batch: int = MAX_BATCH) -> None:
        def work(conn: Connection, jobs: list[SpendJob]) -> list[Outcome]:
            with rt.sessions(bind=conn) as session, session.begin():
                return spend_all(session, rt, jobs)

        super().__init__(rt.engine, work, name="spends", max_batch=max_batch)


def spend_all(session: Session, rt: Runtime, jobs: list[SpendJob]) -> list[Outcome]:
    """Do the jobs' spends in this transaction, each once per Idempotency-Key; an outcome per job, in order.

    Keys are claimed first (sorted), then every account the new spends name is locked with one statement
    (in id order; on PostgreSQL the claim's own), then the spends are done in arrival order
    (spending.spend_many) and their outcomes are stored. A key that comes twice in the batch is done once:
    the later request replays the first one's outcome (or is refused as another request under the same
    key), as it would right after it."""
    first: dict[str, SpendJob] = {}
    for job in jobs:
        first.setdefault(job.key, job)
    outcomes, found = _claim_and_lock(session, list(first.values()))
    new = [job for job in first.values() if outcomes[job.key] is None]
    locked = accounts.lock_refs(session, {job.account for job in new}, found) if new else {}
    calls = [spending.Call(locked[job.account], _charge(job.body), f"spend:{locked[job.account].public_id}:{job.key}")
             for job in new]
    spent = spending.spend_many(session, rt.catalogue, calls)
    done = [(job.key, *job.context.run(_answer, call.account, job.body, result))
            for job, call, result in zip(new, calls, spent)]
    idempotency.record(session, done)
    outcomes.update((key, Outcome(status, body, replayed=False)) for key, status, body in done)
    return [_again(job, first[job.key], outcomes[job.key]) for job in jobs]  # type: ignore[arg-type]


def _claiming_and_locking() -> Select[Any]:
    """PostgreSQL: the Idempotency-Keys' claim (idempotency.CLAIM) and then the lock of the accounts named
    (accounts.LOCK_BY_REFS) as ONE statement, a round trip fewer under every batch: each account locked, in id
    order, the first row also carrying the list of the keys claimed (NULL when none was), and one row of no
    account when none is found. The accounts are the lock's own rows: a row locked after a wait is returned as
    the holder left it, where a second read of the table in the same statement would see it as it was before.

    Keys before accounts, as every transaction takes them (a batch, `idempotency.run_once`), or two could wait
    for each other: the sub-statements of a WITH have no order of their own, so the shape gives it — the keys'
    aggregate is the outer side of a LEFT JOIN `ON true`, which only a nested loop can run, and it reads the
    whole INSERT before the first row lock is taken."""
    claimed = idempotency.CLAIM.postgresql.cte("claimed")
    locked = accounts.LOCK_BY_REFS["postgresql"].cte("locked")
    claims = select(func.json_agg(claimed.c.key).label("claimed")).subquery("claims")
    once = case((func.row_number().over(order_by=locked.c.id) == 1, claims.c.claimed))  # not the list on every row
    return (select(aliased(Account, locked), once.label("claimed")).select_from(claims).outerjoin(locked, true())
            .order_by(locked.c.id).execution_options(populate_existing=True))


CLAIM_AND_LOCK = _claiming_and_locking()


def _claim_and_lock(session: Session, jobs: list[SpendJob]) -> tuple[dict[str, Outcome | None], list[Account] | None]:
    """The jobs' keys claimed (idempotency.claim's answer) and, on PostgreSQL, every account they name locked
    by the same statement (for `accounts.lock_refs`; a replay's account too, so the batch may wait for its lock
    and holds it to the end, as for any account it spends from). On SQLite, in-process, there is no round trip
    to save: the claim alone, and the caller locks (None)."""
    requests = [(job.key, job.digest) for job in jobs]
    if not is_postgresql(session):
        return idempotency.claim(session, requests), None
    rows = session.execute(CLAIM_AND_LOCK, {**recordset_parameters(idempotency.claim_rows(requests)),
                                            "refs": sorted({job.account for job in jobs})}).all()
    outcomes = idempotency.replays(session, requests, set(rows[0].claimed or ()))
    return outcomes, [account for account, _ in rows if account is not None]


def _again(job: SpendJob, first: SpendJob, outcome: Outcome) -> Outcome:
    """A job's outcome: its own, or for a repeat of a key earlier in the batch the first one's, replayed."""
    if job is first:
        return outcome
    if job.digest != first.digest:
        raise idempotency.KeyReused(job.key)
    return Outcome(outcome.status_code, outcome.body, replayed=True)


def _charge(body: SpendRequest) -> spending.Charge:
    return spending.Charge(body.amount, body.action, body.quantity, body.resource, body.member_id, body.reason)


def _answer(account: Account, body: SpendRequest, result: spending.Spent | spending.Refused) -> tuple[int, dict[str, Any]]:
    """The status and body to answer and store for one spend's result (run in its request's context)."""
    structlog.contextvars.bind_contextvars(account_id=account.public_id)
    if isinstance(result, ledger.InsufficientCredits):
        log.info("spend.refused", balance=result.balance, requested=result.requested)
        return 402, {"error": "insufficient_credits", "balance": result.balance, "requested": result.requested}
    if isinstance(result, spending.MemberLimitReached):
        return 402, {"error": "member_limit_reached", "limit": result.limit, "used": result.used, "requested": result.requested}
    if isinstance(result, spending.UnknownMember):
        return 404, {"error": "member_not_found", "message": f"no member {body.member_id!r} in {account.public_id}"}
    if isinstance(result, spending.UnknownAction):
        return 422, {"error": "unknown_action", "message": str(result), "known_actions": result.known}
    echo = {k: v for k, v in (("action", body.action), ("quantity", body.quantity if body.action else None),
                              ("resource", body.resource), ("member_id", body.member_id)) if v is not None}
    return 200, {"balance": result.balance, "spent": result.charged, "charged": result.charged,
                 "entry_id": result.entry_id, **echo}
