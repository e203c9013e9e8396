"""The `credits` command: serve the API, migrate, and the support views over the ledger.

Commands only translate arguments into domain calls and results into tables or JSON; each command is one
transaction. A mistyped command or a missing argument is a usage message (exit 2), never a traceback.
"""

from __future__ import annotations

import logging
import secrets
import signal
import sys
import threading
import uuid
from collections import Counter
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import stripe
import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import DBAPIError, OperationalError

from jobs import reconcile as reconcile_job
from jobs import report
from jobs import worker as inbox_worker
from service.domain import accounts, audit, ledger, usage
from service.domain.accounts import AccountNotFound
from service.entry import idempotency, members_cli, support_cli
from service.entry.schemas import aware_utc, balance_view, entry_view
from service.infra import logs, runtime
from service.infra.catalogue import CatalogueError
from service.infra.config import Settings
from service.infra.db import make_engine
from service.infra.models import StripeEvent, utcnow
from webhooks import dispatch, inbox

app = typer.Typer(
    name="credits",
    help="stripe-credits: credit balances kept from Stripe billing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per error, however long

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class Failure(Exception):
    """A command that cannot do what was asked; printed as one line, exit code 1."""


@app.callback()
def _setup() -> None:
    settings = Settings()
    logs.configure(settings.log_format, settings.log_threshold)


SWITCH_INTERVAL = 0.0005  # seconds a thread may keep the GIL while another waits for it (Python's default: 0.005)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    dev: Annotated[bool, typer.Option("--dev", help="Invent and print API tokens when none are set.")] = False,
    no_worker: Annotated[
        bool,
        typer.Option(
            "--no-worker", help="Leave the inbox to separate `credits worker` processes (as SERVE_WORKER=false)."
        ),
    ] = False,
) -> None:
    """Serve the HTTP API and the Stripe webhook endpoint, and process what comes in (the worker's drain loop
    runs in this process too, unless --no-worker)."""
    settings = Settings()
    if no_worker:
        settings = settings.model_copy(update={"serve_worker": False})
    if dev and settings.token_problem():
        api_token, admin_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        settings = settings.model_copy(
            update={"credits_api_token": SecretStr(api_token), "credits_admin_token": SecretStr(admin_token)}
        )
        out.print("[bold]dev tokens[/bold] (set CREDITS_API_TOKEN / CREDITS_ADMIN_TOKEN to choose your own):")
        out.print(f"  CREDITS_API_TOKEN={api_token}")
        out.print(f"  CREDITS_ADMIN_TOKEN={admin_token}")
    problem = settings.token_problem()
    if problem:
        raise Failure(f"{problem} (or run `credits serve --dev` to use invented tokens)")
    rt = runtime.load(settings)
    processing = "processing the inbox here too" if settings.serve_worker else "leaving the inbox to `credits worker`"
    out.print(
        f"serving on http://{host}:{port} (OpenAPI at /docs), database {rt.engine.url.render_as_string()}, {processing}"
    )
    import uvicorn  # the web stack (uvicorn, FastAPI: ~25 MB) only where it serves: not in every command's memory

    from service.entry.api import create_app

    # The API's threads (the inbox's writer, the routes' threads, the worker's) wait on the database, then for
    # the GIL, which the event loop may hold meanwhile for the whole switch interval (Python's default 5 ms):
    # every delivery's answer waits on the writer's thread. A shorter interval hands the GIL back sooner
    # (bench/README.md, "What the mechanisms save").
    sys.setswitchinterval(SWITCH_INTERVAL)
    # No proxy headers: the app reads neither the client's address nor the scheme, and parsing them costs
    # every request.
    uvicorn.run(create_app(rt), host=host, port=port, access_log=False, log_config=None, proxy_headers=False)


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision."""
    from service.infra.migrate import upgrade  # alembic (and through mako, pygments' lexers) only where it migrates

    settings = Settings()
    upgrade(make_engine(settings.database_url))
    out.print("database is at the newest revision")


@app.command()
def balance(
    account: Annotated[str, typer.Argument(help="Account id or Stripe customer id.")], as_json: AsJson = False
) -> None:
    """Show an account's spendable balance and its grants."""
    with runtime.load().uow() as uow:
        view = balance_view(uow, accounts.get(uow, account))
    if as_json:
        support_cli.print_json(view)
        return
    table = Table(
        "grant", "source", "amount", "remaining", "expires at", title=f"{view['account_id']}: {view['balance']} credits"
    )
    for g in view["grants"]:
        table.add_row(str(g["id"]), g["source"], str(g["amount"]), str(g["remaining"]), g["expires_at"] or "-")
    out.print(table)


@app.command(name="ledger")
def show_ledger(
    account: Annotated[str, typer.Argument(help="Account id or Stripe customer id.")],
    limit: Annotated[int, typer.Option(min=1, help="Newest entries to show.")] = 50,
    as_json: AsJson = False,
) -> None:
    """Show an account's ledger entries, newest first, with who did what and why."""
    with runtime.load().uow() as uow:
        entries = [entry_view(e) for e in ledger.history(uow, accounts.get(uow, account), limit)]
    if as_json:
        support_cli.print_json({"entries": entries})
        return
    table = Table("id", "when", "kind", "amount", "reason", "actor", "idempotency key", title=account)
    for e in entries:
        table.add_row(
            str(e["id"]),
            e["created_at"][:19],
            e["kind"],
            f"{e['amount']:+d}",
            e["reason"] or "",
            e["actor"] or "",
            e["idempotency_key"],
        )
    out.print(table)


@app.command()
def grant(
    account: Annotated[str, typer.Argument(help="Account id or Stripe customer id; created when new.")],
    amount: Annotated[int, typer.Argument(min=1, help="Credits to grant.")],
    reason: Annotated[str, typer.Option(help="Why (shown in the ledger).")],
    actor: Annotated[str, typer.Option(help="Who is granting (shown in the ledger).")],
    expires_at: Annotated[
        datetime | None, typer.Option(help="When the credits expire (UTC unless an offset is given).")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Makes a retried command grant once; a fresh one is made if omitted.")
    ] = None,
) -> None:
    """Grant credits by hand (recorded in the audit trail)."""
    key = idempotency_key or uuid.uuid4().hex
    with runtime.load().uow() as uow:
        acct = accounts.get_or_create(uow, account)
        posted = ledger.grant(
            uow,
            acct,
            amount,
            source="admin",
            key=idempotency.scoped("grant", acct.public_id, key),
            reason=reason,
            actor=actor,
            expires_at=aware_utc(expires_at) if expires_at else None,
        )
        total = ledger.balance(uow, acct)
        entry_key = posted.entry.idempotency_key
        audit.record(
            uow,
            actor=actor,
            action="grant",
            reason=reason,
            account=acct,
            details={
                "amount": amount,
                "idempotency_key": entry_key,
                "created": [entry_key] if posted.created else [],
                "changed": posted.created,
                "balance": total,
            },
        )
        uow.commit()
    verb = "granted" if posted.created else "already granted (same idempotency key); nothing changed"
    out.print(f"{acct.public_id}: {verb} {amount} credits; balance {total} (entry {posted.entry.id})")


@app.command(name="usage")
def show_usage(
    account: Annotated[str, typer.Argument(help="Account id or Stripe customer id.")],
    period: Annotated[str, typer.Option(help="current or previous billing period.")] = "current",
    as_json: AsJson = False,
) -> None:
    """Credits granted, spent (by action, member and team), expired, reversed and remaining in a billing period."""
    if period not in ("current", "previous"):
        raise typer.BadParameter("must be current or previous", param_hint="--period")
    rt = runtime.load()
    with rt.uow() as uow:
        view = usage.report(uow, rt.catalogue, accounts.get(uow, account), period)
    if as_json:
        support_cli.print_json(view)
        return
    span = f"{view['period']['start'][:10]} → {view['period']['end'][:10]}"
    table = Table("", "credits", title=f"{view['account_id']}: {period} period {span}")
    for source, amount in sorted(view["granted"].items()):
        table.add_row(f"granted ({source})", str(amount))
    for action, amount in sorted(view["spent"]["by_action"].items()):
        table.add_row(f"spent on {action}", str(amount))
    for who, amount in sorted(view["spent"]["by_member"].items()):
        table.add_row(f"spent by {who}", str(amount))
    for team, amount in sorted(view["spent"]["by_team"].items()):
        table.add_row(f"spent by team {team}", str(amount))
    table.add_row("expired", str(view["expired"]))
    table.add_row("reversed", str(view["reversed"]))
    table.add_row("[bold]remaining[/bold]", f"[bold]{view['remaining']}[/bold]")
    if view["monthly_goal"]:
        goal = view["monthly_goal"]
        table.add_row(
            "monthly goal per member",
            f"{goal['credits_per_member_per_month']} ({goal['members']} members, {goal['months_left']} months left)",
        )
    out.print(table)


@app.command()
def check() -> None:
    """Recompute every balance and grant from the ledger; exit 1 on any drift."""
    with runtime.load().uow() as uow:
        drifts = ledger.check(uow)
    if not drifts:
        out.print("ledger consistent: every balance and grant agrees with its entries")
        return
    table = Table("account", "what", "ledger says", "stored", title=f"{len(drifts)} drift(s)")
    for d in drifts:
        table.add_row(d.account, d.what, str(d.expected), str(d.actual))
    out.print(table)
    raise typer.Exit(1)


@app.command()
def demo(
    url: Annotated[str | None, typer.Option(help="Post to a running service instead of one started here.")] = None,
) -> None:
    """Post a realistic signed sequence (signup, renewals with rollover, a pack, a refund) and show the result."""
    from service.entry import demo as story  # the web stack, only where it serves

    settings = Settings()
    logs.configure(settings.log_format, level=logging.WARNING)  # the tables are the output, not the log
    if url is not None:
        secret = (settings.webhook_secrets or [story.SECRET])[0]
        token = settings.credits_api_token.get_secret_value() if settings.credits_api_token else story.TOKEN
        account, steps = story.post_story(runtime.load(settings).catalogue, url, secret, token)
    else:
        account, steps = story.run_here(settings)
    for label, status in steps:
        out.print(f"  {'✓' if status < 300 else '✗'} {label} [dim](HTTP {status})[/dim]")
    if url is not None:
        out.print(f"account {account}: see `credits ledger {account}` against that service's database")
        return
    balance(account, as_json=False)
    show_ledger(account, limit=50, as_json=False)


ISO_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S"]


class ReportFormat(StrEnum):
    text = "text"
    json = "json"
    markdown = "markdown"


@app.command()
def reconcile(
    since: Annotated[
        datetime | None,
        typer.Option(formats=ISO_FORMATS, help="Window start (UTC unless an offset is given); default 3 days ago."),
    ] = None,
    until: Annotated[datetime | None, typer.Option(formats=ISO_FORMATS, help="Window end; default now.")] = None,
    fmt: Annotated[
        ReportFormat, typer.Option("--format", help="text (a table), json or markdown.")
    ] = ReportFormat.text,
    output: Annotated[Path | None, typer.Option(help="Write the report to this file instead of stdout.")] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Repair what is safe through the normal handlers.")] = False,
) -> None:
    """Compare Stripe with the ledger; exit 0 when clean, 1 when findings remain, 2 on error."""
    end = aware_utc(until) if until else utcnow()
    start = aware_utc(since) if since else end - timedelta(days=3)
    if start >= end:
        raise typer.BadParameter("--since must be before --until", param_hint="--since")
    try:
        rt = runtime.load()
        with _progress() as progress:
            task = progress.add_task("scanning", total=None)
            result = reconcile_job.run(
                rt, start, end, fix=fix, tick=lambda what: progress.update(task, advance=1, description=what)
            )
    except stripe.StripeError as exc:
        err.print(f"error: Stripe could not be read after retries: {type(exc).__name__}: {exc.user_message or exc}")
        raise typer.Exit(2) from exc
    except (CatalogueError, DBAPIError) as exc:  # exit 1 means findings; a broken setup must not look like one
        err.print(f"error: {exc if isinstance(exc, CatalogueError) else 'the database is unavailable'}")
        raise typer.Exit(2) from exc
    rendered = {"json": report.as_json, "markdown": report.as_markdown}.get(fmt.value)
    if output is not None:
        output.write_text(rendered(result) if rendered else report.as_markdown(result), encoding="utf-8")
        out.print(f"report written to {output}")
    elif rendered:
        sys.stdout.write(rendered(result))
    else:
        report.print_table(result, out)
    raise typer.Exit(1 if result.remaining else 0)


def _progress() -> Progress:
    """A progress display on a terminal; silent under cron."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


events = typer.Typer(help="The Stripe event inbox.", no_args_is_help=True)
app.add_typer(events, name="events")
app.add_typer(members_cli.members_app, name="members")
app.add_typer(members_cli.teams_app, name="teams")
app.add_typer(support_cli.backfill, name="backfill")
app.add_typer(support_cli.rollover_app, name="rollover")
app.add_typer(support_cli.referrals_app, name="referrals")
app.add_typer(support_cli.jobs_app, name="jobs")
app.command(name="audit")(support_cli.audit_trail)


@app.command()
def worker(once: Annotated[bool, typer.Option("--once", help="Drain what is due, then exit.")] = False) -> None:
    """Process inbox events that are due (unprocessed, or failed and past their backoff); run several for more."""
    rt = runtime.load()  # a bad catalogue or URL fails here, before anything is processed
    if once:
        counts = inbox_worker.drain(rt) + inbox_worker.release_held_referrals(rt)
        out.print("processed: " + (", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing due"))
        return
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    inbox_worker.run(rt, stop)


@events.command("list")
def events_list(
    status: Annotated[str | None, typer.Option(help="pending, processed, ignored, invalid, failed or dead.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    as_json: AsJson = False,
) -> None:
    """List inbox events, newest first."""
    if status is not None and status not in inbox.STATUSES:
        raise typer.BadParameter(f"must be one of {', '.join(inbox.STATUSES)}", param_hint="--status")
    with runtime.load().uow() as uow:
        rows = [_event_view(e) for e in inbox.listing(uow, status, limit)]
    if as_json:
        support_cli.print_json({"events": rows})
        return
    table = Table("event", "type", "status", "attempts", "outcome / last error", "received")
    for r in rows:
        table.add_row(
            r["id"],
            r["type"],
            r["status"],
            str(r["attempts"]),
            r["last_error"] or r["outcome"] or "",
            r["received_at"][:19],
        )
    out.print(table)


@events.command("replay")
def events_replay(
    event_id: Annotated[str | None, typer.Argument(help="The Stripe event id (evt_…).")] = None,
    status: Annotated[
        Literal["dead", "failed", "invalid"] | None,
        typer.Option(help="Replay every event in this status instead, oldest first."),
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(formats=ISO_FORMATS, help="With --status: only events received since (UTC unless an offset)."),
    ] = None,
) -> None:
    """Process stored events again, whatever their status: one by id, or all dead (or failed) ones.

    Handlers are idempotent, so nothing doubles. Exit 1 when any replayed event still fails."""
    if (event_id is None) == (status is None):
        raise typer.BadParameter("give an event id or --status, not both", param_hint="EVENT_ID / --status")
    if since is not None and status is None:
        raise typer.BadParameter("only with --status", param_hint="--since")
    rt = runtime.load()
    if event_id is not None:
        ids = [event_id]
    else:
        assert status is not None
        with rt.uow() as uow:
            ids = inbox.ids_in(uow, status, aware_utc(since) if since else None)
    outcomes: Counter[str] = Counter()
    for one in ids:
        result = dispatch.process(rt, one, replay=True)
        if result is None and event_id is not None:
            raise Failure(f"no stored event {one!r} (or another process holds it right now)")
        if result is None:  # another process holds it right now: it is being handled
            out.print(f"{one}: skipped — another process holds it")
            outcomes["busy"] += 1
            continue
        with rt.uow() as uow:
            event = uow.session.get_one(StripeEvent, one)
            out.print(f"{one}: {event.status} — {event.last_error or event.outcome}")
        outcomes[result] += 1
    if status is not None:
        summary = ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))
        out.print(f"replayed {len(ids)} {status} event(s)" + (f": {summary}" if summary else ""))
    if outcomes["failed"] or outcomes["dead"] or outcomes["invalid"]:
        raise typer.Exit(1)


def _event_view(event: Any) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "status": event.status,
        "attempts": event.attempts,
        "outcome": event.outcome,
        "last_error": event.last_error,
        "received_at": event.received_at.isoformat(),
        "next_attempt_at": event.next_attempt_at.isoformat(),
    }


def main() -> None:
    """Console-script entry point: known failures become one line on stderr and exit 1."""
    try:
        app()
    except (Failure, CatalogueError, ledger.LedgerError) as exc:
        err.print(f"error: {exc}")
        sys.exit(1)
    except AccountNotFound as exc:
        err.print(f"error: no account or Stripe customer {exc.args[0]!r}")
        sys.exit(1)
    except OperationalError as exc:
        err.print(f"error: the database is unavailable: {str(exc.orig).splitlines()[0] if exc.orig else exc}")
        sys.exit(1)
    except ValidationError as exc:  # the environment's settings (Settings): each variable named with its problem
        for problem in exc.errors():
            err.print(f"error: {_setting(problem)}: {problem['msg']}", markup=False, highlight=False)
        sys.exit(2)


def _setting(problem: Any) -> str:
    """The environment variable a settings error is about, with the value it had unless that may be secret."""
    variable = "_".join(str(part) for part in problem["loc"]).upper()
    if any(word in variable for word in ("SECRET", "TOKEN", "KEY", "URL")):
        return variable
    return f"{variable}={problem.get('input')!r}"


if __name__ == "__main__":  # `python -m service.entry.cli …`, e.g. from a benchmark that must run this tree
    main()
