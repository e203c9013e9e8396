"""The spend API's batches (service/spends.py): spends that share a transaction are each exactly what they
would be alone, one after the other — on both databases. `in_one_batch` hands spend_all its jobs as one
batch; `together` submits them concurrently to the process's batches, as concurrent requests do."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError

from service.entry import idempotency

from service.domain import accounts, ledger, spending
from service.domain.accounts import AccountNotFound
from service.infra.db import transaction
from service.entry.idempotency import Outcome
from service.infra.models import ApiRequest, utcnow
from service.infra.runtime import Runtime
from service.entry.schemas import SpendRequest
from service.entry.spends import SpendJob, Spends, spend_all
from tests.helpers import balance_of, state


WAITING_FOR_A_LOCK = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                          "AND wait_event_type = 'Lock'")


def job(key: str, body: dict[str, Any], account: str = "acct_1") -> SpendJob:
    digest = idempotency.fingerprint("POST", f"/v1/accounts/{account}/spend", body)
    return SpendJob(account, SpendRequest(**body), key, digest, contextvars.copy_context())


def in_one_batch(rt: Runtime, *jobs: SpendJob) -> list[tuple[int, dict[str, Any], bool]]:
    with transaction(rt.sessions) as session:
        return [(o.status_code, o.body, o.replayed) for o in spend_all(session, rt, list(jobs))]


def together(rt: Runtime, *jobs: SpendJob) -> list[Outcome | BaseException]:
    spends = Spends(rt)

    async def submit() -> list[Outcome | BaseException]:
        return await asyncio.gather(*(spends.submit(j) for j in jobs), return_exceptions=True)

    try:
        return asyncio.run(submit())
    finally:
        spends.stop()


def fund(rt: Runtime, amount: int, account: str = "acct_1", expires_at: Any = None) -> None:
    with transaction(rt.sessions) as session:
        ledger.grant(session, accounts.get_or_create(session, account), amount, source="admin",
                     key=f"fund:{account}:{amount}:{expires_at}", expires_at=expires_at)


def test_spends_on_one_account_in_one_batch_see_each_other_and_never_overdraw(rt: Runtime) -> None:
    fund(rt, 25)
    outcomes = in_one_batch(rt, *(job(f"k{n}", {"amount": 10}) for n in range(4)))
    assert [(status, body.get("balance")) for status, body, _ in outcomes] == [(200, 15), (200, 5), (402, 5), (402, 5)]
    entries, grants = state(rt.sessions, "acct_1")
    assert entries[1:] == [("spend", -10, "spend:acct_1:k0"), ("spend", -10, "spend:acct_1:k1")]
    assert grants == [("admin", 25, 5, 20, 0, 0)]


def test_spends_on_several_accounts_in_one_batch_each_take_from_their_own(rt: Runtime) -> None:
    fund(rt, 10, "acct_a")
    fund(rt, 20, "acct_b")
    outcomes = in_one_batch(rt, job("ka", {"amount": 4}, "acct_a"), job("kb", {"amount": 15}, "acct_b"),
                            job("kc", {"amount": 7}, "acct_a"))
    assert [(status, body.get("balance")) for status, body, _ in outcomes] == [(200, 6), (200, 5), (402, 6)]
    assert (balance_of(rt.sessions, "acct_a"), balance_of(rt.sessions, "acct_b")) == (6, 5)
    with transaction(rt.sessions) as session:
        assert ledger.check(session) == []


def test_a_key_repeated_in_one_batch_spends_once_and_the_repeat_replays(rt: Runtime) -> None:
    fund(rt, 100)
    first, again = in_one_batch(rt, job("same", {"amount": 30}), job("same", {"amount": 30}))
    assert first == (200, {"balance": 70, "spent": 30, "charged": 30, "entry_id": 2}, False)
    assert again == (200, first[1], True)
    assert balance_of(rt.sessions, "acct_1") == 70


def test_a_spend_whose_ledger_entry_exists_answers_it_and_spends_nothing_more(rt: Runtime) -> None:
    fund(rt, 100)
    with transaction(rt.sessions) as session:  # the entry without its stored request (as if the request row were lost)
        spending.spend(session, rt.catalogue, accounts.get(session, "acct_1"), spending.Charge(30), key="spend:acct_1:k1")
    outcomes = in_one_batch(rt, job("k1", {"amount": 30}), job("k2", {"amount": 5}))
    assert outcomes == [(200, {"balance": 70, "spent": 30, "charged": 30, "entry_id": 2}, False),
                        (200, {"balance": 65, "spent": 5, "charged": 5, "entry_id": 3}, False)]
    entries, grants = state(rt.sessions, "acct_1")
    assert entries[1:] == [("spend", -30, "spend:acct_1:k1"), ("spend", -5, "spend:acct_1:k2")]
    assert grants == [("admin", 100, 65, 35, 0, 0)]


def test_a_key_repeated_in_one_batch_with_another_body_is_refused(rt: Runtime) -> None:
    fund(rt, 100)
    with pytest.raises(idempotency.KeyReused):
        in_one_batch(rt, job("same", {"amount": 30}), job("same", {"amount": 31}))


def test_a_member_spending_its_allocation_leaves_the_pool_what_it_had(rt: Runtime) -> None:
    fund(rt, 100)
    with transaction(rt.sessions) as session:
        spending.set_member(session, accounts.get(session, "acct_1"), "ana", allocation=30, limit_per_period=None)
    outcomes = in_one_batch(rt, job("k1", {"amount": 10, "member_id": "ana"}), job("k2", {"amount": 70}),
                            job("k3", {"amount": 21, "member_id": "ana"}))
    assert [(status, body.get("balance")) for status, body, _ in outcomes] == [(200, 90), (200, 20), (402, 20)]
    assert outcomes[2][1] == {"error": "insufficient_credits", "balance": 20, "requested": 21}


def test_a_resource_charged_twice_in_one_batch_is_charged_once(rt: Runtime) -> None:
    fund(rt, 100)
    unlock = {"action": "unlock_prospect", "resource": "prospect:1"}
    outcomes = in_one_batch(rt, job("k1", unlock), job("k2", unlock), job("k3", {"amount": 5}))
    assert [(status, body["charged"], body["balance"]) for status, body, _ in outcomes] == [(200, 1, 99), (200, 0, 99),
                                                                                         (200, 5, 94)]


def test_an_expired_grant_is_expired_once_before_the_batch_spends(rt: Runtime) -> None:
    fund(rt, 50, expires_at=utcnow() + timedelta(milliseconds=300))
    fund(rt, 20)
    time.sleep(0.4)
    outcomes = in_one_batch(rt, job("k1", {"amount": 5}), job("k2", {"amount": 5}))
    assert [(status, body.get("balance")) for status, body, _ in outcomes] == [(200, 15), (200, 10)]
    entries, grants = state(rt.sessions, "acct_1")
    assert [(kind, amount) for kind, amount, _ in entries[2:]] == [("expire", -50), ("spend", -5), ("spend", -5)]
    assert [g[2:] for g in grants] == [(0, 0, 50, 0), (10, 10, 0, 0)]


def test_an_unknown_account_fails_its_own_request_and_the_rest_of_the_batch_is_spent(rt: Runtime) -> None:
    fund(rt, 100)
    outcomes = together(rt, job("k1", {"amount": 10}), job("k2", {"amount": 10}, "nobody"), job("k3", {"amount": 10}))
    assert isinstance(outcomes[1], AccountNotFound)
    assert [(o.status_code, o.body["balance"]) for o in (outcomes[0], outcomes[2])] in ([(200, 90), (200, 80)],
                                                                                        [(200, 80), (200, 90)])
    assert balance_of(rt.sessions, "acct_1") == 80
    with rt.sessions() as session:  # the unknown account's key was not kept: a retry after the account exists spends
        assert session.get(ApiRequest, "k2") is None


def test_a_batch_that_names_no_known_account_is_refused_with_account_not_found(rt: Runtime) -> None:
    """On PostgreSQL the keys' claim and the accounts' lock are one statement: finding no account, it still
    says which keys it claimed. Their claims roll back with the batch."""
    with pytest.raises(AccountNotFound):
        in_one_batch(rt, job("k1", {"amount": 1}, "nobody"), job("k2", {"amount": 1}, "nobody_else"))
    with rt.sessions() as session:
        assert session.scalars(select(ApiRequest.key)).all() == []


def test_a_batch_claims_its_keys_before_it_waits_for_its_accounts_locks(rt: Runtime) -> None:
    """Keys before accounts, as every transaction takes them: a batch waiting for an account's lock already
    holds its keys, so a request retried elsewhere under one of them waits for the batch — never the batch
    for a transaction that holds the key and waits for the account."""
    if rt.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no row locks: one writer at a time orders everything")
    fund(rt, 10)
    done: list[list[tuple[int, dict[str, Any], bool]]] = []
    with rt.engine.connect() as holder:
        holder.execute(text("SELECT id FROM accounts WHERE public_id = 'acct_1' FOR UPDATE"))
        batch = threading.Thread(target=lambda: done.append(in_one_batch(rt, job("k1", {"amount": 1}))))
        batch.start()
        with rt.engine.connect() as probe:
            deadline = time.monotonic() + 10
            while not probe.scalar(WAITING_FOR_A_LOCK) and time.monotonic() < deadline:
                time.sleep(0.02)
            probe.execute(text("SET lock_timeout = '100ms'"))
            with pytest.raises(OperationalError, match="lock timeout"):  # the key is the waiting batch's
                probe.execute(text("INSERT INTO api_requests (key, fingerprint, created_at) "
                                   "VALUES ('k1', 'elsewhere', now()) ON CONFLICT (key) DO NOTHING"))
        holder.rollback()
    batch.join(10)
    assert [(status, body["balance"]) for status, body, _ in done[0]] == [(200, 9)]


def test_a_replay_whose_account_no_longer_answers_to_its_ref_still_replays(rt: Runtime) -> None:
    """The first answer is replayed even after the account was re-keyed (its public id changed), alone or beside
    a new spend: a replay locks nothing it needs and looks for no account."""
    fund(rt, 100)
    fund(rt, 100, "acct_2")
    first = in_one_batch(rt, job("k1", {"amount": 10}))[0]
    with transaction(rt.sessions) as session:
        session.execute(text("UPDATE accounts SET public_id = 'acct_1_rekeyed' WHERE public_id = 'acct_1'"))
    beside = in_one_batch(rt, job("k1", {"amount": 10}), job("k2", {"amount": 5}, "acct_2"))
    alone = in_one_batch(rt, job("k1", {"amount": 10}))
    assert (beside[0], alone[0]) == ((200, first[1], True), (200, first[1], True))
    assert beside[1][:2] == (200, {"balance": 95, "spent": 5, "charged": 5, "entry_id": 4})
    assert (balance_of(rt.sessions, "acct_1_rekeyed"), balance_of(rt.sessions, "acct_2")) == (90, 95)


def test_two_processes_batches_on_the_same_keys_and_accounts_spend_each_key_once(rt: Runtime) -> None:
    """Two API processes' batches (two Spends), every key sent three times across both, six accounts: no
    deadlock or error, one spend per key, and the balances say so."""
    names = [f"acct_{n}" for n in range(6)]
    for name in names:
        fund(rt, 1000, name)
    keys = [(f"k{n}", names[n % 6]) for n in range(60)]
    first, second = Spends(rt), Spends(rt)

    async def submit() -> list[Outcome | BaseException]:
        sent = [(first if (n + round_) % 2 else second).submit(job(key, {"amount": 1}, name))
                for round_ in range(3) for n, (key, name) in enumerate(keys)]
        return await asyncio.gather(*sent, return_exceptions=True)

    try:
        outcomes = asyncio.run(submit())
    finally:
        first.stop()
        second.stop()
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert sorted(o.replayed for o in outcomes) == [False] * 60 + [True] * 120  # type: ignore[union-attr]
    assert [balance_of(rt.sessions, name) for name in names] == [990] * 6
    with transaction(rt.sessions) as session:
        assert ledger.check(session) == []


def test_concurrent_spends_share_commits(rt: Runtime) -> None:
    fund(rt, 1000)
    commits: list[int] = []
    event.listen(rt.engine, "commit", lambda _conn: commits.append(1))
    outcomes = together(rt, *(job(f"k{n}", {"amount": 1}) for n in range(20)))
    assert sorted(o.body["balance"] for o in outcomes) == list(range(980, 1000))  # type: ignore[union-attr]
    assert len(commits) < 20  # one per batch, not one per spend
