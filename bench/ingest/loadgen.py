"""The load generator, a process of its own:
`python -m bench.ingest.loadgen --target NAME=URL [--target NAME=URL …] [--pid NAME=PID …] --mode closed|open …`.

For each target it builds N distinct events (bench/ingest/events.py) and signs them all before any clock
starts; then, one target after the other, it sends a short unmeasured warm-up and the measured load, and prints
one JSON object on stdout. With `--rounds R` (closed loop) the targets take turns R times (A B A B …), each
turn with N/R events, so a drift in the machine's background load hits every target alike.

- closed loop (`--mode closed`): C connections, each sending the next event as soon as its previous answer
  arrived; throughput = 2xx answers / wall time of the phase; latency from send to full answer.
- open loop (`--mode open`): one send scheduled every 1/rate seconds whatever the answers do (no
  coordinated omission); latency is measured from the *scheduled* time, so a server (or generator) that falls
  behind shows it in the tail.

With `--pause NAME=PID` a helper process of target NAME (the service's inbox worker, `credits worker`) runs only
while NAME takes its turns: it is stopped (SIGSTOP) before any other target's warm-up and turn, so it cannot take
their CPU, and continued (SIGCONT) before NAME's and at the end, whatever happens. The signals go to the process
group PID leads (`credits worker`'s processes with it: the harness starts it as a session leader).

Every phase is bounded: N requests at most, and `--max-seconds` of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.ingest import events
from service import heap

HEADERS = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT_TIMEOUT = 60.0  # seconds for one request, connect to last byte


def proc_cpu(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds, all threads, used so far by process `pid`."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def tree_cpu(pid: int) -> float | None:
    """CPU seconds used so far by process `pid` and every process under it (`credits worker`'s processes,
    WORKER_PROCESSES); None once `pid` has exited."""
    if proc_cpu(pid) is None:
        return None
    return sum(tree(pid).values())


def tree(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds used so far by `pid` and each process under it, keyed by (pid, start time): a pid the
    kernel reuses for a new process is a new key."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
    parents: dict[int, list[int]] = {}
    for child, fields in stats.items():
        parents.setdefault(int(fields[1]), []).append(child)
    found: dict[tuple[int, int], float] = {}
    pending = [pid] if pid in stats else []
    while pending:
        at = pending.pop()
        fields = stats[at]
        found[at, int(fields[19])] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        pending += parents.get(at, [])
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summary(latencies: list[float]) -> dict[str, float | None]:
    values = sorted(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        "p50_ms": ms(percentile(values, 0.50)),
        "p90_ms": ms(percentile(values, 0.90)),
        "p99_ms": ms(percentile(values, 0.99)),
        "max_ms": ms(values[-1] if values else None),
        "mean_ms": ms(sum(values) / len(values) if values else None),
    }


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, signature: str) -> int | str:
    try:
        async with session.post(url, data=body, headers={**HEADERS, "Stripe-Signature": signature}) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return type(exc).__name__


@dataclass
class Segment:
    """One measured stretch of load against one target."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    abandoned: bool = False
    capped: bool = False
    lags: list[float] = field(default_factory=list)  # open loop: how late each send left
    sending_seconds: float = 0.0
    completed: list[int] = field(default_factory=list)  # chained loop: chains whose every event was answered


async def closed_loop(
    url: str, items: list[tuple[bytes, str]], concurrency: int, phase_seconds: float, max_seconds: float
) -> Segment:
    """C workers share one queue of pre-signed events; each sends the next when its answer has arrived.
    No new request starts after `phase_seconds`; anything still unanswered at `max_seconds` is abandoned."""
    return await chained_loop(url, [[item] for item in items], concurrency, phase_seconds, max_seconds)


async def chained_loop(
    url: str, chains: list[list[tuple[bytes, str]]], concurrency: int, phase_seconds: float, max_seconds: float,
    admit: Callable[[], Awaitable[None]] | None = None,
) -> Segment:
    """The closed loop over chains of events: C workers share one queue of chains, and each sends a chain's
    events one after the other (the next once the previous answer has arrived), so the events of one chain
    — one customer's, say — arrive in their order while C chains are in flight. `admit`, when given, is
    awaited before each chain starts (a caller's brake). No new chain starts after `phase_seconds`; anything
    still unanswered at `max_seconds` is abandoned. `Segment.completed` lists the chains whose every event
    was answered."""
    seg = Segment()
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    pending = iter(range(len(chains)))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as session:

        async def worker() -> None:
            for i in pending:  # one shared iterator: each chain is sent once
                if admit is not None:
                    await admit()
                if time.perf_counter() > deadline:  # stop issuing; what is in flight completes
                    break
                for item in chains[i]:
                    started = time.perf_counter()
                    status = await _post(session, url, *item)
                    if isinstance(status, int) and 200 <= status < 300:
                        seg.latencies.append(time.perf_counter() - started)
                    seg.statuses[str(status)] += 1
                seg.completed.append(i)

        started = time.perf_counter()
        deadline = started + phase_seconds
        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        _, not_done = await asyncio.wait(workers, timeout=max_seconds)
        for task in not_done:
            task.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        seg.seconds = time.perf_counter() - started
    seg.abandoned = bool(not_done)
    seg.capped = sum(seg.statuses.values()) < sum(len(chain) for chain in chains)
    return seg


async def open_loop(
    url: str, items: list[tuple[bytes, str]], rate: float, connections: int, max_seconds: float
) -> Segment:
    """Send item i at start + i/rate, whatever the answers do; latency counts from the scheduled time."""
    seg = Segment()
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as session:

        async def one(i: int, scheduled: float) -> None:
            status = await _post(session, url, *items[i])
            if isinstance(status, int) and 200 <= status < 300:
                seg.latencies.append(loop.time() - scheduled)
            seg.statuses[str(status)] += 1

        start = loop.time() + 0.05
        deadline = start + max_seconds
        tasks = []
        for i in range(len(items)):
            scheduled = start + i / rate
            if scheduled > deadline:
                break
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            seg.lags.append(loop.time() - scheduled)
            tasks.append(asyncio.ensure_future(one(i, scheduled)))
        seg.sending_seconds = loop.time() - start
        remaining = max(1.0, deadline - loop.time())
        _, not_done = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
        for task in not_done:
            task.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        seg.seconds = loop.time() - start
    seg.abandoned = bool(not_done)
    seg.capped = len(tasks) < len(items)
    return seg


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, metavar="NAME=URL",
                        help="a webhook URL on 127.0.0.1; repeat for several targets (measured in this order)")
    parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID",
                        help="report this server process's CPU seconds during the target's load")
    parser.add_argument("--pause", action="append", default=[], metavar="NAME=PID",
                        help="a helper process group of target NAME (its leader's pid): SIGSTOP during the other targets' turns, SIGCONT for NAME's")
    parser.add_argument("--secret", default=os.environ.get("STRIPE_WEBHOOK_SECRET"), help="default $STRIPE_WEBHOOK_SECRET")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("-n", "--requests", type=int, default=5000, help="events per target (at most)")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="closed loop: connections")
    parser.add_argument("--rounds", type=int, default=1, help="closed loop: the targets take turns this many times")
    parser.add_argument("--rate", type=float, default=500.0, help="open loop: requests per second")
    parser.add_argument("--connections", type=int, default=256, help="open loop: connection limit")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per target first (closed loop)")
    parser.add_argument("--prefix", default=f"b{os.getpid()}",
                        help="event ids: evt_<prefix><target no.>w<i> (warm-up), evt_<prefix><target no.>m<round><i>")
    parser.add_argument("--phase-seconds", type=float, default=30.0,
                        help="closed loop: per target, no new request after this many seconds (N is then not reached)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="hard limit per target; unanswered requests are abandoned")
    args = parser.parse_args(argv)
    args.targets = dict(_pair(parser, spec) for spec in args.target)
    args.pids = {name: int(pid) for name, pid in (_pair(parser, spec) for spec in args.pid)}
    args.pauses = [(name, int(pid)) for name, pid in (_pair(parser, spec) for spec in args.pause)]
    if any(name not in args.targets or pid <= 1 for name, pid in args.pauses):
        parser.error("every --pause must name a target and a process id")
    if any(not url.startswith(("http://127.0.0.1:", "http://localhost:")) for url in args.targets.values()):
        parser.error("every --target must point at 127.0.0.1")
    if not args.secret:
        parser.error("--secret or STRIPE_WEBHOOK_SECRET is required")
    if not 0 < args.requests <= 200_000 or not 0 < args.concurrency <= 1024 or not 0 < args.rate <= 20_000:
        parser.error("requests, concurrency or rate out of range")
    if not 1 <= args.rounds <= 10 or args.rounds > args.requests:
        parser.error("rounds out of range")
    if args.max_seconds > 270:
        parser.error("--max-seconds must stay within Stripe's 300 s signature tolerance")
    return args


def _pair(parser: argparse.ArgumentParser, spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        parser.error(f"expected NAME=VALUE, got {spec!r}")
    return name, value


def _signal_helpers(pauses: list[tuple[str, int]], running: str | None) -> None:
    """Let the helpers of target `running` run and stop every other target's (None: let all run)."""
    for owner, pid in pauses:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGCONT if running is None or owner == running else signal.SIGSTOP)


def aggregate(segments: list[Segment], cpu_split: tuple[float, float] | None, busy: float,
              windows: list[list[float]]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    for seg in segments:
        statuses.update(seg.statuses)
        latencies.extend(seg.latencies)
    seconds = sum(seg.seconds for seg in segments)
    accepted = len(latencies)
    cpu = sum(cpu_split) if cpu_split is not None else None
    result: dict[str, Any] = {
        "sent": sum(statuses.values()),
        "accepted": accepted,
        "statuses": dict(statuses),
        "abandoned_at_max_seconds": any(seg.abandoned for seg in segments),
        "capped_by_time": any(seg.capped for seg in segments),
        "seconds": round(seconds, 3),
        "throughput_rps": round(accepted / seconds, 1) if seconds else None,
        **summary(latencies),
        "server_cpu_seconds": round(cpu, 2) if cpu is not None else None,
        "server_cpu_util": round(cpu / seconds, 2) if cpu is not None and seconds else None,
        "server_cpu_ms_per_event": round(1000 * cpu / accepted, 2) if cpu is not None and accepted else None,
        "server_cpu_system_share": round(cpu_split[1] / cpu, 2) if cpu_split is not None and cpu else None,
        "machine_cpu_busy": round(busy, 2),
        # wall-clock (epoch seconds) start and end of each measured stretch, for the end-to-end figures
        "windows": [[round(a, 3), round(b, 3)] for a, b in windows],
    }
    if len(segments) > 1:
        result["rounds_rps"] = [round(len(s.latencies) / s.seconds, 1) if s.seconds else None for s in segments]
    lags = sorted(lag for seg in segments for lag in seg.lags)
    if lags:
        sending = sum(seg.sending_seconds for seg in segments)
        result.update(
            send_rate=round(len(lags) / sending, 1) if sending else None,
            generator_lag_p99_ms=round((percentile(lags, 0.99) or 0) * 1000, 2),
            generator_lag_max_ms=round(lags[-1] * 1000, 2),
        )
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    names = list(args.targets)
    rounds = args.rounds if args.mode == "closed" else 1
    # Every body is built up front; each stretch of load is signed just before its clock starts, with a
    # fresh timestamp, so no signature can outlive Stripe's 300 s tolerance however long the run is.
    build_started = time.perf_counter()
    signed = lambda bodies: [(b, events.sign(b, args.secret, int(time.time()))) for b in bodies]  # noqa: E731
    prefixes = {name: f"{args.prefix}{n}" for n, name in enumerate(names)}
    warm = {name: events.bodies(f"{prefixes[name]}w", args.warmup) for name in names}
    per_round = [args.requests // rounds + (1 if r < args.requests % rounds else 0) for r in range(rounds)]
    items = {name: [events.bodies(f"{prefixes[name]}m{r}", count) for r, count in enumerate(per_round)]
             for name in names}
    built = time.perf_counter() - build_started
    segments: dict[str, list[Segment]] = {name: [] for name in names}
    cpu: dict[str, list[float] | None] = {name: [0.0, 0.0] if args.pids.get(name) else None for name in names}
    busy: dict[str, list[float]] = {name: [0.0, 0.0] for name in names}
    windows: dict[str, list[list[float]]] = {name: [] for name in names}
    own = own_cpu()
    for r in range(rounds):
        for name in names:
            url, pid = args.targets[name], args.pids.get(name)
            _signal_helpers(args.pauses, name)
            if r == 0 and warm[name]:
                await closed_loop(url, signed(warm[name]), args.concurrency, 10.0, min(30.0, args.max_seconds))
            batch = signed(items[name][r])
            with heap.frozen():  # this process's own full collections (71 ms) would count as the target's latency
                cpu0, machine0, wall0 = proc_cpu(pid), machine_cpu(), time.time()
                if args.mode == "closed":
                    seg = await closed_loop(url, batch, args.concurrency, args.phase_seconds / rounds, args.max_seconds)
                else:
                    seg = await open_loop(url, batch, args.rate, args.connections, args.max_seconds)
                cpu1, machine1 = proc_cpu(pid), machine_cpu()
            windows[name].append([wall0, time.time()])
            segments[name].append(seg)
            total = cpu[name]
            if total is not None and cpu0 is not None and cpu1 is not None:
                total[0] += cpu1[0] - cpu0[0]
                total[1] += cpu1[1] - cpu0[1]
            busy[name][0] += machine1[0] - machine0[0]
            busy[name][1] += machine1[1] - machine0[1]
    body_bytes = [len(b) for rounds_items in items.values() for seg_items in rounds_items for b in seg_items]
    return {
        "mode": args.mode,
        "concurrency": args.concurrency if args.mode == "closed" else None,
        "connections": args.connections if args.mode == "open" else None,
        "rate_target": args.rate if args.mode == "open" else None,
        "rounds": rounds,
        "requests": args.requests,
        "warmup": args.warmup,
        "body_bytes": round(sum(body_bytes) / len(body_bytes)),
        "build_seconds": round(built, 2),
        "loadgen_cpu_seconds": round(own_cpu() - own, 2),
        "targets": {
            name: {"prefix": f"{prefixes[name]}m", "url": args.targets[name],
                   **aggregate(segments[name], _pair_of(cpu[name]), busy[name][0] / max(1.0, busy[name][1]),
                               windows[name])}
            for name in names
        },
    }


def _pair_of(values: list[float] | None) -> tuple[float, float] | None:
    return (values[0], values[1]) if values is not None else None


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        result = asyncio.run(run(args))
    finally:
        _signal_helpers(args.pauses, None)  # a helper is never left stopped
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
