"""The local side of the benchmark: what the service would hold had it processed the dataset's webhooks.

For every invoice but the deliberately missing ones (bench/reconcile/dataset.py): the account (linked to its
customer), the `invoice.paid` event in the inbox (processed, with its full payload), the payment, the plan
grant's ledger entry and credit grant — the rows `refills.refill` writes; for the referred signups, the paid
referral and both payouts. The rows are streamed with COPY (seconds for 100k; seeding is not measured), then
the tables are analysed, as autovacuum would have done on a live database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench.reconcile.dataset import AMOUNT_PAID, CREDITS, PERIOD_SECONDS, PLAN, REFERRAL_CREDITS, REFERRERS, Dataset, referrer_code

Row = tuple[Any, ...]
COLUMNS = {
    "accounts": "id, public_id, stripe_customer_id, plan, status, period_end, subscription_id, email, referral_code, created_at",
    "stripe_events": "id, type, object_type, object_id, api_version, livemode, created, payload, status, attempts, "
                     "outcome, next_attempt_at, received_at, processed_at",
    "payments": "id, account_id, kind, amount, currency, subscription_id, billing_reason, product, credits, outcome, paid_at, created_at",
    "ledger_entries": "id, account_id, kind, amount, idempotency_key, reason, actor, metadata, created_at",
    "credit_grants": "id, account_id, entry_id, source, amount, remaining, spent, expired, reversed, rollover, created_at",
    "referrals": "id, referrer_id, referee_id, code, source, status, qualifying_payment, attributed_at, qualified_at, paid_at",
}


def seed(db: dict[str, Any], data: Dataset) -> dict[str, int]:
    """Fill an empty, migrated database; returns the rows written per table."""
    tables: dict[str, list[Row]] = {name: [] for name in COLUMNS}
    counts = dict.fromkeys(COLUMNS, 0)
    with psycopg.connect(**db) as conn:
        for table, row in _rows(data):
            tables[table].append(row)
            if len(tables[table]) >= 5000:
                _flush(conn, tables, counts)
        _flush(conn, tables, counts)
        for table in ("accounts", "ledger_entries", "credit_grants", "referrals"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
    with psycopg.connect(autocommit=True, **db) as conn:
        conn.execute("VACUUM ANALYZE")
    return counts


def _flush(conn: psycopg.Connection[Any], tables: dict[str, list[Row]], counts: dict[str, int]) -> None:
    """Every buffered row, table by table in COLUMNS order, so each foreign key's target is already there."""
    for table, rows in tables.items():
        with conn.cursor() as cur, cur.copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        counts[table] += len(rows)
        rows.clear()


def _rows(data: Dataset) -> Iterator[tuple[str, Row]]:
    """(table, row) for every local row, referrers first; ids are assigned here, in order."""
    ids = {"ledger_entries": 0, "credit_grants": 0, "referrals": 0}

    def next_id(table: str) -> int:
        ids[table] += 1
        return ids[table]

    def grant(account: int, credits: int, key: str, reason: str, actor: str, meta: dict[str, Any], at: datetime,
              source: str) -> Iterator[tuple[str, Row]]:
        entry = next_id("ledger_entries")
        yield "ledger_entries", (entry, account, "grant", credits, key, reason, actor, json.dumps({"source": source, **meta}), at)
        yield "credit_grants", (next_id("credit_grants"), account, entry, source, credits, credits, 0, 0, 0, True, at)

    first_at = _at(data.created(data.count - 1))
    referrers = {k: data.count + 1 + k for k in range(REFERRERS)}
    for k, account in referrers.items():
        yield "accounts", (account, f"acct_bench_referrer_{k}", f"cus_bench_referrer_{k}", PLAN, "active", None, None,
                           None, referrer_code(k), first_at)
    for i in range(data.count):
        if data.missing(i):
            continue
        tag, account, paid = data.tag(i), i + 1, _at(data.created(i))
        invoice, reason = f"in_{tag}", "subscription_create" if data.first_invoice(i) else "subscription_cycle"
        period_end = _at(data.created(i) + PERIOD_SECONDS)
        yield "accounts", (account, f"acct_{tag}", f"cus_{tag}", PLAN, "active", period_end, f"sub_{tag}",
                           f"{tag}@example.com", None, paid)
        yield "stripe_events", (f"evt_{tag}", "invoice.paid", "invoice", invoice, "2025-03-31.basil", False, paid,
                                data.event_json(i), "processed", 1, f"granted {CREDITS} credits ({PLAN})", paid, paid, paid)
        yield "payments", (invoice, account, "invoice", AMOUNT_PAID, "usd", f"sub_{tag}", reason, PLAN, CREDITS, "granted", paid, paid)
        yield from grant(account, CREDITS, f"invoice:{invoice}", f"{PLAN} plan, invoice {invoice}", "stripe",
                         {"invoice": invoice, "plan": PLAN, "billing_reason": reason, "period_end": period_end.isoformat()},
                         paid, "plan")
        if data.referred(i):
            referral, referrer = next_id("referrals"), referrers[i % REFERRERS]
            yield "referrals", (referral, referrer, account, referrer_code(i % REFERRERS), "subscription", "paid",
                                invoice, paid, paid, paid)
            for side, owner in (("referrer", referrer), ("referee", account)):
                yield from grant(owner, REFERRAL_CREDITS, f"referral:{referral}:{side}", f"referral {referral} ({side})",
                                 "referrals", {"referral": referral, "side": side}, paid, "referral")


def _at(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
