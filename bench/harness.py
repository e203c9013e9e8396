"""What every benchmark shares: the checkout it measures, a throwaway database, the service's processes and
the helpers' (each in a process group of its own, stopped at the end whatever happens), CPU readings, pgbench,
the machine's figures and the tables.

The service is reached only through its command line (`<checkout>/.venv/bin/credits`), HTTP and PostgreSQL,
so one harness measures any checkout: `--checkout DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
Rows = list[dict[str, Any]]
R = TypeVar("R")


def arguments(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes; each adds its sizes."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout to measure (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="`credits worker` processes to start (default 2)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every service process (repeatable), e.g. WORKER_THREADS=8",
    )
    parser.add_argument(
        "--admin-url",
        default="postgresql://root@127.0.0.1:5432/test",
        help="where the throwaway database is created and dropped (default %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    return parser


def command_of(module: str, args: argparse.Namespace, parse: Callable[[list[str]], argparse.Namespace]) -> str:
    """The command that repeats this run, as typed: `python -m MODULE` and the options not at their default."""
    defaults, out = vars(parse([])), []
    for key, value in vars(args).items():
        if (
            key not in ("json", "admin_url")
            and value != defaults.get(key)
            and not (key == "checkout" and value.resolve() == ROOT)
        ):
            out += [
                part
                for item in (value if isinstance(value, list) else [value])
                for part in (f"--{key.replace('_', '-')}", str(item))
            ]
    return shlex.join(["python", "-m", module, *out])


def standalone(
    parse: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    rows: Callable[[dict[str, Any]], Rows],
) -> None:
    """`python -m bench.<one>`: run it, print its table, save the raw results when `--json` asks."""
    args = parse(None)
    results = run(args)
    print(table(rows(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


class Proc:
    """A process we started in a process group of its own (signalled through it), its output in a file; with
    `nice`, at that niceness. Every process stays in the harness's session: Linux's autogroup scheduling shares
    the CPU between sessions first, and a niceness ranks a process only among those of its own session."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], workdir: Path, nice: int = 0) -> None:
        self.name, self.log = name, workdir / f"{name}.log"
        niced = ["nice", "-n", str(nice), *command] if nice else command
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                niced, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, process_group=0
            )
        self.pid = self.popen.pid

    def cpu(self) -> float:
        """CPU seconds so far of the process and every process under it (a supervisor's children)."""
        return sum(tree_cpu(self.pid).values())

    def signal(self, signum: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)  # a paused worker must see its SIGTERM
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=5)

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


def tree_cpu(pid: int | None) -> dict[tuple[int, int], float]:
    """CPU seconds so far of `pid` and every process under it, keyed by (pid, start time)."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        with suppress(OSError, ValueError):
            stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    found, pending = {}, [pid] if pid in stats else []
    while pending:
        at = pending.pop()
        found[at, int(stats[at][19])] = (int(stats[at][11]) + int(stats[at][12])) / CLK_TCK
        pending += children.get(at, [])
    return found


def cpu_since(before: dict[tuple[int, int], float], after: dict[tuple[int, int], float]) -> float:
    """CPU used between two `tree_cpu` readings by the processes in the second (born between: counted whole)."""
    return sum(value - before.get(key, 0.0) for key, value in after.items())


class Sampled(threading.Thread):
    """`with Sampled(pid) as s: …` then `s.seconds`: CPU used meanwhile by `pid`'s tree, read every 0.25 s, so
    processes that come and go (PostgreSQL's backends for pgbench's clients) count up to their last reading."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.first, self.done = pid, tree_cpu(pid), threading.Event()
        self.last: dict[tuple[int, int], float] = {}
        self.seconds: float | None = None

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.last.update(tree_cpu(self.pid))

    def __enter__(self) -> Sampled:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join()
        self.last.update(tree_cpu(self.pid))
        self.seconds = cpu_since(self.first, self.last) if self.pid else None


def wait_http(proc: Proc, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        with suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout:.0f} s")


def pause(procs: list[Proc], paused: bool) -> None:
    """Stop (SIGSTOP) or continue the processes' groups: the workers sit out the references' turns."""
    for proc in procs:
        proc.signal(signal.SIGSTOP if paused else signal.SIGCONT)


class Run:
    """One benchmark's run, `with Run(args, "ingest") as run:` — its folder, databases and processes; at the end
    (errors and SIGTERM included) the processes are stopped, last first, and the databases dropped."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args, self.name, self.checkout = args, name, args.checkout.resolve()
        self.credits, self.python = (self.checkout / ".venv" / "bin" / exe for exe in ("credits", "python"))
        if not self.credits.exists():
            raise SystemExit(f"{self.credits} is missing: cd {self.checkout} && make install")
        self.procs: list[Proc] = []
        self.databases: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"credits-bench-{name}-"))
        self.secret, self.api_token, self.admin_token = (secrets.token_hex(16) for _ in range(3))
        self.secret = f"whsec_{self.secret}"

    def __enter__(self) -> Run:
        self.previous = signal.signal(signal.SIGTERM, _exit)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for proc in reversed(self.procs):
                proc.stop()
            for name in self.databases:
                with suppress(psycopg.Error), psycopg.connect(self.args.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if exc[0] is None and not os.environ.get("BENCH_KEEP_LOGS"):
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                print(f"[bench] logs kept in {self.workdir}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, self.previous)

    def say(self, text: str) -> None:
        print(f"[bench.{self.name}] {text}", file=sys.stderr, flush=True)

    def database(self) -> str:
        """A fresh database `credits_bench_<random>`, migrated with `credits migrate`: its libpq URL."""
        name = f"credits_bench_{secrets.token_hex(4)}"
        with psycopg.connect(self.args.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        url = psycopg.conninfo.make_conninfo(self.args.admin_url, dbname=name)
        self.cli("migrate", env=self.env(url))
        return url

    def env(self, db: str, **extra: str) -> dict[str, str]:
        """The environment of every service process, `--env` settings last."""
        info = psycopg.conninfo.conninfo_to_dict(db)
        where = f"{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}"
        url = f"postgresql+psycopg://{info.get('user', 'root')}@{where}/{info['dbname']}"
        return {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "DATABASE_URL": url,
            "STRIPE_WEBHOOK_SECRET": self.secret,
            "CREDITS_API_TOKEN": self.api_token,
            "CREDITS_ADMIN_TOKEN": self.admin_token,
            "CREDITS_CONFIG": str(self.checkout / "credits.toml"),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "warning",
            "STRIPE_API_BASE": "http://127.0.0.1:9",
            "STRIPE_API_KEY": "sk_test_bench",
            **extra,
            **dict(pair.split("=", 1) for pair in self.args.env),
        }

    def cli(self, *argv: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.credits), *argv],
            env=env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"credits {argv[0]} exited {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
            )
        return done

    def start(self, name: str, command: list[str], env: dict[str, str], nice: int = 0) -> Proc:
        self.procs.append(Proc(name, command, env, self.workdir, nice))
        return self.procs[-1]

    def serve(self, env: dict[str, str]) -> tuple[Proc, str]:
        """`credits serve` on a free port, with SERVE_WORKER=false (the old code ignores it): the processing is
        the workers', as in production. The process and its base URL."""
        port = free_port()
        proc = self.start(
            "api",
            [str(self.credits), "serve", "--host", "127.0.0.1", "--port", str(port)],
            {**env, "SERVE_WORKER": "false"},
        )
        wait_http(proc, f"http://127.0.0.1:{port}/readyz")
        return proc, f"http://127.0.0.1:{port}"

    def workers(self, env: dict[str, str]) -> list[Proc]:
        """`--workers` `credits worker` processes at niceness 10: on these shared cores that stands in for the API
        having cores of its own in production. Returned once they have
        started and gone quiet (under 5% of a core for half a second): with nothing due they only poll."""
        procs = [
            self.start(f"worker{n}", [str(self.credits), "worker"], env, nice=10) for n in range(self.args.workers)
        ]
        deadline, last = time.monotonic() + 60, -1.0
        while time.monotonic() < deadline:
            for proc in procs:
                proc.check()
            now = sum(proc.cpu() for proc in procs)
            if last >= 0 and now - last < 0.025:
                return procs
            last = now
            time.sleep(0.5)
        raise RuntimeError("the workers did not go quiet within 60 s")

    def helper(self, kind: str, env: dict[str, str]) -> tuple[Proc, str]:
        """bench/servers.py's `minimal` or `floor` app under the checkout's python (its uvicorn and stripe)."""
        port = free_port()
        proc = self.start(
            kind, [str(self.python), "-m", "bench.servers", kind, "--port", str(port)], {**env, "PYTHONPATH": str(ROOT)}
        )
        wait_http(proc, f"http://127.0.0.1:{port}/ready")
        return proc, f"http://127.0.0.1:{port}"


def _exit(*_: object) -> None:
    raise SystemExit(143)  # SIGTERM unwinds like Ctrl-C, through every `finally`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pgbench(
    db: str, script: str, workdir: Path, *, clients: int, limit: list[str], defines: dict[str, object] | None = None
) -> dict[str, Any]:
    """pgbench with the custom `script` (`limit`: ["-t", per client] or ["-T", seconds]): its tps and command."""
    path, info = workdir / "pgbench.sql", psycopg.conninfo.conninfo_to_dict(db)
    path.write_text(script)
    command = [
        "pgbench",
        "-n",
        "-h",
        str(info.get("host", "127.0.0.1")),
        "-p",
        str(info.get("port", 5432)),
        "-U",
        str(info.get("user", "root")),
        "-c",
        str(clients),
        "-j",
        "2",
        *limit,
        *[arg for name, value in (defines or {}).items() for arg in ("-D", f"{name}={value}")],
        "-f",
        str(path),
        str(info["dbname"]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    if done.returncode != 0 or not tps:
        raise RuntimeError(f"pgbench failed ({done.returncode}):\n{done.stdout[-1000:]}{done.stderr[-1000:]}")
    return {
        "tps": float(tps[1]),
        "command": shlex.join(command).replace(str(path), "SCRIPT").replace(str(info["dbname"]), "DB"),
    }


def one(cursor: psycopg.Cursor[R]) -> R:
    """The row of a query that always returns one (an aggregate, SHOW, a function of the session)."""
    found = cursor.fetchone()
    if found is None:
        raise RuntimeError("a query that always returns a row returned none")
    return found


def machine(admin: str, checkout: Path) -> dict[str, Any]:
    """Cores, CPU model, PostgreSQL, date, and the checkout's commit (read-only git)."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        version = one(conn.execute("SHOW server_version"))[0]

    def git(*a: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        return subprocess.run(["git", "-C", str(checkout), *a], capture_output=True, text=True, env=env, check=False)

    dirty = " (with uncommitted changes)" if git("diff", "--quiet", "HEAD").returncode else ""
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "postgresql": version,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "commit": (git("rev-parse", "--short", "HEAD").stdout.strip() or "?") + dirty,
    }


def row(
    figure: str, value: str, reference: str = "", ratio: float | str | None = None, command: str = ""
) -> dict[str, Any]:
    """One line of a benchmark's table; `ratio` a number (shown as 1.23×) or a word (yes, **no**)."""
    return {"figure": figure, "value": value, "reference": reference, "ratio": ratio, "command": command}


def num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    return (f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}") + unit


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def table(rows: Rows, baseline: Rows | None = None, label: str = "baseline") -> str:
    """The rows as Markdown; with `baseline` (an earlier run's rows) its value and ratio beside, by figure."""
    before = {r["figure"]: r for r in baseline or []}
    shown = lambda r: "" if r is None else f"{r:.2f}×" if isinstance(r, float | int) else str(r)  # noqa: E731
    head = [
        "figure",
        "value",
        "reference",
        "ratio",
        *([f"{label}: value", f"{label}: ratio"] if baseline else []),
        "command",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        old = before.get(r["figure"], {})
        cells = [
            r["figure"],
            r["value"],
            r["reference"],
            shown(r["ratio"]),
            *([old.get("value", ""), shown(old.get("ratio"))] if baseline else []),
            f"`{r['command']}`" if r["command"] else "",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
