"""The `credits` command as support uses it: exit codes, tables, JSON, and usage errors."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import text

from service.infra.models import StripeEvent, utcnow
from tests import stripe_events as se
from tests.helpers import committed, state
from webhooks import inbox


def test_grant_then_balance_as_json(run) -> None:
    code, out, _ = run("grant", "acct_1", "100", "--reason", "apology for outage", "--actor", "ana")
    assert (code, "granted 100 credits; balance 100" in out) == (0, True)
    code, out, _ = run("balance", "acct_1", "--json")
    assert code == 0
    assert json.loads(out)["balance"] == 100


def test_grant_with_the_same_idempotency_key_twice_grants_once(run) -> None:
    args = ("grant", "acct_1", "100", "--reason", "r", "--actor", "ana", "--idempotency-key", "ticket-42")
    run(*args)
    code, out, _ = run(*args)
    assert (code, "already granted" in out) == (0, True)
    assert json.loads(run("balance", "acct_1", "--json")[1])["balance"] == 100


def test_ledger_shows_reason_and_actor(run) -> None:
    run("grant", "acct_1", "100", "--reason", "apology", "--actor", "ana")
    code, out, _ = run("ledger", "acct_1")
    assert code == 0
    assert "apology" in out and "ana" in out and "+100" in out
    entries = json.loads(run("ledger", "acct_1", "--json")[1])["entries"]
    assert [(e["kind"], e["amount"], e["reason"], e["actor"]) for e in entries] == [("grant", 100, "apology", "ana")]


def test_grant_without_reason_is_a_usage_error(run) -> None:
    code, _, err = run("grant", "acct_1", "100", "--actor", "ana")
    assert code == 2
    assert "Missing option '--reason'" in err


def test_a_missing_argument_is_a_usage_error_not_a_traceback(run) -> None:
    code, _, err = run("balance")
    assert code == 2
    assert "Missing argument" in err and "Traceback" not in err


def test_a_mistyped_command_is_a_usage_error(run) -> None:
    code, _, err = run("balanse", "acct_1")
    assert code == 2
    assert "No such command" in err


def test_a_bad_setting_in_the_environment_is_named_in_one_line_not_a_traceback(run, monkeypatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "loud")
    monkeypatch.setenv("WORKER_THREADS", "0")
    code, out, err = run("events", "list")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "error: LOG_LEVEL='loud': Input should be 'debug', 'info', 'warning' or 'error'",
        "error: WORKER_THREADS='0': Input should be greater than or equal to 1",
    ]


def test_a_non_positive_amount_is_a_usage_error(run) -> None:
    assert run("grant", "acct_1", "0", "--reason", "r", "--actor", "a")[0] == 2


def test_an_unknown_account_is_one_line_and_exit_1(run) -> None:
    code, _, err = run("balance", "nobody")
    assert (code, err.strip()) == (1, "error: no account or Stripe customer 'nobody'")


def test_check_passes_on_a_consistent_ledger(run) -> None:
    run("grant", "acct_1", "100", "--reason", "r", "--actor", "a")
    code, out, _ = run("check")
    assert (code, "ledger consistent" in out) == (0, True)


def test_check_exits_1_on_drift(run, rt) -> None:
    run("grant", "acct_1", "100", "--reason", "r", "--actor", "a")
    with committed(rt) as uow:
        uow.session.execute(text("UPDATE credit_grants SET remaining = 90, expired = 10"))
    code, out, _ = run("check")
    assert code == 1
    assert "balance" in out and "grant 1 expired" in out


def test_a_bad_catalogue_stops_the_command_naming_the_line(run, tmp_path, monkeypatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[free]\ncredits = -1\n")
    monkeypatch.setenv("CREDITS_CONFIG", str(bad))
    code, _, err = run("balance", "acct_1")
    assert code == 1
    assert "bad.toml:2: free.credits" in err


def test_worker_once_drains_what_is_due_and_events_list_shows_it(run, rt) -> None:
    inv = se.invoice("2017", invoice_id="in_1", customer="cus_1", price="plan_starter", amount_paid=2000)
    inv["metadata"] = {"account_id": "acct_1"}
    with committed(rt) as uow:
        inbox.store(uow, se.event("invoice.payment_succeeded", inv, event_id="evt_1", era="2017"), utcnow())
    assert run("worker", "--once")[1].strip() == "processed: 1 processed"
    code, out, _ = run("events", "list", "--status", "processed", "--json")
    assert code == 0
    assert [(e["id"], e["status"], e["outcome"]) for e in json.loads(out)["events"]] == [
        ("evt_1", "processed", "granted 2000 credits (starter)")
    ]


def test_events_list_refuses_an_unknown_status(run) -> None:
    code, _, err = run("events", "list", "--status", "deadish")
    assert code == 2
    assert "must be one of" in err


def test_events_replay_reprocesses_one_event(run, rt) -> None:
    inv = se.invoice(
        "2020",
        invoice_id="in_1",
        customer="cus_1",
        price="price_starter_monthly",
        amount_paid=2000,
        subscription_metadata={"account_id": "acct_1"},
    )
    with committed(rt) as uow:
        inbox.store(uow, se.event("invoice.paid", inv, event_id="evt_1", era="2020"), utcnow())
    code, out, _ = run("events", "replay", "evt_1")
    assert (code, out.strip()) == (0, "evt_1: processed — granted 2000 credits (starter)")
    assert run("events", "replay", "evt_1")[1].strip() == "evt_1: processed — already granted (invoice:in_1)"


def test_events_replay_of_an_unknown_event_is_exit_1(run) -> None:
    code, _, err = run("events", "replay", "evt_nope")
    assert (code, "no stored event 'evt_nope'" in err) == (1, True)


def test_events_replay_status_dead_replays_every_dead_event_received_since(run, rt) -> None:
    with committed(rt) as uow:
        for n, received in enumerate((se.T0, se.T0 + timedelta(days=2), se.T0 + timedelta(days=3))):
            inv = se.invoice(
                "2020",
                invoice_id=f"in_{n}",
                customer="cus_1",
                price="price_starter_monthly",
                amount_paid=2000,
                billing_reason="subscription_cycle",
                period=(se.T0.replace(month=n + 1), se.T0.replace(month=n + 2)),
                subscription_metadata={"account_id": "acct_1"},
            )
            inbox.store(uow, se.event("invoice.paid", inv, event_id=f"evt_{n}", era="2020"), received)
            uow.session.get_one(StripeEvent, f"evt_{n}").status = "dead"
    code, out, _ = run("events", "replay", "--status", "dead", "--since", "2026-01-02")
    assert (code, out.splitlines()) == (
        0,
        [
            "evt_1: processed — granted 2000 credits (starter)",
            "evt_2: processed — granted 2000 credits (starter)",
            "replayed 2 dead event(s): 2 processed",
        ],
    )
    assert [key for _, _, key in state(rt, "acct_1")[0]] == ["invoice:in_1", "invoice:in_2"]
    assert run("events", "replay", "--status", "dead")[1].splitlines() == [
        "evt_0: processed — granted 2000 credits (starter)",
        "replayed 1 dead event(s): 1 processed",
    ]


def test_events_replay_takes_an_event_id_or_a_status(run) -> None:
    assert run("events", "replay")[0] == 2
    assert run("events", "replay", "evt_1", "--status", "dead")[0] == 2
    assert run("events", "replay", "evt_1", "--since", "2026-01-01")[0] == 2
    assert run("events", "replay", "--status", "processed")[0] == 2


def test_demo_posts_the_whole_story_and_shows_the_ledger(run) -> None:
    code, out, _ = run("demo")
    assert code == 0
    assert out.count("✓") == 7 and "✗" not in out
    assert "rollover (cap) at renewal" in out and "reverse:re_demo_" in out
