"""The end-to-end benchmark: `python -m bench.e2e [--events 20000] [--months 3] [--max-seconds 180] …`.

1. a fresh PostgreSQL database, migrated (bench/ingest/run.py's helpers), and the service as deploy/compose.yaml
   runs it on one host: the API (bench/ingest/server.py, one uvicorn worker, processing what it receives on
   its inline threads) and one `credits worker` beside it, same environment;
2. the mix (bench/e2e/mix.py): signups, first invoices, renewals, packs and referrals over `--months`
   billing months; the referrers' codes are made through the API (`POST /v1/accounts/{id}/referral-code`)
   before the clock starts, as a referrer has its link before sharing it;
3. the load generator (bench/e2e/loadgen.py, its own process) delivers the months one after the other, each
   once the previous is processed; the clock runs from its first delivery to the last event's processing
   (the inbox's `processed_at`);
4. the service is stopped, and PostgreSQL's counters give the row writes per event;
5. verification: every event processed, every balance equal to what the catalogue says the mix must give,
   `credits check` passes;
6. pgbench doing as many row writes per event, with as many clients as accounts in flight — the reference;
7. when py-spy is installed, steps 1–5 again with PROFILE_EVENTS events and py-spy sampling the worker's
   processes: the profile, and that run's rate under the sampler (py-spy's CPU is taken from the same 2 cores,
   so the figures come from the run without it).

Every child process is stopped in a `finally`; the database is dropped; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import invocation
from bench.e2e import budget, mix, report, verify, writes
from bench.e2e import profile as worker_profile
from bench.e2e.events import Builder
from bench.ingest import run as harness
from bench.ingest.loadgen import proc_cpu
from bench.ingest.profile import find_py_spy
from service.catalogue import load as load_catalogue

PROFILE_EVENTS = 8_000  # the profiled run's: thousands of samples, shares to a percent
STATS_SETTLE_SECONDS = 1.5  # backends report their write counters at most once a second when idle
PGBENCH_MAX_TRANSACTIONS = 10_000  # the reference rate needs no more; keeps the run within its budget


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--events", type=int, default=20_000, help="events to deliver (at least; default 20000)")
    parser.add_argument("--months", type=int, default=3, help="billing months the mix spans (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="the mix's random seed")
    parser.add_argument("-c", "--concurrency", type=int, default=32,
                        help="accounts in flight at the load generator, and pgbench's clients (default 32)")
    parser.add_argument("--max-seconds", type=float, default=150.0,
                        help="no delivery starts later than this after the first (default 150 s)")
    parser.add_argument("--drain-seconds", type=float, default=45.0,
                        help="how much longer the inbox may take to settle (default 45 s)")
    parser.add_argument("--max-backlog", type=int, default=1000,
                        help="the load generator holds back while this many events are unsettled (default 1000)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="py-spy the worker during the run (when py-spy is installed)")
    parser.add_argument("--log-level", default="warning", help="structlog level of the API process (default warning)")
    parser.add_argument("--admin-url", default=harness.DEFAULT_ADMIN_URL,
                        help="PostgreSQL URL used to create/drop the bench database (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.events <= 200_000 or not 1 <= args.months <= 12 or not 0 < args.concurrency <= 256:
        parser.error("events, months or concurrency out of range")
    if not 0 < args.max_seconds <= 270 or not 0 <= args.drain_seconds <= 600:
        parser.error("durations out of range")
    return args


def referral_codes(api: str, token: str, prefix: str, referrers: list[mix.Account]) -> dict[str, str]:
    """Each referrer's code, made through the API (account key → code)."""
    codes = {}
    for account in referrers:
        request = urllib.request.Request(
            f"{api}/v1/accounts/acct_{prefix}{account.key}/referral-code", data=b"{}", method="POST",
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"bench-{prefix}{account.key}",
                     "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            codes[account.key] = json.loads(response.read())["code"]
    return codes


def delivered(load: dict[str, Any]) -> dict[int, set[str]]:
    """Month → the account keys whose chain was answered in full."""
    return {month["month"]: set(month["completed"]) for month in load["months"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The measured run, then (py-spy installed, --profile) the profiled one; the figures are the first's."""
    clock = time.monotonic()
    results = measure(args, clock, profile=False)
    if args.profile and find_py_spy():
        invocation.progress("bench.e2e", clock)(f"again with py-spy on the worker, {min(args.events, PROFILE_EVENTS)} events …")
        profiled = measure(argparse.Namespace(**{**vars(args), "events": min(args.events, PROFILE_EVENTS)}), clock,
                           profile=True)
        results["profile"] = profiled.get("profile")
        results["profile_run"] = {"events": profiled["inbox"]["rows"], "events_per_s": report.derive(profiled)["events_per_s"],
                                  "cpu": profiled["cpu"], "balances_equal": profiled["balances"].get("equal")}
    return invocation.finished(results, clock, report)


def measure(args: argparse.Namespace, clock: float, *, profile: bool) -> dict[str, Any]:
    """Steps 1–6 of the docstring, with py-spy on the worker's processes when `profile`."""
    admin = harness.conninfo(args.admin_url)
    with harness.staged(admin, "credits-bench-e2e-") as stage:
        workdir, children = stage.workdir, stage.children
        results: dict[str, Any] = invocation.header(args, parse, "bench.e2e", workdir)
        say = invocation.progress("bench.e2e", clock)
        results["machine"] = harness.machine(admin)
        results["machine"]["cpu_busy_before_start"] = harness.idle_cpu()
        db, url = stage.database()
        dbname = db["dbname"]
        harness.migrate(url)
        env = harness.service_env(url)
        catalogue = load_catalogue(Path(env["CREDITS_CONFIG"]))
        mix.check_catalogue(catalogue)
        plan = mix.plan(args.events, args.months, args.seed)
        results["mix"] = {"events": plan.events, "accounts": len(plan.accounts), **plan.counts()}  # types, shape

        api, hook = harness.start_server("service", "bench.ingest.server", ["--log-level", args.log_level], "/readyz",
                                         env, workdir, children)
        worker = harness.start_service_worker("worker", env, workdir, children)
        results["servers"] = {"service": harness.shown([harness.PYTHON, "-m", "bench.ingest.server", "--port", "PORT",
                                                        "--log-level", args.log_level]),
                              "worker": harness.shown([str(harness.CREDITS), "worker"])}
        prefix = f"{secrets.token_hex(2)}x"
        say(f"{plan.events} events for {len(plan.accounts)} accounts over {args.months} months; "
            f"{len(plan.referrers)} referral codes through the API …")
        codes_file = workdir / "codes.json"
        codes_file.write_text(json.dumps(referral_codes(hook.removesuffix("/webhooks/stripe"), env["CREDITS_API_TOKEN"],
                                                        prefix, plan.referrers)))
        time.sleep(STATS_SETTLE_SECONDS)
        before = writes.snapshot(db)
        cpu_before, server = {"api": api.cpu(), "worker": worker.cpu()}, budget.postmaster(db)

        command = [harness.PYTHON, "-m", "bench.e2e.loadgen", "--target", hook, "--pid", str(api.pid),
                   "--database-url", f"postgresql://{db['user']}@{db['host']}:{db['port']}/{dbname}",
                   "--codes", str(codes_file), "--prefix", prefix, "--events", str(args.events),
                   "--months", str(args.months), "--seed", str(args.seed), "--concurrency", str(args.concurrency),
                   "--max-seconds", str(args.max_seconds), "--drain-seconds", str(args.drain_seconds),
                   "--max-backlog", str(args.max_backlog)]
        say(f"delivering, {args.concurrency} accounts in flight, at most {args.max_seconds:g} s "
            f"(+{args.drain_seconds:g} s to settle) …")
        with ExitStack() as stack:
            rec = (stack.enter_context(worker_profile.recorder(worker.pid, workdir / "worker.pyspy.txt"))
                   if profile else None)
            with budget.Budget(server) as spent:
                done = subprocess.run(command, cwd=harness.ROOT, env=env, capture_output=True, text=True,
                                      timeout=args.max_seconds + args.drain_seconds + 120, check=False)
            spy_cpu = proc_cpu(rec.process.pid) if rec and rec.process else None
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-2000:]}")
        load = json.loads(done.stdout.strip().splitlines()[-1])
        load["command"] = "STRIPE_WEBHOOK_SECRET=… " + harness.shown(command).replace(str(workdir), "$WORKDIR")
        results["load"] = load
        results["cpu"] = {"api_seconds": round(api.cpu() - cpu_before["api"], 2),
                          "worker_seconds": round(worker.cpu() - cpu_before["worker"], 2),
                          "worker_processed": harness.log_events(worker)[0],
                          "py_spy_seconds": round(sum(spy_cpu), 2) if spy_cpu else None, **spent.result()}
        if rec:
            results["profile"] = worker_profile.summarise(rec)
        say("stopping the service; counting row writes; verifying …")
        for child in (api, worker):
            child.stop()  # their backends exit, which reports their last write counters
        time.sleep(STATS_SETTLE_SECONDS)
        results["inbox"] = verify.inbox(db)
        results["writes"] = writes.delta(before, writes.snapshot(db), results["inbox"]["rows"])
        unsettled = sum(results["inbox"]["statuses"].get(s, 0) for s in ("pending", "failed"))
        if unsettled:  # what those events would still change is unknown: comparing would only list them
            results["balances"] = {"skipped": f"{unsettled} events not final", "equal": None}
        else:
            expected = mix.expected_balances(plan, catalogue, delivered(load))
            results["balances"] = verify.balances(db, {f"acct_{prefix}{key}": n for key, n in expected.items()})
        results["ledger"] = verify.ledger(db)
        results["check"] = verify.credits_check(harness.CREDITS, env, harness.ROOT)

        if profile:  # the reference is the measured run's
            return results
        transactions = min(results["inbox"]["rows"], PGBENCH_MAX_TRANSACTIONS)
        say(f"pgbench, {transactions} transactions of {results['writes']['writes_per_event']} row writes …")
        sample = next(c for c in plan.chains(1) if c.invoice)
        payload = Builder(prefix, {}, args.months).bodies(sample)[mix.SIGNUP.index("invoice.paid")]  # a typical body
        results["pgbench"] = writes.reference(db, workdir, payload, results["writes"], transactions, args.concurrency,
                                              server)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return invocation.main(argv, parse, run, report)
