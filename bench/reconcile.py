"""Reconcile: `credits reconcile --since … --until …` (the default 3-day window, without `--fix`) over 10k, 50k
and 100k paid invoices and their `invoice.paid` events, served by a fake Stripe (bench/fake_stripe.py,
STRIPE_API_BASE pointing at it). Each size starts from a fresh database holding what the service keeps after
processing those webhooks (accounts, processed inbox events with their payloads, payments, plan grants and
their entries, paid referrals), written by PostgreSQL from the dataset's rules and analysed, not measured.
Wall seconds, CPU seconds and peak RSS of the `credits` process; its findings must be exactly the planted ones.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench import events
from bench.fake_stripe import PERIOD, SPAN, T_END, T_PAID, Dataset
from bench.harness import ROOT, Rows, Run, arguments, command_of, free_port, num, ratio, row, standalone, wait_http

LIMITS = """Reconcile pages through Stripe's lists of events and invoices (and the window's new customers and
Checkout sessions) and checks each page against the database with one query per table, so its time grows
with the number of invoices and most of its CPU is decoding Stripe's pretty-printed JSON pages; its memory
stays at what importing the command costs plus a page or two. Against the real Stripe every page is also a
network round trip, which this local fake does not show."""

SEED = Path(__file__).with_name("reconcile_seed.sql")


def seed(db: str, data: Dataset) -> None:
    """What the service holds had it processed every delivered invoice's webhook, written by PostgreSQL itself
    from the dataset's rules (bench/fake_stripe.py), then analysed as autovacuum would have."""
    templates = {
        "first": data._templates[1][True],
        "renewal": data._templates[1][False],
        "tag": events.TAG,
        "t_paid": str(T_PAID),
        "t_end": str(T_END),
    }
    with psycopg.connect(db) as conn:
        text = "\n".join(line for line in SEED.read_text().splitlines() if not line.startswith("--"))
        for statement in filter(
            str.strip, text.format(n=data.count, newest=data.newest, span=SPAN, period=PERIOD).split(";")
        ):
            conn.execute(statement, templates)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def timed(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run to completion: wall seconds, CPU seconds (wait4) and peak RSS. The peak is the child's VmHWM, read
    every 20 ms: `ru_maxrss` would count what the child inherited from this process at fork."""
    started, peak = time.monotonic(), 0
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        while time.monotonic() - started < 900:
            with suppress(OSError), open(f"/proc/{process.pid}/status") as status:
                peak = max([peak] + [int(line.split()[1]) for line in status if line.startswith("VmHWM:")])
            reaped, code, usage = os.wait4(process.pid, os.WNOHANG)
            if reaped:
                process.returncode = os.waitstatus_to_exitcode(code)  # reaped here, not by Popen
                return {
                    "exit": process.returncode,
                    "seconds": round(time.monotonic() - started, 2),
                    "cpu": round(usage.ru_utime + usage.ru_stime, 2),
                    "rss_mb": round(peak * 1024 / 1e6, 1),
                }
            time.sleep(0.02)
        raise TimeoutError(f"{shlex.join(command)} ran longer than 900 s")
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()


def parse(argv: list[str] | None = None) -> Any:
    parser = arguments("python -m bench.reconcile", __doc__)
    parser.add_argument("--sizes", default="10000,50000,100000", help="invoices per run, comma-separated")
    return parser.parse_args(argv)


def run(args: Any) -> dict[str, Any]:
    with Run(args, "reconcile") as bench:
        help_env = bench.env("postgresql://root@127.0.0.1:9/none")
        results: dict[str, Any] = {
            "command": command_of("bench.reconcile", args, parse),
            "import": timed([str(bench.credits), "--help"], help_env, bench.workdir / "help.log"),
            "sizes": [],
        }
        for count in (int(size) for size in args.sizes.split(",")):
            now = datetime.now(UTC).replace(microsecond=0)
            since = now - timedelta(days=3)
            data = Dataset(
                count, int((now - timedelta(minutes=10)).timestamp())
            )  # older than reconcile's 5-minute grace
            db = bench.database()
            clock = time.monotonic()
            seed(db, data)
            bench.say(f"{count:,}: seeded in {time.monotonic() - clock:.1f} s")
            port = free_port()
            fake = bench.start(
                f"fake_stripe_{count}",
                [
                    sys.executable,
                    "-m",
                    "bench.fake_stripe",
                    "--port",
                    str(port),
                    "--count",
                    str(count),
                    "--newest",
                    str(data.newest),
                ],
                {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
            )
            wait_http(fake, f"http://127.0.0.1:{port}/ready")
            output = bench.workdir / f"reconcile_{count}.json"
            env = bench.env(db, STRIPE_API_BASE=f"http://127.0.0.1:{port}")
            timing = timed(
                [
                    str(bench.credits),
                    "reconcile",
                    "--since",
                    since.isoformat(),
                    "--until",
                    now.isoformat(),
                    "--format",
                    "json",
                    "--output",
                    str(output),
                ],
                env,
                bench.workdir / f"reconcile_{count}.log",
            )
            fake.stop()
            summary = json.loads(output.read_text()).get("summary", {}) if output.exists() else {}
            found = summary.get("remaining_by_kind") or {}
            results["sizes"].append(
                {
                    "count": count,
                    **timing,
                    "found": found,
                    "expected": data.expected(),
                    "as_expected": found == data.expected() and timing["exit"] == 1,
                }
            )
            bench.say(
                f"{count:,}: reconcile {timing['seconds']} s, peak RSS {timing['rss_mb']} MB, exit {timing['exit']}"
            )
        return results


def rows(r: dict[str, Any]) -> Rows:
    command, smallest, out = r["command"], r["sizes"][0], []
    per10k = lambda s: s["seconds"] * 10_000 / s["count"]  # noqa: E731
    for s in r["sizes"]:
        n = f"{s['count']:,}"
        out += [
            row(
                f"{n} invoices: seconds (CPU seconds)",
                f"{num(s['seconds'], ' s')} ({num(s['cpu'], ' s')})",
                "",
                None,
                command,
            ),
            row(
                f"{n} invoices: seconds per 10k (linearity)",
                num(per10k(s), " s"),
                f"at {smallest['count']:,}: {num(per10k(smallest), ' s')}",
                ratio(per10k(s), per10k(smallest)),
                command,
            ),
            row(
                f"{n} invoices: peak RSS",
                num(s["rss_mb"], " MB"),
                f"`credits --help` {num(r['import']['rss_mb'], ' MB')}",
                ratio(s["rss_mb"], r["import"]["rss_mb"]),
                command,
            ),
            row(
                f"{n} invoices: findings (exit {s['exit']})",
                ", ".join(f"{k} {v}" for k, v in sorted(s["found"].items())) or "none",
                "planted: " + ", ".join(f"{k} {v}" for k, v in sorted(s["expected"].items())),
                "as planted" if s["as_expected"] else "**different**",
                command,
            ),
        ]
    return out


if __name__ == "__main__":
    standalone(parse, run, rows)
