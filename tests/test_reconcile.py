"""`credits reconcile`: what the webhooks missed, found in Stripe's lists and the local state, reported
with stable kinds and repaired by --fix through the same handlers and keys — once."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
import respx
from sqlalchemy import text

from jobs import reconcile
from service.domain import ledger
from service.infra.models import StripeEvent, utcnow
from tests import stripe_events as se
from tests.helpers import balance_of, committed, state

NOW = utcnow().replace(microsecond=0)
THIS_MONTH = (NOW - timedelta(hours=2), NOW + timedelta(days=29))


@contextmanager
def freeze_grace() -> Iterator[None]:
    """Let reconciliation treat events received a moment ago as overdue (no five-minute grace)."""
    saved, reconcile.GRACE = reconcile.GRACE, timedelta(0)
    try:
        yield
    finally:
        reconcile.GRACE = saved


def serve_list(router: respx.MockRouter, path: str, items: list[dict[str, Any]], page_size: int = 2) -> respx.Route:
    """A Stripe list endpoint that pages with has_more / starting_after, as Stripe does."""

    def page(request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("starting_after")
        start = next((n + 1 for n, item in enumerate(items) if item["id"] == after), 0)
        chunk = items[start : start + page_size]
        return httpx.Response(
            200, json={"object": "list", "data": chunk, "has_more": start + page_size < len(items), "url": path}
        )

    return router.get(path).mock(side_effect=page)


@pytest.fixture
def stripe_lists(stripe_api):
    """Empty events, invoices, customers and checkout sessions unless a test serves some."""
    serve_list(stripe_api, "/v1/events", [])
    serve_list(stripe_api, "/v1/invoices", [])
    serve_list(stripe_api, "/v1/customers", [])
    serve_list(stripe_api, "/v1/checkout/sessions", [])
    return stripe_api


def referred_invoice(code: str, invoice_id: str = "in_349") -> dict[str, Any]:
    return se.invoice(
        "2025",
        invoice_id=invoice_id,
        customer="cus_bob",
        price="price_starter_monthly",
        amount_paid=34900,
        period=THIS_MONTH,
        subscription_metadata={"account_id": "acct_bob", "referral_code": code},
    )


def code_of(client, account: str) -> str:
    return client.post(f"/v1/accounts/{account}/referral-code", headers={"Idempotency-Key": f"code-{account}"}).json()[
        "code"
    ]


def reconcile_json(run, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run("reconcile", "--format", "json", *args)
    assert code in (0, 1), err
    return code, json.loads(out)


def kinds(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted((f["kind"], f["subject"], f["status"]) for f in report["findings"])


def test_a_clean_window_exits_0(run, stripe_lists) -> None:
    code, out, _ = run("reconcile")
    assert code == 0
    assert "clean" in out


def test_an_undelivered_referred_signup_is_found_and_fixed_once(run, client, rt, stripe_lists) -> None:
    """No webhook ever arrived: the paid invoice and the referral are found in Stripe; --fix credits the
    refill and both sides; a second --fix finds and changes nothing."""
    code = code_of(client, "acct_ana")
    invoice = referred_invoice(code)
    serve_list(stripe_lists, "/v1/events", [se.event("invoice.paid", invoice, event_id="evt_lost", created=NOW)])
    serve_list(stripe_lists, "/v1/invoices", [invoice])
    status, report = reconcile_json(run)
    assert status == 1
    assert kinds(report) == [
        ("missed_referral_payout", "referee:cus_bob", "open"),
        ("missing_refill", "in_349", "open"),
    ]
    missed = next(f for f in report["findings"] if f["kind"] == "missed_referral_payout")
    assert (missed["credits"], missed["stripe_ids"]) == (6000, ["in_349", "cus_bob"])
    assert report["summary"]["remaining"] == 2

    status, report = reconcile_json(run, "--fix")
    assert status == 0
    assert kinds(report) == [
        ("missed_referral_payout", "referee:cus_bob", "fixed"),
        ("missing_refill", "in_349", "fixed"),
    ]
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]
    assert state(rt, "acct_bob")[0] == [("grant", 2000, "invoice:in_349"), ("grant", 3000, "referral:1:referee")]

    status, report = reconcile_json(run, "--fix")
    assert (status, report["findings"]) == (0, [])
    assert balance_of(rt, "acct_ana") == 3000 and balance_of(rt, "acct_bob") == 5000


def test_an_attribution_only_on_the_customer_at_stripe_is_found(run, client, deliver, rt, stripe_lists) -> None:
    code = code_of(client, "acct_ana")
    invoice = referred_invoice(code)
    invoice["parent"]["subscription_details"]["metadata"] = {"account_id": "acct_bob"}
    deliver(se.event("invoice.paid", invoice))  # delivered, but nothing told the service about the code
    serve_list(stripe_lists, "/v1/invoices", [invoice])
    stripe_lists.get("/v1/customers/cus_bob").respond(json=se.customer("cus_bob", metadata={"referral_code": code}))
    _, report = reconcile_json(run, "--fix")
    assert kinds(report) == [("missed_referral_payout", "referee:acct_bob", "fixed")]
    assert "customer metadata carries referral code" in report["findings"][0]["detail"]
    assert balance_of(rt, "acct_ana") == 3000


def test_an_attribution_only_on_the_checkout_session_is_found(run, client, deliver, rt, stripe_lists) -> None:
    code = code_of(client, "acct_ana")
    invoice = referred_invoice(code)
    invoice["parent"]["subscription_details"]["metadata"] = {"account_id": "acct_bob"}
    deliver(se.event("invoice.paid", invoice))
    serve_list(stripe_lists, "/v1/invoices", [invoice])
    stripe_lists.get("/v1/customers/cus_bob").respond(json=se.customer("cus_bob"))
    checkout = se.checkout_session(
        customer="cus_bob", mode="subscription", subscription="sub_1", metadata={"referral_code": code}
    )
    serve_list(stripe_lists, "/v1/checkout/sessions", [checkout])
    _, report = reconcile_json(run, "--fix")
    assert kinds(report) == [("missed_referral_payout", "referee:acct_bob", "fixed")]
    assert balance_of(rt, "acct_bob") == 5000


def first_invoice(n: int, code: str | None = None) -> dict[str, Any]:
    """Customer `cus_n`'s first paid invoice (subscription `sub_n`, account `acct_n`), the code in its
    subscription's metadata when given."""
    metadata = {"account_id": f"acct_{n}", **({"referral_code": code} if code else {})}
    return se.invoice(
        "2025",
        invoice_id=f"in_{n}",
        customer=f"cus_{n}",
        subscription=f"sub_{n}",
        price="price_starter_monthly",
        amount_paid=34900,
        period=THIS_MONTH,
        subscription_metadata=metadata,
    )


def window_seconds(route: respx.Route) -> int:
    """The span of the `created` window a list route was asked for."""
    params = route.calls[0].request.url.params
    return int(params["created[lte]"]) - int(params["created[gte]"])


def test_new_customers_are_listed_once_for_the_window_and_an_older_one_is_looked_up_alone(
    run, client, deliver, rt, stripe_lists
) -> None:
    """Three first invoices: customers 1 and 2 were created in the window (listed, 1 carrying a code: no
    request of their own — an unexpected one fails the run), customer 3 before it (looked up by id)."""
    code = code_of(client, "acct_ana")
    invoices = [first_invoice(n) for n in (1, 2, 3)]
    for invoice in invoices:
        deliver(se.event("invoice.paid", invoice, event_id=f"evt_{invoice['id']}"))
    serve_list(stripe_lists, "/v1/invoices", invoices)
    listed = serve_list(
        stripe_lists, "/v1/customers", [se.customer("cus_1", metadata={"referral_code": code}), se.customer("cus_2")]
    )
    older = stripe_lists.get("/v1/customers/cus_3").respond(json=se.customer("cus_3", metadata={"referral_code": code}))
    status, report = reconcile_json(run)
    assert (status, kinds(report)) == (
        1,
        [("missed_referral_payout", "referee:acct_1", "open"), ("missed_referral_payout", "referee:acct_3", "open")],
    )
    assert all("customer metadata carries referral code" in f["detail"] for f in report["findings"])
    assert (listed.call_count, older.call_count) == (1, 1)
    assert abs(window_seconds(listed) - (3 * 86400 - 5 * 60)) <= 1  # the invoices' window: 3 days, less the grace


def test_checkout_sessions_are_listed_from_a_day_before_the_window(run, client, deliver, rt, stripe_lists) -> None:
    """A Checkout session lives at most 24 hours, so the session behind any first invoice of the window was
    created at most a day before it: completed sessions are listed from then, once, with no per-subscription
    look-up."""
    code = code_of(client, "acct_ana")
    invoices = [first_invoice(n) for n in (1, 2)]
    for invoice in invoices:
        deliver(se.event("invoice.paid", invoice, event_id=f"evt_{invoice['id']}"))
    serve_list(stripe_lists, "/v1/invoices", invoices)
    serve_list(stripe_lists, "/v1/customers", [se.customer("cus_1"), se.customer("cus_2")])
    checkouts = [
        se.checkout_session(
            session_id=f"cs_{n}",
            customer=f"cus_{n}",
            mode="subscription",
            subscription=f"sub_{n}",
            metadata={"referral_code": code} if n == 2 else {},
        )
        for n in (1, 2)
    ]
    listed = serve_list(stripe_lists, "/v1/checkout/sessions", checkouts, page_size=1)
    status, report = reconcile_json(run)
    assert (status, kinds(report)) == (1, [("missed_referral_payout", "referee:acct_2", "open")])
    assert "checkout session metadata carries referral code" in report["findings"][0]["detail"]
    assert listed.call_count == 2  # its two pages
    assert {call.request.url.params["status"] for call in listed.calls} == {"complete"}
    assert abs(window_seconds(listed) - (4 * 86400 - 5 * 60)) <= 1


def test_a_customer_who_never_carried_a_code_is_not_a_finding(run, deliver, stripe_lists) -> None:
    invoice = se.invoice(
        "2025",
        invoice_id="in_1",
        customer="cus_bob",
        price="price_starter_monthly",
        amount_paid=2000,
        period=THIS_MONTH,
        subscription_metadata={"account_id": "acct_bob"},
    )
    deliver(se.event("invoice.paid", invoice))
    serve_list(stripe_lists, "/v1/invoices", [invoice])
    stripe_lists.get("/v1/customers/cus_bob").respond(json=se.customer("cus_bob"))
    status, report = reconcile_json(run)
    assert (status, report["findings"]) == (0, [])


def test_a_locally_known_referral_left_unpaid_is_found_and_paid(
    run, client, deliver, rt, stripe_lists, monkeypatch
) -> None:
    real_grant = ledger.grant
    monkeypatch.setattr(
        ledger,
        "grant",
        lambda s, a, n, **kw: (
            (_ for _ in ()).throw(RuntimeError("down"))
            if kw["key"].startswith("referral:")
            else real_grant(s, a, n, **kw)
        ),
    )
    code = code_of(client, "acct_ana")
    client.post(
        "/v1/referrals", json={"code": code, "referee_account_id": "acct_bob"}, headers={"Idempotency-Key": "r"}
    )
    deliver(se.event("invoice.paid", referred_invoice(code)))
    monkeypatch.setattr(ledger, "grant", real_grant)
    status, report = reconcile_json(run)
    assert (status, kinds(report)) == (1, [("missed_referral_payout", "referral:1", "open")])
    _, report = reconcile_json(run, "--fix")
    assert kinds(report) == [("missed_referral_payout", "referral:1", "fixed")]
    assert balance_of(rt, "acct_ana") == 3000


def test_a_one_sided_payout_is_found_and_completed(run, client, deliver, rt, stripe_lists, monkeypatch) -> None:
    real_grant = ledger.grant
    monkeypatch.setattr(
        ledger,
        "grant",
        lambda s, a, n, **kw: (
            (_ for _ in ()).throw(RuntimeError("down"))
            if kw["key"].endswith(":referrer")
            else real_grant(s, a, n, **kw)
        ),
    )
    code = code_of(client, "acct_ana")
    client.post(
        "/v1/referrals", json={"code": code, "referee_account_id": "acct_bob"}, headers={"Idempotency-Key": "r"}
    )
    deliver(se.event("invoice.paid", referred_invoice(code)))
    monkeypatch.setattr(ledger, "grant", real_grant)
    _, report = reconcile_json(run, "--fix")
    assert kinds(report) == [("one_sided_referral_payout", "referral:1", "fixed")]
    assert report["findings"][0]["credits"] == 3000
    assert state(rt, "acct_ana")[0] == [("grant", 3000, "referral:1:referrer")]
    assert state(rt, "acct_bob")[0][-1] == ("grant", 3000, "referral:1:referee")


def test_a_failing_event_is_retried_by_fix_and_stays_open_while_it_fails(run, deliver, stripe_lists) -> None:
    stripe_lists.get("/v1/customers/cus_x").respond(400, json={"error": {"type": "invalid_request_error"}})
    invoice = se.invoice("2025", invoice_id="in_x", customer="cus_x", price="price_starter_monthly", amount_paid=2000)
    deliver(se.event("invoice.paid", invoice, event_id="evt_failing", created=NOW))
    with freeze_grace():
        status, report = reconcile_json(run, "--fix")
    assert (status, kinds(report)) == (1, [("missing_refill", "in_x", "open")])
    detail = report["findings"][0]["detail"]
    assert detail.startswith("invoice.paid evt_failing failed after 1 attempt(s)") and "InvalidRequestError" in detail


def test_a_dead_event_is_reported_with_its_error_and_not_fixed(run, deliver, rt, stripe_lists) -> None:
    stripe_lists.get("/v1/customers/cus_x").respond(400, json={"error": {"type": "invalid_request_error"}})
    deliver(
        se.event(
            "invoice.paid",
            se.invoice("2025", invoice_id="in_x", customer="cus_x", price="price_starter_monthly", amount_paid=2000),
            event_id="evt_dead",
        )
    )
    with committed(rt) as uow:
        uow.session.get_one(StripeEvent, "evt_dead").status = "dead"
    status, report = reconcile_json(run, "--fix")
    assert (status, kinds(report)) == (1, [("dead_event", "evt_dead", "open")])
    assert report["findings"][0]["action"] == "fix the cause, then `credits events replay evt_dead`"


def test_refund_shortfalls_are_reported(run, client, deliver, stripe_lists) -> None:
    deliver(
        se.event(
            "payment_intent.succeeded",
            se.payment_intent(customer=None, metadata={"pack": "boost", "account_id": "acct_1"}),
        )
    )
    client.post("/v1/accounts/acct_1/spend", json={"amount": 600}, headers={"Idempotency-Key": "s"})
    deliver(
        se.event("charge.refunded", se.charge(amount_refunded=1000, payment_intent="pi_1", refunds=[("re_1", 1000)]))
    )
    status, report = reconcile_json(run)
    assert (status, kinds(report)) == (1, [("unreversed_refund", "reverse:re_1", "open")])
    assert (report["findings"][0]["credits"], report["findings"][0]["accounts"]) == (600, ["acct_1"])


def test_ledger_drift_is_reported(run, client, admin_headers, rt, stripe_lists) -> None:
    client.post(
        "/v1/accounts/acct_1/grants",
        json={"amount": 10, "reason": "x"},
        headers={**admin_headers, "Idempotency-Key": "g"},
    )
    with committed(rt) as uow:
        uow.session.execute(text("UPDATE credit_grants SET remaining = 9, expired = 1"))
    _, report = reconcile_json(run)
    assert ("ledger_drift", "acct_1:balance", "open") in kinds(report)


def test_stripe_pages_are_followed_and_a_429_is_retried(run, client, rt, stripe_lists) -> None:
    invoices = [
        se.invoice(
            "2025",
            invoice_id=f"in_{n}",
            customer=f"cus_{n}",
            price="price_starter_monthly",
            amount_paid=2000,
            period=THIS_MONTH,
            billing_reason="subscription_cycle",
            subscription_metadata={"account_id": f"acct_{n}"},
        )
        for n in range(5)
    ]
    route = serve_list(stripe_lists, "/v1/invoices", invoices, page_size=2)
    real = cast(Callable[[httpx.Request], httpx.Response], route.side_effect)  # serve_list's page handler
    calls = {"n": 0}

    def first_throttled(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(429, json={"error": {"type": "rate_limit_error", "message": "slow down"}})
        return real(request)

    route.mock(side_effect=first_throttled)
    _, report = reconcile_json(run, "--fix")
    assert sorted(f["subject"] for f in report["findings"]) == [f"in_{n}" for n in range(5)]
    assert calls["n"] == 4  # one 429, then three pages
    assert all(balance_of(rt, f"acct_{n}") == 2000 for n in range(5))


def test_stripe_failing_after_retries_is_exit_2(run, stripe_api) -> None:
    stripe_api.get("/v1/events").respond(500, json={"error": {"type": "api_error", "message": "boom"}})
    code, _, err = run("reconcile")
    assert code == 2
    assert "Stripe could not be read after retries" in err


def test_bad_arguments_are_exit_2(run) -> None:
    assert run("reconcile", "--since", "2026-02-01", "--until", "2026-01-01")[0] == 2
    assert run("reconcile", "--format", "yaml")[0] == 2
    assert run("reconcile", "--since", "yesterday-ish")[0] == 2


def test_markdown_report_to_a_file(run, client, stripe_lists, tmp_path) -> None:
    code = code_of(client, "acct_ana")
    serve_list(stripe_lists, "/v1/invoices", [referred_invoice(code)])
    path = tmp_path / "report.md"
    status, out, _ = run("reconcile", "--format", "markdown", "--output", str(path))
    text = path.read_text()
    assert status == 1 and "report written to" in out
    assert (
        text.startswith("## Credits reconciliation") and "| open | missed_referral_payout | `referee:cus_bob` |" in text
    )


def test_open_findings_are_stored_and_listed_for_admins(run, client, admin_headers, stripe_lists) -> None:
    code = code_of(client, "acct_ana")
    serve_list(stripe_lists, "/v1/invoices", [referred_invoice(code)])
    run("reconcile")
    run("reconcile")
    listed = client.get("/v1/admin/findings", headers=admin_headers).json()["findings"]
    assert sorted((f["kind"], f["subject"], f["first_run_id"], f["last_run_id"]) for f in listed) == [
        ("missed_referral_payout", "referee:cus_bob", 1, 2),
        ("missing_refill", "in_349", 1, 2),
    ]
    assert client.get("/v1/admin/findings").status_code == 403
    run("reconcile", "--fix")
    assert client.get("/v1/admin/findings", headers=admin_headers).json()["findings"] == []


def test_the_window_accepts_iso_timestamps_with_a_zone(run, stripe_lists) -> None:
    code, out, _ = run("reconcile", "--since", "2026-11-20T03:17:00Z", "--until", "2026-11-21T03:17:00+00:00")
    assert code == 0 and "2026-11-20T03:17 → 2026-11-21T03:17" in out


def test_an_unreachable_database_is_exit_2_not_a_finding(run, monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://root@127.0.0.1:1/none?connect_timeout=1")
    code, _, err = run("reconcile")
    assert (code, err.strip()) == (2, "error: the database is unavailable")
