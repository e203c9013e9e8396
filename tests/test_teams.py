"""Teams, through the HTTP API: credits split account → team → member. A team's allocation is held back from
the pool for its members, its members' allocations come out of it (never reserved twice), its limit bounds what
its members spend together in a period, and no spend takes the balance below zero — each rule asserted on the
exact balances, views and ledger rows."""

from __future__ import annotations

import json
from itertools import count
from typing import Any

import pytest

from tests import stripe_events as se

Body = dict[str, Any]
_keys = count()


def team(client, admin_headers, body: Body, key: str | None = None):
    headers = {**admin_headers, "Idempotency-Key": key or f"team-{next(_keys)}"}
    return client.post("/v1/accounts/acct_1/teams", json=body, headers=headers)


def member(client, admin_headers, body: Body):
    headers = {**admin_headers, "Idempotency-Key": f"member-{next(_keys)}"}
    return client.post("/v1/accounts/acct_1/members", json=body, headers=headers)


def spend(client, key: str, amount: int, member_id: str | None = None):
    body: Body = {"amount": amount} | ({"member_id": member_id} if member_id else {})
    return client.post("/v1/accounts/acct_1/spend", json=body, headers={"Idempotency-Key": key})


def ok(response) -> Body:
    assert response.status_code == 200, response.json()
    body: Body = response.json()
    return body


def balance(client) -> int:
    value: int = client.get("/v1/accounts/acct_1/balance").json()["balance"]
    return value


def spends(client) -> list[tuple[int, str, str, Body]]:
    """(amount, idempotency key, actor, metadata) of every spend entry, oldest first, as GET …/ledger shows it."""
    entries = client.get("/v1/accounts/acct_1/ledger", params={"limit": 500}).json()["entries"]
    return [
        (e["amount"], e["idempotency_key"], e["actor"], e["metadata"])
        for e in reversed(entries)
        if e["kind"] == "spend"
    ]


def teams(client) -> Body:
    return ok(client.get("/v1/accounts/acct_1/teams"))


def a_team(team_id: str, allocation=None, unallocated=None, limit=None, spent=0, members=()) -> Body:
    return {
        "team_id": team_id,
        "allocation": allocation,
        "unallocated": unallocated,
        "limit_per_period": limit,
        "spent_this_period": spent,
        "members": list(members),
    }


def a_member(member_id: str, team_id=None, allocation=None, limit=None, spent=0) -> Body:
    return {
        "member_id": member_id,
        "team_id": team_id,
        "allocation": allocation,
        "limit_per_period": limit,
        "spent_this_period": spent,
    }


# --- the routes -------------------------------------------------------------------------------------------


def test_a_team_is_created_listed_and_set_again_as_given(client, admin_headers, funded) -> None:
    created = team(client, admin_headers, {"team_id": "sales", "allocation": 40, "limit_per_period": 25})
    assert ok(created) == {
        "account_id": "acct_1",
        "pool": 60,
        "teams": [a_team("sales", allocation=40, unallocated=40, limit=25)],
    }
    team(client, admin_headers, {"team_id": "ops"})
    assert teams(client) == {
        "account_id": "acct_1",
        "pool": 60,
        "teams": [a_team("ops"), a_team("sales", allocation=40, unallocated=40, limit=25)],
    }
    # Set as given: what the body leaves out is none, and the team's credits return to the pool.
    assert ok(team(client, admin_headers, {"team_id": "sales", "limit_per_period": 30}))["teams"][1] == a_team(
        "sales", limit=30
    )
    assert (teams(client)["pool"], balance(client)) == (100, 100)


def test_only_the_admin_token_sets_a_team_and_any_token_lists_them(client, admin_headers, funded) -> None:
    refused = client.post("/v1/accounts/acct_1/teams", json={"team_id": "sales"}, headers={"Idempotency-Key": "t"})
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
    assert teams(client)["teams"] == []
    assert client.get("/v1/accounts/acct_1/teams", headers={"Authorization": ""}).status_code == 401


def test_a_team_post_is_replayed_under_its_idempotency_key(client, admin_headers, funded) -> None:
    first = team(client, admin_headers, {"team_id": "sales", "allocation": 40}, key="t1")
    again = team(client, admin_headers, {"team_id": "sales", "allocation": 40}, key="t1")
    assert (again.json(), again.headers["idempotent-replayed"]) == (first.json(), "true")
    other = team(client, admin_headers, {"team_id": "sales", "allocation": 50}, key="t1")
    assert (other.status_code, other.json()["error"]) == (409, "idempotency_key_reused")


def test_a_team_of_an_unknown_account_is_404(client, admin_headers) -> None:
    response = team(client, admin_headers, {"team_id": "sales"})
    assert (response.status_code, response.json()["error"]) == (404, "account_not_found")


@pytest.mark.parametrize(
    "body", [{}, {"team_id": ""}, {"team_id": "sales", "allocation": -1}, {"team_id": "s", "limit_per_period": 1.5}]
)
def test_a_team_body_that_does_not_validate_is_422(client, admin_headers, funded, body: Body) -> None:
    response = team(client, admin_headers, body)
    assert (response.status_code, response.json()["error"]) == (422, "invalid_request")


def test_a_team_allocation_larger_than_the_pool_is_422_and_changes_nothing(client, admin_headers, funded) -> None:
    member(client, admin_headers, {"member_id": "ana", "allocation": 30})
    refused = team(client, admin_headers, {"team_id": "sales", "allocation": 71})
    assert (refused.status_code, refused.json()) == (
        422,
        {"error": "allocation_too_large", "message": "allocation 71 is more than the pool's 70"},
    )
    assert teams(client) == {"account_id": "acct_1", "pool": 70, "teams": []}
    assert ok(team(client, admin_headers, {"team_id": "sales", "allocation": 70}))["pool"] == 0


def test_a_member_of_an_unknown_team_is_404_and_is_not_created(client, admin_headers, funded) -> None:
    response = member(client, admin_headers, {"member_id": "ana", "team_id": "ghosts"})
    assert (response.status_code, response.json()) == (
        404,
        {"error": "team_not_found", "message": "no team 'ghosts' in 'acct_1'"},
    )
    assert ok(client.get("/v1/accounts/acct_1/members"))["members"] == []


# --- a team's allocation ----------------------------------------------------------------------------------


def test_a_team_allocation_is_its_members_and_the_pool_cannot_touch_it(client, admin_headers, funded) -> None:
    team(client, admin_headers, {"team_id": "sales", "allocation": 30})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales"})
    member(client, admin_headers, {"member_id": "bob", "team_id": "sales"})
    member(client, admin_headers, {"member_id": "cy"})

    pool_short = spend(client, "p1", 71)
    assert (pool_short.status_code, pool_short.json()) == (
        402,
        {
            "error": "insufficient_credits",
            "message": "70 credits available, 71 requested",
            "balance": 70,
            "requested": 71,
        },
    )
    assert (spend(client, "c1", 71, "cy").status_code, spend(client, "c2", 70, "cy").status_code) == (402, 200)
    assert ok(spend(client, "a1", 20, "ana"))["balance"] == 10
    short = spend(client, "b1", 11, "bob")
    assert (short.status_code, short.json()["balance"], short.json()["requested"]) == (402, 10, 11)
    assert ok(spend(client, "b2", 10, "bob")) == {
        "balance": 0,
        "spent": 10,
        "charged": 10,
        "entry_id": 4,
        "member_id": "bob",
    }

    assert spends(client) == [
        (-70, "spend:acct_1:c2", "cy", {"member_id": "cy"}),
        (-20, "spend:acct_1:a1", "ana", {"member_id": "ana", "team_id": "sales"}),
        (-10, "spend:acct_1:b2", "bob", {"member_id": "bob", "team_id": "sales"}),
    ]
    assert teams(client) == {
        "account_id": "acct_1",
        "pool": 0,
        "teams": [a_team("sales", allocation=0, unallocated=0, spent=30, members=["ana", "bob"])],
    }


def test_a_member_allocation_in_a_team_comes_out_of_the_teams_never_reserved_twice(
    client, admin_headers, funded
) -> None:
    team(client, admin_headers, {"team_id": "sales", "allocation": 50})
    view = ok(member(client, admin_headers, {"member_id": "ana", "team_id": "sales", "allocation": 20}))
    assert (view["pool"], view["members"]) == (50, [a_member("ana", "sales", allocation=20)])
    member(client, admin_headers, {"member_id": "bob", "team_id": "sales"})
    assert teams(client)["teams"] == [a_team("sales", allocation=50, unallocated=30, members=["ana", "bob"])]

    too_large = member(client, admin_headers, {"member_id": "cy", "team_id": "sales", "allocation": 31})
    assert (too_large.status_code, too_large.json()) == (
        422,
        {"error": "allocation_too_large", "message": "allocation 31 is more than team 'sales''s unallocated 30"},
    )
    # bob shares what no member holds (30); ana spends only her own 20, and both come out of the team's 50.
    assert spend(client, "b1", 31, "bob").json()["balance"] == 30
    assert ok(spend(client, "b2", 30, "bob"))["balance"] == 70
    assert spend(client, "a1", 21, "ana").json()["balance"] == 20
    assert ok(spend(client, "a2", 15, "ana"))["balance"] == 55
    assert spends(client) == [
        (-30, "spend:acct_1:b2", "bob", {"member_id": "bob", "team_id": "sales"}),
        (-15, "spend:acct_1:a2", "ana", {"member_id": "ana", "team_id": "sales"}),
    ]
    assert teams(client) == {
        "account_id": "acct_1",
        "pool": 50,
        "teams": [a_team("sales", allocation=5, unallocated=0, spent=45, members=["ana", "bob"])],
    }
    assert ok(client.get("/v1/accounts/acct_1/members"))["members"] == [
        a_member("ana", "sales", allocation=5, spent=15),
        a_member("bob", "sales", spent=30),
    ]
    assert balance(client) == 55


def test_a_team_allocation_cannot_shrink_below_its_members_allocations(client, admin_headers, funded) -> None:
    team(client, admin_headers, {"team_id": "sales", "allocation": 50})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales", "allocation": 20})
    refused = team(client, admin_headers, {"team_id": "sales", "allocation": 19})
    assert (refused.status_code, refused.json()) == (
        422,
        {
            "error": "allocation_too_small",
            "message": "team allocation 19 is less than its members' allocations, 20; shrink those first",
        },
    )
    assert ok(team(client, admin_headers, {"team_id": "sales", "allocation": 20}))["pool"] == 80
    assert teams(client)["teams"] == [a_team("sales", allocation=20, unallocated=0, members=["ana"])]


def test_without_an_allocation_a_team_reserves_nothing_and_its_members_allocations_come_out_of_the_pool(
    client, admin_headers, funded
) -> None:
    team(client, admin_headers, {"team_id": "sales"})
    assert ok(member(client, admin_headers, {"member_id": "ana", "team_id": "sales", "allocation": 30}))["pool"] == 70
    # Giving the team an allocation takes ana's 30 inside it: the pool gives only the rest.
    assert ok(team(client, admin_headers, {"team_id": "sales", "allocation": 50}))["pool"] == 50
    too_large = team(client, admin_headers, {"team_id": "sales", "allocation": 101})
    assert too_large.json()["message"] == "allocation 101 is more than the pool's 100"
    # And taking the team's allocation away leaves ana's 30 reserved out of the pool again.
    assert ok(team(client, admin_headers, {"team_id": "sales"}))["pool"] == 70
    assert ok(spend(client, "a1", 30, "ana"))["balance"] == 70
    assert spend(client, "a2", 1, "ana").status_code == 402


def test_a_member_leaving_a_team_leaves_its_allocation_to_the_team_and_takes_a_new_one_from_the_pool(
    client, admin_headers, funded
) -> None:
    team(client, admin_headers, {"team_id": "sales", "allocation": 40})
    team(client, admin_headers, {"team_id": "ops", "allocation": 10})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales", "allocation": 40})
    moved = member(client, admin_headers, {"member_id": "ana", "team_id": "ops", "allocation": 11})
    assert moved.json()["message"] == "allocation 11 is more than team 'ops''s unallocated 10"
    assert ok(member(client, admin_headers, {"member_id": "ana", "team_id": "ops", "allocation": 10}))["pool"] == 50
    assert teams(client)["teams"] == [
        a_team("ops", allocation=10, unallocated=0, members=["ana"]),
        a_team("sales", allocation=40, unallocated=40),
    ]
    view = ok(member(client, admin_headers, {"member_id": "ana", "allocation": 50}))
    assert (view["pool"], view["members"]) == (0, [a_member("ana", allocation=50)])
    removed = ok(client.delete("/v1/accounts/acct_1/members/ana", headers=admin_headers))
    assert (removed["pool"], removed["members"]) == (50, [])


def test_a_removed_members_allocation_returns_to_its_team(client, admin_headers, funded) -> None:
    team(client, admin_headers, {"team_id": "sales", "allocation": 40})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales", "allocation": 25})
    removed = ok(client.delete("/v1/accounts/acct_1/members/ana", headers=admin_headers))
    assert removed["pool"] == 60
    assert teams(client)["teams"] == [a_team("sales", allocation=40, unallocated=40)]


# --- a team's limit ---------------------------------------------------------------------------------------


def test_a_team_limit_bounds_what_its_members_spend_together_in_a_period(client, admin_headers, funded) -> None:
    team(client, admin_headers, {"team_id": "sales", "limit_per_period": 15})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales", "limit_per_period": 10})
    member(client, admin_headers, {"member_id": "bob", "team_id": "sales"})
    member(client, admin_headers, {"member_id": "cy"})

    assert ok(spend(client, "a1", 10, "ana"))["balance"] == 90
    own = spend(client, "a2", 1, "ana")
    assert (own.status_code, own.json()) == (
        402,
        {
            "error": "member_limit_reached",
            "message": "member limit 10 per period: 10 used, 1 requested",
            "limit": 10,
            "used": 10,
            "requested": 1,
        },
    )
    assert ok(spend(client, "b1", 5, "bob"))["balance"] == 85
    teams_ = spend(client, "b2", 1, "bob")
    assert (teams_.status_code, teams_.json()) == (
        402,
        {
            "error": "team_limit_reached",
            "message": "team 'sales' limit 15 per period: 15 used, 1 requested",
            "team_id": "sales",
            "limit": 15,
            "used": 15,
            "requested": 1,
        },
    )
    # Outside the team, nothing is limited by it.
    assert (ok(spend(client, "c1", 20, "cy"))["balance"], ok(spend(client, "p1", 20))["balance"]) == (65, 45)
    assert spends(client) == [
        (-10, "spend:acct_1:a1", "ana", {"member_id": "ana", "team_id": "sales"}),
        (-5, "spend:acct_1:b1", "bob", {"member_id": "bob", "team_id": "sales"}),
        (-20, "spend:acct_1:c1", "cy", {"member_id": "cy"}),
        (-20, "spend:acct_1:p1", "api", {}),
    ]
    assert teams(client)["teams"] == [a_team("sales", limit=15, spent=15, members=["ana", "bob"])]


def test_a_spend_counts_for_the_team_its_member_was_in_when_it_was_made(client, admin_headers, funded) -> None:
    team(client, admin_headers, {"team_id": "sales", "limit_per_period": 10})
    team(client, admin_headers, {"team_id": "ops", "limit_per_period": 10})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales"})
    ok(spend(client, "a1", 8, "ana"))
    member(client, admin_headers, {"member_id": "ana", "team_id": "ops"})
    ok(spend(client, "a2", 10, "ana"))
    assert spend(client, "a3", 1, "ana").json()["error"] == "team_limit_reached"
    assert [(t["team_id"], t["spent_this_period"]) for t in teams(client)["teams"]] == [("ops", 10), ("sales", 8)]
    usage = client.get("/v1/accounts/acct_1/usage").json()["spent"]
    assert (usage["by_member"], usage["by_team"]) == ({"ana": 18}, {"sales": 8, "ops": 10})


# --- the balance bounds everything ------------------------------------------------------------------------


def test_a_team_member_spends_at_most_what_the_balance_allows_whatever_the_teams_allocation(
    client, admin_headers, deliver, run
) -> None:
    """A 1,000-credit pack, the team's allocation 300 (ana's own 100 inside it), 90% of the pack refunded: the
    balance, 100, is below what the team reserves. Its members spend what is there, first come, first served,
    and no spend takes the balance below zero; the pool, whose share is gone, spends nothing."""
    deliver(se.event("payment_intent.succeeded", se.payment_intent(metadata={"pack": "boost", "account_id": "acct_1"})))
    team(client, admin_headers, {"team_id": "sales", "allocation": 300})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales", "allocation": 100})
    member(client, admin_headers, {"member_id": "bob", "team_id": "sales"})
    deliver(
        se.event(
            "charge.refunded",
            se.charge(amount=1000, amount_refunded=900, payment_intent="pi_1", refunds=[("re_1", 900)]),
        )
    )
    assert (balance(client), teams(client)["pool"]) == (100, -200)
    pool = spend(client, "p1", 1)
    assert (pool.status_code, pool.json()["balance"]) == (402, 0)
    assert ok(spend(client, "a1", 60, "ana"))["balance"] == 40
    short = spend(client, "b1", 41, "bob")
    assert (short.status_code, short.json()["balance"], short.json()["requested"]) == (402, 40, 41)
    assert ok(spend(client, "b2", 40, "bob"))["balance"] == 0
    empty = spend(client, "a2", 1, "ana")
    assert (empty.status_code, empty.json()["balance"]) == (402, 0)
    assert spends(client) == [
        (-60, "spend:acct_1:a1", "ana", {"member_id": "ana", "team_id": "sales"}),
        (-40, "spend:acct_1:b2", "bob", {"member_id": "bob", "team_id": "sales"}),
    ]
    assert teams(client) == {
        "account_id": "acct_1",
        "pool": -200,
        "teams": [a_team("sales", allocation=200, unallocated=160, spent=100, members=["ana", "bob"])],
    }
    # Growing a reservation is refused while the balance is below them; shrinking one is always allowed.
    assert team(client, admin_headers, {"team_id": "sales", "allocation": 201}).status_code == 422
    assert ok(team(client, admin_headers, {"team_id": "sales", "allocation": 40}))["pool"] == -40
    assert run("check")[0] == 0


# --- usage ------------------------------------------------------------------------------------------------


def test_usage_reports_spends_by_team_and_by_member(client, admin_headers, funded) -> None:
    team(client, admin_headers, {"team_id": "sales", "allocation": 30})
    team(client, admin_headers, {"team_id": "ops"})
    member(client, admin_headers, {"member_id": "ana", "team_id": "sales"})
    member(client, admin_headers, {"member_id": "bob", "team_id": "sales", "allocation": 10})
    member(client, admin_headers, {"member_id": "cy", "team_id": "ops"})
    member(client, admin_headers, {"member_id": "dee"})
    for key, amount, who in (("a1", 7, "ana"), ("b1", 4, "bob"), ("c1", 5, "cy"), ("d1", 2, "dee"), ("p1", 1, None)):
        ok(spend(client, key, amount, who))
    usage = client.get("/v1/accounts/acct_1/usage").json()
    assert usage["spent"] == {
        "total": 19,
        "by_action": {"amount": 19},
        "by_member": {"ana": 7, "bob": 4, "cy": 5, "dee": 2, "pool": 1},
        "by_team": {"sales": 11, "ops": 5},
    }
    assert usage["remaining"] == 81


# --- the CLI ----------------------------------------------------------------------------------------------


def test_the_cli_sets_and_lists_teams_and_members_with_an_audit_row(client, admin_headers, funded, run) -> None:
    who = ("--reason", "Q3 budget", "--actor", "sam")
    code, out, _ = run("teams", "set", "acct_1", "sales", "--allocation", "40", "--limit-per-period", "30", *who)
    assert (code, out.strip()) == (0, "acct_1: team sales allocation 40, limit per period 30")
    code, out, _ = run("members", "set", "acct_1", "ana", "--team", "sales", "--allocation", "15", *who)
    assert (code, out.strip()) == (0, "acct_1: member ana team sales, allocation 15, limit per period -")
    assert (
        run("members", "set", "acct_1", "ana", "--team", "sales", "--allocation", "15", *who)[1]
        .strip()
        .endswith("(unchanged)")
    )
    ok(spend(client, "a1", 5, "ana"))

    assert json.loads(run("teams", "list", "acct_1", "--json")[1]) == teams(client)
    assert teams(client)["teams"] == [
        a_team("sales", allocation=35, unallocated=25, limit=30, spent=5, members=["ana"])
    ]
    members = json.loads(run("members", "list", "acct_1", "--json")[1])
    assert members == {
        "account_id": "acct_1",
        "pool": 60,
        "members": [a_member("ana", "sales", allocation=10, spent=5)],
    }
    code, out, _ = run("teams", "list", "acct_1")
    assert code == 0 and "pool 60" in out and "sales" in out and "ana" in out
    code, out, _ = run("usage", "acct_1")
    assert code == 0 and "spent by team sales" in out

    trail = json.loads(run("audit", "acct_1", "--json")[1])["entries"]
    assert [(e["action"], e["actor"], e["reason"], e["details"]["changed"]) for e in trail] == [
        ("member.set", "sam", "Q3 budget", False),
        ("member.set", "sam", "Q3 budget", True),
        ("team.set", "sam", "Q3 budget", True),
    ]
    assert trail[2]["details"] == {
        "team_id": "sales",
        "before": None,
        "after": {"allocation": 40, "limit_per_period": 30},
        "changed": True,
    }


def test_the_cli_refuses_what_the_api_refuses_in_one_line(client, admin_headers, funded, run) -> None:
    who = ("--reason", "r", "--actor", "sam")
    code, _, err = run("teams", "set", "acct_1", "sales", "--allocation", "101", *who)
    assert (code, err.strip()) == (1, "refused: allocation 101 is more than the pool's 100")
    code, _, err = run("members", "set", "acct_1", "ana", "--team", "ghosts", *who)
    assert (code, err.strip()) == (1, "refused: no team 'ghosts' in acct_1")
    code, _, err = run("members", "remove", "acct_1", "ana", *who)
    assert (code, err.strip()) == (1, "refused: no member 'ana' in acct_1")
    assert run("teams", "set", "acct_1", "sales", "--actor", "sam")[0] == 2  # no --reason: a usage error
    assert teams(client)["teams"] == []
    assert json.loads(run("audit", "acct_1", "--json")[1])["entries"] == []
