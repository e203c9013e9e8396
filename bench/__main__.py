"""`python -m bench` (what `make bench` runs): the four benchmarks, one after the other, then bench/README.md
rewritten with their tables. `--json OUT` saves the raw results; an earlier run's (bench/baseline.json, or
`--baseline FILE`) are shown beside them, to compare two commits measured on the same machine;
`--from-json RUN.json` rewrites the README from a saved run without measuring anything.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import e2e, harness, ingest, reconcile, spend
from bench.harness import Rows, table

BENCHMARKS: dict[str, tuple[ModuleType, str]] = {
    "ingest": (ingest, "Ingest: `POST /webhooks/stripe`"),
    "e2e": (e2e, "End to end: delivered, processed, every balance checked"),
    "spend": (spend, "Spend: `POST /v1/accounts/{id}/spend`"),
    "reconcile": (reconcile, "Reconcile: `credits reconcile` against a fake Stripe"),
}
SMOKE = {
    "ingest": ["--events", "300", "--rounds", "1", "--warmup", "20"],
    "e2e": ["--events", "1500", "--months", "2"],
    "spend": ["--accounts", "50", "--seconds", "2", "--rounds", "1", "--history", "1000"],
    "reconcile": ["--sizes", "1000,2000"],
}
README, BASELINE = Path(__file__).with_name("README.md"), Path(__file__).with_name("baseline.json")
MECHANISMS = Path(__file__).with_name("mechanisms.md")  # measured by hand, variant against variant: not rerun

HOW = """## How the figures were produced

- Everything runs on this machine against 127.0.0.1: a throwaway database `credits_bench_<random>` on
  127.0.0.1:5432 (created from the `test` database as `root`, migrated with `credits migrate`, dropped at the
  end), and processes that are all stopped at the end, error or not.
- The service is the checkout's own command, `<checkout>/.venv/bin/credits`, with `CREDITS_CONFIG` its
  credits.toml, `LOG_FORMAT=json`, `LOG_LEVEL=warning`, fresh tokens and webhook secret, and `STRIPE_API_BASE`
  on 127.0.0.1 (nothing leaves the machine): `credits serve` with `SERVE_WORKER=false` (the processing is
  the workers', as in production) and `--workers N` `credits worker` processes; `--env KEY=VALUE` passes a
  setting to all of them. The harness imports nothing of the service's: it builds and signs the Stripe
  events itself (bench/events.py) and reads results from PostgreSQL.
- The harness starts each worker process at niceness 10, every process it starts in its own session (Linux's
  autogroup shares the CPU between sessions first; a niceness counts within one): on two cores shared by the
  API, the workers,
  PostgreSQL and the load generator, that stands in for the API having cores of its own in production.
- Load generators: aiohttp in the harness's process (closed loop, 32 connections, each answer before the
  next request), and for ingest also wrk (16 connections, bench/wrk.lua over pre-signed events, each thread
  its own share, none repeated), which costs the machine far less CPU. Targets take turns (A B A B), so a
  drift in the machine's load hits both alike; compare ratios, measured in the same run, not absolute figures.
- References: the minimal webhook handler and the bare ASGI floor (bench/servers.py, uvicorn like the
  service); pgbench (`-c 32 -j 2`) doing the same row writes per event on bench/pgbench_e2e.sql's tables, or
  the spend's transaction in SQL (bench/pgbench_spend.sql) on the service's own tables; for reconcile its
  smallest size and the memory of merely starting the command. Reconcile's database is written by
  bench/reconcile_seed.sql, its Stripe served by bench/fake_stripe.py.
"""


def ratio_of(rows: Rows, figure: str) -> float | None:
    found = next((r["ratio"] for r in rows if r["figure"] == figure), None)
    return found if isinstance(found, float | int) else None


def checks(rows: dict[str, list[dict[str, Any]]], baseline: dict[str, list[dict[str, Any]]] | None) -> str:
    """The issue's two acceptance figures, as a table."""
    lines = ["| check | value | met |", "|---|---|---|"]
    if "ingest" in rows:
        closed = ratio_of(rows["ingest"], "accepted/s, aiohttp closed loop, 32 connections")
        wrk = ratio_of(rows["ingest"], "accepted/s, wrk, 16 connections, no event repeats")
        lines.append(
            f"| ingest ≥ 2× the minimal handler (aiohttp closed loop, as in earlier runs) | {closed}× (wrk: {wrk}×) "
            f"| {'yes' if closed and closed >= 2 else '**no**'} |"
        )
    if "e2e" in rows and baseline and "e2e" in baseline:
        figure = "events/s, first delivery → last balance final"
        now, before = ratio_of(rows["e2e"], figure), ratio_of(baseline["e2e"], figure)
        if now and before:
            change = now / before - 1
            lines.append(
                f"| end to end within 15 % of the baseline's ratio to pgbench | {now}× against {before}× "
                f"({change:+.0%}) | {'yes' if abs(change) <= 0.15 else '**no**'} |"
            )
    return "\n".join(lines)


def readme(run: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    m = run["machine"]
    out = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`.venv/bin/python -m bench`), which runs the benchmarks below and rewrites this "
        "file; its paragraphs are in bench/*.py, and its section on the mechanisms is bench/mechanisms.md, copied "
        "as it is (measured by hand, variant against variant). Each benchmark also runs alone and prints its table, "
        "e.g. "
        "`.venv/bin/python -m bench.ingest --checkout DIR`. To show another commit beside this one, measure it on the "
        "same machine first: `.venv/bin/python -m bench --checkout DIR --json bench/baseline.json --no-readme` (for "
        "31e863c add `--workers 1 --env WORKER_PROCESSES=2 --env WORKER_NICE=0`: its `credits worker` supervises "
        "two processes itself), then `make bench`; `--baseline FILE` names another file.",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), PostgreSQL {m['postgresql']}, Python {m['python']}; run of "
        f"{m['date']} (load average before it {m['loadavg']}), commit {m['commit']}, `{run['options'] or 'defaults'}`.",
    ]
    label = None
    if baseline:
        b = baseline["machine"]
        label = f"old {b['commit'].split()[0]}"
        same = (b["cores"], b["cpu"]) == (m["cores"], m["cpu"])
        out.append(
            f"Baseline (columns “{label}”): commit {b['commit']}, run of {b['date']}, "
            f"`{baseline['options'] or 'defaults'}`"
            + (
                ", on the same machine."
                if same
                else f" — **another machine** ({b['cores']} cores, {b['cpu']}): rerun it here."
            )
        )
    rows = {name: got["rows"] for name, got in run["benchmarks"].items()}
    old = {name: got["rows"] for name, got in baseline["benchmarks"].items()} if baseline else None
    out += ["", "## Checks", "", checks(rows, old), "", HOW, MECHANISMS.read_text()]
    for name, got in run["benchmarks"].items():
        module, title = BENCHMARKS[name]
        out += [
            f"## {title}",
            "",
            " ".join((module.__doc__ or "").split("\n\n")[0].split()),
            "",
            table(got["rows"], (old or {}).get(name), label or ""),
            "",
            "**What limits it.** " + " ".join(module.LIMITS.split()),
            "",
        ]
    return "\n".join(out)


def main() -> None:
    parser = harness.arguments("python -m bench", __doc__)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated, of: " + ", ".join(BENCHMARKS))
    parser.add_argument(
        "--baseline",
        type=Path,
        default=BASELINE if BASELINE.exists() else None,
        help="an earlier run's --json, shown beside this one (default: bench/baseline.json when it exists)",
    )
    parser.add_argument("--from-json", type=Path, help="measure nothing: the README from this saved run")
    parser.add_argument("--no-readme", action="store_true", help="print the tables, leave bench/README.md alone")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does everything run?")
    args = parser.parse_args()
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if args.from_json:
        run = json.loads(args.from_json.read_text())
    else:
        options = ["--workers", str(args.workers), *[part for pair in args.env for part in ("--env", pair)]]
        options = ([] if args.checkout.resolve() == harness.ROOT else ["--checkout", str(args.checkout)]) + options
        common = ["--checkout", str(args.checkout), "--admin-url", args.admin_url, *options]
        run = {
            "machine": harness.machine(args.admin_url, args.checkout.resolve()),
            "benchmarks": {},
            "options": shlex.join(options),
        }
        for name in args.only.split(","):
            module = BENCHMARKS[name][0]
            results = module.run(module.parse(common + (SMOKE[name] if args.smoke else [])))
            run["benchmarks"][name] = {"results": results, "rows": module.rows(results)}
            print(f"\n## {name}\n\n" + table(run["benchmarks"][name]["rows"]), flush=True)
            if args.json:  # after each benchmark: a later failure keeps the earlier results
                args.json.write_text(json.dumps(run, indent=1, default=str))
    if not args.no_readme and not args.smoke:
        README.write_text(readme(run, baseline))
        print(f"[bench] wrote {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
