"""Spending like the products that inspired this: priced actions, once-per-resource charges, members with
allocations and limits, and usage per billing period — on both databases, under concurrency too."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from itertools import count

import pytest

from service.domain import accounts, ledger, spending
from service.infra.models import ApiRequest, utcnow
from tests import stripe_events as se
from tests.helpers import balance_of, committed, spend_rows, state

_keys = count()


def spend(client, body: dict, account: str = "acct_1"):
    return client.post(f"/v1/accounts/{account}/spend", json=body, headers={"Idempotency-Key": f"k{next(_keys)}"})


def member(client, admin_headers, body: dict, account: str = "acct_1"):
    return client.post(
        f"/v1/accounts/{account}/members", json=body, headers={**admin_headers, "Idempotency-Key": f"m{next(_keys)}"}
    )


def test_an_action_is_priced_by_the_catalogue_and_recorded(client, funded, rt) -> None:
    response = spend(client, {"action": "handwritten_note", "quantity": 3})
    assert response.json() == {
        "balance": 85,
        "spent": 15,
        "charged": 15,
        "entry_id": 2,
        "action": "handwritten_note",
        "quantity": 3,
    }
    assert spend_rows(rt) == [(-15, {"action": "handwritten_note", "quantity": 3})]


def test_an_unknown_action_is_422_naming_the_known_ones(client, funded) -> None:
    response = spend(client, {"action": "fax"})
    assert response.status_code == 422
    assert response.json()["known_actions"] == [
        "gift",
        "handwritten_note",
        "postcard_intl",
        "postcard_us",
        "unlock_prospect",
    ]


@pytest.mark.parametrize(
    "body", [{"amount": 1, "action": "postcard_us"}, {}, {"amount": 1, "quantity": 2}, {"amount": 1, "resource": "p:1"}]
)
def test_a_spend_needs_exactly_one_of_amount_or_action(client, funded, body: dict) -> None:
    assert spend(client, body).status_code == 422


def test_a_resource_is_charged_once_per_account_even_for_a_colleague(client, admin_headers, funded, rt) -> None:
    member(client, admin_headers, {"member_id": "ana"})
    member(client, admin_headers, {"member_id": "bob"})
    first = spend(client, {"action": "unlock_prospect", "resource": "prospect:123", "member_id": "ana"})
    again = spend(client, {"action": "unlock_prospect", "resource": "prospect:123", "member_id": "bob"})
    assert first.json()["charged"] == 1
    assert again.json() == {
        "balance": 99,
        "spent": 0,
        "charged": 0,
        "entry_id": None,
        "action": "unlock_prospect",
        "quantity": 1,
        "resource": "prospect:123",
        "member_id": "bob",
    }
    assert spend(client, {"action": "unlock_prospect", "resource": "prospect:124"}).json()["charged"] == 1
    assert [amount for amount, _ in spend_rows(rt)] == [-1, -1]


def test_a_resource_is_charged_once_under_concurrency(rt) -> None:
    with committed(rt) as uow:
        ledger.grant(uow, accounts.get_or_create(uow, "acct_1"), 100, source="admin", key="g")
    start = threading.Barrier(10)

    def unlock(n: int) -> int:
        start.wait()
        with committed(rt) as uow:
            charge = spending.Charge(action="unlock_prospect", resource="prospect:9")
            return spending.spend(uow, rt.catalogue, accounts.get(uow, "acct_1"), charge, key=f"s{n}").charged

    with ThreadPoolExecutor(max_workers=10) as pool:
        assert sorted(pool.map(unlock, range(10))) == [0] * 9 + [1]
    assert balance_of(rt, "acct_1") == 99


def test_an_allocation_is_the_members_own_and_the_pool_cannot_touch_it(client, admin_headers, funded) -> None:
    assert member(client, admin_headers, {"member_id": "ana", "allocation": 30}).json()["pool"] == 70
    refused = spend(client, {"amount": 71})
    assert (refused.status_code, refused.json()["balance"]) == (402, 70)
    assert spend(client, {"amount": 20, "member_id": "ana"}).status_code == 200
    short = spend(client, {"amount": 11, "member_id": "ana"})
    assert (short.status_code, short.json()) == (
        402,
        {
            "error": "insufficient_credits",
            "message": "10 credits available, 11 requested",
            "balance": 10,
            "requested": 11,
        },
    )
    view = client.get("/v1/accounts/acct_1/members").json()
    assert view["members"] == [
        {"member_id": "ana", "team_id": None, "allocation": 10, "limit_per_period": None, "spent_this_period": 20}
    ]
    assert view["pool"] == 70


def test_shrinking_an_allocation_or_removing_the_member_returns_credits_to_the_pool(
    client, admin_headers, funded
) -> None:
    member(client, admin_headers, {"member_id": "ana", "allocation": 30})
    assert member(client, admin_headers, {"member_id": "ana", "allocation": 10}).json()["pool"] == 90
    removed = client.delete("/v1/accounts/acct_1/members/ana", headers=admin_headers)
    assert (removed.json()["pool"], removed.json()["members"]) == (100, [])


def test_an_allocation_larger_than_the_pool_is_422_and_adds_no_member(client, admin_headers, funded) -> None:
    member(client, admin_headers, {"member_id": "ana", "allocation": 60})
    response = member(client, admin_headers, {"member_id": "bob", "allocation": 41})
    assert (response.status_code, response.json()["error"]) == (422, "allocation_too_large")
    assert [m["member_id"] for m in client.get("/v1/accounts/acct_1/members").json()["members"]] == ["ana"]


def test_a_member_limit_per_period_is_enforced(client, admin_headers, funded) -> None:
    member(client, admin_headers, {"member_id": "ana", "limit_per_period": 10})
    assert spend(client, {"amount": 6, "member_id": "ana"}).status_code == 200
    refused = spend(client, {"amount": 5, "member_id": "ana"})
    assert (refused.status_code, refused.json()) == (
        402,
        {
            "error": "member_limit_reached",
            "message": "member limit 10 per period: 6 used, 5 requested",
            "limit": 10,
            "used": 6,
            "requested": 5,
        },
    )
    assert spend(client, {"amount": 5}).status_code == 200  # the pool itself is not limited


def test_an_unknown_member_is_404(client, funded) -> None:
    response = spend(client, {"amount": 1, "member_id": "ghost"})
    assert (response.status_code, response.json()["error"]) == (404, "member_not_found")


def test_only_the_admin_token_manages_members(client, funded) -> None:
    response = client.post("/v1/accounts/acct_1/members", json={"member_id": "ana"}, headers={"Idempotency-Key": "m"})
    assert response.status_code == 403


def test_concurrent_member_spends_never_exceed_an_allocation_or_a_limit(rt) -> None:
    with committed(rt) as uow:
        acct = accounts.get_or_create(uow, "acct_1")
        ledger.grant(uow, acct, 1000, source="admin", key="g")
        spending.set_member(uow, acct, "alloc", allocation=7, limit_per_period=None)
        spending.set_member(uow, acct, "limited", allocation=None, limit_per_period=5)
    start = threading.Barrier(20)

    def one(n: int) -> str:
        start.wait()
        who = "alloc" if n % 2 else "limited"
        try:
            with committed(rt) as uow:
                spending.spend(
                    uow,
                    rt.catalogue,
                    accounts.get(uow, "acct_1"),
                    spending.Charge(amount=1, member_id=who),
                    key=f"s{n}",
                )
        except (ledger.InsufficientCredits, spending.MemberLimitReached):
            return f"{who}:refused"
        return f"{who}:ok"

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(one, range(20)))
    assert (outcomes.count("alloc:ok"), outcomes.count("limited:ok")) == (7, 5)
    assert balance_of(rt, "acct_1") == 1000 - 12


def test_usage_reports_the_current_period_by_source_action_and_member(client, admin_headers, funded, deliver) -> None:
    member(client, admin_headers, {"member_id": "ana"})
    spend(client, {"action": "postcard_intl", "quantity": 2, "member_id": "ana"})
    spend(client, {"amount": 10})
    usage = client.get("/v1/accounts/acct_1/usage").json()
    assert usage["granted"] == {"admin": 100}
    assert usage["spent"] == {
        "total": 14,
        "by_action": {"postcard_intl": 4, "amount": 10},
        "by_member": {"ana": 4, "pool": 10},
        "by_team": {},
    }
    assert (usage["expired"], usage["reversed"], usage["remaining"], usage["monthly_goal"]) == (0, 0, 86, None)
    previous = client.get("/v1/accounts/acct_1/usage", params={"period": "previous"}).json()
    assert (previous["granted"], previous["remaining"]) == ({}, 0)


def test_an_annual_plan_shows_a_monthly_goal_per_member(client, admin_headers, deliver, rt) -> None:
    now = utcnow()
    year = (now - timedelta(days=1), now - timedelta(days=1) + timedelta(days=365))
    deliver(
        se.event(
            "invoice.paid",
            se.invoice(
                "2025",
                invoice_id="in_y",
                customer="cus_1",
                price="price_pro_annual",
                amount_paid=99000,
                period=year,
                subscription_metadata={"account_id": "acct_1"},
            ),
        )
    )
    for name in ("ana", "bob", "cy"):
        member(client, admin_headers, {"member_id": name})
    goal = client.get("/v1/accounts/acct_1/usage").json()["monthly_goal"]
    assert goal == {"credits_per_member_per_month": 60000 // 3 // 12, "members": 3, "months_left": 12}
    assert state(rt, "acct_1")[0] == [("grant", 60000, "invoice:in_y")]


def test_credits_usage_prints_the_period_as_a_table(client, funded, run) -> None:
    spend(client, {"action": "postcard_us", "quantity": 4})
    code, out, _ = run("usage", "acct_1")
    assert code == 0
    assert "granted (admin)" in out and "spent on postcard_us" in out and "remaining" in out and "96" in out
    assert run("usage", "acct_1", "--period", "someday")[0] == 2


def test_a_member_spends_at_most_what_the_balance_allows_whatever_its_allocation(
    client, admin_headers, deliver, rt, run
) -> None:
    """A 1,000-credit pack, ana's allocation 300, 90% of the pack refunded (balance 100): ana's 300 is refused
    with what is there, and she can spend the 100 that is left."""
    deliver(se.event("payment_intent.succeeded", se.payment_intent(metadata={"pack": "boost", "account_id": "acct_1"})))
    member(client, admin_headers, {"member_id": "ana", "allocation": 300})
    deliver(
        se.event(
            "charge.refunded",
            se.charge(amount=1000, amount_refunded=900, payment_intent="pi_1", refunds=[("re_1", 900)]),
        )
    )
    assert balance_of(rt, "acct_1") == 100
    refused = spend(client, {"amount": 300, "member_id": "ana"})
    assert (refused.status_code, refused.json()) == (
        402,
        {
            "error": "insufficient_credits",
            "message": "100 credits available, 300 requested",
            "balance": 100,
            "requested": 300,
        },
    )
    spent = spend(client, {"amount": 100, "member_id": "ana"})
    assert (spent.status_code, spent.json()["charged"], spent.json()["balance"]) == (200, 100, 0)
    assert state(rt, "acct_1")[1] == [("pack", 1000, 0, 100, 0, 900)]
    assert run("check")[0] == 0


def test_a_spend_whose_ledger_entry_exists_answers_it_and_spends_nothing_more(client, funded, rt) -> None:
    """The ledger's key holds even when the stored answer under the Idempotency-Key is gone."""
    with committed(rt) as uow:
        spending.spend(uow, rt.catalogue, accounts.get(uow, "acct_1"), spending.Charge(30), key="spend:acct_1:k1")
    response = client.post("/v1/accounts/acct_1/spend", json={"amount": 30}, headers={"Idempotency-Key": "k1"})
    assert (response.status_code, response.json()["charged"], response.json()["balance"]) == (200, 30, 70)
    assert state(rt, "acct_1")[0][1:] == [("spend", -30, "spend:acct_1:k1")]


def spend_twice(rt, charge: spending.Charge, key: str = "spend:acct_1:k1") -> tuple[spending.Spent, spending.Spent]:
    """The same spend, under the same key, in two transactions: what each answered."""
    answers = []
    for _ in range(2):
        with committed(rt) as uow:
            answers.append(spending.spend(uow, rt.catalogue, accounts.get(uow, "acct_1"), charge, key=key))
    return answers[0], answers[1]


def test_a_replayed_resource_spend_answers_what_it_charged_not_that_the_resource_was_charged(funded, rt) -> None:
    first, again = spend_twice(rt, spending.Charge(action="handwritten_note", resource="prospect_7"))
    assert (first.charged, first.balance) == (5, 95)
    assert again == first
    assert state(rt, "acct_1")[0][1:] == [("spend", -5, "spend:acct_1:k1")]


def test_a_replayed_member_spend_that_reached_its_limit_answers_what_it_charged(funded, rt) -> None:
    with committed(rt) as uow:
        spending.set_member(uow, accounts.get(uow, "acct_1"), "ana", allocation=None, limit_per_period=10)
    first, again = spend_twice(rt, spending.Charge(amount=10, member_id="ana"))
    assert (first.charged, first.balance) == (10, 90)
    assert again == first
    assert state(rt, "acct_1")[0][1:] == [("spend", -10, "spend:acct_1:k1")]


def test_an_expired_grant_is_expired_before_a_spend_and_never_spent(client, admin_headers, rt) -> None:
    with committed(rt) as uow:
        account = accounts.get_or_create(uow, "acct_1")
        ledger.grant(uow, account, 50, source="admin", key="soon", expires_at=utcnow() + timedelta(milliseconds=200))
        ledger.grant(uow, account, 20, source="admin", key="later")
    time.sleep(0.3)
    assert [spend(client, {"amount": 5}).json()["balance"] for _ in range(2)] == [15, 10]
    entries, grants = state(rt, "acct_1")
    assert [(kind, amount) for kind, amount, _ in entries[2:]] == [("expire", -50), ("spend", -5), ("spend", -5)]
    assert [g[2:] for g in grants] == [(0, 0, 50, 0), (10, 10, 0, 0)]


def test_an_unknown_account_is_404_and_its_key_stays_free(client, funded, rt) -> None:
    response = client.post("/v1/accounts/nobody/spend", json={"amount": 1}, headers={"Idempotency-Key": "k1"})
    assert (response.status_code, response.json()["error"]) == (404, "account_not_found")
    with rt.uow() as uow:
        assert uow.session.get(ApiRequest, "k1") is None


def test_a_replay_whose_account_was_rekeyed_since_still_replays(client, funded, rt) -> None:
    first = client.post("/v1/accounts/acct_1/spend", json={"amount": 10}, headers={"Idempotency-Key": "k1"})
    with committed(rt) as uow:
        accounts.get(uow, "acct_1").public_id = "acct_1_rekeyed"
    again = client.post("/v1/accounts/acct_1/spend", json={"amount": 10}, headers={"Idempotency-Key": "k1"})
    assert (again.status_code, again.json(), again.headers["idempotent-replayed"]) == (200, first.json(), "true")
    assert balance_of(rt, "acct_1_rekeyed") == 90
