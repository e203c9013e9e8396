"""The two load generators.

- `closed_loop`: asyncio + aiohttp in the harness's own process. C connections share one source of chains
  of requests; each sends a chain's requests one after the other (the next once the previous is answered),
  so one customer's events arrive in order while C chains are in flight. Bounded by the source, by
  `seconds` (no new chain after it) and by `max_seconds` (what is still in flight is abandoned).
- `wrk`: C, little CPU of its own, driven by a Lua script over pre-signed requests: each wrk thread sends
  its own share once (no event repeats) and stops when every one of them is answered. On 2 shared cores a
  Python generator takes CPU that a CPU-bound reference would otherwise use; wrk takes far less.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shlex
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

Request = tuple[str, bytes, dict[str, str]]  # url, body, headers
WEBHOOK_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
}


@dataclass
class Outcome:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of 2xx answers, seconds
    seconds: float = 0.0
    completed: list[Any] = field(default_factory=list)  # keys of chains whose every request got a 2xx

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else None


async def _closed(
    chains: Iterable[tuple[Any, list[Request]]],
    concurrency: int,
    seconds: float,
    max_seconds: float,
    admit: Callable[[], Awaitable[None]] | None,
) -> Outcome:
    out = Outcome()
    source = iter(chains)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            for key, chain in source:  # one shared iterator: each chain is sent once
                if admit is not None:
                    await admit()
                if time.perf_counter() > deadline:
                    return
                good = True
                for url, body, headers in chain:
                    sent = time.perf_counter()
                    try:
                        async with session.post(url, data=body, headers=headers) as response:
                            await response.read()
                            status: int | str = response.status
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        status = type(exc).__name__
                    out.statuses[str(status)] += 1
                    if isinstance(status, int) and 200 <= status < 300:
                        out.latencies.append(time.perf_counter() - sent)
                    else:
                        good = False
                if good:
                    out.completed.append(key)

        started = time.perf_counter()
        deadline = started + seconds
        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        _, late = await asyncio.wait(tasks, timeout=max_seconds)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        out.seconds = time.perf_counter() - started
    return out


def closed_loop(
    chains: Iterable[tuple[Any, list[Request]]],
    concurrency: int,
    seconds: float = 600.0,
    max_seconds: float = 900.0,
    admit: Callable[[], Awaitable[None]] | None = None,
) -> Outcome:
    """Run the closed loop to its end. The harness's own garbage collector is held off meanwhile: a full
    collection of the bodies it holds would count as the server's latency."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return asyncio.run(_closed(chains, concurrency, seconds, max_seconds, admit))
    finally:
        gc.enable()
        gc.unfreeze()


def singles(requests: Iterable[Request]) -> Iterable[tuple[Any, list[Request]]]:
    return ((n, [request]) for n, request in enumerate(requests))


LUA = Path(__file__).with_name("wrk.lua")  # what each wrk thread runs


def wrk(
    url: str,
    requests: list[tuple[bytes, dict[str, str]]],
    workdir: Path,
    *,
    threads: int = 2,
    connections: int = 16,
    rounds: int = 1,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """POST every (body, headers) to `url` with wrk, `rounds` times each (1: once); 2xx answers per second from
    the first send to the last answer, as the threads measure them."""
    folder = workdir / "wrk"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("done.*"):
        old.unlink()
    host, path = url.removeprefix("http://").split("/", 1)
    for t in range(threads):
        with open(folder / f"requests.{t}", "wb") as out:
            for body, headers in requests[t::threads]:
                head = "".join(f"{k}: {v}\r\n" for k, v in {**WEBHOOK_HEADERS, **headers}.items())
                raw = (
                    f"POST /{path} HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                out.write(f"{len(raw)}\n".encode() + raw)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{int(timeout)}s",
        "-s",
        str(LUA),
        url,
        "--",
        str(folder),
        str(rounds),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder)
    try:
        deadline = time.monotonic() + timeout
        while len(list(folder.glob("done.*"))) < threads and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # wrk's main thread would sleep out -d; SIGINT ends it now
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in range(threads):
            (folder / f"requests.{t}").unlink(missing_ok=True)
    found = [json.loads(text[6:]) for text in output.splitlines() if text.startswith("BENCH ")]
    if not found or not all(p["last"] and p["answered"] >= p["sent"] for p in found[0]):
        raise RuntimeError(f"wrk did not get every answer within {timeout:.0f} s:\n{output[-2000:]}")
    ok, seconds = (
        sum(p["ok"] for p in found[0]),
        max(p["last"] for p in found[0]) - min(p["first"] for p in found[0] if p["first"]),
    )
    return {
        "ok": ok,
        "sent": sum(p["sent"] for p in found[0]),
        "seconds": round(seconds, 3),
        "rate": round(ok / seconds, 1),
        "command": shlex.join(
            [*command[:3], "-s", "bench/wrk.lua", re.sub(r":\d+/", ":PORT/", url), "--", "DIR", str(rounds)]
        ),
    }
