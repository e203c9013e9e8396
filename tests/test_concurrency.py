"""Concurrent spends: the account row lock (PostgreSQL) or the write lock (SQLite) means no interleaving
can overdraw and no retried key spends twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


from service.domain import accounts, ledger
from service.infra.db import transaction


def test_25_concurrent_spends_of_10_against_100_give_10_successes_and_15_refusals(sessions) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as s:
        ledger.grant(s, accounts.get_or_create(s, "acct_hot"), 100, source="admin", key="g1")
    start = threading.Barrier(25)

    def one_spend(n: int) -> str:
        start.wait()
        try:
            with transaction(sessions) as s:
                ledger.spend(s, accounts.get(s, "acct_hot"), 10, key=f"s{n}")
        except ledger.InsufficientCredits:
            return "402"
        return "200"

    with ThreadPoolExecutor(max_workers=25) as pool:
        outcomes = list(pool.map(one_spend, range(25)))
    assert (outcomes.count("200"), outcomes.count("402")) == (10, 15)
    with transaction(sessions) as s:
        assert ledger.balance(s, accounts.get(s, "acct_hot")) == 0
        assert ledger.check(s) == []


def test_concurrent_retries_of_one_spend_spend_once(sessions) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as s:
        ledger.grant(s, accounts.get_or_create(s, "acct_hot"), 100, source="admin", key="g1")
    start = threading.Barrier(10)

    def retry(_: int) -> int:
        start.wait()
        with transaction(sessions) as s:
            return ledger.spend(s, accounts.get(s, "acct_hot"), 10, key="same").entry.id

    with ThreadPoolExecutor(max_workers=10) as pool:
        entry_ids = set(pool.map(retry, range(10)))
    assert len(entry_ids) == 1
    with transaction(sessions) as s:
        assert ledger.balance(s, accounts.get(s, "acct_hot")) == 90
