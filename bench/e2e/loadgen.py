"""The end-to-end load generator, a process of its own:
`python -m bench.e2e.loadgen --target URL --database-url URL --codes FILE --events N --months M --seed S …`.

It plans the same mix as the orchestrator (bench/e2e/mix.py: same events, months and seed) and builds every
body before any clock starts. Then, month after month, it signs the month's chains with a fresh timestamp
and sends them with bench/ingest/loadgen.py's closed loop over chains: C accounts in flight, each account's
events one after the other, the next once the previous was answered. While sending, it holds back whenever
`--max-backlog` events are waiting in the inbox: the processing always has work queued, and what is left
when sending stops can settle within the run. After each month it polls the inbox until no event is pending
or failed — the month has been processed — before the next month's renewals may go out (see mix.py for
why). It prints one JSON object on stdout: per month what was sent, answered and completed (the chains'
account keys, for the expected balances), how long the sending, the holding back and the wait took, and the
clock's start (the first send, epoch seconds).

Bounded: no chain starts after `--max-seconds` from the first send, and the wait for the inbox ends at
`--max-seconds + --drain-seconds` whatever it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.e2e import mix
from bench.e2e.events import Builder
from bench.ingest import events
from bench.ingest.loadgen import chained_loop, own_cpu, proc_cpu, summary
from service import heap

UNSETTLED = "SELECT count(*) FROM stripe_events WHERE status IN ('pending', 'failed')"


class Inbox:
    """The service's inbox as the generator watches it: how many events are not final yet (pending, or
    failed and waiting for their retry), polled every `poll` seconds on a connection of its own."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], poll: float, limit: int) -> None:
        self.conn, self.poll, self.limit = conn, poll, limit
        self.unsettled = 0
        self.held_seconds = 0.0

    async def count(self) -> int:
        cursor = await self.conn.execute(UNSETTLED)
        self.unsettled = (await cursor.fetchone())[0]  # type: ignore[index]
        return self.unsettled

    async def admit(self) -> None:
        """Before a chain: wait while `limit` or more events are unsettled. The processing never runs dry
        (that many are queued), but what is left when sending stops stays small enough to settle in time."""
        while self.unsettled >= self.limit:
            await asyncio.sleep(self.poll)

    async def watch(self) -> None:
        """Keep `unsettled` fresh while a month is sent (cancelled after it), and add up the wall time the
        brake was on (`held_seconds`)."""
        while True:
            await self.count()
            started = time.perf_counter()
            await asyncio.sleep(self.poll)
            if self.unsettled >= self.limit:
                self.held_seconds += time.perf_counter() - started

    async def settled(self, until: float) -> tuple[int, float]:
        """Wait until nothing is unsettled or the wall clock reaches `until`: (still unsettled, seconds waited)."""
        started = time.time()
        while await self.count() and time.time() < until:
            await asyncio.sleep(self.poll)
        return self.unsettled, time.time() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    built = time.perf_counter()
    plan = mix.plan(args.events, args.months, args.seed)
    builder = Builder(args.prefix, json.loads(args.codes.read_text()), args.months)
    months = [[(chain.account.key, builder.bodies(chain)) for chain in plan.chains(m)] for m in range(1, args.months + 1)]
    built = time.perf_counter() - built
    own, cpu0 = own_cpu(), proc_cpu(args.pid)
    first_send = time.time()
    stop_sending, stop_waiting = first_send + args.max_seconds, first_send + args.max_seconds + args.drain_seconds
    report = []
    async with await psycopg.AsyncConnection.connect(args.database_url, autocommit=True) as conn:
        inbox = Inbox(conn, args.poll_seconds, args.max_backlog)
        for number, chains in enumerate(months, 1):
            if time.time() >= stop_sending:
                break
            at = int(time.time())
            signed = [[(b, events.sign(b, args.secret, at)) for b in bodies] for _, bodies in chains]
            held, sending = inbox.held_seconds, time.time()
            watcher = asyncio.create_task(inbox.watch())
            try:
                with heap.frozen():  # as bench/ingest's load generator: no full collections of all the bodies
                    seg = await chained_loop(args.target, signed, args.concurrency, stop_sending - sending,
                                             stop_waiting - sending, admit=inbox.admit)
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            sent_until = time.time()
            unsettled, waited = await inbox.settled(stop_waiting)
            report.append({
                "month": number,
                "chains": len(chains),
                "events": sum(len(bodies) for _, bodies in chains),
                "completed": sorted(chains[i][0] for i in seg.completed),
                "sent": sum(seg.statuses.values()),
                "accepted": len(seg.latencies),
                "statuses": dict(seg.statuses),
                "abandoned": seg.abandoned,
                "window": [round(sending, 3), round(sent_until, 3)],
                "sending_seconds": round(sent_until - sending, 2),
                "held_seconds": round(inbox.held_seconds - held, 2),
                "accepted_per_s": round(len(seg.latencies) / (sent_until - sending), 1) if sent_until > sending else None,
                "wait_seconds": round(waited, 2),
                "unsettled_after_wait": unsettled,
                **summary(seg.latencies),
            })
            if unsettled:
                break  # the next month's renewals would race what is still waiting
    cpu1 = proc_cpu(args.pid)
    return {
        "first_send": round(first_send, 3),
        "ended": round(time.time(), 3),
        "events_planned": plan.events,
        "build_seconds": round(built, 2),
        "loadgen_cpu_seconds": round(own_cpu() - own, 2),
        "server_cpu_seconds": round(sum(cpu1) - sum(cpu0), 2) if cpu0 and cpu1 else None,
        "concurrency": args.concurrency,
        "months": report,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="the service's webhook URL on 127.0.0.1")
    parser.add_argument("--pid", type=int, help="the API process, whose CPU seconds are reported")
    parser.add_argument("--database-url", required=True, help="the service's database (libpq URL), to see months settle")
    parser.add_argument("--codes", type=Path, required=True, help="JSON: referrer account key → referral code")
    parser.add_argument("--secret", default=os.environ.get("STRIPE_WEBHOOK_SECRET"), help="default $STRIPE_WEBHOOK_SECRET")
    parser.add_argument("--prefix", required=True, help="id prefix of this run's accounts and events")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--months", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="accounts in flight")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="no chain starts later than this after the first send")
    parser.add_argument("--drain-seconds", type=float, default=60.0, help="and the inbox is watched this much longer")
    parser.add_argument("--poll-seconds", type=float, default=0.25)
    parser.add_argument("--max-backlog", type=int, default=1000,
                        help="no chain starts while this many events are unsettled (default 1000)")
    args = parser.parse_args(argv)
    if not args.target.startswith(("http://127.0.0.1:", "http://localhost:")):
        parser.error("--target must point at 127.0.0.1")
    if not args.secret:
        parser.error("--secret or STRIPE_WEBHOOK_SECRET is required")
    if args.max_seconds > 270:  # each month is signed when it starts; its sending must end within the tolerance
        parser.error("--max-seconds must stay within Stripe's 300 s signature tolerance")
    return args


def main(argv: list[str] | None = None) -> None:
    result = asyncio.run(run(parse(argv)))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
