"""The spend load generator, a process of its own:
`python -m bench.spend.loadgen --url BASE --accounts PREFIX:N --key-prefix P [--seconds S] [-c C] …`.

A closed loop (asyncio + aiohttp): C connections, each sending `POST /v1/accounts/{id}/spend` with the next
distinct Idempotency-Key as soon as its previous answer arrived, for `--seconds` of wall time (after an
unmeasured warm-up of `--warmup-seconds`). The account of each request is drawn at random (seeded) from
`PREFIX0000 … PREFIX{N-1}`, so `PREFIX:1000` spreads the load over 1,000 accounts and `PREFIX:1` puts it all
on one. It prints one JSON object: the answers by status, spends/s (200 answers per second), latency, and the
server process's CPU (`--pid`) per spend. Every phase is bounded in time; requests still unanswered at
`--max-seconds` are abandoned; `--requests N` stops after N requests (the warm-up is not counted).

The bearer token comes from `CREDITS_API_TOKEN`, never from the command line (the README shows commands).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.ingest.loadgen import own_cpu, proc_cpu, summary
from service import heap

CLIENT_TIMEOUT = 60.0


def accounts(spec: str) -> list[str]:
    """`PREFIX:N` → the N account ids the seed created (bench/spend/seed.py names them the same way)."""
    prefix, _, count = spec.rpartition(":")
    return [f"{prefix}{i:04d}" for i in range(int(count))]


async def closed_loop(args: argparse.Namespace, names: list[str], key_prefix: str, seconds: float,
                      rng: random.Random) -> dict[str, Any]:
    """C workers, each posting a spend as soon as its previous one was answered, until `seconds` have passed."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    body = json.dumps({"amount": args.amount}).encode()
    headers = {"Authorization": f"Bearer {os.environ['CREDITS_API_TOKEN']}", "Content-Type": "application/json"}
    counter = iter(range(args.requests or 10**9))
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as session:

        async def worker() -> None:
            for i in counter:  # one shared counter: every Idempotency-Key is sent once
                if time.perf_counter() > deadline:
                    return
                url = f"{args.url}/v1/accounts/{rng.choice(names)}/spend"
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body,
                                            headers={**headers, "Idempotency-Key": f"{key_prefix}{i}"}) as response:
                        await response.read()
                        status: int | str = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    status = type(exc).__name__
                statuses[str(status)] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        deadline = started + seconds
        tasks = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
        _, late = await asyncio.wait(tasks, timeout=args.max_seconds)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        elapsed = time.perf_counter() - started
    return {"statuses": dict(statuses), "latencies": latencies, "seconds": elapsed, "abandoned": bool(late)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    names = accounts(args.accounts)
    rng = random.Random(args.seed)
    own = own_cpu()
    if args.warmup_seconds:
        warm = await closed_loop(args, names, f"{args.key_prefix}w", args.warmup_seconds, rng)
    with heap.frozen():  # this process's own full collections would count as the service's latency
        cpu0 = proc_cpu(args.pid)
        measured = await closed_loop(args, names, f"{args.key_prefix}m", args.seconds, rng)
        cpu1 = proc_cpu(args.pid)
    spent, seconds = len(measured["latencies"]), measured["seconds"]
    cpu = sum(cpu1) - sum(cpu0) if cpu0 and cpu1 else None
    return {
        "accounts": len(names),
        "concurrency": args.concurrency,
        "amount": args.amount,
        "key_prefix": args.key_prefix,
        "warmup_statuses": warm["statuses"] if args.warmup_seconds else {},
        "statuses": measured["statuses"],
        "sent": sum(measured["statuses"].values()),
        "spent": spent,
        "seconds": round(seconds, 3),
        "spends_per_s": round(spent / seconds, 1) if seconds else None,
        "abandoned": measured["abandoned"],
        **summary(measured["latencies"]),
        "server_cpu_seconds": round(cpu, 2) if cpu is not None else None,
        "server_cpu_ms_per_spend": round(1000 * cpu / spent, 2) if cpu is not None and spent else None,
        "loadgen_cpu_seconds": round(own_cpu() - own, 2),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.spend.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the service's base URL on 127.0.0.1")
    parser.add_argument("--accounts", required=True, metavar="PREFIX:N", help="spend from PREFIX0000 … PREFIX{N-1}")
    parser.add_argument("--key-prefix", required=True, help="Idempotency-Keys: <prefix>w<i> (warm-up), <prefix>m<i>")
    parser.add_argument("--amount", type=int, default=1, help="credits per spend")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured load; no new request after this long")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="unmeasured load first")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="hard limit of one stretch of load")
    parser.add_argument("--requests", type=int, help="send at most this many (the race: more than the account holds)")
    parser.add_argument("--pid", type=int, help="the server process, for its CPU per spend")
    parser.add_argument("--seed", type=int, default=8, help="seed of the account choice")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        parser.error("--url must point at 127.0.0.1")
    if not 0 < args.concurrency <= 512 or not 0 < args.seconds <= 120 or not 0 < args.amount:
        parser.error("concurrency, seconds or amount out of range")
    if "CREDITS_API_TOKEN" not in os.environ:
        parser.error("CREDITS_API_TOKEN must be set")
    return args


def main(argv: list[str] | None = None) -> None:
    json.dump(asyncio.run(run(parse(argv))), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
