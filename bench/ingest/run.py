"""The ingest benchmark, end to end: `python -m bench.ingest [--requests N] [--concurrency C] …`.

1. a fresh PostgreSQL database (`credits_bench_<random>`), migrated to head; dropped at the end;
2. two servers, each its own process with the same uvicorn settings: the real service
   (bench/ingest/server.py) and the minimal verify-only handler (bench/ingest/reference.py); beside the
   service, as in production, its inbox worker `credits worker` (a process of its own, same environment),
   which processes what the API's bounded inline queue (webhooks/inline.py) leaves pending;
3. the load generator (bench/ingest/loadgen.py, its own process), one target after the other: a closed loop
   (C connections; the two targets take turns twice), then an open loop at a fixed rate; the worker is
   paused (SIGSTOP/SIGCONT) while the reference takes its turns, so it cannot take the reference's CPU;
4. after each of the service's phases: every accepted event is a row, and the backlog drains to `processed`
   (inline threads and worker); the API's and the worker's CPU from the start of the load until drained;
5. pgbench inserting the same payload with the same concurrency — the database's own limit;
6. diagnostics, each with a server of its own: the ingest path alone (processing deferred, no worker running;
   taking turns with the reference, in the closed loop and in the open loop), the processing alone (that backlog drained by a worker process), and the
   service with its default INFO logs (taking turns with the measured service; a worker beside them);
7. py-spy profiles of the service (its worker beside it), then of the reference, under the same closed-loop
   load (separate phases, not among the figures).

Every child process is terminated in a `finally`; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg

from bench import invocation
from bench.ingest import pgbench, profile, report
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CREDITS = Path(PYTHON).parent / "credits"  # the service's own command, as installed beside this python
DEFAULT_ADMIN_URL = "postgresql://root@127.0.0.1:5432/test"


# ---------------------------------------------------------------------------------------------- processes


class Child:
    """A child process we started (its own session), with its output in a file; stopped by its pid."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.command = name, command
        self.log_path = logdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu(self) -> float | None:
        """CPU seconds (user + system, all threads, its own processes' too) used so far; None once it has exited."""
        from bench.ingest.loadgen import tree_cpu

        return tree_cpu(self.pid) if self.alive() else None

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGCONT)  # a paused worker (its processes too) must see its SIGTERM
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def tail(self, lines: int = 15) -> str:
        with suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_logged(child: Child, text: str, timeout: float = 30.0, times: int = 1) -> None:
    """Until `text` appears `times` times in the child's log (e.g. the worker's `worker.started`, once a
    process); bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")
        with suppress(OSError):
            if child.log_path.read_text(errors="replace").count(text) >= times:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not log {text!r} within {timeout:.0f} s:\n{child.tail()}")


def log_events(child: Child) -> tuple[int, int, int]:
    """(events handled, lines, bytes) in the child's JSON log so far: `event.handled` is logged once per event
    its processing finished (at INFO, the worker's only level)."""
    handled = lines = 0
    with suppress(OSError), open(child.log_path, "rb") as f:
        for line in f:
            lines += 1
            if b'"event.handled"' in line:
                with suppress(ValueError):
                    handled += json.loads(line).get("event") == "event.handled"
    return handled, lines, child.log_path.stat().st_size if child.log_path.exists() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(child: Child, port: int, path: str | None, timeout: float = 30.0) -> None:
    """Until the port answers (and `path` returns 200, when given); bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")
        try:
            if path is None:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            else:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                    if response.status == 200:
                        return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not answer on 127.0.0.1:{port} within {timeout:.0f} s:\n{child.tail()}")


def service_env(url: str) -> dict[str, str]:
    """The environment of every service process of a run (API, worker, CLI): this tree's code first on the
    path (the venv's editable install may point at another checkout), a fresh webhook secret and tokens,
    the shipped catalogue, JSON logs, and a Stripe API base where nothing answers — no event may need a call."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "DATABASE_URL": url,
        "STRIPE_WEBHOOK_SECRET": f"whsec_bench_{secrets.token_hex(16)}",
        "STRIPE_API_KEY": "sk_test_bench",
        "STRIPE_API_BASE": "http://127.0.0.1:9",  # nothing may leave the machine; the events need no look-up
        "CREDITS_API_TOKEN": secrets.token_urlsafe(24),
        "CREDITS_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "CREDITS_CONFIG": str(ROOT / "credits.toml"),
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }


def start_server(name: str, module: str, extra: list[str], ready: str | None, env: dict[str, str], workdir: Path,
                 children: list[Child]) -> tuple[Child, str]:
    """`python -m module --port P …` on a free port, added to `children` (so the caller's `finally` stops it)
    and answering (on `ready`, when given); returns it with its webhook URL."""
    port = free_port()
    child = Child(name, [PYTHON, "-m", module, "--port", str(port), *extra], env, workdir)
    children.append(child)
    wait_listening(child, port, ready)
    return child, f"http://127.0.0.1:{port}/webhooks/stripe"


def start_service_worker(name: str, env: dict[str, str], workdir: Path, children: list[Child]) -> Child:
    """`credits worker` beside the service, as in production: same environment, and awaited until each of its
    processes has started; it has no log-level option, so it logs at INFO, and its stderr (with stdout) goes
    to $WORKDIR/<name>.log."""
    if not CREDITS.exists():
        raise RuntimeError(f"{CREDITS} is missing (make install)")
    child = Child(name, [str(CREDITS), "worker"], env, workdir)
    children.append(child)
    processes = int(env.get("WORKER_PROCESSES", Settings.model_fields["worker_processes"].default))
    wait_logged(child, '"worker.started"', times=processes)  # each of its processes
    return child


# ---------------------------------------------------------------------------------------------- database


def conninfo(url: str) -> dict[str, Any]:
    info = psycopg.conninfo.conninfo_to_dict(url.replace("postgresql+psycopg://", "postgresql://"))
    return {"host": info.get("host", "127.0.0.1"), "port": int(info.get("port", 5432)),
            "user": info.get("user", "root"), "dbname": info.get("dbname", "test")}


def create_database(admin: dict[str, Any]) -> str:
    name = f"credits_bench_{secrets.token_hex(4)}"
    with psycopg.connect(autocommit=True, **admin) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(admin: dict[str, Any], name: str) -> None:
    with psycopg.connect(autocommit=True, **admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stage:
    """What one benchmark run holds until it ends: its folder, its processes and its database."""

    def __init__(self, admin: dict[str, Any], workdir: Path) -> None:
        self.admin, self.workdir = admin, workdir
        self.children: list[Child] = []
        self.dbname: str | None = None

    def database(self) -> tuple[dict[str, Any], str]:
        """A fresh database for the run, dropped at its end: its connection parameters and its URL."""
        self.dbname = create_database(self.admin)
        db = {**self.admin, "dbname": self.dbname}
        return db, f"postgresql+psycopg://{db['user']}@{db['host']}:{db['port']}/{self.dbname}"


@contextmanager
def staged(admin: dict[str, Any], prefix: str) -> Iterator[Stage]:
    """A run's Stage; at the end, error or SIGTERM (raised like Ctrl-C meanwhile), its processes are stopped,
    last started first, and its database dropped."""
    previous_handler = signal.signal(signal.SIGTERM, invocation.raise_on_sigterm)
    stage = Stage(admin, Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield stage
    finally:
        for child in reversed(stage.children):
            child.stop()
        if stage.dbname:
            with suppress(Exception):
                drop_database(admin, stage.dbname)
        signal.signal(signal.SIGTERM, previous_handler)


def migrate(url: str) -> None:
    from service.db import make_engine
    from service.migrate import upgrade

    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def inbox_state(db: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Rows of one phase's events by status, with the first/last receipt and the last processing time."""
    with psycopg.connect(autocommit=True, **db) as conn:
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM stripe_events WHERE id LIKE %s GROUP BY status", (f"evt_{prefix}%",)
        ).fetchall())
        first, last, processed = conn.execute(
            "SELECT min(received_at), max(received_at), max(processed_at) FROM stripe_events WHERE id LIKE %s",
            (f"evt_{prefix}%",),
        ).fetchone()  # type: ignore[misc]
        grants = conn.execute(
            "SELECT count(*) FROM ledger_entries WHERE idempotency_key LIKE %s AND kind = 'grant'", (f"invoice:in_{prefix}%",)
        ).fetchone()[0]  # type: ignore[index]
    return {"rows": sum(statuses.values()), "statuses": statuses, "first_received": first, "last_received": last,
            "last_processed": processed, "grants": grants}


def busy_seconds(db: dict[str, Any], prefix: str, windows: list[list[float]]) -> float | None:
    """Seconds the service side (API and worker) spent on one phase's events: its own turns of load (`windows`,
    wall-clock from the load generator), plus, after each turn, the time until the last processing that
    started before its next turn (or, after the last turn, the drain). While another target takes its turn
    the worker is paused; the API's inline threads may still finish their queue, and that time counts."""
    if not windows:
        return None
    with psycopg.connect(autocommit=True, **db) as conn:
        times = [row[0].timestamp() for row in conn.execute(
            "SELECT processed_at FROM stripe_events WHERE id LIKE %s AND processed_at IS NOT NULL ORDER BY 1",
            (f"evt_{prefix}%",),
        )]
    if not times:
        return None
    spans = sorted(windows)
    total = sum(end - start for start, end in spans)
    for i, (_, end) in enumerate(spans):
        following = spans[i + 1][0] if i + 1 < len(spans) else float("inf")
        in_gap = [t for t in times if end <= t < following]
        if in_gap:
            total += in_gap[-1] - end
    return total


def wait_drained(db: dict[str, Any], prefix: str, accepted: int, timeout: float,
                 windows: list[list[float]] | None = None) -> dict[str, Any]:
    """Durability and drain of one phase: rows == accepted, then (bounded) wait until none is pending."""
    load_ended = time.monotonic()
    state = inbox_state(db, prefix)
    backlog_at_end = state["statuses"].get("pending", 0) + state["statuses"].get("failed", 0)
    deadline = load_ended + timeout
    while time.monotonic() < deadline:
        if state["statuses"].get("pending", 0) + state["statuses"].get("failed", 0) == 0:
            break
        time.sleep(0.25)
        state = inbox_state(db, prefix)
    waited = time.monotonic() - load_ended
    statuses = state["statuses"]
    drained = statuses.get("pending", 0) + statuses.get("failed", 0) == 0
    span = busy_seconds(db, prefix, windows or []) if state["last_processed"] else None
    after = (state["last_processed"] - state["last_received"]).total_seconds() if state["last_processed"] else None
    return {
        "accepted": accepted,
        "rows": state["rows"],
        "rows_equal_accepted": state["rows"] == accepted,
        "statuses": statuses,
        "processed": statuses.get("processed", 0),
        "plan_grants": state["grants"],
        "backlog_at_load_end": backlog_at_end,
        "drained": drained,
        "drain_wait_seconds": round(waited, 2),
        "drain_timeout_seconds": timeout,
        # the service's turns plus the processing after them (see busy_seconds), from the inbox's timestamps
        "end_to_end_seconds": round(span, 2) if span is not None else None,
        "end_to_end_events_per_s": round(statuses.get("processed", 0) / span, 1) if span else None,
        "processing_after_last_receipt_seconds": round(after, 2) if after is not None else None,
    }


# ---------------------------------------------------------------------------------------------- machine


def machine(db: dict[str, Any]) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    with psycopg.connect(autocommit=True, **db) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                    for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections")}
    have = lambda module: subprocess.run([PYTHON, "-c", f"import {module}"], capture_output=True).returncode == 0  # noqa: E731
    versions = {}
    for dist in ("uvicorn", "fastapi", "starlette", "stripe", "sqlalchemy", "psycopg", "structlog", "aiohttp", "py-spy"):
        with suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "postgresql": version,
        "postgresql_settings": settings,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "uvicorn_loop": "uvloop" if have("uvloop") else "asyncio",
        "uvicorn_http": "httptools" if have("httptools") else "h11",
        "versions": versions,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# ---------------------------------------------------------------------------------------------- load


def shown(command: list[str]) -> str:
    """A command as the README shows it (the venv's python, paths relative to the repository)."""
    parts = [".venv/bin/python" if part == PYTHON else part.replace(str(ROOT) + "/", "") for part in command]
    return shlex.join(parts)


def loadgen(targets: dict[str, tuple[Child, str]], secret: str, prefix: str, args: argparse.Namespace, *, mode: str,
            requests: int, rounds: int = 1, warmup: int | None = None, phase_seconds: float | None = None,
            pause: dict[str, Child] | None = None) -> dict[str, Any]:
    """Run the load generator process against `targets` (name → (server, url)), in that order; `pause`
    (target name → helper process) runs each helper only during its own target's turns."""
    command = [PYTHON, "-m", "bench.ingest.loadgen"]
    for name, (child, url) in targets.items():
        command += ["--target", f"{name}={url}", "--pid", f"{name}={child.pid}"]
    for name, helper in (pause or {}).items():
        command += ["--pause", f"{name}={helper.pid}"]
    command += ["--mode", mode, "--requests", str(requests), "--concurrency", str(args.concurrency),
                "--rounds", str(rounds), "--warmup", str(args.warmup if warmup is None else warmup),
                "--prefix", prefix, "--phase-seconds", str(phase_seconds or args.phase_seconds),
                "--max-seconds", str(args.max_seconds)]
    if mode == "open":
        command += ["--rate", str(args.rate)]
    budget = len(targets) * (rounds * (args.max_seconds + 5) + 35) + 60
    try:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "STRIPE_WEBHOOK_SECRET": secret},
                              capture_output=True, text=True, timeout=budget, check=False)
    finally:
        for helper in (pause or {}).values():  # never left stopped, even if the generator was killed
            with suppress(ProcessLookupError):
                os.killpg(helper.pid, signal.SIGCONT)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = "STRIPE_WEBHOOK_SECRET=… " + shown(command)
    for name, (child, _) in targets.items():
        if not child.alive():
            raise RuntimeError(f"{child.name} died under load:\n{child.tail()}")
    return result


def idle_cpu(seconds: float = 2.0) -> float:
    """How busy the machine is before we start anything (other tenants), as a fraction of all cores."""
    from bench.ingest.loadgen import machine_cpu

    before = machine_cpu()
    time.sleep(seconds)
    after = machine_cpu()
    return round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--requests", type=int, default=5000,
                        help="events per target in the closed loop (default 5000), capped by --phase-seconds")
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="connections (and pgbench clients), default 32")
    parser.add_argument("--phase-seconds", type=float, default=16.0,
                        help="closed loop: per target, no new request after this long (default 16 s)")
    parser.add_argument("--rounds", type=int, default=2, help="closed loop: the targets take turns this many times")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop rate, requests/s (default 500)")
    parser.add_argument("--rate-seconds", type=float, default=3.0, help="open-loop sending time per target (default 3 s)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests per target before the closed loop")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="longest wait for a backlog to be processed after a load (s), default 120")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="hard limit of one stretch of load (s)")
    parser.add_argument("--diagnostic-seconds", type=float, default=8.0,
                        help="length of each diagnostic phase (ingest alone, processing alone, INFO logs); 0 skips them")
    parser.add_argument("--profile-seconds", type=float, default=10.0,
                        help="length of the py-spy phase (0: no profile; skipped when py-spy is missing)")
    parser.add_argument("--log-level", default="warning", help="structlog level of the measured service (default warning)")
    parser.add_argument("--admin-url", default=os.environ.get("BENCH_ADMIN_DATABASE_URL", DEFAULT_ADMIN_URL),
                        help="PostgreSQL URL used to create/drop the bench database (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.requests <= 100_000 or not 0 < args.concurrency <= 256 or not 0 < args.rate <= 5000:
        parser.error("requests, concurrency or rate out of range")
    if not 1 <= args.rounds <= 5 or not 0 < args.phase_seconds <= 120 or not 0 < args.rate_seconds <= 30:
        parser.error("rounds or durations out of range")
    if not 0 < args.drain_timeout <= 300 or not 0 < args.max_seconds <= 120:
        parser.error("durations out of range")
    if not 0 <= args.diagnostic_seconds <= 60 or not 0 <= args.profile_seconds <= 60:
        parser.error("durations out of range")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = time.monotonic()
    admin = conninfo(args.admin_url)
    with staged(admin, "credits-bench-") as stage:
        workdir, children = stage.workdir, stage.children
        results: dict[str, Any] = invocation.header(args, parse, "bench.ingest", workdir)
        say = invocation.progress("bench.ingest", clock)
        results["machine"] = machine(admin)
        results["machine"]["cpu_busy_before_start"] = idle_cpu()
        db, url = stage.database()
        dbname = db["dbname"]
        migrate(url)
        results["database"] = dbname
        env = service_env(url)
        secret = env["STRIPE_WEBHOOK_SECRET"]

        def start(name: str, module: str, extra: list[str], ready: str | None) -> tuple[Child, str]:
            return start_server(name, module, extra, ready, env, workdir, children)

        def drain(name: str, target: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
            wait = args.drain_timeout if timeout is None else timeout
            state = wait_drained(db, target["prefix"], target["accepted"], wait, target.get("windows"))
            say(f"  {name}: rows {state['rows']} / accepted {state['accepted']}, processed {state['processed']}, "
                f"{'drained' if state['drained'] else 'NOT drained'} {state['drain_wait_seconds']} s after the load")
            return state

        def start_worker(name: str) -> Child:
            return start_service_worker(name, env, workdir, children)

        def costs_before(api: Child, worker: Child) -> dict[str, Any]:
            return {"api": api.cpu(), "worker": worker.cpu(), "log": log_events(worker)}

        def side_costs(target: dict[str, Any], api: Child, worker: Child, before: dict[str, Any]) -> dict[str, Any]:
            """The API's and the worker's CPU from just before the load until the backlog was processed, per
            event stored in that time (the measured events and the target's warm-up)."""
            api_cpu, worker_cpu = api.cpu(), worker.cpu()
            if None in (api_cpu, worker_cpu, before["api"], before["worker"]):
                return {}
            api_cpu, worker_cpu = api_cpu - before["api"], worker_cpu - before["worker"]
            handled, lines, size = (now - then for now, then in zip(log_events(worker), before["log"]))
            stem = target["prefix"][:-1]  # evt_<stem>w… (warm-up) and evt_<stem>m… (measured)
            with psycopg.connect(autocommit=True, **db) as conn:
                stored = conn.execute("SELECT count(*) FROM stripe_events WHERE id LIKE %s",
                                      (f"evt_{stem}%",)).fetchone()[0]  # type: ignore[index]
            per = lambda cpu, n: round(1000 * cpu / n, 2) if n else None  # noqa: E731
            return {
                "events_in_window": stored,
                "api_cpu_seconds_to_drained": round(api_cpu, 2),
                "worker_cpu_seconds": round(worker_cpu, 2),
                "api_cpu_ms_per_event_to_drained": per(api_cpu, stored),
                "worker_cpu_ms_per_event": per(worker_cpu, stored),
                "total_cpu_ms_per_event": per(api_cpu + worker_cpu, stored),
                "worker_processed": handled,
                "worker_cpu_ms_per_processed_event": per(worker_cpu, handled),
                "worker_log_lines_per_processed_event": round(lines / handled, 1) if handled else None,
                "worker_log_bytes_per_processed_event": round(size / handled) if handled else None,
            }

        service_args = ["--log-level", args.log_level]
        service = start("service", "bench.ingest.server", service_args, "/readyz")
        reference = start("reference", "bench.ingest.reference", [], None)
        results["servers"] = {
            "service": shown([PYTHON, "-m", "bench.ingest.server", "--port", "PORT", *service_args]),
            "worker": shown([str(CREDITS), "worker"]),
            "worker_log": "$WORKDIR/worker.log",
            "reference": shown([PYTHON, "-m", "bench.ingest.reference", "--port", "PORT"]),
            "environment": "DATABASE_URL=<bench db> STRIPE_WEBHOOK_SECRET=<random> CREDITS_API_TOKEN=<random> "
                           "CREDITS_ADMIN_TOKEN=<random, different> CREDITS_CONFIG=credits.toml LOG_FORMAT=json "
                           "STRIPE_API_BASE=http://127.0.0.1:9",
        }
        run_id = secrets.token_hex(2)
        durability: dict[str, Any] = {}
        both = {"reference": reference, "service": service}

        worker = start_worker("worker")
        try:
            say(f"closed loop, {args.concurrency} connections, {args.requests} events per target (at most "
                f"{args.phase_seconds:g} s each), {args.rounds} rounds; the worker beside the service …")
            before = costs_before(service[0], worker)
            results["closed"] = loadgen(both, secret, f"{run_id}c", args, mode="closed", requests=args.requests,
                                        rounds=args.rounds, pause={"service": worker})
            target = results["closed"]["targets"]["service"]
            durability["closed"] = drain("service (closed loop)", target)
            target.update(side_costs(target, service[0], worker, before))

            rate_requests = int(args.rate * args.rate_seconds)
            say(f"open loop, {args.rate:g} requests/s for {args.rate_seconds:g} s per target …")
            before = costs_before(service[0], worker)
            results["open"] = loadgen(both, secret, f"{run_id}o", args, mode="open", requests=rate_requests,
                                      warmup=0, pause={"service": worker})
            target = results["open"]["targets"]["service"]
            durability["open"] = drain("service (open loop)", target)
            target.update(side_costs(target, service[0], worker, before))
        finally:
            worker.stop()  # SIGTERM, wait, then kill; the diagnostics below need the inbox left alone

        say("pgbench …")
        from bench.ingest import events  # the same payload shape as the load generator's

        payload = events.body(events.event(f"{run_id}pg", 0))
        results["pgbench"] = pgbench.run(db, workdir, payload, args.requests, args.concurrency)
        results["pgbench"]["command"] = results["pgbench"]["command"].replace(str(workdir), "$WORKDIR")

        diagnostics: dict[str, Any] = {}
        if args.diagnostic_seconds:
            say(f"diagnostic: the ingest path alone (processing deferred) and the reference, taking turns, "
                f"{args.diagnostic_seconds:g} s each …")
            deferred = start("service-deferred", "bench.ingest.server", [*service_args, "--defer-processing"], "/readyz")
            load = loadgen({"reference": reference, "ingest_only": deferred}, secret, f"{run_id}d", args,
                           mode="closed", requests=args.requests, rounds=args.rounds,
                           phase_seconds=args.diagnostic_seconds)
            diagnostics["ingest_only"] = {**load["targets"]["ingest_only"], "command": load["command"],
                                          "reference": load["targets"]["reference"],
                                          "server": shown([PYTHON, "-m", "bench.ingest.server", "--port", "PORT",
                                                           *service_args, "--defer-processing"])}
            say(f"diagnostic: the ingest path alone and the reference, open loop, {args.rate:g} requests/s for "
                f"{args.rate_seconds:g} s each …")
            load = loadgen({"reference": reference, "ingest_only": deferred}, secret, f"{run_id}e", args, mode="open",
                           requests=int(args.rate * args.rate_seconds), warmup=0)
            deferred[0].stop()
            diagnostics["ingest_only_open"] = {**load["targets"]["ingest_only"], "command": load["command"],
                                               "reference": load["targets"]["reference"]}
            say(f"diagnostic: the processing alone (a worker drains that backlog), at most {args.diagnostic_seconds:g} s …")
            command = [PYTHON, "-m", "bench.ingest.drain", "--log-level", args.log_level,
                       "--max-seconds", str(args.diagnostic_seconds)]
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=args.diagnostic_seconds + 60, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"drain failed ({done.returncode}):\n{done.stderr[-2000:]}")
            diagnostics["processing_alone"] = {**json.loads(done.stdout.strip().splitlines()[-1]), "command": shown(command)}

            say(f"diagnostic: the service with its default INFO logs and at {args.log_level.upper()}, taking turns, "
                f"{args.diagnostic_seconds:g} s each, a worker beside them …")
            info = start("service-info-logs", "bench.ingest.server", ["--log-level", "info"], "/readyz")
            worker = start_worker("worker-2")
            try:
                load = loadgen({"service": service, "info_logs": info}, secret, f"{run_id}i", args, mode="closed",
                               requests=args.requests, rounds=args.rounds, phase_seconds=args.diagnostic_seconds)
                target = load["targets"]["info_logs"]
                # Stored = accepted is checked; the processing is not awaited (this phase measures logging's
                # cost, and its ~10k events would keep the worker busy for minutes): the worker goes on with it.
                durability["info_logs"] = drain("service (INFO logs), processing not awaited", target, timeout=0)
            finally:
                worker.stop()
            info[0].stop()
            lines = info[0].log_path.read_text(errors="replace").count("\n")
            events_logged = target["accepted"] + args.warmup
            diagnostics["info_logs"] = {**target, "command": load["command"], "warning": load["targets"]["service"],
                                        "server": shown([PYTHON, "-m", "bench.ingest.server", "--port", "PORT",
                                                         "--log-level", "info"]),
                                        "log_lines_per_event": round(lines / max(1, events_logged), 1),
                                        "log_bytes_per_event": round(info[0].log_path.stat().st_size / max(1, events_logged))}
        results["diagnostics"] = diagnostics

        results["profile"] = None
        if args.profile_seconds and profile.find_py_spy():
            say(f"profiling the service with py-spy under the closed loop, {args.profile_seconds:g} s, a worker "
                "beside it …")
            raw = workdir / "service.pyspy.txt"
            worker = start_worker("worker-3")
            try:
                with profile.Recorder(service[0].pid, raw) as recorder:
                    load = loadgen({"service": service}, secret, f"{run_id}p", args, mode="closed",
                                   requests=args.requests, warmup=0, phase_seconds=args.profile_seconds)
                    state = wait_drained(db, load["targets"]["service"]["prefix"], load["targets"]["service"]["accepted"],
                                         args.drain_timeout, load["targets"]["service"]["windows"])
            finally:
                worker.stop()
            summary = profile.summarise(raw) if raw.exists() else {"error": recorder.log.read_text(errors="replace")}
            summary.update(command=shown(recorder.command).replace(str(raw), "$WORKDIR/service.pyspy.txt"),
                           load=load, drain=state, sampler=profile.sampler_stats(recorder.log))
            results["profile"] = summary

            seconds = max(1.0, args.profile_seconds / 2)
            say(f"profiling the reference with py-spy under the closed loop, {seconds:g} s …")
            raw = workdir / "reference.pyspy.txt"
            with profile.Recorder(reference[0].pid, raw) as recorder:
                load = loadgen({"reference": reference}, secret, f"{run_id}q", args, mode="closed",
                               requests=args.requests, warmup=0, phase_seconds=seconds)
            summary = profile.summarise(raw) if raw.exists() else {"error": recorder.log.read_text(errors="replace")}
            summary.update(command=shown(recorder.command).replace(str(raw), "$WORKDIR/reference.pyspy.txt"),
                           load=load, sampler=profile.sampler_stats(recorder.log))
            results["profile_reference"] = summary
        elif args.profile_seconds:
            results["profile"] = {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}

        results["durability"] = durability
        results["service_log_bytes"] = service[0].log_path.stat().st_size
    return invocation.finished(results, clock, report)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return invocation.main(argv, parse, run, report)
