"""Support's commands on the audit trail: `backfill referral`, `rollover extend`, `referrals list|release`,
`audit`, and the scheduled `jobs refill-free`. Registered on the `credits` app by service/entry/cli.py.

Like the rest of the CLI these only translate: arguments into domain calls, results into tables or JSON.
Every action that changes credits by hand asks who (`--actor`) and why (`--reason`) and leaves an audit
row, so a repair can always be traced to a person and a ticket. A refusal is one line on stderr and exit
code 1; a missing or blank `--reason`/`--actor` is a usage error (exit 2), before anything is read.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, NoReturn

import stripe
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from jobs import backfill as backfill_job
from jobs import refill_free as refill_job
from service.domain import accounts, audit, referrals, rollover
from service.entry.schemas import aware_utc
from service.infra import runtime
from service.infra.models import utcnow

backfill = typer.Typer(help="Repair one support case by hand: a dry run unless --apply.", no_args_is_help=True)
rollover_app = typer.Typer(help="Support's levers on the rollover policy.", no_args_is_help=True)
referrals_app = typer.Typer(help="Support's work on referrals: the held and the rejected.", no_args_is_help=True)
jobs_app = typer.Typer(help="Scheduled jobs (cron runs them; each is safe to repeat).", no_args_is_help=True)
out = Console(markup=False)  # account ids, reasons and tickets are printed as typed, never read as markup
err = Console(stderr=True, markup=False, soft_wrap=True)


def _not_blank(value: str) -> str:
    """An audit row without a real who or why is worthless: blank is refused like a missing option."""
    if not value.strip():
        raise typer.BadParameter("must not be blank")
    return value.strip()


def _month(value: str | None) -> str | None:
    if value is not None and not refill_job.MONTH.fullmatch(value):
        raise typer.BadParameter("must be YYYY-MM, e.g. 2026-03")
    return value


Reason = Annotated[str, typer.Option(help="Why (kept in the audit trail).", callback=_not_blank)]
Actor = Annotated[str, typer.Option(help="Who is doing it (kept in the audit trail).", callback=_not_blank)]
Ticket = Annotated[str | None, typer.Option(help="The support ticket, kept in the audit trail.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@backfill.command("referral")
def backfill_referral(
    referee: Annotated[str, typer.Option(help="The referred account: account id or Stripe customer id.")],
    referrer: Annotated[str, typer.Option(help="The referrer: its referral code, account id or Stripe customer id.")],
    reason: Reason,
    actor: Actor,
    ticket: Ticket = None,
    invoice: Annotated[
        str | None, typer.Option(help="The qualifying invoice (in_…), checked at Stripe; found by itself if omitted.")
    ] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Do it; without this nothing is written.")] = False,
    override_cap: Annotated[
        bool, typer.Option("--override-cap", help="Pay a referrer held by its monthly cap (audited).")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Attribute a referral after the fact and pay whichever side is unpaid, once; a dry run unless --apply."""
    request = backfill_job.Request(referee, referrer, reason, actor, ticket, invoice, override_cap)
    try:
        report, audit_id = backfill_job.referral(runtime.load(), request, apply=apply)
    except backfill_job.Refused as exc:
        _refuse(f"refused: {exc}")
    except stripe.StripeError as exc:
        _refuse(f"Stripe could not be read: {type(exc).__name__}: {exc.user_message or exc}")
    if as_json:
        print_json({**report.as_dict(), "audit_id": audit_id})
        return
    _print_backfill(report, audit_id)


@rollover_app.command("extend")
def rollover_extend(
    account: Annotated[str, typer.Argument(help="Account id or Stripe customer id.")],
    until: Annotated[
        datetime, typer.Option(help="Keep what the next renewal would cut until then (UTC unless an offset is given).")
    ],
    reason: Reason,
    actor: Actor,
    ticket: Ticket = None,
    force: Annotated[bool, typer.Option("--force", help="Grant another although the account had one.")] = False,
) -> None:
    """Grant the one-time rollover extension: the next renewal keeps what it would cut, until --until."""
    until = aware_utc(until)
    with runtime.load().uow() as uow:
        acct = accounts.get(uow, account)
        try:
            replaced = rollover.extend(uow, acct, until, force=force, now=utcnow())
        except rollover.ExtensionRefused as exc:
            _refuse(f"refused: {exc}")
        audit.record(
            uow,
            actor=actor,
            action="rollover.extend",
            reason=reason,
            account=acct,
            ticket=ticket,
            details={
                "until": until.isoformat(),
                "replaced": replaced.isoformat() if replaced else None,
                "extensions": acct.rollover_extensions,
                "force": force,
            },
        )
        uow.commit()
    out.print(
        f"{acct.public_id}: the next renewal keeps what it would cut until {until:%Y-%m-%d %H:%M} UTC "
        f"(extension {acct.rollover_extensions})"
    )


def audit_trail(
    account: Annotated[str | None, typer.Argument(help="Only this account (account id or Stripe customer id).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest rows to show.")] = 50,
    as_json: AsJson = False,
) -> None:
    """Show the audit trail of support actions, newest first."""
    with runtime.load().uow() as uow:
        acct = accounts.get(uow, account) if account else None
        rows = [audit.view(uow, entry) for entry in audit.listing(uow, acct, limit)]
    if as_json:
        print_json({"entries": rows})
        return
    table = Table("id", "when (UTC)", "actor", "action", "account", "ticket", title="audit trail")
    table.add_column("reason", overflow="fold")
    table.add_column("what changed", overflow="fold")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["at"][:16].replace("T", " "),
            r["actor"],
            r["action"],
            r["account_id"] or "-",
            r["ticket"] or "-",
            r["reason"],
            _changes(r["details"]),
        )
    out.print(table)


@referrals_app.command("list")
def referrals_list(
    status: Annotated[referrals.Status | None, typer.Option(help="Only referrals in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Oldest rows to show.")] = 100,
    as_json: AsJson = False,
) -> None:
    """List referrals, oldest first: the held wait for `credits referrals release`, the rejected say why."""
    with runtime.load().uow() as uow:
        rows = referrals.listing(uow, status, limit)
    if as_json:
        print_json({"referrals": rows})
        return
    table = Table("id", "status", "referrer", "referee", "paid", "qualified (UTC)", title="referrals")
    table.add_column("reason", overflow="fold")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["status"],
            r["referrer_account_id"],
            r["referee_account_id"],
            ", ".join(r["paid_sides"]) or "-",
            (r["qualified_at"] or "-")[:16].replace("T", " "),
            r["reason"] or "",
        )
    out.print(table)


@referrals_app.command("release")
def referrals_release(
    referral: Annotated[int, typer.Argument(help="The referral's id (`credits referrals list --status held`).")],
    reason: Reason,
    actor: Actor,
    ticket: Ticket = None,
    as_json: AsJson = False,
) -> None:
    """Pay a held referral's unpaid side past the referrer's monthly cap, once; audited. Exit 1 unless paid."""
    rt = runtime.load()
    with rt.uow() as uow:
        try:
            released = referrals.release(
                uow, rt.catalogue, referral, utcnow(), actor=actor, reason=reason, ticket=ticket
            )
        except referrals.ReleaseRefused as exc:
            _refuse(f"refused: {exc}")
        view = referrals.describe(uow, released.referral)
        uow.commit()
    if as_json:
        print_json({**view, "audit_id": released.audit_id})
    elif released.audit_id is not None:
        out.print(f"referral {referral}: paid; paid: {', '.join(view['paid_sides'])} (audit {released.audit_id})")
    if released.audit_id is None:
        _refuse(f"referral {referral} not paid: {view['reason']}")


@jobs_app.command("refill-free")
def refill_free(
    month: Annotated[
        str | None, typer.Option(help="YYYY-MM; the current month (UTC) if omitted.", callback=_month)
    ] = None,
) -> None:
    """Grant the monthly free allowance to every account without a paid plan; safe twice, safe late."""
    rt = runtime.load()
    month = month or refill_job.month_of(utcnow())
    if rt.catalogue.free.credits == 0:
        out.print("the free allowance is 0 credits: nothing to do")
        return
    counts = refill_job.run(
        rt,
        month,
        track=lambda ids: track(ids, description=f"free allowance {month}", console=out, disable=not out.is_terminal),
    )
    skipped = counts["skipped (paid plan)"]
    out.print(
        f"free allowance {month}: {counts['granted']} granted, {counts['already granted']} already granted"
        + (f", {skipped} skipped (subscribed meanwhile)" if skipped else "")
    )


def _print_backfill(report: backfill_job.Report, audit_id: int | None) -> None:
    referral = f"referral {report.referral}" if report.referral is not None else "a new referral"
    heading = "applied" if report.applied else "dry run — nothing written; add --apply to do it"
    out.print(f"backfill referral ({heading})", style="bold")
    out.print(
        f"attribution: {report.attribution} — {referral}, {report.referee.account} referred by "
        f"{report.referrer.account}; status {report.status}"
        + (f" ({report.status_reason})" if report.status_reason else "")
    )
    if report.invoice is None:
        out.print("qualifying invoice: none yet — the payouts follow the referee's first qualifying invoice")
    else:
        fed = (
            f"; {'fed' if report.applied else 'to be fed'} through the inbox as {report.fed_event}"
            if report.fed_event
            else ""
        )
        out.print(f"qualifying invoice: {report.invoice} (found in {report.invoice_found_in}){fed}")
    table = Table("side", "account", "payout", "balance before", "balance after")
    for side, party in (("referrer", report.referrer), ("referee", report.referee)):
        table.add_row(
            side, party.account, _payout(party, report.applied), str(party.balance_before), str(party.balance_after)
        )
    out.print(table)
    if not report.changed:
        out.print(f"nothing changed: {_why_unchanged(report)}")
    elif report.created:
        out.print(
            ("ledger entries written: " if report.applied else "ledger entries it would write: ")
            + ", ".join(report.created)
        )
    else:
        out.print(
            f"{'attribution recorded' if report.applied else 'it would record the attribution'}; no ledger entries: "
            + _why_unchanged(report)
        )
    if audit_id is not None:
        out.print(f"audit row {audit_id}")


def _payout(party: backfill_job.Party, applied: bool) -> str:
    if party.outcome == "paid":
        return f"{'paid' if applied else 'will pay'} {party.credits}"
    if party.outcome == "held":
        return f"held by the monthly cap ({party.credits}; --override-cap pays it)"
    return party.outcome


def _why_unchanged(report: backfill_job.Report) -> str:
    outcomes = {report.referee.outcome, report.referrer.outcome}
    if "held" in outcomes:
        return "the referrer is held by the monthly cap (--override-cap pays it)"
    if outcomes <= {"already paid", "no payout"}:
        return "everything due was already paid"
    return "nothing is due yet"


def _changes(details: dict[str, Any]) -> str:
    """One line for the table: the ledger keys an action created, else its plain facts."""
    if "created" in details:
        return ", ".join(details["created"]) or ("no ledger entries" if details.get("changed") else "nothing changed")
    return ", ".join(f"{key}={value}" for key, value in details.items() if not isinstance(value, dict | list))


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (what `--json` prints)."""
    typer.echo(json.dumps(data, indent=2, default=str))


def _refuse(message: str) -> NoReturn:
    err.print(message)
    raise typer.Exit(1)
