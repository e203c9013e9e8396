"""Spend: `POST /v1/accounts/{id}/spend` (the API token, an Idempotency-Key each, `{"amount": 1}`) from 32
connections, across 1,000 accounts and then all on one hot account, taking turns with pgbench running the
same transaction in SQL on the same tables (lock the account, find the grant, insert the entry and its
allocation, update the grant, commit). Then a race drains an account of 100 credits with 200 spends, and the
ledger is checked: no overdraft anywhere, every 200 spent once, every 402 nothing, `credits check` passes.

Accounts are funded through the admin API before the clock; the database also starts with 100,000 earlier
requests' stored outcomes and planner statistics, as a service that has been running keeps (on an empty,
never analysed database the plans kept for the prepared statements were sequential scans).
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
from pathlib import Path
from typing import Any

import psycopg

from bench import load
from bench.harness import Rows, Run, arguments, command_of, num, one, pgbench, ratio, row, standalone

LIMITS = """Each spend is a transaction of its own: the account's row locked, the key checked, the grants
read under the lock, the debit's entry, allocations and grant updates written, the outcome stored for the
key, then the commit; every statement is a round trip through SQLAlchemy and psycopg. Across accounts the
API process's own CPU per spend (HTTP, JSON, that ORM work, one process on one core at a time) sets the
pace; on one hot account the row lock does, held for the whole transaction, which pgbench keeps shorter
because no Python runs between its statements."""

PGBENCH_SPEND = Path(__file__).with_name("pgbench_spend.sql")
PLENTY, RACE_CREDITS = 10_000_000, 100


def parse(argv: list[str] | None = None) -> Any:
    parser = arguments("python -m bench.spend", __doc__)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=6.0, help="each measured turn, service or pgbench")
    parser.add_argument("--rounds", type=int, default=2, help="turns each takes per phase")
    parser.add_argument("--history", type=int, default=100_000, help="earlier requests' stored outcomes to seed")
    return parser.parse_args(argv)


def spends(base: str, token: str, names: list[str], prefix: str, seed: int, count: int | None = None) -> Any:
    """Spends (endless, or `count`), each on a random account of `names` with a key of its own."""
    rng = random.Random(seed)
    body = b'{"amount": 1}'
    for i in itertools.count() if count is None else range(count):
        yield (
            i,
            [
                (
                    f"{base}/v1/accounts/{rng.choice(names)}/spend",
                    body,
                    {
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                        "Idempotency-Key": f"{prefix}{i}",
                    },
                )
            ],
        )


def fund(base: str, token: str, names: list[str], credits: int) -> None:
    """One admin grant each (which creates the account)."""
    grants = (
        (
            n,
            [
                (
                    f"{base}/v1/accounts/{name}/grants",
                    json.dumps({"amount": credits, "reason": "bench"}).encode(),
                    {
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                        "Idempotency-Key": f"fund-{name}",
                    },
                )
            ],
        )
        for n, name in enumerate(names)
    )
    out = load.closed_loop(grants, 16)
    if out.ok != len(names):
        raise RuntimeError(f"funding the accounts: {dict(out.statuses)}")


def history(db: str, count: int) -> bool:
    """Earlier requests' stored outcomes, then VACUUM ANALYZE; False when the table is not as expected."""
    try:
        with psycopg.connect(db) as conn:
            conn.execute(
                "INSERT INTO api_requests (key, fingerprint, status_code, response, created_at) "
                "SELECT 'history-' || i, md5(i::text) || md5(i::text), 200, '{\"history\": true}'::jsonb, now() "
                "FROM generate_series(1, %s) AS i",
                (count,),
            )
        return True
    except psycopg.Error:
        return False
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")


def committed(db: str) -> int:
    """Writing transactions so far: every one takes the next transaction id (this question takes one too,
    which the difference of two cancels)."""
    with psycopg.connect(db, autocommit=True) as conn:
        return int(one(conn.execute("SELECT txid_current()"))[0])


def run(args: Any) -> dict[str, Any]:
    with Run(args, "spend") as bench:
        db = bench.database()
        env = bench.env(db)
        api, base = bench.serve(env)
        across = [f"acct-{i:04d}" for i in range(args.accounts)]
        bench.say(f"funding {args.accounts + 2} accounts through the admin API …")
        fund(base, bench.admin_token, across, PLENTY)  # first and alone: pgbench picks their ids as one range
        fund(base, bench.admin_token, ["hot-0000"], PLENTY)
        fund(base, bench.admin_token, ["race-0000"], RACE_CREDITS)
        seeded = history(db, args.history)
        with psycopg.connect(db, autocommit=True) as conn:
            ids: dict[str, int] = dict(conn.execute("SELECT public_id, id FROM accounts").fetchall())
        first = min(ids[n] for n in across)
        if sorted(ids[n] for n in across) != list(range(first, first + len(across))):
            raise RuntimeError("the accounts' ids are not one range: pgbench picks them by range")
        tag, ok, phases = secrets.token_hex(2), 0, dict[str, list[dict[str, Any]]]()
        for phase, names, first_id in (("across", across, first), ("hot", ["hot-0000"], ids["hot-0000"])):
            phases[phase] = []
            for r in range(args.rounds):
                warm = load.closed_loop(spends(base, bench.api_token, names, f"{tag}{phase}{r}w-", r), 32, seconds=1.0)
                cpu, commits = api.cpu(), committed(db)
                out = load.closed_loop(
                    spends(base, bench.api_token, names, f"{tag}{phase}{r}m-", 100 + r), 32, seconds=args.seconds
                )
                cpu, commits = api.cpu() - cpu, committed(db) - commits
                api.check()
                ok += warm.statuses["200"] + out.statuses["200"]
                reference = pgbench(
                    db,
                    PGBENCH_SPEND.read_text(),
                    bench.workdir,
                    clients=32,
                    limit=["-T", str(round(args.seconds))],
                    defines={"first": first_id, "accounts": len(names)},
                )
                phases[phase].append(
                    {
                        "rate": round(out.rate, 1),
                        "statuses": dict(out.statuses),
                        "p99_ms": out.percentile(0.99),
                        "cpu_ms": round(1000 * cpu / max(1, out.ok), 3),
                        "pgbench": reference,
                        "batch": round(sum(out.statuses.values()) / commits, 2) if commits else None,
                    }
                )
                bench.say(f"{phase} round {r + 1}: service {out.rate:.0f}/s, pgbench {reference['tps']:.0f} tps")
        race = load.closed_loop(spends(base, bench.api_token, ["race-0000"], f"{tag}race-", 0, 2 * RACE_CREDITS), 32)
        ok += race.statuses["200"]
        with psycopg.connect(db, autocommit=True) as conn:
            entries, spent = one(
                conn.execute(
                    "SELECT count(*), coalesce(-sum(amount), 0) FROM ledger_entries "
                    "WHERE kind = 'spend' AND idempotency_key NOT LIKE 'pgbench:%'"
                )
            )
            negative = one(
                conn.execute(
                    "SELECT count(*) FROM (SELECT account_id FROM ledger_entries GROUP BY 1 "
                    "HAVING sum(amount) < 0) AS below"
                )
            )[0]
            negative += one(conn.execute("SELECT count(*) FROM credit_grants WHERE remaining < 0"))[0]
            left = one(
                conn.execute(
                    "SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e JOIN accounts a ON a.id = e.account_id "
                    "WHERE a.public_id = 'race-0000'"
                )
            )[0]
        check = bench.cli("check", env=env, check=False)
        return {
            "command": command_of("bench.spend", args, parse),
            "accounts": args.accounts,
            "phases": phases,
            "history_seeded": seeded,
            "ledger": {"entries": entries, "credits": int(spent), "answered_200": ok, "negative": negative},
            "race": {"statuses": dict(race.statuses), "left": int(left)},
            "check_exit": check.returncode,
        }


def rows(r: dict[str, Any]) -> Rows:
    command, out = r["command"], []
    for phase, label in (("across", f"across {r['accounts']:,} accounts"), ("hot", "one hot account")):
        turns = r["phases"][phase]
        rate = sum(t["rate"] for t in turns) / len(turns)
        tps = sum(t["pgbench"]["tps"] for t in turns) / len(turns)
        batched = [t["batch"] for t in turns if t["batch"]]
        out += [
            row(f"spends/s, {label}", num(rate, "/s"), f"pgbench {num(tps)} tps", ratio(rate, tps), command),
            row(
                f"… each round (service / pgbench), {label}",
                ", ".join(f"{t['rate'] / t['pgbench']['tps']:.2f}×" for t in turns),
                "",
                None,
                turns[0]["pgbench"]["command"],
            ),
            row(
                f"p99 latency / API CPU per spend, {label}",
                f"{num(max(t['p99_ms'] or 0 for t in turns), ' ms')} / "
                f"{num(sum(t['cpu_ms'] for t in turns) / len(turns), ' ms')}",
                "",
                None,
                command,
            ),
            row(
                f"spends per transaction, {label}",
                num(sum(batched) / len(batched)) if batched else "—",
                "pgbench 1",
                None,
                command,
            ),
        ]
    ledger, race = r["ledger"], r["race"]
    agree = ledger["entries"] == ledger["answered_200"] == ledger["credits"] and ledger["negative"] == 0
    race_ok = race["statuses"].get("200") == RACE_CREDITS and race["left"] == 0
    return [
        *out,
        row(
            "zero overdraft: spend entries = 200 answers, no balance or grant below 0",
            f"{ledger['entries']:,} = {ledger['answered_200']:,}; {ledger['negative']} below 0",
            "",
            "yes" if agree else "**no**",
            command,
        ),
        row(
            f"race: 32 connections drain {RACE_CREDITS} credits",
            ", ".join(f"{n}× {s}" for s, n in sorted(race["statuses"].items())),
            f"balance after {race['left']}",
            "yes" if race_ok else "**no**",
            command,
        ),
        row(
            "`credits check`",
            "passed" if r["check_exit"] == 0 else f"exit {r['check_exit']}",
            "",
            None,
            "credits check",
        ),
        row(
            "database seeded with earlier requests' outcomes",
            "yes" if r["history_seeded"] else "**no** (table differs)",
            "",
            None,
            command,
        ),
    ]


if __name__ == "__main__":
    standalone(parse, run, rows)
