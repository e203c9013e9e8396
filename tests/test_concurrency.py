"""Concurrent spends through the API, as the product sends them: the account row lock (PostgreSQL) or the write
lock (SQLite) means no interleaving overdraws, a member's allocation — and its team's allocation and limit —
bound it as the balance does, and a retried Idempotency-Key spends once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.domain import accounts, ledger, spending
from tests.helpers import balance_of, committed

Outcome = tuple[int, dict[str, Any]]


def fund(rt, credits: int, *, members: dict[str, int] | None = None) -> None:
    """acct_hot with `credits`, and members with these allocations."""
    with committed(rt) as uow:
        account = accounts.get_or_create(uow, "acct_hot")
        ledger.grant(uow, account, credits, source="admin", key="g1")
        for member_id, allocation in (members or {}).items():
            spending.set_member(uow, account, member_id, allocation=allocation, limit_per_period=None)


def at_once(client: TestClient, bodies: list[dict[str, Any]], keys: list[str]) -> list[Outcome]:
    """POST each body to acct_hot's spend route under its key, all released at the same moment."""
    start = threading.Barrier(len(bodies))

    def post(n: int) -> Outcome:
        start.wait()
        response = client.post("/v1/accounts/acct_hot/spend", json=bodies[n], headers={"Idempotency-Key": keys[n]})
        return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(post, range(len(bodies))))


def assert_consistent(rt, balance: int) -> None:
    assert balance_of(rt, "acct_hot") == balance
    with rt.uow() as uow:
        assert ledger.check(uow) == []


@pytest.mark.parametrize(("spends", "each", "credits", "succeed"), [(25, 10, 100, 10), (50, 3, 100, 33)])
def test_concurrent_spends_succeed_exactly_as_often_as_the_balance_allows(
    client, rt, spends, each, credits, succeed
) -> None:
    fund(rt, credits)
    outcomes = at_once(client, [{"amount": each}] * spends, [f"s{n}" for n in range(spends)])
    statuses = [status for status, _ in outcomes]
    assert (statuses.count(200), statuses.count(402)) == (succeed, spends - succeed)
    assert all(body["charged"] == each for status, body in outcomes if status == 200)
    assert_consistent(rt, credits - succeed * each)


@pytest.mark.parametrize(("spends", "each", "allocation", "succeed"), [(25, 10, 100, 10), (50, 3, 100, 33)])
def test_concurrent_spends_of_a_member_never_pass_its_allocation(client, rt, spends, each, allocation, succeed) -> None:
    fund(rt, 1000, members={"ana": allocation})
    outcomes = at_once(client, [{"amount": each, "member_id": "ana"}] * spends, [f"s{n}" for n in range(spends)])
    statuses = [status for status, _ in outcomes]
    assert (statuses.count(200), statuses.count(402)) == (succeed, spends - succeed)
    assert_consistent(rt, 1000 - succeed * each)


def test_concurrent_spends_of_a_member_never_pass_the_balance_under_its_allocation(client, rt) -> None:
    fund(rt, 100, members={"ana": 100})
    with committed(rt) as uow:  # most of the credits taken back (a refund): the allocation outgrows the balance
        ledger.debit(uow, accounts.get(uow, "acct_hot"), 70, kind="reverse", key="reverse:re_1", partial=True)
    outcomes = at_once(client, [{"amount": 10, "member_id": "ana"}] * 25, [f"s{n}" for n in range(25)])
    statuses = [status for status, _ in outcomes]
    assert (statuses.count(200), statuses.count(402)) == (3, 22)
    assert_consistent(rt, 0)


def test_concurrent_spends_of_a_team_and_the_pool_never_pass_the_allocations_or_the_balance(client, rt) -> None:
    """The team sales holds 100 of 1,000: ana's own 30 and 70 that bob and cy share; the pool has 900. Ten
    spends of 100 from the pool and twenty of 10 by each member, all at once."""
    fund(rt, 1000)
    with committed(rt) as uow:
        account = accounts.get(uow, "acct_hot")
        spending.set_team(uow, account, "sales", allocation=100, limit_per_period=None)
        spending.set_member(uow, account, "ana", allocation=30, limit_per_period=None, team_id="sales")
        for shares in ("bob", "cy"):
            spending.set_member(uow, account, shares, allocation=None, limit_per_period=None, team_id="sales")
    bodies = [{"amount": 100}] * 10 + [{"amount": 10, "member_id": who} for who in ("ana", "bob", "cy") * 20]
    outcomes = at_once(client, bodies, [f"s{n}" for n in range(len(bodies))])
    succeeded = [body.get("member_id", "pool") for status, body in outcomes if status == 200]
    assert (succeeded.count("pool"), succeeded.count("ana"), succeeded.count("bob") + succeeded.count("cy")) == (
        9,
        3,
        7,
    )
    assert {status for status, _ in outcomes} == {200, 402}
    assert_consistent(rt, 0)
    view = client.get("/v1/accounts/acct_hot/teams").json()
    assert (view["pool"], view["teams"][0]["allocation"], view["teams"][0]["unallocated"]) == (0, 0, 0)


def test_concurrent_spends_of_a_teams_members_never_pass_its_limit(client, rt) -> None:
    fund(rt, 1000)
    with committed(rt) as uow:
        account = accounts.get(uow, "acct_hot")
        spending.set_team(uow, account, "ops", allocation=None, limit_per_period=50)
        for who in ("dan", "eve"):
            spending.set_member(uow, account, who, allocation=None, limit_per_period=None, team_id="ops")
    outcomes = at_once(
        client, [{"amount": 5, "member_id": ("dan", "eve")[n % 2]} for n in range(30)], [f"s{n}" for n in range(30)]
    )
    statuses = [status for status, _ in outcomes]
    assert (statuses.count(200), statuses.count(402)) == (10, 20)
    assert {body["error"] for status, body in outcomes if status == 402} == {"team_limit_reached"}
    assert_consistent(rt, 950)


def test_concurrent_spends_of_a_teams_members_never_pass_the_balance_under_its_allocation(client, rt) -> None:
    fund(rt, 100)
    with committed(rt) as uow:
        account = accounts.get(uow, "acct_hot")
        spending.set_team(uow, account, "sales", allocation=100, limit_per_period=None)
        spending.set_member(uow, account, "ana", allocation=50, limit_per_period=None, team_id="sales")
        spending.set_member(uow, account, "bob", allocation=None, limit_per_period=None, team_id="sales")
        # most of the credits taken back (a refund): the team's allocation outgrows the balance
        ledger.debit(uow, account, 70, kind="reverse", key="reverse:re_1", partial=True)
    outcomes = at_once(
        client, [{"amount": 10, "member_id": ("ana", "bob")[n % 2]} for n in range(25)], [f"s{n}" for n in range(25)]
    )
    statuses = [status for status, _ in outcomes]
    assert (statuses.count(200), statuses.count(402)) == (3, 22)
    assert_consistent(rt, 0)


def test_concurrent_retries_of_one_spend_spend_once_and_each_gets_its_answer(client, rt) -> None:
    fund(rt, 100)
    outcomes = at_once(client, [{"amount": 10}] * 10, ["same"] * 10)
    assert {status for status, _ in outcomes} == {200}
    assert len({body["entry_id"] for _, body in outcomes}) == 1
    assert_consistent(rt, 90)


def test_concurrent_retries_of_many_spends_spend_each_once(client, rt) -> None:
    """Every key sent three times at once, as a client that retries on a timeout does."""
    fund(rt, 100)
    keys = [f"s{n % 10}" for n in range(30)]
    outcomes = at_once(client, [{"amount": 1}] * 30, keys)
    assert {status for status, _ in outcomes} == {200}
    assert len({body["entry_id"] for _, body in outcomes}) == 10
    assert_consistent(rt, 90)
