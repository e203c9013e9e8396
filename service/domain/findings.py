"""Reconciliation runs and their findings, stored so a finding's history is visible across runs.

A finding is identified by its stable kind and subject (an event, invoice, referral, payment or entry id).
Each run upserts what it saw; an open finding that a run no longer sees is closed as `resolved`, one that a
run repaired is closed as `fixed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from service.infra.models import Finding, ReconcileRun, utcnow
from service.infra.uow import UnitOfWork


@dataclass(frozen=True)
class Seen:
    """One finding as a run reports it."""

    kind: str
    subject: str
    detail: str
    action: str
    accounts: tuple[str, ...]
    stripe_ids: tuple[str, ...]
    credits: int
    fixed: bool


def start_run(uow: UnitOfWork, since: datetime, until: datetime, fix: bool) -> ReconcileRun:
    run = ReconcileRun(since=since, until=until, fix=fix, status="running", started_at=utcnow())
    uow.session.add(run)
    uow.session.flush()
    return run


def finish_run(uow: UnitOfWork, run: ReconcileRun, seen: list[Seen], status: str, summary: dict[str, Any]) -> None:
    """Record what the run saw and close what it no longer sees."""
    now = utcnow()
    run = uow.session.get_one(ReconcileRun, run.id)
    run.status, run.summary, run.finished_at = status, summary, now
    existing = {(f.kind, f.subject): f for f in uow.session.scalars(select(Finding).where(Finding.status == "open"))}
    for item in seen:
        row = existing.pop((item.kind, item.subject), None) or uow.session.scalar(
            select(Finding).where(Finding.kind == item.kind, Finding.subject == item.subject)
        )
        if row is None:
            row = Finding(kind=item.kind, subject=item.subject, first_run_id=run.id, first_seen_at=now)
            uow.session.add(row)
        row.detail, row.action, row.credits = item.detail, item.action, item.credits
        row.accounts, row.stripe_ids = {"ids": list(item.accounts)}, {"ids": list(item.stripe_ids)}
        row.last_run_id, row.last_seen_at = run.id, now
        row.status, row.closed_at = ("fixed", now) if item.fixed else ("open", None)
    if status != "error":
        for row in existing.values():
            row.status, row.closed_at = "resolved", now
    uow.session.flush()


def open_findings(uow: UnitOfWork, limit: int = 500) -> list[dict[str, Any]]:
    """Open findings, oldest first, as the admin API shows them."""
    rows = uow.session.scalars(
        select(Finding).where(Finding.status == "open").order_by(Finding.first_seen_at, Finding.id).limit(limit)
    )
    return [
        {
            "kind": f.kind,
            "subject": f.subject,
            "accounts": f.accounts.get("ids", []),
            "stripe_ids": f.stripe_ids.get("ids", []),
            "credits": f.credits,
            "detail": f.detail,
            "action": f.action,
            "first_seen_at": f.first_seen_at.isoformat(),
            "last_seen_at": f.last_seen_at.isoformat(),
            "first_run_id": f.first_run_id,
            "last_run_id": f.last_run_id,
        }
        for f in rows
    ]
