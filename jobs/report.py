"""A reconciliation report in three forms: a rich table for a person, JSON for machines, Markdown for a
ticket or a chat message."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from jobs.reconcile import Report

FORMATS = ("text", "json", "markdown")


def as_json(report: Report) -> str:
    return json.dumps({"findings": [f.view() for f in report.found], "summary": report.summary()}, indent=2)


def as_markdown(report: Report) -> str:
    summary = report.summary()
    lines = [
        f"## Credits reconciliation {summary['since'][:16]} → {summary['until'][:16]}",
        "",
        f"{summary['found']} finding(s), {summary['fixed']} fixed, **{summary['remaining']} remaining**, "
        f"{summary['credits_at_stake']} credits at stake (run {summary['run_id']}).",
    ]
    if report.found:
        lines += [
            "",
            "| status | kind | subject | accounts | credits | detail | action |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in report.found:
            row = [
                "fixed" if f.fixed else "open",
                f.kind,
                f"`{f.subject}`",
                ", ".join(f.accounts),
                str(f.credits),
                f.detail,
                f.action,
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def print_table(report: Report, console: Console) -> None:
    summary = report.summary()
    title = (
        f"reconciliation {summary['since'][:16]} → {summary['until'][:16]}: {summary['found']} found, "
        f"{summary['fixed']} fixed, {summary['remaining']} remaining"
    )
    table = Table("status", "kind", "subject", "accounts", "credits", "detail", "action", title=title)
    for f in report.found:
        status = "[green]fixed[/green]" if f.fixed else "[red]open[/red]"
        table.add_row(status, f.kind, f.subject, ", ".join(f.accounts), str(f.credits), f.detail, f.action)
    console.print(table if report.found else f"{title} — clean")
