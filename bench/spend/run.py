"""The spend benchmark, end to end: `python -m bench.spend [--seconds S] [--rounds R] [-c C] …`.

1. a fresh PostgreSQL database (`credits_bench_<random>`), migrated to head, dropped at the end (the ingest
   benchmark's helpers); 1,000 accounts with credits, one hot account, and one account with little, seeded
   in SQL, with 100,000 earlier requests' stored outcomes and planner statistics (bench/spend/seed.py, not
   measured);
2. the real service in its own process (bench/ingest/server.py: uvicorn, one worker, logs at WARNING), and a
   count of the SQL statements one spend sends (bench/spend/statements.py, the app in a process of its own);
3. across accounts, then on the hot account: the load generator (bench/spend/loadgen.py, its own process;
   closed loop, C connections, distinct Idempotency-Keys) posts spends for S seconds, then pgbench runs the
   same transaction in SQL for S seconds (bench/spend/pgbench.py) — the database's own limit — taking turns
   R times, so drifts in the machine's load hit both alike;
4. the race: C connections send twice as many spends as the account with little can pay for;
5. a py-spy profile of the service under the across-accounts load (a phase of its own, not a figure);
6. zero overdraft (bench/spend/checks.py): the ledger agrees with every answer, 402s spent nothing, no balance
   below zero, and `credits check` passes.

Every child process is stopped in a `finally`; every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from bench import invocation
from bench.ingest import profile
from bench.ingest.run import (
    DEFAULT_ADMIN_URL,
    PYTHON,
    ROOT,
    Child,
    conninfo,
    free_port,
    idle_cpu,
    machine,
    migrate,
    service_env,
    shown,
    staged,
    wait_listening,
)
from bench.spend import checks, pgbench, report, seed
from bench.spend import profile as spend_profile

# Seeded accounts: the load generator and pgbench name and pick them the same way (PREFIX + 4 digits).
ACROSS, HOT, RACE = "acct-", "hot-", "race-"
PLENTY = 10_000_000  # credits per account: no spend of the measured phases can run short
HISTORY = 100_000  # earlier API requests already stored (seed.history)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.spend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1000, help="accounts the across-accounts phase spends from")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="connections (and pgbench clients)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each measured turn (service or pgbench)")
    parser.add_argument("--rounds", type=int, default=2, help="service and pgbench take turns this many times")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="unmeasured load before each service turn")
    parser.add_argument("--amount", type=int, default=1, help="credits per spend")
    parser.add_argument("--race-credits", type=int, default=100, help="credits of the account the race drains")
    parser.add_argument("--profile-seconds", type=float, default=8.0, help="py-spy phase (0: none)")
    parser.add_argument("--admin-url", default=os.environ.get("BENCH_ADMIN_DATABASE_URL", DEFAULT_ADMIN_URL),
                        help="PostgreSQL URL used to create/drop the bench database (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.accounts <= 10_000 or not 0 < args.concurrency <= 256 or not 0 < args.amount:
        parser.error("accounts, concurrency or amount out of range")
    if not 0 < args.seconds <= 60 or not 1 <= args.rounds <= 5 or not 0 <= args.profile_seconds <= 60:
        parser.error("durations out of range")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = time.monotonic()
    admin = conninfo(args.admin_url)
    with staged(admin, "credits-bench-spend-") as stage:
        workdir, children = stage.workdir, stage.children
        results: dict[str, Any] = invocation.header(args, parse, "bench.spend", workdir)
        say = invocation.progress("bench.spend", clock)
        results["machine"] = {**machine(admin), "cpu_busy_before_start": idle_cpu()}
        db, url = stage.database()
        dbname = db["dbname"]
        migrate(url)
        results["database"] = dbname
        say(f"seeding {args.accounts} accounts, a hot one and a race one in {dbname} …")
        across_ids = seed.seed(db, ACROSS, args.accounts, PLENTY)
        hot_ids = seed.seed(db, HOT, 1, PLENTY)
        seed.seed(db, RACE, 1, args.race_credits)
        seed.history(db, HISTORY)
        env = service_env(url)

        port = free_port()
        server_command = [PYTHON, "-m", "bench.ingest.server", "--port", str(port), "--log-level", "warning"]
        server = Child("service", server_command, env, workdir)
        children.append(server)
        wait_listening(server, port, "/readyz")
        base = f"http://127.0.0.1:{port}"
        results["server"] = shown([*server_command[:4], "PORT", *server_command[5:]])

        say("counting the SQL statements of one spend …")
        results["statements"] = _json_of([PYTHON, "-m", "bench.spend.statements", "--account", f"{ACROSS}0000"],
                                         env, timeout=120)

        run_id = secrets.token_hex(2)
        phases: dict[str, Any] = {}
        for name, prefix, ids in (("across", ACROSS, across_ids), ("hot", HOT, hot_ids)):
            say(f"{name}: service and pgbench take turns, {args.rounds} × {args.seconds:g} s each, "
                f"{args.concurrency} connections, {len(ids)} account(s) …")
            phases[name] = {"service": [], "pgbench": []}
            for r in range(args.rounds):
                before = batches(base)
                turn = _loadgen(args, env, base, server.pid, f"{prefix}:{len(ids)}", f"s{run_id}{name[0]}{r}-")
                turn["batches"] = {k: v - before[k] for k, v in batches(base).items()}
                phases[name]["service"].append(turn)
                phases[name]["pgbench"].append(pgbench.run(db, workdir, first=ids[0], accounts=len(ids),
                                                           amount=args.amount, clients=args.concurrency,
                                                           seconds=args.seconds))
                say(f"  round {r + 1}: service {phases[name]['service'][-1]['spends_per_s']}/s, "
                    f"pgbench {phases[name]['pgbench'][-1].get('tps')} tps")
            if not server.alive():
                raise RuntimeError(f"the service died under load:\n{server.tail()}")
        say(f"race: {args.concurrency} connections drain an account of {args.race_credits} credits …")
        phases["race"] = {"service": [_loadgen(args, env, base, server.pid, f"{RACE}:1", f"s{run_id}r-", seconds=30.0,
                                               warmup=0.0, requests=2 * args.race_credits // args.amount)]}
        results["phases"] = phases

        results["profile"] = None
        if args.profile_seconds and profile.find_py_spy():
            say(f"profiling the service with py-spy under the across-accounts load, {args.profile_seconds:g} s …")
            raw = workdir / "service.pyspy.txt"
            with profile.Recorder(server.pid, raw) as recorder:
                load = _loadgen(args, env, base, server.pid, f"{ACROSS}:{len(across_ids)}", f"s{run_id}p-",
                                seconds=args.profile_seconds, warmup=0.0)
            summary = spend_profile.summarise(raw) if raw.exists() else {"error": recorder.log.read_text(errors="replace")}
            command = shown(recorder.command).replace(str(raw), "$WORKDIR/service.pyspy.txt")
            summary.update(command=command.replace(f"--pid {server.pid}", "--pid PID"), load=load,
                           sampler=profile.sampler_stats(recorder.log))
            results["profile"] = summary
            phases["profile"] = {"service": [load]}
        elif args.profile_seconds:
            results["profile"] = {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}

        say("checking: ledger against answers, no overdraft, credits check …")
        turns = [turn for phase in phases.values() for turn in phase["service"]]
        race = phases["race"]["service"][0]
        results["checks"] = {
            "turns": {turn["key_prefix"]: checks.phase(db, turn["key_prefix"], Counter(turn["statuses"])
                                                       + Counter(turn["warmup_statuses"]), args.amount)
                      for turn in turns},
            "race": checks.race(db, f"{RACE}0000", args.race_credits, Counter(race["statuses"]), args.amount),
            "overall": checks.overall(db, env),
        }
        results["credits_check_command"] = "DATABASE_URL=<bench db> .venv/bin/credits check"
        results["server_log_bytes"] = server.log_path.stat().st_size
    return invocation.finished(results, clock, report)


def batches(base: str) -> dict[str, float]:
    """The service's batches of spends so far, from its /metrics: how many, and how many spends they held."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    found = dict(re.findall(r'^credits_group_commit_batch_size_(count|sum)\{name="spends"\} (\S+)$', text, re.M))
    return {"count": float(found.get("count", 0)), "sum": float(found.get("sum", 0))}


def _json_of(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a helper process that prints one JSON object last; that object, with the command as shown."""
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shown(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "command": shown(command)}


def _loadgen(args: argparse.Namespace, env: dict[str, str], base: str, pid: int, accounts: str, key_prefix: str, *,
             seconds: float | None = None, warmup: float | None = None, requests: int | None = None) -> dict[str, Any]:
    """One turn of the load generator process against the service (`requests`: at most that many)."""
    seconds = args.seconds if seconds is None else seconds
    command = [PYTHON, "-m", "bench.spend.loadgen", "--url", base, "--accounts", accounts, "--key-prefix", key_prefix,
               "--amount", str(args.amount), "--concurrency", str(args.concurrency), "--seconds", str(seconds),
               "--warmup-seconds", str(args.warmup_seconds if warmup is None else warmup), "--pid", str(pid)]
    if requests:
        command += ["--requests", str(requests)]
    result = _json_of(command, env, timeout=seconds + 120)
    result["command"] = "CREDITS_API_TOKEN=… " + result["command"].replace(base, "http://127.0.0.1:PORT").replace(
        f"--pid {pid}", "--pid PID")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return invocation.main(argv, parse, run, report)
