"""Support's other commands on the audit trail — `rollover extend`, `grant`, `audit` — and the scheduled
`jobs refill-free` (the free allowance and the one-time rollover extension)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

from sqlalchemy import select

from jobs import refill_free
from service.domain import accounts
from service.infra.catalogue import Free
from service.infra.models import Grant, LedgerEntry, utcnow
from tests.helpers import T0, balance_of, committed, state
from tests.test_refills import FEB, JAN, MAR, pay

APR = (T0.replace(month=4), T0.replace(month=5))
UNTIL = (utcnow() + timedelta(days=60)).replace(hour=0, minute=0, second=0, microsecond=0)
WHY = ("--reason", "customer was on parental leave", "--actor", "sam")
THIS_MONTH = utcnow().strftime("%Y-%m")


def extend(run, *extra: str, account: str = "acct_1"):
    return run("rollover", "extend", account, "--until", f"{UNTIL:%Y-%m-%d}", *WHY, *extra)


def audit_rows(run, *args: str) -> list[dict]:
    return json.loads(run("audit", *args, "--json")[1])["entries"]


def make_accounts(rt, *refs: str, plan: str | None = None) -> None:
    with committed(rt) as uow:
        for ref in refs:
            accounts.get_or_create(uow, ref).plan = plan


def renewal_under_extension(deliver, run) -> None:
    """acct_1 on the starter plan (2000 a month, cap 2×) holds 4000 when support extends it; then March renews."""
    pay(deliver, "2025", "in_1", "price_starter_monthly", period=JAN)
    pay(deliver, "2025", "in_2", "price_starter_monthly", reason="subscription_cycle", period=FEB)
    extend(run)
    pay(deliver, "2025", "in_3", "price_starter_monthly", reason="subscription_cycle", period=MAR)


def test_a_rollover_extension_is_granted_once_unless_forced(run, rt) -> None:
    make_accounts(rt, "acct_1", plan="starter")
    status, out, _ = extend(run, "--ticket", "T-7")
    assert (status, f"keeps what it would cut until {UNTIL:%Y-%m-%d} 00:00 UTC (extension 1)" in out) == (0, True)
    status, _, err = extend(run)
    assert (status, "acct_1 already had 1 rollover extension(s); use --force to grant another" in err) == (1, True)
    assert extend(run, "--force")[0] == 0
    with rt.uow() as uow:
        account = accounts.get(uow, "acct_1")
        assert (account.rollover_extended_until, account.rollover_extensions) == (UNTIL, 2)
    rows = audit_rows(run)
    assert [
        (r["action"], r["actor"], r["ticket"], r["details"]["extensions"], r["details"]["force"]) for r in rows
    ] == [
        ("rollover.extend", "sam", None, 2, True),
        ("rollover.extend", "sam", "T-7", 1, False),
    ]
    assert rows[0]["details"]["replaced"] == rows[0]["details"]["until"] == UNTIL.isoformat()


def test_an_extension_date_in_the_past_is_refused(run, rt) -> None:
    make_accounts(rt, "acct_1")
    status, _, err = run("rollover", "extend", "acct_1", "--until", "2020-01-01", *WHY)
    assert (status, "is not in the future" in err) == (1, True)
    assert audit_rows(run) == []


def test_the_next_renewal_keeps_what_it_would_cut_until_the_extension_date(deliver, run, rt) -> None:
    renewal_under_extension(deliver, run)
    entries, grants = state(rt, "acct_1")
    assert entries == [
        ("grant", 2000, "invoice:in_1"),
        ("grant", 2000, "invoice:in_2"),
        ("expire", -2000, "rollover:in_3:1"),
        ("grant", 2000, "rollover:in_3:extension"),
        ("grant", 2000, "invoice:in_3"),
    ]
    assert grants == [
        ("plan", 2000, 0, 0, 2000, 0),
        ("plan", 2000, 2000, 0, 0, 0),
        ("extension", 2000, 2000, 0, 0, 0),
        ("plan", 2000, 2000, 0, 0, 0),
    ]
    assert balance_of(rt, "acct_1") == 6000
    with rt.uow() as uow:
        expiry = uow.session.scalars(select(LedgerEntry).where(LedgerEntry.idempotency_key == "rollover:in_3:1")).one()
        assert expiry.reason == f"kept under support extension until {UNTIL:%Y-%m-%d} 00:00 UTC"
        kept = uow.session.scalars(select(Grant).where(Grant.source == "extension")).one()
        assert (kept.expires_at, kept.rollover) == (UNTIL, False)
        assert accounts.get(uow, "acct_1").rollover_extended_until is None


def test_the_extension_is_used_up_by_one_renewal(deliver, run, rt) -> None:
    renewal_under_extension(deliver, run)
    pay(deliver, "2025", "in_4", "price_starter_monthly", reason="subscription_cycle", period=APR)
    assert state(rt, "acct_1")[0][5:] == [("expire", -2000, "rollover:in_4:2"), ("grant", 2000, "invoice:in_4")]
    assert balance_of(rt, "acct_1") == 6000  # the kept 2000 outside the policy, plus 2× the allowance


def test_grant_writes_an_audit_row(run) -> None:
    run("grant", "acct_1", "100", "--reason", "apology for outage", "--actor", "ana", "--idempotency-key", "T-9")
    [row] = audit_rows(run)
    assert (row["actor"], row["action"], row["account_id"], row["reason"], row["ticket"]) == (
        "ana",
        "grant",
        "acct_1",
        "apology for outage",
        None,
    )
    assert row["details"] == {
        "amount": 100,
        "idempotency_key": "grant:acct_1:T-9",
        "created": ["grant:acct_1:T-9"],
        "changed": True,
        "balance": 100,
    }


def test_a_replayed_grant_is_audited_as_changing_nothing(run) -> None:
    for _ in range(2):
        run("grant", "acct_1", "100", "--reason", "apology for outage", "--actor", "ana", "--idempotency-key", "T-9")
    assert [(r["details"]["changed"], r["details"]["created"]) for r in audit_rows(run)] == [
        (False, []),
        (True, ["grant:acct_1:T-9"]),
    ]


def test_audit_lists_the_trail_newest_first_for_everyone_or_one_account(run) -> None:
    for account, amount in (("acct_1", 1), ("acct_2", 2), ("acct_1", 3)):
        run("grant", account, str(amount), "--reason", "goodwill", "--actor", "ana")
    assert [(r["account_id"], r["details"]["amount"]) for r in audit_rows(run)] == [
        ("acct_1", 3),
        ("acct_2", 2),
        ("acct_1", 1),
    ]
    assert [(r["account_id"], r["details"]["amount"]) for r in audit_rows(run, "acct_1")] == [
        ("acct_1", 3),
        ("acct_1", 1),
    ]


def test_audit_shows_a_table_for_a_person(run) -> None:
    run("grant", "acct_1", "5", "--reason", "goodwill", "--actor", "ana", "--idempotency-key", "k")
    status, out, _ = run("audit")
    assert status == 0
    assert "│ ana   │ grant  │ acct_1  │ -      │ goodwill │ grant:acct_1:k" in out


def test_refill_free_twice_in_a_month_grants_once(run, rt) -> None:
    make_accounts(rt, "acct_free")
    status, out, _ = run("jobs", "refill-free")  # no --month: the current one, however late in it
    assert (status, out) == (0, f"free allowance {THIS_MONTH}: 1 granted, 0 already granted\n")
    status, out, _ = run("jobs", "refill-free", "--month", THIS_MONTH)
    assert (status, out) == (0, f"free allowance {THIS_MONTH}: 0 granted, 1 already granted\n")
    assert state(rt, "acct_free") == ([("grant", 100, f"free:acct_free:{THIS_MONTH}")], [("free", 100, 100, 0, 0, 0)])


def test_each_month_applies_the_free_rollover_policy_before_it_grants(run, rt) -> None:
    make_accounts(rt, "acct_free")
    for month in ("2026-01", "2026-02", "2026-03"):
        run("jobs", "refill-free", "--month", month)
    assert state(rt, "acct_free")[0] == [
        ("grant", 100, "free:acct_free:2026-01"),
        ("grant", 100, "free:acct_free:2026-02"),  # 100 carried + 100 new: the cap (2×), nothing cut
        ("expire", -100, "rollover:free:acct_free:2026-03:1"),
        ("grant", 100, "free:acct_free:2026-03"),
    ]
    assert balance_of(rt, "acct_free") == 200


def test_refill_free_skips_accounts_with_a_paid_plan(run, rt) -> None:
    make_accounts(rt, "acct_free")
    make_accounts(rt, "acct_paid", plan="starter")
    assert (
        run("jobs", "refill-free", "--month", "2026-03")[1] == "free allowance 2026-03: 1 granted, 0 already granted\n"
    )
    assert state(rt, "acct_paid") == ([], [])


def test_an_account_rekeyed_since_the_last_run_is_not_granted_twice(run, rt) -> None:
    make_accounts(rt, "cus_9")
    run("jobs", "refill-free", "--month", "2026-03")
    with committed(rt) as uow:
        accounts.get(uow, "cus_9").public_id = "acct_9"  # what accounts.resolve does when the account id turns up
    assert (
        run("jobs", "refill-free", "--month", "2026-03")[1] == "free allowance 2026-03: 0 granted, 1 already granted\n"
    )
    assert state(rt, "acct_9")[0] == [("grant", 100, "free:cus_9:2026-03")]


def test_a_zero_free_allowance_grants_nothing(rt) -> None:
    make_accounts(rt, "acct_free")
    object.__setattr__(rt, "catalogue", rt.catalogue.model_copy(update={"free": Free(credits=0)}))
    assert refill_free.run(rt, "2026-03") == Counter()
    assert state(rt, "acct_free") == ([], [])


def test_a_malformed_month_is_a_usage_error(run) -> None:
    status, _, err = run("jobs", "refill-free", "--month", "2026-13")
    assert (status, "must be YYYY-MM" in err) == (2, True)
