"""Ingest: signed, distinct `invoice.paid` webhooks (~6 KB, the 2025 shape, each for a customer and account of
its own) POSTed to `/webhooks/stripe`.

1. the service against the minimal handler (bench/servers.py), closed loop from aiohttp with 32 connections,
   taking turns A B A B (minimal, service, minimal, service), after an unmeasured warm-up of each;
2. the same two with wrk, 16 connections, each of its threads sending its own share of pre-signed events;
3. the HTTP floor (bench/servers.py `floor`) under the same wrk load;
then every accepted event must be a row in the inbox (rows = 2xx).

The workers run beside the API during the service's turns and are stopped (SIGSTOP) during the references',
so that they cannot take the references' CPU, as in every earlier run.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import psycopg

from bench import events, load
from bench.harness import Rows, Run, arguments, command_of, num, one, pause, ratio, row, standalone

LIMITS = """The endpoint verifies the signature, parses the body once and stores it in the inbox with one
group-committed insert per batch of waiting deliveries, so its cost is mostly Python's HTTP handling and the
verification, not PostgreSQL. On two shared cores the API competes with the load generator, PostgreSQL and
the workers draining the backlog (at lower priority), so the aiohttp ratio moves with the generator's share of
the CPU; wrk leaves more of it to the servers, which is why its ratio is the better measure of the code, and
the floor shows how much of a core HTTP alone costs."""


def parse(argv: list[str] | None = None) -> Any:
    parser = arguments("python -m bench.ingest", __doc__)
    parser.add_argument("--events", type=int, default=5000, help="events per turn (default 5000)")
    parser.add_argument("--rounds", type=int, default=2, help="turns each target takes (A B A B: 2)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured events per target first")
    parser.add_argument(
        "--floor-rounds", type=int, default=4, help="times the floor is sent each event (it stores nothing)"
    )
    return parser.parse_args(argv)


def run(args: Any) -> dict[str, Any]:
    with Run(args, "ingest") as bench:
        db = bench.database()
        env = bench.env(db)
        api, base = bench.serve(env)
        workers = bench.workers(env)
        minimal, minimal_base = bench.helper("minimal", env)
        floor, floor_base = bench.helper("floor", env)
        servers = {"service": (api, base), "minimal": (minimal, minimal_base), "floor": (floor, floor_base)}
        tag = secrets.token_hex(2)

        def signed(prefix: str, n: int) -> list[tuple[bytes, dict[str, str]]]:
            at = int(time.time())  # signed just before the turn: Stripe's tolerance is 300 s
            return [
                (b, {"Stripe-Signature": events.sign(b, bench.secret, at)}) for b in events.ingest_bodies(prefix, n)
            ]

        def turn(target: str, prefix: str, gen: str, n: int) -> dict[str, Any]:
            proc, url = servers[target]
            pause(workers, target != "service")
            batch = signed(prefix, n)
            cpu = proc.cpu()
            if gen == "aiohttp":
                out = load.closed_loop(
                    load.singles((url + "/webhooks/stripe", b, {**load.WEBHOOK_HEADERS, **h}) for b, h in batch), 32
                )
                result = {
                    "ok": out.ok,
                    "rate": round(out.rate, 1),
                    "seconds": round(out.seconds, 3),
                    "statuses": dict(out.statuses),
                }
            else:
                rounds = args.floor_rounds if target == "floor" else 1
                result = load.wrk(url + "/webhooks/stripe", batch, bench.workdir, rounds=rounds)
            result.update(prefix=prefix, cpu=round(proc.cpu() - cpu, 2))
            proc.check()
            bench.say(f"{gen} {target}: {result['rate']}/s ({result['ok']} 2xx)")
            return result

        turns: dict[str, list[dict[str, Any]]] = {}
        for target in ("minimal", "service"):
            turn(target, f"{tag}w{target[0]}", "aiohttp", args.warmup)
        for gen in ("aiohttp", "wrk"):
            for r in range(args.rounds):
                for target in ("minimal", "service"):
                    turns.setdefault(f"{gen} {target}", []).append(
                        turn(target, f"{tag}{gen[0]}{r}{target[0]}", gen, args.events)
                    )
        turns["wrk floor"] = [turn("floor", f"{tag}f", "wrk", args.events)]
        pause(workers, False)

        with psycopg.connect(db, autocommit=True) as conn:  # every accepted event stored
            stored = sum(
                one(conn.execute("SELECT count(*) FROM stripe_events WHERE id LIKE %s", (f"evt_{t['prefix']}%",)))[0]
                for t in turns["aiohttp service"] + turns["wrk service"]
            )
        return {"command": command_of("bench.ingest", args, parse), "turns": turns, "stored": stored}


def rows(r: dict[str, Any]) -> Rows:
    turns, command = r["turns"], r["command"]
    rate = lambda key, by="seconds": sum(t["ok"] for t in turns[key]) / sum(t[by] for t in turns[key])  # noqa: E731
    cpu = lambda key: 1000 / rate(key, "cpu")  # noqa: E731
    rounds = lambda gen: ", ".join(  # noqa: E731
        f"{s['rate'] / m['rate']:.2f}×" for m, s in zip(turns[f"{gen} minimal"], turns[f"{gen} service"], strict=True)
    )
    wrk, floor = turns["wrk service"][0]["command"], turns["wrk floor"][0]["command"]
    ok = sum(t["ok"] for t in turns["aiohttp service"] + turns["wrk service"])
    return [
        row(
            "accepted/s, aiohttp closed loop, 32 connections",
            num(rate("aiohttp service"), "/s"),
            f"minimal {num(rate('aiohttp minimal'), '/s')}",
            ratio(rate("aiohttp service"), rate("aiohttp minimal")),
            command,
        ),
        row("… each round (service / minimal), aiohttp", rounds("aiohttp"), "", None, command),
        row(
            "accepted/s, wrk, 16 connections, no event repeats",
            num(rate("wrk service"), "/s"),
            f"minimal {num(rate('wrk minimal'), '/s')}",
            ratio(rate("wrk service"), rate("wrk minimal")),
            wrk,
        ),
        row("… each round (service / minimal), wrk", rounds("wrk"), "", None, wrk),
        row(
            "service against the HTTP floor (wrk)",
            num(rate("wrk service"), "/s"),
            f"floor {num(rate('wrk floor'), '/s')}",
            ratio(rate("wrk service"), rate("wrk floor")),
            floor,
        ),
        row(
            "minimal handler against the HTTP floor (wrk)",
            num(rate("wrk minimal"), "/s"),
            f"floor {num(rate('wrk floor'), '/s')}",
            ratio(rate("wrk minimal"), rate("wrk floor")),
            floor,
        ),
        row(
            "API CPU per accepted event (aiohttp turns)",
            num(cpu("aiohttp service"), " ms"),
            f"minimal {num(cpu('aiohttp minimal'), ' ms')}",
            ratio(cpu("aiohttp service"), cpu("aiohttp minimal")),
            command,
        ),
        row(
            "stored rows = 2xx answers (service turns)",
            f"{r['stored']:,} = {ok:,}",
            "",
            "yes" if r["stored"] == ok else "**no**",
            command,
        ),
    ]


if __name__ == "__main__":
    standalone(parse, run, rows)
